"""Profiler overhead: p50 through ``profile_model`` vs a bare ``session.run`` loop, same run.

The two are measured in interleaved blocks (A B, B A, A B, ...) so that the machine's load drifts
over both alike; each block loads a fresh session for both sides (the profiler always does).
The claim: the profiler's p50 is within 3 % of the bare loop's.

    /work/venv-host/bin/python bench/profiler.py [--pt yolov8n-coco.pt | --onnx model.onnx] [--imgsz 640]
        [--threads 2] [--blocks 8] [--runs 40] [--warmup 5]

Exports the ONNX with Ultralytics (``YOLO(pt).export(format="onnx", imgsz=...)``) into a temp dir
when ``--onnx`` is not given. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))


def export_onnx(pt: Path, imgsz: int, work: Path) -> Path:
    """Ultralytics' own exporter, on a copy (the exporter writes beside the .pt; ../shared is read-only)."""
    import prune_pack.offline  # noqa: F401 - before Ultralytics: never the network
    from ultralytics import YOLO

    local = work / pt.name
    shutil.copy2(pt, local)
    return Path(YOLO(str(local)).export(format="onnx", imgsz=imgsz, verbose=False))


def bare_loop(onnx: Path, threads: int, warmup: int, runs: int) -> list[float]:
    """What a user would write: an ORT session with the same options, and session.run in a loop."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
    feed = {inp.name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    lat = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        lat.append((time.perf_counter_ns() - t0) / 1e6)
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pt", type=Path, default=SHARED / "models" / "yolov8n-coco.pt")
    ap.add_argument("--onnx", type=Path, help="use this ONNX instead of exporting --pt")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=8, help="blocks per side, interleaved")
    ap.add_argument("--runs", type=int, default=40, help="measured runs per block")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up runs per block (excluded)")
    args = ap.parse_args()

    from prune_pack.agent.profiler import device_context, latency_stats, profile_model

    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        onnx = args.onnx or export_onnx(args.pt, args.imgsz, Path(tmp))
        prof: list[float] = []
        bare: list[float] = []
        block_ratios = []
        t_start = time.time()
        for b in range(args.blocks):
            order = ("profiler", "bare") if b % 2 == 0 else ("bare", "profiler")
            got = {}
            for side in order:
                if side == "profiler":
                    got[side] = profile_model(onnx, threads=args.threads, warmup=args.warmup, runs=args.runs)["latencies_ms"]
                else:
                    got[side] = bare_loop(onnx, args.threads, args.warmup, args.runs)
            prof += got["profiler"]
            bare += got["bare"]
            block_ratios.append(statistics.median(got["profiler"]) / statistics.median(got["bare"]))
            print(f"block {b}: profiler p50 {statistics.median(got['profiler']):.2f} ms, bare p50 {statistics.median(got['bare']):.2f} ms",
                  file=sys.stderr)
        sp, sb = latency_stats(prof), latency_stats(bare)
        ctx = device_context()
    ratio = sp["p50_ms"] / sb["p50_ms"]
    res = {
        "model": str(args.onnx or args.pt), "imgsz": args.imgsz, "threads": args.threads, "blocks": args.blocks,
        "runs_per_block": args.runs, "profiler_p50_ms": sp["p50_ms"], "bare_p50_ms": sb["p50_ms"],
        "profiler_p50_ci_ms": sp["p50_ci_ms"], "bare_p50_ci_ms": sb["p50_ci_ms"],
        "ratio_p50": round(ratio, 4), "median_block_ratio": round(statistics.median(block_ratios), 4),
        "within_3pct": abs(ratio - 1) <= 0.03, "wall_s": round(time.time() - t_start, 1),
        "cpu": ctx["cpu_model"], "usable_cores": ctx["usable_cores"], "loadavg_end": ctx["loadavg"],
    }
    print("| loop | p50 ms | 95% CI | p90 ms | mean ms | runs |\n|---|---:|---|---:|---:|---:|")
    for name, s in (("profile_model", sp), ("bare session.run", sb)):
        print(f"| {name} | {s['p50_ms']:.2f} | {s['p50_ci_ms'][0]:.2f}–{s['p50_ci_ms'][1]:.2f} | {s['p90_ms']:.2f} | {s['mean_ms']:.2f} | {len(prof)} |")
    print(f"\np50 ratio profiler/bare = {ratio:.4f} (median of per-block ratios {res['median_block_ratio']:.4f})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
