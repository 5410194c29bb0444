"""Backends: ONNX Runtime and OpenVINO behind one interface, precisions, CPU detection, fallback, cache."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from prune_pack.agent import backends as be
from prune_pack.errors import MissingExtraError, UserInputError

from conftest import shared_path

TINY = Path(__file__).resolve().parent / "data" / "tiny.onnx"
HAVE_OV = "openvino" in be.available_backends()
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="OpenVINO is not installed (pip install 'prune-pack[openvino]')")


@pytest.fixture(scope="module")
def tiny() -> Path:
    if not TINY.exists():
        pytest.skip(f"{TINY} is missing (tests/data/make_tiny_onnx.py writes it)")
    return TINY


@pytest.fixture(scope="module")
def tiny_int8(tiny, tmp_path_factory) -> Path:
    """A static QDQ INT8 version of tiny.onnx, quantized by ONNX Runtime's own tool (needs onnx)."""
    pytest.importorskip("onnx")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"images": np.random.default_rng(i).random((1, 3, 64, 64), dtype=np.float32)} for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path_factory.mktemp("q") / "tiny_int8.onnx"
    quantize_static(str(tiny), str(out), Reader(), quant_format=QuantFormat.QDQ)
    return out


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)


@pytest.fixture
def no_openvino(monkeypatch):
    """OpenVINO absent, for real: a None entry in sys.modules makes find_spec say None and import fail."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert be.available_backends() == ["ort"]


# ---------------------------------------------------------------- facts


def test_model_precision_from_the_file(tiny, tiny_int8):
    assert be.model_precision(tiny) == "fp32"
    assert be.model_precision(tiny_int8) == "int8"


def test_third_party_dynamic_int8_is_int8():
    assert be.model_precision(shared_path("models", "yolov8n_int8.onnx")) == "int8"


def test_precision_names():
    assert be.normalize_precision("f32") == "fp32"
    assert be.normalize_precision("BF16") == "bf16"
    assert be.normalize_precision(None) is None
    with pytest.raises(UserInputError, match="unknown precision 'fp8'"):
        be.normalize_precision("fp8")


def test_cpu_features_override(monkeypatch):
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx2, amx_bf16 amx_tile")
    assert be.cpu_features() == {"avx2", "amx_bf16", "amx_tile"}
    assert be.bf16_supported()
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "")
    assert be.cpu_features() == set() and not be.bf16_supported()
    assert be.cpu_features(["AVX512_BF16"]) == {"avx512_bf16"}  # an argument wins over the env


def test_cpu_features_real_cpu(monkeypatch):
    monkeypatch.delenv(be.CPU_FLAGS_ENV, raising=False)
    flags = be.cpu_features()
    if Path("/proc/cpuinfo").exists():
        assert flags, "/proc/cpuinfo has flags on every Linux"
        assert be.bf16_supported() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_backend_precisions(monkeypatch):
    assert be.backend_precisions("ort") == ["fp32", "int8"]
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx2 avx512f")
    assert be.backend_precisions("openvino") == ["fp32", "int8"]
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "avx512f avx512_bf16")
    assert be.backend_precisions("openvino") == ["fp32", "bf16", "int8"]
    assert be.runnable_precisions("openvino", "fp32") == ["fp32", "bf16"]
    assert be.runnable_precisions("openvino", "int8") == ["int8"]
    with pytest.raises(UserInputError, match="unknown backend"):
        be.backend_precisions("tensorrt")


def test_bf16_refused_on_a_cpu_without_it(monkeypatch, tiny):
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "sse4_2 avx2 fma avx512f avx512_vnni")  # an AVX-512 CPU without BF16
    with pytest.raises(UserInputError, match="bf16 needs a CPU with AVX512_BF16 or AMX"):
        be.resolve_precision("openvino", "bf16", "fp32")
    if HAVE_OV:
        with pytest.raises(UserInputError, match="bf16 needs a CPU") as e:
            be.load_session(tiny, "openvino", "bf16")
        assert "\n" not in str(e.value)
    monkeypatch.setenv(be.CPU_FLAGS_ENV, "amx_tile amx_bf16 amx_int8")
    assert be.resolve_precision("openvino", "bf16", "fp32") == "bf16"


def test_precision_is_a_property_of_the_file(tiny, tiny_int8):
    with pytest.raises(UserInputError, match="int8 needs a quantized"):
        be.load_session(tiny, "ort", "int8")
    with pytest.raises(UserInputError, match="quantized .int8.; fp32 needs the unquantized"):
        be.load_session(tiny_int8, "ort", "fp32")
    with pytest.raises(UserInputError, match="ONNX Runtime has no bf16"):
        be.load_session(tiny, "ort", "bf16")
    assert be.load_session(tiny).precision == "fp32"  # None = the file's own
    assert be.load_session(tiny_int8).precision == "int8"


# ---------------------------------------------------------------- ONNX Runtime


def test_ort_session_runs(tiny, x):
    s = be.load_session(tiny, "ort", threads=1)
    assert (s.backend, s.precision, s.threads) == ("ort", "fp32", 1)
    assert s.input_name == "images" and s.input_shape == (1, 3, 64, 64) and s.input_dtype == "float32"
    out = s.run(x)
    assert isinstance(out, list) and len(out) == len(s.output_names) == 1
    assert out[0].shape[:2] == (1, 7) and np.isfinite(out[0]).all()
    info = s.info()
    assert info["intra_op_threads"] == 1 and info["providers"] == ["CPUExecutionProvider"] and info["runtime_version"]


def test_ort_int8_runs_close_to_fp32(tiny, tiny_int8, x):
    ref = be.load_session(tiny).run(x)[0]
    q = be.load_session(tiny_int8, "ort").run(x)[0]
    assert q.shape == ref.shape
    assert np.abs(q - ref).max() < 0.1 * (np.abs(ref).max() + 1e-6)


def test_load_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(UserInputError, match="ONNX Runtime cannot load") as e:
        be.load_session(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(UserInputError, match="model not found"):
        be.load_session(tmp_path / "missing.onnx")
    with pytest.raises(UserInputError, match="unknown backend 'tflite'"):
        be.load_session(bad, "tflite")


def _threaded_matches(session, n_threads: int = 4, iters: int = 15) -> None:
    xs = [np.random.default_rng(100 + i).random(session.input_shape, dtype=np.float32) for i in range(n_threads)]
    refs = [session.run(v)[0].copy() for v in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(iters):
            got = session.run(xs[i])[0]
            if not np.array_equal(got, refs[i]):
                errors.append(f"thread {i}: output differs from its single-thread result")
                return

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_ort_run_is_thread_safe(tiny):
    _threaded_matches(be.load_session(tiny, "ort", threads=1))


# ---------------------------------------------------------------- selection and fallback


def test_fallback_to_ort_when_openvino_is_absent(no_openvino, tiny):
    assert be.resolve_backend("auto") == "ort"
    assert be.resolve_backend(None, "int8") == "ort"
    with pytest.raises(MissingExtraError, match=r"pip install 'prune-pack\[openvino\]'") as e:
        be.resolve_backend("openvino")
    assert "\n" not in str(e.value)
    with pytest.raises(MissingExtraError, match="bf16"):
        be.resolve_backend("auto", "bf16")  # only OpenVINO does bf16: no silent fallback
    with pytest.raises(MissingExtraError, match="openvino"):
        be.load_session(tiny, "openvino")
    with pytest.raises(MissingExtraError):
        be.OpenVinoSession(tiny)  # the lazy import itself reports the extra


@needs_ov
def test_auto_prefers_openvino_when_installed():
    assert be.resolve_backend("auto") == "openvino"
    assert be.resolve_backend("ort") == "ort"
    with pytest.raises(UserInputError, match="unknown backend"):
        be.resolve_backend("cuda")


# ---------------------------------------------------------------- OpenVINO


@needs_ov
def test_openvino_matches_ort(tiny, x):
    ref = be.load_session(tiny, "ort").run(x)[0]
    s = be.load_session(tiny, "openvino", "fp32", threads=1)
    assert (s.backend, s.precision, s.threads) == ("openvino", "fp32", 1)
    assert s.input_name == "images" and s.input_shape == (1, 3, 64, 64) and s.input_dtype == "float32"
    out = s.run(x)
    assert isinstance(out, list) and len(out) == 1
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4)
    info = s.info()
    assert info["inference_precision"] == "f32" and info["inference_num_threads"] == 1
    assert info["performance_hint"] == "LATENCY" and info["num_streams"] == 1


@needs_ov
def test_openvino_int8_file(tiny, tiny_int8, x):
    ref = be.load_session(tiny_int8, "ort").run(x)[0]
    s = be.load_session(tiny_int8, "openvino")
    assert s.precision == "int8"
    out = s.run(x)[0]
    assert np.abs(out - ref).max() < 0.1 * (np.abs(ref).max() + 1e-6)


@needs_ov
def test_openvino_bf16_where_supported(monkeypatch, tiny, x):
    monkeypatch.delenv(be.CPU_FLAGS_ENV, raising=False)
    if not be.bf16_supported():
        pytest.skip("this CPU has no AVX512_BF16/AMX (the refusal is tested separately)")
    ref = be.load_session(tiny, "ort").run(x)[0]
    s = be.load_session(tiny, "openvino", "bf16")
    assert s.info()["inference_precision"] == "bf16"
    out = s.run(x)[0]
    assert np.abs(out - ref).max() < 0.05 * (np.abs(ref).max() + 1e-6)  # bf16 has 8 mantissa bits


@needs_ov
def test_openvino_run_is_thread_safe(tiny):
    _threaded_matches(be.load_session(tiny, "openvino", "fp32", threads=1))


@needs_ov
def test_openvino_dynamic_batch_is_fixed_to_one(tmp_path, x):
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(TINY))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    dyn = tmp_path / "dyn.onnx"
    onnx.save(m, str(dyn))
    s = be.load_session(dyn, "openvino")
    assert s.input_shape == (1, 3, 64, 64)
    assert s.run(x)[0].shape[0] == 1


_CACHE_PROBE = """
import json, sys
from prune_pack.agent.backends import load_session
s = load_session(sys.argv[1], "openvino", "fp32", threads=1, cache_dir=sys.argv[2])
print(json.dumps(s.info()))
"""


@needs_ov
def test_openvino_cache_survives_a_restart(tiny, tmp_path):
    cache = tmp_path / "state" / "cache" / "openvino"

    def start() -> dict:
        p = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(tiny), str(cache)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = start()
    assert first["loaded_from_cache"] is False and first["cache_dir"] == str(cache)
    assert any(cache.iterdir()), "compiling with CACHE_DIR writes a blob"
    second = start()  # a new process = an agent restart
    assert second["loaded_from_cache"] is True


@needs_ov
def test_openvino_unusable_cache_dir_costs_only_the_cache(tiny, tmp_path, x):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir should be")
    s = be.load_session(tiny, "openvino", "fp32", cache_dir=blocker / "cache")
    info = s.info()
    assert info["cache_dir"] is None and str(blocker) in info["cache_error"]
    assert s.run(x)[0].shape[1] == 7
