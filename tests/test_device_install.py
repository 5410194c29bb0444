"""No torch on a device: the agent imports and profiles a model where torch/ultralytics are absent.

Two proofs: a cheap one in this environment (torch, ultralytics and onnx made unimportable before
anything of ours is imported), and the real one in a base-install venv (``pip install .``, no
extras). CI builds that venv and exports PRUNE_PACK_DEVICE_PYTHON; without it the test builds one
itself in a temp folder (about 30 s and ~350 MB from the package index).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_path

REPO = Path(__file__).resolve().parent.parent
HOST_ONLY = ("torch", "torchvision", "ultralytics", "onnx", "onnxslim", "torch_pruning")
PROFILE_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "rss_peak_mb", "runs", "threads", "model_sha256", "context")


def _model() -> Path:
    tiny = REPO / "tests" / "data" / "tiny.onnx"
    return tiny if tiny.exists() else shared_path("models", "yolov8n_int8.onnx")


def _check_profile(stdout: str, model: Path, runs: int) -> dict:
    r = json.loads(stdout.strip().splitlines()[-1])
    for k in PROFILE_KEYS:
        assert k in r, k
    assert r["runs"] == runs and r["p50_ms"] > 0 and r["rss_peak_mb"] > 0
    assert r["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    return r


_BLOCKED_RUN = """
import importlib, json, pkgutil, sys
blocked = sys.argv[2].split(",")
for name in blocked:
    sys.modules[name] = None  # import fails, importlib.util.find_spec says None: as if not installed
import prune_pack.agent as agent
mods = sorted(m.name for m in pkgutil.iter_modules(agent.__path__))
for m in mods:
    importlib.import_module("prune_pack.agent." + m)
from prune_pack.cli import main
code = main(["profile", sys.argv[1], "--runs", "3", "--warmup", "1", "--threads", "1", "--json"])
loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in blocked)
print(json.dumps({"code": code, "modules": mods, "loaded": loaded}))
"""


def test_agent_imports_and_profiles_without_host_packages(tmp_path):
    model = _model()
    p = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(model), ",".join(HOST_ONLY)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["code"] == 0 and summary["loaded"] == []
    assert {"backends", "profiler", "settings"} <= set(summary["modules"])
    _check_profile(lines[-2], model, runs=3)


def _build_device_venv(root: Path) -> Path:
    """``pip install <repo>`` (no extras) into a fresh venv, from a copy of the sources (never writes into the checkout)."""
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    for d in ("prune_pack", "agent", "pruning", "deploy"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    py = venv / "bin" / "python"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, timeout=1200, env=env)
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-5:]
        if any(s in p.stderr for s in ("No matching distribution", "Could not find a version", "NewConnectionError", "Network is unreachable")):
            pytest.skip("cannot build a device venv: the package index is unreachable: " + " | ".join(tail))
        pytest.fail("pip install of the base package failed:\n" + "\n".join(tail))
    return py


@pytest.mark.slow
def test_base_install_profiles_without_torch(tmp_path_factory):
    env_py = os.environ.get("PRUNE_PACK_DEVICE_PYTHON")
    if env_py:
        py = Path(env_py)
        assert py.exists(), f"PRUNE_PACK_DEVICE_PYTHON={env_py} does not exist"
    else:
        py = _build_device_venv(tmp_path_factory.mktemp("device"))
    cwd = tmp_path_factory.mktemp("run")  # not the repo root, so the installed package is what runs
    probe = "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in %r}))" % (HOST_ONLY,)
    p = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert p.returncode == 0, p.stderr
    present = json.loads(p.stdout)
    assert not present["torch"] and not present["ultralytics"], f"the device install has host packages: {present}"
    model = _model()
    p = subprocess.run([str(py), "-m", "prune_pack.cli", "profile", str(model), "--json", "--runs", "5", "--warmup", "1"],
                       capture_output=True, text=True, cwd=cwd, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = _check_profile(p.stdout, model, runs=5)
    assert r["backend"] == "ort" and r["context"]["onnxruntime"]
    # The host-only commands say what is missing in one line instead of a traceback.
    p = subprocess.run([str(py), "-m", "prune_pack.cli", "prune", "--model", "m.pt", "--ratio", "0.3", "--out", "o.pt"],
                       capture_output=True, text=True, cwd=cwd, timeout=120)
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1 and "prune-pack[host]" in p.stderr
