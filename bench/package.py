"""Cost of packing and verifying .ppk packages (sign + hash + extract), by model size.

    /work/venv-host/bin/python bench/package.py [--sizes-mb 3,12,100] [--repeat 3]

Synthetic models are random bytes (incompressible, like weights) with an explicit input spec,
so ONNX Runtime is not involved; the real shared INT8 model is added when present. Prints a
Markdown table: median wall time of write_package and verify_package (incl. fsync).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from prune_pack.agent import keys as K
from prune_pack.agent import manifest as M
from prune_pack.agent import verifier as V
from prune_pack.agent import writer as W

SHARED_INT8 = Path(__file__).resolve().parents[2] / "shared" / "models" / "yolov8n_int8.onnx"


def bench(model: Path, keys: tuple[Path, Path], work: Path, repeat: int, real: bool) -> tuple[float, float]:
    m = {"name": "bench", "version": 1, "precision": "fp32"}
    if not real:
        m["input"] = {"name": "images", "shape": [1, 3, 640, 640], "dtype": "float32"}
    w, v = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        pkg = W.write_package(model, m, work / "b.ppk", keys[0])
        w.append(time.perf_counter() - t)
        t = time.perf_counter()
        V.verify_package(pkg, [keys[1]], staging_root=work / "stage").discard()
        v.append(time.perf_counter() - t)
    return statistics.median(w), statistics.median(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", default="3,12,100")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        keys = K.generate_keypair(work / "keys")
        rows = []
        if SHARED_INT8.exists():
            rows.append((f"{SHARED_INT8.name} ({SHARED_INT8.stat().st_size / 2**20:.1f} MiB, input read by ORT)", *bench(SHARED_INT8, keys, work, a.repeat, True)))
        for mb in (float(x) for x in a.sizes_mb.split(",")):
            f = work / f"{mb}.onnx"
            f.write_bytes(os.urandom(int(mb * 2**20)))
            rows.append((f"random {mb:g} MiB", *bench(f, keys, work, a.repeat, False)))
            f.unlink()
    print("| model | write_package (s) | verify_package (s) |\n|---|---|---|")
    for name, w, v in rows:
        print(f"| {name} | {w:.3f} | {v:.3f} |")


if __name__ == "__main__":
    main()
