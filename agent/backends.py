"""Inference backends behind one small interface, used by the profiler and by streams.

ONNX Runtime is always installed; OpenVINO is optional (``pip install 'prune-pack[openvino]'``)
and imported lazily. Precisions are named ``fp32``, ``bf16`` and ``int8`` everywhere (OpenVINO's
``f32`` is accepted as an alias). ``int8`` is a property of the *file* (a quantized QDQ export):
a backend runs an int8 file as it is and never quantizes on its own; ``bf16`` is an OpenVINO
execution mode of an fp32 file and needs a CPU with AVX512_BF16 or AMX.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

import numpy as np

from prune_pack.errors import MissingExtraError, UserInputError

BACKENDS = ("ort", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
_ALIASES = {"f32": "fp32", "float32": "fp32", "fp32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "int8": "int8", "i8": "int8"}
CPU_FLAGS_ENV = "PRUNE_PACK_CPU_FLAGS"  # test/ops override of /proc/cpuinfo flags (comma or space separated)
# Flags worth reporting: they decide which precisions run fast on this CPU.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Operators only a quantized graph contains (static QDQ, QOperator and dynamic quantization).
_QUANT_OPS = (b"QuantizeLinear", b"QLinearConv", b"QLinearMatMul", b"ConvInteger", b"MatMulInteger")


class Session(Protocol):
    """A loaded model, ready to run. ``run`` is thread-safe on every backend."""

    backend: str
    precision: str
    threads: int
    input_name: str
    input_shape: tuple[int, ...]  # static shape; a dynamic dimension is reported (and fixed) as 1
    input_dtype: str
    output_names: list[str]

    def run(self, x: np.ndarray) -> list[np.ndarray]: ...

    def info(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- CPU and model facts


def cpu_features(flags: Optional[Iterable[str] | str] = None) -> set[str]:
    """The CPU's feature flags: ``flags`` if given, else $PRUNE_PACK_CPU_FLAGS, else /proc/cpuinfo.

    The override exists so that decisions that depend on the CPU (bf16) can be tested and
    forced on any machine; an empty override means "a CPU with no special features".
    """
    if flags is None:
        flags = os.environ.get(CPU_FLAGS_ENV)
    if flags is not None:
        items = flags.replace(",", " ").split() if isinstance(flags, str) else list(flags)
        return {f.strip().lower() for f in items if f.strip()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                # x86 says "flags", ARM says "Features"; the first core speaks for all.
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_supported(features: Optional[set[str]] = None) -> bool:
    """Native bf16 arithmetic (AVX512_BF16 or AMX-BF16); without it bf16 would be emulated and slow."""
    feats = cpu_features() if features is None else features
    return any(f in feats for f in _BF16_FLAGS)


def normalize_precision(precision: Optional[str]) -> Optional[str]:
    """``f32`` → ``fp32`` etc.; None stays None (= the file's own precision)."""
    if precision is None:
        return None
    p = _ALIASES.get(str(precision).strip().lower())
    if p is None:
        raise UserInputError(f"unknown precision {precision!r} (expected one of: {', '.join(PRECISIONS)})")
    return p


def model_precision(path: str | Path) -> str:
    """``int8`` when the ONNX graph contains quantization operators, else ``fp32``.

    A byte scan of the protobuf for operator names: the agent must not depend on the onnx
    package, and an op_type is stored verbatim in the file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise UserInputError(f"{p} is empty, not an ONNX model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return "int8" if any(mm.find(op) >= 0 for op in _QUANT_OPS) else "fp32"
    except OSError as e:
        raise UserInputError(f"cannot read model {p}: {e.strerror or e}") from None


def available_backends() -> list[str]:
    """Installed backends, without importing them (OpenVINO's import costs time and memory)."""
    out = ["ort"]
    try:
        if importlib.util.find_spec("openvino") is not None:
            out.append("openvino")
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        pass
    return out


def backend_precisions(backend: str, features: Optional[set[str]] = None) -> list[str]:
    """Precisions a backend can run on this CPU (ORT: fp32, int8; OpenVINO: fp32, bf16 where native, int8)."""
    if backend == "ort":
        return ["fp32", "int8"]
    if backend == "openvino":
        return ["fp32", "bf16", "int8"] if bf16_supported(features) else ["fp32", "int8"]
    raise UserInputError(f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})")


def runnable_precisions(backend: str, file_precision: str, features: Optional[set[str]] = None) -> list[str]:
    """What a backend can run *from this file*: an int8 file runs as int8; an fp32 file as fp32 (and bf16 on OpenVINO)."""
    if file_precision == "int8":
        return ["int8"]
    return [p for p in backend_precisions(backend, features) if p != "int8"]


def resolve_backend(requested: Optional[str], precision: Optional[str] = None) -> str:
    """The backend to use for a request: ``ort``, ``openvino`` or ``auto``.

    ``auto`` prefers OpenVINO (faster on Intel CPUs, the only one with bf16) and falls back to
    ONNX Runtime when the extra is absent, unless the precision needs OpenVINO.
    """
    req = (requested or "auto").strip().lower()
    prec = normalize_precision(precision)
    have = available_backends()
    if req == "auto":
        if "openvino" in have:
            return "openvino"
        if prec == "bf16":
            raise MissingExtraError("bf16 inference (OpenVINO)", "openvino", "openvino")
        return "ort"
    if req == "ort":
        if prec == "bf16":
            raise UserInputError("ONNX Runtime has no bf16 mode on CPU: use --backend openvino")
        return "ort"
    if req == "openvino":
        if "openvino" not in have:
            raise MissingExtraError("the OpenVINO backend", "openvino", "openvino")
        return "openvino"
    raise UserInputError(f"unknown backend {requested!r} (expected auto, {', '.join(BACKENDS)})")


def resolve_precision(backend: str, requested: Optional[str], file_precision: str,
                      features: Optional[set[str]] = None) -> str:
    """Check a (backend, precision) request against the file and the CPU; None = the file's own."""
    prec = normalize_precision(requested) or file_precision
    if prec == "int8" and file_precision != "int8":
        raise UserInputError("int8 needs a quantized (QDQ) ONNX file; this one is fp32 (export it with --int8)")
    if prec != "int8" and file_precision == "int8":
        raise UserInputError(f"this ONNX file is quantized (int8); {prec} needs the unquantized export")
    if prec == "bf16":
        if backend != "openvino":
            raise UserInputError("ONNX Runtime has no bf16 mode on CPU: use --backend openvino")
        if not bf16_supported(features):
            raise UserInputError("bf16 needs a CPU with AVX512_BF16 or AMX (this CPU has neither); use fp32 or int8")
    if prec not in backend_precisions(backend, features):
        raise UserInputError(f"backend {backend} cannot run precision {prec}")
    return prec


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _static_shape(dims: Iterable[Any]) -> tuple[int, ...]:
    return tuple(int(d) if isinstance(d, int) and d > 0 else 1 for d in dims)


# ---------------------------------------------------------------- ONNX Runtime


@dataclass
class OrtSession:
    """ONNX Runtime on the CPU execution provider; ``InferenceSession.run`` is thread-safe."""

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
    load_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads  # 0 = ORT's default (all physical cores)
        so.inter_op_num_threads = self.inter_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        t0 = time.perf_counter()
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types; make them one line
            raise UserInputError(f"ONNX Runtime cannot load {self.path}: {_one_line(e)}") from None
        self.load_s = time.perf_counter() - t0
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = _static_shape(inp.shape)
        self.input_dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}.get(inp.type, inp.type)
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.sess.run(self.output_names, {self.input_name: x})

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "backend": "ort",
            "precision": self.precision,
            "runtime": "onnxruntime",
            "runtime_version": ort.__version__,
            "providers": self.sess.get_providers(),
            "intra_op_threads": self.threads,
            "inter_op_threads": self.inter_threads,
            "execution_mode": "sequential",
            "graph_optimization": "all",
            "load_s": round(self.load_s, 4),
        }


# ---------------------------------------------------------------- OpenVINO

_OV_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64"}


class OpenVinoSession:
    """OpenVINO on the CPU: one compiled model per session, one infer request per calling thread.

    Properties: ``INFERENCE_NUM_THREADS`` = threads (0 = OpenVINO's default), ``PERFORMANCE_HINT``
    LATENCY (one stream), ``INFERENCE_PRECISION_HINT`` f32 or bf16 (int8 files keep OpenVINO's
    default for their unquantized parts), and ``CACHE_DIR`` so that a restart loads the compiled
    blob instead of compiling again.
    """

    backend = "openvino"

    def __init__(self, path: str | Path, threads: int = 2, precision: str = "fp32",
                 cache_dir: Optional[str | Path] = None) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise MissingExtraError("the OpenVINO backend", "openvino", "openvino") from None
        self._ov = ov
        self.path = Path(path)
        self.threads = int(threads)
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir else None
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.threads > 0:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        elif precision == "bf16":
            config["INFERENCE_PRECISION_HINT"] = "bf16"
        self.cache_error: Optional[str] = None
        if self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(self.cache_dir)
            except OSError as e:  # a read-only state dir costs a recompile, not the model
                self.cache_error = f"{self.cache_dir}: {e.strerror or e}"
                self.cache_dir = None
        self.config = config
        core = ov.Core()
        t0 = time.perf_counter()
        try:
            # From the path, so that a cached blob is found without parsing the ONNX file.
            self.compiled = core.compile_model(str(self.path), "CPU", config)
            if self.compiled.input(0).get_partial_shape().is_dynamic:
                # A dynamic dimension (batch) is fixed to 1: the profiler and streams feed one frame,
                # and a static graph compiles to faster kernels. Rare, so compiling twice is fine.
                model = core.read_model(str(self.path))
                shape = [d.get_length() if d.is_static else 1 for d in model.input(0).get_partial_shape()]
                model.reshape({model.input(0).get_any_name(): shape})
                self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line C++ trace
            raise UserInputError(f"OpenVINO cannot compile {self.path}: {_one_line(e)}") from None
        self.compile_s = time.perf_counter() - t0
        inp = self.compiled.input(0)
        self.input_name = inp.get_any_name()
        self.input_shape = _static_shape(d.get_length() if d.is_static else -1 for d in inp.get_partial_shape())
        et = inp.get_element_type().get_type_name()
        self.input_dtype = _OV_TYPES.get(et, et)
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._local = threading.local()

    def _request(self) -> Any:
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        return req

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        # share_outputs=False copies the outputs: the request's buffers are reused by its next run.
        res = self._request().infer({0: x}, share_inputs=True, share_outputs=False)
        return list(res.to_tuple())

    def _prop(self, name: str) -> Any:
        try:
            v = self.compiled.get_property(name)
        except Exception:  # not every property exists on every version
            return None
        return v if isinstance(v, (bool, int, float, str)) else str(v)

    def info(self) -> dict[str, Any]:
        prec = self._prop("INFERENCE_PRECISION_HINT")
        return {
            "backend": "openvino",
            "precision": self.precision,
            "runtime": "openvino",
            "runtime_version": self._ov.get_version(),
            "device": "CPU",
            "inference_precision": {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16", "<Type: 'float16'>": "f16"}.get(str(prec), prec),
            "inference_num_threads": self._prop("INFERENCE_NUM_THREADS"),
            "num_streams": self._prop("NUM_STREAMS"),
            "performance_hint": self._prop("PERFORMANCE_HINT"),
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
            "loaded_from_cache": self._prop("LOADED_FROM_CACHE"),
            "cache_error": self.cache_error,
            "load_s": round(self.compile_s, 4),
        }


# ---------------------------------------------------------------- entry point


def load_session(path: str | Path, backend: str = "ort", precision: Optional[str] = None, threads: int = 2,
                 cache_dir: Optional[str | Path] = None) -> Session:
    """Load an ONNX file on a backend at a precision (None = the file's own).

    Unknown backends, impossible precisions and missing extras are one-line errors.
    ``cache_dir`` is used by OpenVINO for compiled blobs (ORT ignores it).
    """
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"model not found: {p}")
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})")
    if backend == "openvino" and "openvino" not in available_backends():
        raise MissingExtraError("the OpenVINO backend", "openvino", "openvino")
    prec = resolve_precision(backend, precision, model_precision(p))
    if backend == "ort":
        return OrtSession(p, threads=threads, precision=prec)
    return OpenVinoSession(p, threads=threads, precision=prec, cache_dir=cache_dir)
