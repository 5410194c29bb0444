"""Does recovering on unlabeled frames of the deployment scene close the pruning gap? (issue #15)

On the built-in demo (its model, its synthetic dataset, its input size 896), for each pruning ratio
and each count of unlabeled frames: prune with the product's ``prune_model`` (frames, when given,
replace the train split for the least-squares calibration and the BatchNorm re-estimation), recover
with the product's ``recover`` (distillation; frames, when given, replace the train images) for the
*same* budget as the demo build's recovery (``DEMO_EPOCHS`` x ``DEMO_FRACTION`` passes over the
train split's image count, i.e. the same number of iterations), and validate on the demo's labeled
val split, the only accuracy gate. Validation runs at batch 1: on a loaded CPU Ultralytics' NMS time
limit (2 s + 0.05 s per image of the batch) cut batches of 16 short and lost detections (0.57 vs 0.86).

Frames stand in for a device's harvest: the demo's own generator (``deploy.demo._sample``) with
seeds disjoint from its train and val splits, written as JPEG without labels.

Usage (one run, nice'd, on a shared CPU):
  nice python bench/frames_recovery.py --ratios 0.15,0.4 --frames 0,500,2000 --out bench/results/frames_recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import prune_pack.offline  # noqa: F401 - before Ultralytics
import torch

from prune_pack.deploy import demo
from prune_pack.pruning.checkpoint import save_pruned
from prune_pack.pruning.prune import prune_model
from prune_pack.pruning.recover import recover
from prune_pack.pruning.sources import resolve_dataset
from prune_pack.pruning.validate import validate

from harvest import cpu_name  # bench/harvest.py: lscpu model name, family and model (the hosts differ by those)

FRAME_SEED_OFFSET = 2_000_000  # the demo's train split uses offsets 0.., its val split 1_000_000..


def make_frames(folder: Path, n: int) -> Path:
    """``n`` unlabeled demo-domain frames (JPEG, no labels), generated once into ``folder``."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        f = folder / f"frame_{i:05d}.jpg"
        if not f.is_file():
            img, _ = demo._sample(np.random.default_rng([demo.SEED, FRAME_SEED_OFFSET + i]), demo.IMG_SIZE)
            cv2.imwrite(str(f), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


class Results:
    """One benchmark's JSON file: the run's context (date, CPU, load, arguments) and its rows, rewritten
    after every row so an interrupted run keeps what it measured. Each row gets the load average and
    torch's thread count at the moment it was recorded (shared CPU: seconds are only read next to them)."""

    def __init__(self, out: Path, args: dict, rows: Optional[list[dict]] = None) -> None:
        self.out, self.rows = out, list(rows or [])
        self.meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "cpus": os.cpu_count(),
                     "platform": platform.platform(), "args": args, "load_start": os.getloadavg()}

    def emit(self, row: dict) -> dict:
        row.update(load1=round(os.getloadavg()[0], 2), threads=torch.get_num_threads())
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1))
        return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.15,0.4")
    ap.add_argument("--frames", default="0,500,2000")
    ap.add_argument("--imgsz", type=int, default=demo.DEMO_IMGSZ)
    ap.add_argument("--epochs", type=float, default=demo.DEMO_EPOCHS, help="recovery budget in train-split passes (the demo build's)")
    ap.add_argument("--fraction", type=float, default=demo.DEMO_FRACTION)
    ap.add_argument("--frames-dir", default=None, help="where the generated frames go (default: the cache)")
    ap.add_argument("--out", default="bench/results/frames_recovery.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-frames-"))
    data = resolve_dataset(demo.ensure_demo_dataset(), work / "data")
    model = demo.demo_model()
    counts = [int(x) for x in a.frames.split(",")]
    pool = make_frames(Path(a.frames_dir) if a.frames_dir else demo.cache_root() / "demo-frames-v1", max(counts))
    res = Results(Path(a.out), vars(a))
    emit = res.emit

    emit({"ratio": 0.0, "frames": 0, "map50_95": validate(model, data, imgsz=a.imgsz, batch=1)["map50_95"]})
    for n in counts:
        cache: dict = {}  # the calibration statistics and channel scores of one image set serve every ratio
        for ratio in (float(r) for r in a.ratios.split(",")):
            frames = None
            if n:
                frames = work / f"frames-{n}"  # the first n of the pool: 500 is a subset of 2000
                frames.mkdir(exist_ok=True)
                for f in sorted(pool.glob("*.jpg"))[:n]:
                    (frames / f.name).unlink(missing_ok=True)
                    (frames / f.name).symlink_to(f)
            t = time.monotonic()
            yolo, info = prune_model(model, ratio, data_yaml=data, imgsz=a.imgsz, unlabeled=frames, progress=False,
                                     calib_cache=cache)
            pt = save_pruned(yolo, work / f"r{ratio}-f{n}.pt", info)
            prune_s = time.monotonic() - t  # the second ratio reuses the cached statistics
            pruned_map = validate(pt, data, imgsz=a.imgsz, batch=1)["map50_95"]
            r = recover(pt, data, work / f"r{ratio}-f{n}-rec.pt", method="distill", teacher=model, imgsz=a.imgsz,
                        epochs=a.epochs, fraction=a.fraction, train_device="cpu", unlabeled=frames, measure=False,
                        progress=False)
            emit({"ratio": ratio, "achieved": info["achieved_ratio"], "frames": n,
                  "calib_frames": info["frames"]["calibration"], "distill_frames": r["frames"]["distillation"],
                  "pruned_map50_95": pruned_map, "map50_95": validate(r["out"], data, imgsz=a.imgsz, batch=1)["map50_95"],
                  "iterations": r["iterations"], "prune_s": round(prune_s, 1), "recover_s": r["seconds"]})
    res.meta["load_end"] = os.getloadavg()
    emit({"done": True})


if __name__ == "__main__":
    main()
