"""A thin onnxruntime session for a pipeline's own model: inputs by name, outputs as numpy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class OnnxModel:
    """One ONNX graph on the CPU. `model(x)` feeds `x` to the only input (or a dict of inputs by name)
    and returns the first output; `run` returns them all. Sessions use `threads` intra-op threads."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: np.ndarray | dict[str, Any]) -> list[np.ndarray]:
        if not isinstance(inputs, dict):
            if len(self.inputs) != 1:
                raise ValueError(f"{self.path.name} takes inputs {self.inputs}: pass a dict by name")
            inputs = {self.inputs[0]: inputs}
        return self.session.run(None, inputs)

    def __call__(self, inputs: np.ndarray | dict[str, Any]) -> np.ndarray:
        return self.run(inputs)[0]
