"""Inference backends behind one small interface, used by the profiler and by streams.

ONNX Runtime is always installed; OpenVINO is optional (``pip install 'prune-pack[openvino]'``)
and imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from prune_pack.errors import MissingExtraError, UserInputError


class Session(Protocol):
    """A loaded model, ready to run. ``run`` is thread-safe for ORT; one session per worker otherwise."""

    backend: str
    precision: str
    threads: int
    input_name: str
    input_shape: tuple[int, ...]  # static shape; a dynamic batch is reported as 1
    input_dtype: str
    output_names: list[str]

    def run(self, x: np.ndarray) -> list[np.ndarray]: ...

    def info(self) -> dict[str, Any]: ...


@dataclass
class OrtSession:
    path: Path
    threads: int = 2
    inter_threads: int = 1
    precision: str = "fp32"
    backend: str = "ort"
    sess: Any = field(init=False, repr=False)
    input_name: str = field(init=False)
    input_shape: tuple[int, ...] = field(init=False)
    input_dtype: str = field(init=False)
    output_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads  # 0 = ORT's default (all physical cores)
        so.inter_op_num_threads = self.inter_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types; make them one line
            raise UserInputError(f"ONNX Runtime cannot load {self.path}: {str(e).splitlines()[0][:300]}") from None
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
        self.input_dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}.get(inp.type, inp.type)
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.sess.run(self.output_names, {self.input_name: x})

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "backend": "ort",
            "precision": self.precision,
            "runtime_version": ort.__version__,
            "providers": self.sess.get_providers(),
            "intra_op_threads": self.threads,
            "inter_op_threads": self.inter_threads,
        }


def available_backends() -> list[str]:
    import importlib.util

    out = ["ort"]
    if importlib.util.find_spec("openvino") is not None:
        out.append("openvino")
    return out


def load_session(path: str | Path, backend: str = "ort", precision: str = "fp32", threads: int = 2,
                 cache_dir: Optional[str | Path] = None) -> Session:
    """Load an ONNX file on a backend. Unknown backends and missing extras are one-line errors."""
    if backend == "ort":
        return OrtSession(Path(path), threads=threads, precision=precision)
    if backend == "openvino":
        if "openvino" not in available_backends():
            raise MissingExtraError("the OpenVINO backend", "openvino", "openvino")
        raise UserInputError("the OpenVINO backend is not implemented yet")
    raise UserInputError(f"unknown backend {backend!r} (expected ort or openvino)")
