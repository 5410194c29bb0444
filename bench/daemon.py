"""Idle cost of the device daemon: RSS and CPU % of ``prune-pack agent run`` connected to a
local Mosquitto, (a) with an empty store, (b) serving tests/data/tiny.onnx, (c) serving the
shared YOLOv8n INT8 export (when ../shared is there), at the default telemetry interval.

    /work/venv-host/bin/python bench/daemon.py [--seconds 60] [--telemetry 10]

CPU % = process CPU time / wall time over the window (100 = one core), after a 5 s settle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from _broker import start_broker  # bench/_broker.py (scripts run as python bench/NAME.py)

REPO = Path(__file__).resolve().parent.parent
SHARED_INT8 = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared")) / "models" / "yolov8n_int8.onnx"


def seed_store(state: Path, onnx: Path, name: str) -> None:
    """Put a package into the store as a deploy would (verify -> stage -> activate)."""
    from prune_pack.agent.keys import generate_keypair
    from prune_pack.agent.store import ModelStore
    from prune_pack.agent.verifier import verify_package
    from prune_pack.agent.writer import write_package

    keys = state.parent / "keys"
    priv, pub = (keys / "signing.key", keys / "signing.pub") if (keys / "signing.key").exists() else generate_keypair(keys)
    pkg = write_package(onnx, {"name": name, "precision": "int8" if "int8" in onnx.name else "fp32", "version": 1},
                        state.parent / f"{name}.ppk", priv)
    store = ModelStore(state).open()
    vp = verify_package(pkg, [pub], staging_root=store.staging_dir)
    store.activate(store.stage(vp.dir).id)


def measure(tmp: Path, port: int, model: Path | None, seconds: float, telemetry: float) -> dict:
    state = tmp / f"state-{model.stem if model else 'empty'}"
    state.mkdir()
    if model:
        seed_store(state, model, model.stem.replace("_", "-"))
    cfg = {"device": {"id": "bench", "site": "lab"}, "mqtt": {"broker": f"mqtt://127.0.0.1:{port}"},
           "agent": {"state_dir": str(state), "telemetry_interval_s": telemetry,
                     "trusted_keys": [str(tmp / "keys" / "signing.pub")]},
           "inference": {"threads": 1}}
    cfg_path = tmp / f"{state.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "prune_pack.cli", "agent", "run", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(5.0)  # imports, store open, model load, connect
        t0, c0 = time.monotonic(), sum(p.cpu_times()[:2])
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(p.memory_info().rss / 2**20)
            time.sleep(1.0)
        cpu = 100.0 * (sum(p.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
        return {"model": model.name if model else None, "rss_mb_median": round(sorted(rss)[len(rss) // 2], 1),
                "rss_mb_max": round(max(rss), 1), "cpu_percent": round(cpu, 2), "seconds": seconds,
                "threads": p.num_threads()}
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--telemetry", type=float, default=10.0)
    a = ap.parse_args()
    models = [None, REPO / "tests" / "data" / "tiny.onnx"] + ([SHARED_INT8] if SHARED_INT8.exists() else [])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker, port = start_broker(tmp)
        try:
            for m in models:
                print(json.dumps(measure(tmp, port, m, a.seconds, a.telemetry)), flush=True)
        finally:
            broker.terminate()
            broker.wait(5)


if __name__ == "__main__":
    main()
