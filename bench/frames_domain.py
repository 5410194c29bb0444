"""Recovery with a domain gap (issue #15): a COCO model pruned once, distilled on the train split vs on
frames of the val distribution, evaluated on two disjoint halves of the labeled val split.

bench/frames_recovery.py cannot show the issue's effect: the demo's train, val and frames come from one
generator. Here (coco128 by default) the train images are COCO train2017 and the val images COCO
val2017: the issue's H200 run gained ~10 points by distilling on the val images themselves. This
benchmark repeats it on the CPU with the product's code, and separates what is transductive from
what is not. The val split's images are sorted and cut in two halves, A and B (labels kept for the
evaluation only). Arms, all from ONE ``prune_model`` (defaults, calibration on the train split):

  unpruned   the teacher
  pruned     no recovery
  train      ``recover(method="distill")`` on the train images
  frames     the same on ``--frames-dir`` (e.g. val half A harvested from a video by an agent and
             pulled over MQTT: bench/frames_e2e.py); without it, val half A's image files
  valA       the same on val half A's image files (when --frames-dir is given: the undegraded control)
  valall     the same on every val image (the issue's stand-in for a fixed camera's frames)

Every recovery gets the same number of iterations (``--epochs`` passes over the train split's image
count at the CPU's default batch 8). Every model is validated with ``pruning.validate`` (batch 1) on
val A, val B and the whole val. Readings: an arm on B when it saw only A = frames of the same
distribution that are not the evaluation images; on A (or valall anywhere) = transductive, which is
what a fixed camera gets (it sees the same scenes it will be asked about).

Rows are appended to ``--out`` (a re-run of an arm replaces its row), so arms can run one at a time:
  nice -n 5 python bench/frames_domain.py --arms unpruned,pruned,train --epochs 8
  nice -n 5 python bench/frames_domain.py --arms frames --frames-dir bench/out/frames_e2e/pulled --epochs 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from frames_recovery import Results  # the shared results file (same folder: run as a script)

from prune_pack.pruning.checkpoint import save_pruned
from prune_pack.pruning.prune import prune_model
from prune_pack.pruning.recover import recover
from prune_pack.pruning.sources import dataset_images, resolve_dataset
from prune_pack.pruning.validate import validate

REPO = Path(__file__).resolve().parent.parent
SHARED = Path("/work/shared") if Path("/work/shared").is_dir() else REPO.parent / "shared"
ARMS = ("unpruned", "pruned", "train", "frames", "valA", "valall")


def val_halves(data: Path) -> tuple[list[Path], list[Path]]:
    """The resolved dataset's val images, sorted, cut in two halves (A, B)."""
    imgs = sorted(dataset_images(data, "val"), key=lambda p: p.name)
    return imgs[: len(imgs) // 2], imgs[len(imgs) // 2:]


def _label_of(img: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix .txt."""
    parts = list(img.parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:-1], img.stem + ".txt")


def subset_dataset(data: Path, images: list[Path], dest: Path) -> Path:
    """A dataset yaml whose val split is ``images`` (per-file links, labels copied beside them)
    and whose train split is the source's; written into ``dest``, resolved like any user dataset."""
    cfg = yaml.safe_load(data.read_text(encoding="utf-8"))
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images" / "val").mkdir(parents=True)
    (dest / "labels" / "val").mkdir(parents=True)
    for img in images:
        (dest / "images" / "val" / img.name).symlink_to(img.resolve())
        if _label_of(img).is_file():
            shutil.copyfile(_label_of(img), dest / "labels" / "val" / (img.stem + ".txt"))
    root = Path(cfg["path"])
    train = [str(root / t) for t in (cfg["train"] if isinstance(cfg["train"], list) else [cfg["train"]])]
    y = dest / "data.yaml"
    y.write_text(yaml.safe_dump({"path": str(dest), "train": train, "val": "images/val", "names": cfg["names"]}))
    return resolve_dataset(y, dest / "resolved")


def image_folder(images: list[Path], dest: Path) -> Path:
    """A folder of links to ``images`` (no labels): unlabeled frames for ``recover``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for img in images:
        (dest / img.name).symlink_to(img.resolve())
    return dest


def evaluate(model: Path, sets: dict[str, Path], imgsz: int) -> dict:
    """mAP50-95 (and mAP50) of one model on every evaluation set, with the seconds it took."""
    out: dict = {}
    t = time.monotonic()
    for name, y in sets.items():
        m = validate(model, y, imgsz=imgsz, batch=1)
        out[f"map50_95_{name}"], out[f"map50_{name}"] = round(m["map50_95"], 4), round(m["map50"], 4)
    out["eval_s"] = round(time.monotonic() - t, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "yolov8n-coco.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "coco128" / "data.yaml"))
    ap.add_argument("--ratio", type=float, default=0.20)
    ap.add_argument("--epochs", type=float, default=8.0, help="recovery budget in train-split passes (same in every arm)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--frames-dir", default=None, help="the 'frames' arm's unlabeled frames (default: val half A)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "frames_domain"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "frames_domain.json"))
    a = ap.parse_args()
    arms = [x for x in a.arms.split(",") if x]
    if set(arms) - set(ARMS):
        raise SystemExit(f"--arms: choose from {', '.join(ARMS)}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = resolve_dataset(a.data, work / "data")
    half_a, half_b = val_halves(data)
    sets = {"A": subset_dataset(data, half_a, work / "sets" / "A"), "B": subset_dataset(data, half_b, work / "sets" / "B"),
            "all": subset_dataset(data, half_a + half_b, work / "sets" / "all")}
    old = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    res = Results(Path(a.out), vars(a), [r for r in old.get("rows", []) if r.get("arm") not in arms])
    res.meta["runs"] = old.get("runs", []) + [{k: res.meta[k] for k in ("date", "args", "load_start")}]
    res.meta["val_halves"] = {"A": [p.name for p in half_a], "B": [p.name for p in half_b]}
    pruned = work / f"pruned-r{a.ratio}.pt"
    if not pruned.is_file() and set(arms) - {"unpruned"}:
        t = time.monotonic()
        yolo, info = prune_model(a.model, a.ratio, data_yaml=data, imgsz=a.imgsz, progress=True)
        save_pruned(yolo, pruned, info)
        (work / f"pruned-r{a.ratio}.json").write_text(json.dumps(
            {"achieved_ratio": info["achieved_ratio"], "prune_s": round(time.monotonic() - t, 1),
             "calibration_frames": info["frames"]["calibration"], "load1": os.getloadavg()[0]}))
    prune_info = json.loads((work / f"pruned-r{a.ratio}.json").read_text()) if pruned.is_file() else {}
    frames = {"frames": Path(a.frames_dir) if a.frames_dir else image_folder(half_a, work / "frames-valA"),
              "valA": image_folder(half_a, work / "frames-valA"), "valall": image_folder(half_a + half_b, work / "frames-valall")}
    for arm in arms:
        row: dict = {"arm": arm, "ratio": 0.0 if arm == "unpruned" else a.ratio}
        model = Path(a.model) if arm == "unpruned" else pruned
        if arm not in ("unpruned", "pruned"):
            unlabeled = None if arm == "train" else frames[arm]
            r = recover(pruned, data, work / f"{arm}.pt", method="distill", teacher=a.model, imgsz=a.imgsz, epochs=a.epochs,
                        train_device="cpu", unlabeled=unlabeled, measure=False, progress=True)
            model = Path(r["out"])
            row.update(distill_images=r["frames"]["distillation"] or len(dataset_images(data, "train")),
                       unlabeled=str(unlabeled) if unlabeled else None, iterations=r["iterations"], batch=r["batch"],
                       recover_s=r["seconds"], load1_after_recover=round(os.getloadavg()[0], 2))
        if arm != "unpruned":
            row.update(achieved_ratio=prune_info.get("achieved_ratio"), prune_s=prune_info.get("prune_s"))
        row.update(evaluate(model, sets, a.imgsz))
        res.emit(row)
    res.meta["load_end"] = os.getloadavg()
    res.emit({"done": True, "arms": arms})
    res.rows.pop()  # the marker only flushes load_end; keep rows to arms
    res.out.write_text(json.dumps({**res.meta, "rows": res.rows}, indent=1))


if __name__ == "__main__":
    main()
