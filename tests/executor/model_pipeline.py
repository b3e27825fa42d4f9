"""A one-step model pipeline for real executor processes in tests: two ONNX variants (a linear layer each,
built into `<home>/test-models` at start: nothing is downloaded) behind one micro-batched `Infer` step.
Batches wait up to 150 ms to fill, so a burst of tasks queues. Run it with
`tracetune executor --pipeline tests.executor.model_pipeline:scorer`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracetune.base.settings import Settings
from tracetune.executor import Batching, Infer, OnnxModel, Pipeline

NAME = "scorer"
ROUTES = ("small", "large")
MAX_WAIT_MS = 150.0


def _build(path: Path, seed: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if path.exists():
        return path
    weights = np.random.default_rng(seed).normal(size=(4, 2)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _features(text: str) -> list[float]:
    return [len(text), text.count(" "), sum(map(ord, text)) % 97, 1.0]


def scorer(settings: Settings) -> Pipeline:
    models = {route: OnnxModel(_build(Path(settings.home) / "test-models" / f"{route}.onnx", seed))
              for seed, route in enumerate(ROUTES)}

    def variant(model: OnnxModel):
        return lambda texts: [float(y[0]) for y in model(np.array([_features(t) for t in texts], np.float32))]

    return Pipeline(NAME, [
        Infer("score", {route: variant(model) for route, model in models.items()}, seed=0,
              batching=Batching(max_size=64, max_wait_ms=MAX_WAIT_MS)),
    ])
