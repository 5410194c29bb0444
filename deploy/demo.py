"""The built-in demo: a deterministic synthetic detection dataset and a small trained checkpoint.

``prune-pack build --target-ms 40`` with no ``--model``/``--data`` must work on a fresh offline
machine, so nothing here is downloaded: the dataset (coloured shapes on textured, cluttered
backgrounds; four classes; a real held-out val split) is generated from a fixed seed into the
user's cache folder, and the checkpoint ``prune_pack/demo/demo.pt`` was trained on it once with
the Ultralytics trainer by ``python -m prune_pack.deploy.demo train`` (reproducible).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np

import prune_pack
from prune_pack.errors import UserInputError

DEMO_VERSION = 1  # bump when the generator changes: the cache folder name changes with it
CLASSES = ["circle", "square", "triangle", "star"]
IMG_SIZE = 640
N_TRAIN = 200
N_VAL = 50
SEED = 20261129
DEMO_DIR = Path(prune_pack.__file__).resolve().parent / "demo"  # package data (pyproject: "prune_pack" = ["demo/*"])
DEMO_PT = DEMO_DIR / "demo.pt"
# The demo model is a YOLOv8n (COCO-initialised, trained on the synthetic set). At 640 it runs in
# about 30 ms p95 on 2 cores, so the demo deploys at 896 (about 2x the FLOPs): there 40 ms needs
# real pruning, and the search visibly works.
DEMO_IMGSZ = 896
DEMO_EPOCHS = 1  # the default fine-tune of the demo build: keeps the whole run under 10 minutes
DEMO_FRACTION = 0.5  # share of the demo train split used per fine-tuning epoch


def cache_root() -> Path:
    """The user's cache folder (XDG on Linux; ~/Library/Caches on macOS; %LOCALAPPDATA% on Windows)."""
    if os.environ.get("PRUNE_PACK_CACHE"):
        return Path(os.environ["PRUNE_PACK_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "prune-pack"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    import cv2

    # Low-frequency colour noise upsampled (smooth blotches) + a gradient + fine grain: enough
    # texture that a detector must learn shapes, not "anything that is not flat".
    low = rng.uniform(40, 215, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    gx = np.linspace(-1, 1, size, dtype=np.float32)
    grad = (gx[None, :, None] * rng.uniform(-40, 40) + gx[:, None, None] * rng.uniform(-40, 40))
    img = img + grad + rng.normal(0, rng.uniform(3, 14), size=(size, size, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    # Clutter: lines and open arcs that are not objects (distractors).
    for _ in range(int(rng.integers(3, 12))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.6:
            p2 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, p1, p2, color, int(rng.integers(1, 5)), cv2.LINE_AA)
        else:
            ax = (int(rng.integers(10, 80)), int(rng.integers(10, 80)))
            a0 = float(rng.uniform(0, 360))
            cv2.ellipse(img, p1, ax, 0, a0, a0 + float(rng.uniform(60, 200)), color, int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def _polygon(cls: int, cx: float, cy: float, r: float, rot: float) -> Optional[np.ndarray]:
    if cls == 0:
        return None  # circle: drawn as an ellipse
    if cls == 1:
        angles = [rot + k * math.pi / 2 + math.pi / 4 for k in range(4)]
        radii = [r] * 4
    elif cls == 2:
        angles = [rot + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
    else:
        angles = [rot + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    pts = [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]
    return np.array(pts, dtype=np.float32)


def _sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    import cv2

    img = _background(rng, size)
    boxes: list[tuple[int, float, float, float, float]] = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 7))):
        cls = int(rng.integers(0, len(CLASSES)))
        r = float(size * rng.uniform(0.03, 0.16))
        for _attempt in range(20):
            cx, cy = (float(v) for v in rng.uniform(r, size - r, 2))
            x1, y1, x2, y2 = cx - r, cy - r, cx + r, cy + r
            if all(x2 < a or x1 > c or y2 < b or y1 > d for a, b, c, d in placed):
                break
        else:
            continue
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        pts = _polygon(cls, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        if pts is None:
            ry = r * float(rng.uniform(0.85, 1.0))  # a slightly squashed circle: still "circle"
            cv2.ellipse(img, (int(cx), int(cy)), (int(r), int(ry)), 0, 0, 360, color, -1, cv2.LINE_AA)
            bx1, by1, bx2, by2 = cx - r, cy - ry, cx + r, cy + ry
        else:
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], color, cv2.LINE_AA)
            bx1, by1 = pts.min(0)
            bx2, by2 = pts.max(0)
        if rng.random() < 0.4:  # an outline in another colour sometimes
            outline = tuple(int(c) for c in rng.integers(0, 256, 3))
            if pts is None:
                cv2.ellipse(img, (int(cx), int(cy)), (int(r), int(ry)), 0, 0, 360, outline, 2, cv2.LINE_AA)
            else:
                cv2.polylines(img, [np.round(pts).astype(np.int32)], True, outline, 2, cv2.LINE_AA)
        placed.append((x1, y1, x2, y2))
        bx1, by1 = max(0.0, float(bx1)), max(0.0, float(by1))
        bx2, by2 = min(float(size), float(bx2)), min(float(size), float(by2))
        boxes.append((cls, (bx1 + bx2) / 2 / size, (by1 + by2) / 2 / size, (bx2 - bx1) / size, (by2 - by1) / size))
    # Global photometric variation and slight blur, like a real camera.
    img = cv2.convertScaleAbs(img, alpha=float(rng.uniform(0.75, 1.2)), beta=float(rng.uniform(-25, 25)))
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return img, boxes


def dataset_dir() -> Path:
    return cache_root() / f"demo-shapes-v{DEMO_VERSION}"


def ensure_demo_dataset(root: Optional[Path] = None, n_train: int = N_TRAIN, n_val: int = N_VAL) -> Path:
    """Generate the demo dataset once (deterministic) and return its ``data.yaml``.

    Written into a temp folder and renamed, so an interrupted generation never leaves a
    half-dataset that a later run would trust.
    """
    import cv2

    root = Path(root) if root else dataset_dir()
    yaml_path = root / "data.yaml"
    if (root / ".complete").is_file() and yaml_path.is_file():
        return yaml_path
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([SEED, offset + i])  # per-image streams: order-independent
            img, boxes = _sample(rng, IMG_SIZE)
            stem = f"{split}_{i:04d}"
            cv2.imwrite(str(tmp / "images" / split / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            lines = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in boxes]
            (tmp / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    (tmp / "data.yaml").write_text(f"# prune-pack demo dataset v{DEMO_VERSION} (synthetic, generated)\npath: .\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    (tmp / ".complete").write_text(json.dumps({"version": DEMO_VERSION, "seed": SEED, "train": n_train, "val": n_val}))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return yaml_path


def demo_model() -> Path:
    """The shipped demo checkpoint, or a clear error if the install lacks it."""
    if not DEMO_PT.is_file():
        raise UserInputError(
            f"the built-in demo model is missing ({DEMO_PT}); reinstall prune-pack or pass --model and --data"
        )
    return DEMO_PT


def train_demo(out: Path, init: str, epochs: int, imgsz: int, batch: int, workers: int = 2,
               finish_epochs: int = 0, finish_imgsz: int = 640) -> Path:
    """Train the demo checkpoint with the Ultralytics trainer (run once; result shipped in git).

    ``init`` is a YOLOv8 checkpoint or yaml to start from (COCO weights converge in a few
    epochs; ``yolov8n.yaml`` trains from scratch, slower). Optional ``finish_epochs`` at
    ``finish_imgsz`` adapt the model to the deployment input size.
    """
    import prune_pack.offline  # noqa: F401 - before Ultralytics: never the network
    from ultralytics import YOLO

    from prune_pack.pruning.sources import resolve_dataset

    data = ensure_demo_dataset()
    work = Path(out).resolve().parent / "demo-train"
    data_abs = resolve_dataset(data, work)
    model = YOLO(init)
    model.train(data=str(data_abs), epochs=epochs, imgsz=imgsz, batch=batch, workers=workers, device="cpu",
                project=str(work), name="stage1", exist_ok=True, plots=False, amp=False, seed=0, deterministic=True,
                mosaic=1.0, close_mosaic=max(1, epochs // 3), patience=0, cache=True, scale=0.6, verbose=False)
    best = work / "stage1" / "weights" / "last.pt"
    if finish_epochs:
        model = YOLO(str(best))
        model.train(data=str(data_abs), epochs=finish_epochs, imgsz=finish_imgsz, batch=batch, workers=workers,
                    device="cpu", project=str(work), name="stage2", exist_ok=True, plots=False, amp=False, seed=0,
                    lr0=0.002, warmup_epochs=0, mosaic=0.0, patience=0, verbose=False)
        best = work / "stage2" / "weights" / "last.pt"
    # Ship a lean checkpoint: the fp16 model only (no optimizer state, no EMA duplicate).
    import torch

    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    # No machine-specific paths in a file that ships: keep the training settings, drop the paths.
    args = {k: v for k, v in (ckpt.get("train_args") or {}).items() if k not in ("data", "project", "name", "save_dir", "model")}
    args.update(task="detect", model="demo.pt", data=f"demo-shapes-v{DEMO_VERSION}")
    lean = {"model": ckpt.get("ema") or ckpt["model"], "train_args": args,
            "date": ckpt.get("date"), "version": ckpt.get("version"), "epoch": -1,
            "optimizer": None, "ema": None, "updates": None, "best_fitness": None}
    lean["model"] = lean["model"].half()
    if isinstance(getattr(lean["model"], "args", None), dict):
        lean["model"].args = {k: v for k, v in lean["model"].args.items() if k not in ("data", "project", "name", "save_dir", "model")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(lean, out)
    return Path(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune_pack.deploy.demo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("data", help="generate the demo dataset into the cache and print its yaml")
    g.add_argument("--root")
    t = sub.add_parser("train", help="train the demo checkpoint (writes prune_pack/demo/demo.pt)")
    t.add_argument("--init", required=True,
                   help="starting checkpoint: a local COCO YOLOv8n .pt (e.g. ../shared/models/yolov8n-coco.pt); nothing is downloaded")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--imgsz", type=int, default=640)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--finish-epochs", type=int, default=0)
    t.add_argument("--finish-imgsz", type=int, default=DEMO_IMGSZ)
    t.add_argument("--out", default=str(DEMO_PT))
    a = ap.parse_args(argv)
    if a.cmd == "data":
        print(ensure_demo_dataset(Path(a.root) if a.root else None))
    else:
        print(train_demo(Path(a.out), a.init, a.epochs, a.imgsz, a.batch, finish_epochs=a.finish_epochs,
                         finish_imgsz=a.finish_imgsz))
    return 0


if __name__ == "__main__":
    sys.exit(main())
