"""The demo models, trained here from the generated corpus and exported to ONNX.

The ticket classifier is a softmax-regression head over hashed word and character n-grams:
featurization runs in Python (`featurize`), the head runs in onnxruntime. Models are built once
into `.tracetune/models/` and reused.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from executor.corpus import CATEGORIES, generate

FEATURE_DIM = 4096
CLASSIFIER = "ticket_classifier"
_TOKEN = re.compile(r"[a-z0-9]+")


def _bucket(token: str) -> int:
    return zlib.crc32(token.encode()) % FEATURE_DIM


def featurize(texts: list[str]) -> np.ndarray:
    """Hashed unigram, bigram and character-trigram counts, log-scaled and L2-normalised."""
    out = np.zeros((len(texts), FEATURE_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _TOKEN.findall(text.lower())
        grams = [f"w:{w}" for w in words] + [f"b:{a}_{b}" for a, b in zip(words, words[1:])]
        for w in words:
            padded = f"<{w}>"
            grams.extend(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
        for gram in grams:
            out[row, _bucket(gram)] += 1.0
    np.log1p(out, out=out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.maximum(norms, 1e-6)
    return out


def _train(x: np.ndarray, y: np.ndarray, classes: int, epochs: int, on_epoch=None) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch softmax regression with Adam and a little L2; returns (W, b)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (x.shape[1], classes)).astype(np.float32)
    b = np.zeros(classes, dtype=np.float32)
    onehot = np.eye(classes, dtype=np.float32)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    lr, beta1, beta2, l2 = 0.05, 0.9, 0.999, 1e-5
    for epoch in range(1, epochs + 1):
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - onehot) / len(x)
        grads = [x.T @ grad + l2 * w, grad.sum(axis=0)]
        for i, (param, g) in enumerate(zip((w, b), grads)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            param -= lr * (m[i] / (1 - beta1 ** epoch)) / (np.sqrt(v[i] / (1 - beta2 ** epoch)) + 1e-8)
        if on_epoch:
            on_epoch(epoch)
    return w, b


def _export(w: np.ndarray, b: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["features", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        name=CLASSIFIER,
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURE_DIM])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tracetune")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def classifier_paths(models_dir: Path) -> tuple[Path, Path]:
    return models_dir / f"{CLASSIFIER}.onnx", models_dir / f"{CLASSIFIER}.json"


def build_models(models_dir: Path, force: bool = False, progress: bool = False,
                 samples: int = 6000, epochs: int = 150) -> dict[str, Any]:
    """Train and export the classifier unless present; returns its metadata (incl. held-out accuracy)."""
    models_dir = Path(models_dir)
    onnx_path, meta_path = classifier_paths(models_dir)
    if onnx_path.exists() and meta_path.exists() and not force:
        return json.loads(meta_path.read_text())
    models_dir.mkdir(parents=True, exist_ok=True)

    from rich.progress import Progress

    tickets = generate(samples, seed=11)
    split = int(len(tickets) * 0.8)
    x = featurize([t.text for t in tickets])
    y = np.array([CATEGORIES.index(t.category) for t in tickets])
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("training ticket classifier", total=epochs)
        w, b = _train(x[:split], y[:split], len(CATEGORIES), epochs, lambda _: bar.advance(task))
    tmp = onnx_path.with_suffix(".onnx.tmp")
    _export(w, b, tmp)

    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"features": x[split:]})[0]
    accuracy = float((probs.argmax(axis=1) == y[split:]).mean())
    meta = {"name": CLASSIFIER, "labels": CATEGORIES, "feature_dim": FEATURE_DIM, "train_samples": split,
            "test_samples": len(tickets) - split, "held_out_accuracy": round(accuracy, 4), "opset": 17}
    tmp.replace(onnx_path)
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


class TicketClassifier:
    """An onnxruntime session over the exported classifier; `predict` takes a batch of texts."""

    def __init__(self, models_dir: Path, threads: int = 1):
        import onnxruntime as ort

        onnx_path, meta_path = classifier_paths(Path(models_dir))
        self.meta = json.loads(meta_path.read_text())
        self.labels: list[str] = self.meta["labels"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        probs = self.session.run(["probabilities"], {"features": featurize(texts)})[0]
        best = probs.argmax(axis=1)
        return [(self.labels[i], float(probs[row, i])) for row, i in enumerate(best)]
