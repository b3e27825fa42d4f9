"""The executor's models: the MiniLM sentence encoder (fp32 and int8) and a ticket classifier head.

`build_models` writes everything into one directory (`.tracetune/models/` by default), each model
with a JSON metadata file beside it, and reuses what is already there:

- `minilm-fp32.onnx`: all-MiniLM-L6-v2 as one ONNX graph (see `demo.encoder`);
- `minilm-int8.onnx`: its dynamic int8 quantization, with measured agreement to fp32;
- `ticket-classifier.onnx`: a softmax-regression head trained on fp32 embeddings of the generated
  corpus (`demo.corpus`), embeddings [batch, 384] -> probabilities [batch, categories].

`TicketClassifier` chains tokenizer -> encoder -> head for one variant; it is what the pipeline calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracetune.demo import encoder as _encoder
from tracetune.demo.corpus import CATEGORIES, generate
from tracetune.demo.encoder import DIM, ENCODER_FILES, MAX_TOKENS, TOKENIZER_FILE, Encoder, ModelFilesMissing

__all__ = ["build_models", "TicketClassifier", "Encoder", "ModelFilesMissing", "PUBLISHED_SENTENCES",
           "model_paths", "similarities"]

FORMAT = 2  # bump when the files change shape; older metadata then triggers a rebuild
HEAD = "ticket-classifier"
HEAD_FILE = f"{HEAD}.onnx"
# all-MiniLM-L6-v2's model card example; published cosine similarities 0.6660, 0.1046, 0.1411.
PUBLISHED_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
PUBLISHED_SIMILARITIES = {"1-2": 0.6660, "1-3": 0.1046, "2-3": 0.1411}


def model_paths(models_dir: Path) -> dict[str, tuple[Path, Path]]:
    """(model, metadata) paths for each model built into `models_dir`."""
    models_dir = Path(models_dir)
    files = {**ENCODER_FILES, HEAD: HEAD_FILE}
    return {name: (models_dir / file, models_dir / file.replace(".onnx", ".json")) for name, file in files.items()}


def similarities(embeddings: np.ndarray) -> dict[str, float]:
    """Pairwise cosine similarities of the three published sentences' embeddings, keyed "1-2" etc."""
    sim = embeddings @ embeddings.T
    return {"1-2": round(float(sim[0, 1]), 4), "1-3": round(float(sim[0, 2]), 4), "2-3": round(float(sim[1, 2]), 4)}


# ---- building ----------------------------------------------------------------------------------

def _tmp(path: Path) -> Path:
    """A temporary sibling that keeps the suffix (onnx tools look at it); renamed over `path` when done."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _read_meta(model: Path, meta: Path, **expected: Any) -> dict[str, Any] | None:
    """The metadata of a model that is present, current and built with the `expected` settings,
    else None (so it gets rebuilt)."""
    if not (model.is_file() and meta.is_file()):
        return None
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if data.get("format") != FORMAT or any(data.get(k) != v for k, v in expected.items()):
        return None
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Steps:
    """A rich progress display when asked for, and a no-op otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> _Steps:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # stderr: stdout stays clean for the JSON report `tracetune models build` prints.
            self._progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True))
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str, total: int = 1) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n)`; the bar completes when the block ends."""
        if self._progress is None:
            yield lambda n=1: None
            return
        task = self._progress.add_task(description, total=total)
        yield lambda n=1: self._progress.advance(task, n)
        self._progress.update(task, completed=total)


def _build_fp32(models_dir: Path, max_tokens: int, threads: int) -> dict[str, Any]:
    path, meta_path = model_paths(models_dir)["fp32"]
    meta_path.unlink(missing_ok=True)  # no metadata until the new model is in place: a crash means a rebuild
    started = time.perf_counter()
    tmp = _tmp(path)
    config = _encoder.export_fp32(tmp)
    os.replace(tmp, path)
    source = _encoder.weights_dir()
    tokenizer_tmp = _tmp(models_dir / TOKENIZER_FILE)
    shutil.copyfile(source / TOKENIZER_FILE, tokenizer_tmp)
    os.replace(tokenizer_tmp, models_dir / TOKENIZER_FILE)
    encoder = Encoder(models_dir, "fp32", threads=threads, max_tokens=max_tokens)
    meta = {
        "format": FORMAT, "name": "minilm-fp32", "model": _encoder.MODEL_NAME, "variant": "fp32",
        "source": f"{_encoder.WEIGHTS_PACKAGE} (model.safetensors, sha256 {_sha256(source / 'model.safetensors')})",
        "opset": _encoder.OPSET, "dim": DIM, "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"], "max_tokens": max_tokens, "tokenizer": TOKENIZER_FILE,
        "inputs": {"input_ids": "int64 [batch, seq]", "attention_mask": "int64 [batch, seq]"},
        "outputs": {"embeddings": f"float32 [batch, {DIM}], mean-pooled, L2-normalised"},
        "published_similarities": similarities(encoder.encode(PUBLISHED_SENTENCES)),
        "bytes": path.stat().st_size, "build_seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(meta_path, meta)
    return meta


def _agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Mean cosine between the two embeddings of each text, and how often each text's nearest
    neighbour among the others is the same under both."""
    cosine = float(np.mean(np.sum(reference * other, axis=1)))

    def neighbours(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    same = float(np.mean(neighbours(reference) == neighbours(other)))
    return {"mean_cosine": round(cosine, 4), "min_cosine": round(float(np.min(np.sum(reference * other, axis=1))), 4),
            "nearest_neighbour_agreement": round(same, 4), "samples": len(reference)}


def _build_int8(models_dir: Path, max_tokens: int, threads: int, samples: int,
                advance: Callable[[int], None]) -> dict[str, Any]:
    fp32_path, _ = model_paths(models_dir)["fp32"]
    path, meta_path = model_paths(models_dir)["int8"]
    meta_path.unlink(missing_ok=True)  # no metadata until the new model is in place: a crash means a rebuild
    started = time.perf_counter()
    tmp = _tmp(path)
    _encoder.quantize(fp32_path, tmp, models_dir)
    os.replace(tmp, path)
    advance(samples)
    quantize_seconds = time.perf_counter() - started
    texts = [t.text for t in generate(samples, seed=23, typo_rate=0.05)]
    fp32 = Encoder(models_dir, "fp32", threads=threads, max_tokens=max_tokens).encode(texts, advance)
    int8_encoder = Encoder(models_dir, "int8", threads=threads, max_tokens=max_tokens)
    int8 = int8_encoder.encode(texts, advance)
    meta = {
        "format": FORMAT, "name": "minilm-int8", "model": _encoder.MODEL_NAME, "variant": "int8",
        "quantization": "onnxruntime quantize_dynamic, QInt8 weights per channel, uint8 activations",
        "session": {"disabled_optimizers": list(_encoder.INT8_DISABLED_OPTIMIZERS)},
        "opset": _encoder.OPSET, "dim": DIM, "max_tokens": max_tokens, "tokenizer": TOKENIZER_FILE,
        "published_similarities": similarities(int8_encoder.encode(PUBLISHED_SENTENCES)),
        "agreement_with_fp32": _agreement(fp32, int8),
        "bytes": path.stat().st_size, "build_seconds": round(quantize_seconds, 2),
    }
    _write_json(meta_path, meta)
    return meta


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _train(x: np.ndarray, y: np.ndarray, classes: int, epochs: int, l2: float = 1e-4,
           on_epoch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch softmax regression with Adam and a little L2 on the weights; returns (W, b)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (x.shape[1], classes)).astype(np.float32)
    b = np.zeros(classes, dtype=np.float32)
    onehot = np.eye(classes, dtype=np.float32)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    lr, beta1, beta2 = 0.02, 0.9, 0.999
    for epoch in range(1, epochs + 1):
        grad = (_softmax(x @ w + b) - onehot) / len(x)
        grads = [x.T @ grad + l2 * w, grad.sum(axis=0)]
        for i, (param, g) in enumerate(zip((w, b), grads, strict=True)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            param -= lr * (m[i] / (1 - beta1 ** epoch)) / (np.sqrt(v[i] / (1 - beta2 ** epoch)) + 1e-8)
        if on_epoch:
            on_epoch(1)
    return w, b


def _export_head(w: np.ndarray, b: np.ndarray, labels: list[str], path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["embeddings", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        name=HEAD.replace("-", "_"),
        inputs=[helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(labels)])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "W"),
                     numpy_helper.from_array(b.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _encoder.OPSET)],
                              producer_name="tracetune")
    model.ir_version = 8
    helper.set_model_props(model, {"labels": json.dumps(labels)})
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _head_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def confidence_buckets(probs: np.ndarray, y: np.ndarray, edges: Sequence[float] = (0.5, 0.7, 0.9)) -> list[dict]:
    """Accuracy per band of top-class probability: what a confidence cascade's threshold trades."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    bounds = [0.0, *edges, 1.0]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        sel = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        if sel.any():
            out.append({"min_confidence": lo, "max_confidence": hi, "share": round(float(sel.mean()), 4),
                        "accuracy": round(float(correct[sel].mean()), 4)})
    return out


def _build_head(models_dir: Path, max_tokens: int, threads: int, samples: int, epochs: int, seed: int,
                typo_rate: float, steps: _Steps) -> dict[str, Any]:
    path, meta_path = model_paths(models_dir)[HEAD]
    meta_path.unlink(missing_ok=True)  # no metadata until the new model is in place: a crash means a rebuild
    started = time.perf_counter()
    tickets = generate(samples, seed=seed, typo_rate=typo_rate)
    split = int(len(tickets) * 0.8)
    texts = [t.text for t in tickets]
    y = np.array([CATEGORIES.index(t.category) for t in tickets])
    unique = list(dict.fromkeys(texts))  # short tickets repeat; embed each text once
    with steps.step("embedding the corpus (fp32)", len(unique)) as advance:
        vectors = Encoder(models_dir, "fp32", threads=threads, max_tokens=max_tokens).encode(unique, advance)
    row = {text: i for i, text in enumerate(unique)}
    x = vectors[[row[text] for text in texts]]
    with steps.step("training the classifier head", epochs) as advance:
        w, b = _train(x[:split], y[:split], len(CATEGORIES), epochs, on_epoch=advance)
    tmp = _tmp(path)
    _export_head(w, b, list(CATEGORIES), tmp)
    head = _head_session(tmp)
    probs = head.run(["probabilities"], {"embeddings": x[split:]})[0]
    accuracy = float((probs.argmax(axis=1) == y[split:]).mean())
    train_accuracy = float((head.run(["probabilities"], {"embeddings": x[:split]})[0].argmax(axis=1)
                            == y[:split]).mean())
    with steps.step("held-out accuracy (int8)", len(texts) - split) as advance:
        int8 = Encoder(models_dir, "int8", threads=threads, max_tokens=max_tokens).encode(texts[split:], advance)
    probs8 = head.run(["probabilities"], {"embeddings": int8})[0]
    accuracy8 = float((probs8.argmax(axis=1) == y[split:]).mean())
    os.replace(tmp, path)
    meta = {
        "format": FORMAT, "name": HEAD, "labels": list(CATEGORIES), "architecture": "softmax regression",
        "input": f"embeddings float32 [batch, {DIM}] from minilm-fp32", "output": "probabilities float32 [batch, C]",
        "encoder": "minilm", "max_tokens": max_tokens, "opset": _encoder.OPSET,
        "corpus": {"seed": seed, "samples": samples, "typo_rate": typo_rate},
        "train_samples": split, "test_samples": len(tickets) - split, "epochs": epochs,
        "train_accuracy": round(train_accuracy, 4),
        "held_out_accuracy": round(accuracy, 4),
        "held_out_accuracy_by_variant": {"fp32": round(accuracy, 4), "int8": round(accuracy8, 4)},
        "held_out_confidence": confidence_buckets(probs, y[split:]),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(meta_path, meta)
    return meta


def build_models(models_dir: Path, force: bool = False, progress: bool = False, samples: int = 2500,
                 epochs: int = 300, seed: int = 11, typo_rate: float = 0.04, agreement_samples: int = 300,
                 max_tokens: int = MAX_TOKENS, threads: int | None = None) -> dict[str, Any]:
    """Build what is missing (everything with `force`) and report on all three models.

    A model is rebuilt when its file or metadata is missing, stale or built with other settings, and
    so is everything built after it (int8 from fp32; the head is measured on both encoders). Files
    are written under a temporary name and renamed, so a reader never sees half a model. The
    returned report is JSON-serialisable.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, min(4, os.cpu_count() or 1))
    paths = model_paths(models_dir)
    started = time.perf_counter()
    built: list[str] = []
    metas: dict[str, dict[str, Any]] = {}
    with _Steps(progress) as steps:
        meta = None if force else _read_meta(*paths["fp32"], max_tokens=max_tokens)
        if meta is None or not (models_dir / TOKENIZER_FILE).is_file():
            with steps.step("exporting MiniLM to ONNX (fp32)"):
                meta = _build_fp32(models_dir, max_tokens, threads)
            built.append("fp32")
        metas["fp32"] = meta

        meta = None if force or built else _read_meta(*paths["int8"], max_tokens=max_tokens)
        if meta is None:
            with steps.step("quantizing to int8 + agreement", 3 * agreement_samples) as advance:
                meta = _build_int8(models_dir, max_tokens, threads, agreement_samples, advance)
            built.append("int8")
        metas["int8"] = meta

        corpus = {"seed": seed, "samples": samples, "typo_rate": typo_rate}
        meta = None if force or built else _read_meta(*paths[HEAD], max_tokens=max_tokens, corpus=corpus, epochs=epochs)
        if meta is None:
            meta = _build_head(models_dir, max_tokens, threads, samples, epochs, seed, typo_rate, steps)
            built.append(HEAD)
        metas[HEAD] = meta

    head = metas[HEAD]
    return {
        "models_dir": str(models_dir),
        "built": built,
        "reused": [name for name in paths if name not in built],
        "files": {name: paths[name][0].name for name in paths},
        "published_similarities": {"expected": PUBLISHED_SIMILARITIES,
                                   "fp32": metas["fp32"]["published_similarities"],
                                   "int8": metas["int8"]["published_similarities"]},
        "int8_agreement": metas["int8"]["agreement_with_fp32"],
        "classifier": {
            "labels": head["labels"],
            "held_out_accuracy": head["held_out_accuracy"],
            "held_out_accuracy_by_variant": head["held_out_accuracy_by_variant"],
            "held_out_confidence": head["held_out_confidence"],
            "train_samples": head["train_samples"], "test_samples": head["test_samples"],
        },
        "seconds": round(time.perf_counter() - started, 2),
    }


# ---- inference ---------------------------------------------------------------------------------

class TicketClassifier:
    """Ticket text -> (category, confidence): tokenizer, MiniLM encoder (`variant`), classifier head."""

    def __init__(self, models_dir: Path, variant: str = "fp32", threads: int = 1, max_tokens: int | None = None):
        models_dir = Path(models_dir)
        head_path, meta_path = model_paths(models_dir)[HEAD]
        if not (head_path.is_file() and meta_path.is_file()):
            raise ModelFilesMissing(f"{head_path} is missing; build it with `tracetune models build`")
        meta = json.loads(meta_path.read_text())
        self.variant = _encoder.check_variant(variant)
        self.encoder = Encoder(models_dir, variant, threads=threads, max_tokens=max_tokens or meta["max_tokens"])
        self.labels: list[str] = list(meta["labels"])
        # This variant's own figure: the int8 encoder under the same head scores a little differently.
        by_variant = meta.get("held_out_accuracy_by_variant", {})
        self.meta: dict[str, Any] = {**meta, "variant": variant,
                                     "held_out_accuracy": by_variant.get(variant, meta["held_out_accuracy"])}
        self.head = _head_session(head_path, threads)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities [n, len(labels)] in `labels` order."""
        embeddings = self.encoder.encode(texts)
        if not len(embeddings):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.head.run(["probabilities"], {"embeddings": embeddings})[0]

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, confidence) per text, confidence being the top class probability."""
        probs = self.probabilities(texts)
        best = probs.argmax(axis=1)
        return [(self.labels[i], float(probs[row, i])) for row, i in enumerate(best)]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Encoder tokens per text (after truncation), for length-bucketed batching."""
        return self.encoder.token_lengths(texts)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.tokenize(texts)
