"""Pruning benchmark: params, GFLOPs, ORT p50 as a ratio to the unpruned model (same run,
interleaved), mAP50-95 before and after a fixed fine-tuning budget, per criterion/allocation.

    python bench/pruning.py --model ../shared/models/yolov8n-coco.pt --data ../shared/data/coco128/data.yaml \
        --ratios 0.1 0.2 --configs l1:uniform:nocomp lsq:sensitivity --imgsz 640 --out-dir /tmp/bench-prune

Writes ``results.jsonl`` (one line per point) and ``results.md`` (a table) into ``--out-dir``.
Latency: ONNX Runtime CPU, ``--threads`` intra-op threads, batch 1, random input; the models are
timed in interleaved rounds so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def export_onnx(pt: Path, imgsz: int, out_dir: Path) -> Path:
    """The product's exporter: works on a temp copy, so nothing is written beside ``pt``."""
    from prune_pack.deploy.export import export_onnx as product_export

    return product_export(pt, out_dir / f"{pt.stem}-{imgsz}.onnx", imgsz=imgsz)


def interleaved_p50(onnx_paths: list[Path], imgsz: int, threads: int, rounds: int, runs: int) -> list[float]:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in onnx_paths]
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:  # warm-up
        for _ in range(3):
            s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            name = s.get_inputs()[0].name
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, {name: x})
                times[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def val_map(pt: Path, data: Path, imgsz: int) -> float:
    from prune_pack.pruning.validate import validate

    return round(float(validate(pt, data, imgsz=imgsz)["map50_95"]), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--configs", nargs="+", default=["l1:uniform", "lsq:sensitivity"], help="criterion:allocation[:nocomp|:mean] (default compensation: least squares)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--finetune-epochs", type=int, default=0, help="0 = no fine-tuning")
    ap.add_argument("--finetune-imgsz", type=int, default=320)
    ap.add_argument("--finetune-ratios", type=float, nargs="*", default=None, help="fine-tune only these points")
    ap.add_argument("--finetune-minutes", type=float, default=None, help="CPU time budget per fine-tune")
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()

    from prune_pack.pruning.checkpoint import save_pruned
    from prune_pack.pruning.prune import prune_model
    from prune_pack.pruning.sources import resolve_dataset

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_dataset(a.data, out / "data")
    base = Path(a.model).resolve()
    rows: list[dict] = []
    points: list[tuple[dict, Path]] = []
    for cfg in a.configs:
        crit, alloc, *rest = cfg.split(":")
        comp = "nocomp" not in rest
        lsq = "mean" not in rest
        for r in a.ratios:
            t = time.monotonic()
            yolo, info = prune_model(base, r, criterion=crit, data_yaml=a.data, imgsz=a.imgsz, allocation=alloc,
                                     calib_images=a.calib_images, compensation=("lsq" if lsq else "mean") if comp else "none",
                                     progress=False)
            pt = out / f"{crit}-{alloc}{'' if comp else '-nocomp'}{'' if lsq else '-mean'}-{r:.2f}.pt"
            save_pruned(yolo, pt, info)
            row = {"criterion": crit, "allocation": alloc, "bias_compensation": info["bias_compensation"], "requested": r,
                   "achieved": info["achieved_ratio"], "params": info["params_after"], "gflops": info["gflops_after"],
                   "prune_s": round(time.monotonic() - t, 1), "pt": str(pt)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            points.append((row, pt))
    base_map = val_map(base, data, a.imgsz)
    for row, pt in points:
        row["map_pruned"] = val_map(pt, data, a.imgsz)
        print(json.dumps(row), file=sys.stderr, flush=True)
    onnx = [export_onnx(base, a.imgsz, out)] + [export_onnx(pt, a.imgsz, out) for _, pt in points]
    p50 = interleaved_p50(onnx, a.imgsz, a.threads, a.rounds, a.runs)
    for (row, _), p in zip(points, p50[1:]):
        row["p50_ms"] = round(p, 2)
        row["speedup"] = round(p50[0] / p, 3)
    if a.finetune_epochs or a.finetune_minutes:
        from prune_pack.pruning.recover import recover

        for row, pt in points:
            if a.finetune_ratios and row["requested"] not in a.finetune_ratios:
                continue
            for distill in (False, True):
                key = "map_ft_distill" if distill else "map_ft"
                recover(pt, a.data, out / f"{pt.stem}-ft{'-kd' if distill else ''}.pt", method="labels",
                        epochs=max(1, a.finetune_epochs), imgsz=a.finetune_imgsz, teacher=base if distill else None,
                        labels_distill=distill, train_device="cpu", progress=False, time_budget_min=a.finetune_minutes,
                        measure=False)
                row[key] = val_map(out / f"{pt.stem}-ft{'-kd' if distill else ''}.pt", data, a.imgsz)
                print(json.dumps(row), file=sys.stderr, flush=True)
    base_row = {"criterion": "unpruned", "allocation": "-", "requested": 0.0, "achieved": 0.0, "map_pruned": base_map,
                "p50_ms": round(p50[0], 2), "speedup": 1.0}
    rows = [base_row] + [r for r, _ in points]
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    cond = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, ORT {a.threads} threads, "
            f"imgsz {a.imgsz}, {a.rounds}x{a.runs} interleaved runs per model")
    lines = [f"Conditions: {cond}", "", "| criterion | allocation | requested | achieved | params | GFLOPs | p50 ms | speedup | mAP50-95 | FT | FT+KD |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['criterion']} | {r['allocation']}{'' if r.get('bias_compensation') in (None, 'lsq') else ' (' + r['bias_compensation'] + ' comp)'} | {r['requested']} | "
                     f"{r['achieved']} | {r.get('params', '')} | {r.get('gflops', '')} | {r.get('p50_ms', '')} | {r.get('speedup', '')} | "
                     f"{r.get('map_pruned', '')} | {r.get('map_ft', '')} | {r.get('map_ft_distill', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
