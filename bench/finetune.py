"""What a fixed CPU budget of fine-tuning buys a pruned YOLOv8n, per recovery method.

Prunes yolov8n-coco once (project pruner, fixed settings), then recovers it on coco128 train
(128 images) for a fixed wall-clock budget per point and validates on coco128 val (128 COCO
val2017 images the model never trained on). Points:
- ``labels``: Ultralytics' supervised trainer (``pruning.recover.recover(method="labels")``);
- ``labels-kd``: the same plus Ultralytics' feature distillation from the unpruned model;
- ``distill``: output distillation from the unpruned model, no labels (``recover(method="distill")``).
Usage: python bench/finetune.py --imgsz 640 --budget-min 8 --points labels,distill --out bench/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import prune_pack.offline  # noqa: F401 - before Ultralytics
import torch

from prune_pack.pruning.checkpoint import save_pruned
from prune_pack.pruning.prune import prune_model
from prune_pack.pruning.recover import recover
from prune_pack.pruning.validate import validate

SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "yolov8n-coco.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "coco128" / "data.yaml"))
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--criterion", default="auto")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--budget-min", type=float, default=6.0)
    ap.add_argument("--points", default="labels,labels-kd,distill")
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pruned", help="reuse this pruned checkpoint instead of pruning again")
    ap.add_argument("--skip-reference", action="store_true", help="do not validate the unpruned/pruned starting points")
    ap.add_argument("--out", default="bench/results/finetune.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    rows = []

    def emit(row: dict) -> None:
        row.update(imgsz=a.imgsz, threads=torch.get_num_threads(), cpus=os.cpu_count(), load1=round(os.getloadavg()[0], 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"platform": platform.platform(), "args": vars(a), "rows": rows}, indent=1))

    if not a.skip_reference:
        emit({"point": "unpruned", **_short(validate(a.model, a.data, imgsz=a.imgsz))})
    if a.pruned:
        pruned = Path(a.pruned)
    else:
        t = time.monotonic()
        yolo, info = prune_model(a.model, a.ratio, criterion=a.criterion, data_yaml=a.data, imgsz=a.imgsz,
                                 allocation=a.allocation, calib_images=a.calib_images, progress=False)
        pruned = save_pruned(yolo, work / "pruned.pt", info)
        emit({"point": "pruned, no fine-tuning", "prune_s": round(time.monotonic() - t, 1), "pruned_pt": str(pruned),
              "criterion": info.get("criterion"), "achieved_ratio": info.get("achieved_ratio"),
              "params": info.get("params_after"), "gflops": info.get("gflops_after"),
              **(_short(validate(pruned, a.data, imgsz=a.imgsz)) if not a.skip_reference else {})})
    for point in a.points.split(","):
        if point == "distill":
            r = recover(pruned, a.data, work / f"{point}.pt", method="distill", teacher=a.model, imgsz=a.imgsz, epochs=None,
                        time_budget_min=a.budget_min, train_device="cpu", workers=0, measure=False, progress=False)
            emit({"point": f"fine-tuned {a.budget_min:g} min, {point}", "iterations": r["iterations"],
                  "train_s": r["seconds"], **_short(validate(work / f"{point}.pt", a.data, imgsz=a.imgsz))})
            continue
        if point not in ("labels", "labels-kd"):
            raise SystemExit(f"unknown point {point}")
        teacher = a.model if point == "labels-kd" else None
        r = recover(pruned, a.data, work / f"{point}.pt", method="labels", epochs=100, imgsz=a.imgsz, teacher=teacher,
                    labels_distill=teacher is not None, batch=a.batch, train_device="cpu", progress=False,
                    time_budget_min=a.budget_min, measure=False)
        emit({"point": f"fine-tuned {a.budget_min:g} min, {point}", "epochs": r["epochs"], "train_s": r["seconds"],
              **_short(r["after"])})


def _short(m: dict) -> dict:
    return {"map50_95": m["map50_95"], "map50": m["map50"]}


if __name__ == "__main__":
    main()
