"""Validation of (pruned) detectors: mAP of a module, a ``.pt`` or an ``.onnx`` on a dataset's val split,
through Ultralytics' own validator (the one accuracy gate of prune, recovery, export and the build).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import prune_pack.offline  # noqa: F401 - before Ultralytics
import torch
import torch.nn as nn
import yaml

from prune_pack.errors import UserInputError
from prune_pack.pruning.checkpoint import _first_line, load_detection_checkpoint
from prune_pack.pruning.sources import resolve_dataset

ModelLike = Union[str, Path, nn.Module]


def per_class_map(box: Any, names: dict[int, str]) -> dict[str, float]:
    """{class name: mAP50-95} of an Ultralytics ``Metric`` (``metrics.box``), for the classes in the val labels."""
    return {str(names.get(int(c), int(c))): round(float(box.ap[i].mean() if box.ap.ndim > 1 else box.ap[i]), 5)
            for i, c in enumerate(box.ap_class_index)}


def metrics_from_validator(validator: Any, names: dict[int, str]) -> Optional[dict]:
    """mAP50-95, mAP50 and per-class mAP50-95 (classes present in the val labels) of the last run."""
    m = getattr(validator, "metrics", None)
    box = getattr(m, "box", None)
    if box is None:
        return None
    per_class = per_class_map(box, names)
    return {
        "map50_95": round(float(box.map), 5),
        "map50": round(float(box.map50), 5),
        "precision": round(float(box.mp), 5),
        "recall": round(float(box.mr), 5),
        "per_class": per_class,
    }


@contextlib.contextmanager
def ultralytics_run(quiet: bool) -> Iterator[None]:
    """Silence Ultralytics' INFO logging while ``quiet``, and restore global state it changes."""
    from ultralytics.utils import LOGGER

    # Ultralytics' select_device() sets torch's global thread count to cpu_count - 1 (1 on a
    # 2-core PC); that is its choice for its run, but must not leak into the caller's process.
    threads = torch.get_num_threads()
    level = LOGGER.level
    if quiet:
        LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)
        torch.set_num_threads(threads)


def dataset_names(data_yaml: Path) -> dict[int, str]:
    cfg = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))
    return {int(k): str(v) for k, v in cfg["names"].items()}


def validate(
    model_or_path: ModelLike,
    data_yaml: Union[str, Path],
    imgsz: int = 640,
    batch: int = 1,
    device: str = "cpu",
    progress: bool = False,
    split: str = "val",
) -> dict:
    """mAP of a module, a ``.pt`` (pruned too) or an ``.onnx`` (FP32 or INT8 QDQ) on a dataset's val split.

    Batch 1 by default: Ultralytics' NMS gives up on a batch after 2 s + 0.05 s per image and drops
    the rest of its detections; on a loaded 2-core CPU at 896 batches of 16 hit that limit and the
    demo model measured 0.573 instead of 0.871 mAP50-95 (bench/frames_recovery.py); one image per
    batch gets 2.05 s, and the forward costs the same per image on a CPU.

    Returns ``map50_95``, ``map50``, ``precision``, ``recall`` and ``per_class`` {name: mAP50-95}
    (classes that occur in the val labels). ONNX runs through Ultralytics' AutoBackend, i.e.
    ONNX Runtime; a static-shape ONNX is validated at its own input size, batch 1.
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    with tempfile.TemporaryDirectory(prefix="prune-pack-val-") as tmp:
        data = resolve_dataset(data_yaml, Path(tmp) / "data")
        names = dataset_names(data)
        model: Any = model_or_path
        if isinstance(model_or_path, nn.Module):
            model = copy.deepcopy(model_or_path).float().eval()
        else:
            p = Path(model_or_path).expanduser()
            if p.suffix == ".onnx":
                if not p.is_file():
                    raise UserInputError(f"model file not found: {model_or_path}")
                nc = _check_onnx(p)
                if nc is not None and nc != len(names):
                    raise UserInputError(f"{model_or_path} predicts {nc} classes, the dataset {data_yaml} has {len(names)}")
                model = str(p.resolve())
            else:
                model = load_detection_checkpoint(p)[0]
        if isinstance(model, nn.Module):
            nc = model.model[-1].nc
            if nc != len(names):
                raise UserInputError(f"the model predicts {nc} classes, the dataset {data_yaml} has {len(names)}; "
                                     "fine-tune it on this dataset first (prune-pack finetune)")
        args = {"data": str(data), "imgsz": imgsz, "batch": batch, "device": device, "plots": False,
                "split": split, "verbose": progress, "save_json": False, "rect": True,  # as `yolo val`
                "task": "detect", "mode": "val",
                "project": tmp, "name": "val", "exist_ok": True}
        if isinstance(model, str):
            args["model"] = model
        validator = DetectionValidator(args=args, save_dir=Path(tmp) / "val")
        with ultralytics_run(not progress):
            validator(model=model)
        metrics = metrics_from_validator(validator, names)
        if metrics is None:
            raise RuntimeError("the validator returned no detection metrics")
        sz = validator.args.imgsz  # a static ONNX overrides the requested size with its own
        h, w = (int(v) for v in sz) if isinstance(sz, (list, tuple)) else (int(sz), int(sz))
        metrics["imgsz"] = h if h == w else [h, w]
        metrics["images"] = int(validator.seen or 0)
        return metrics


def _check_onnx(path: Path) -> Optional[int]:
    """Fail in one line on a broken file; the class count of a (1, 4 + nc, anchors) output, if static."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError/ValidationError/...
        raise UserInputError(f"{path}: not a loadable ONNX model ({_first_line(e)})") from None
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] if model.graph.output else []
    return dims[1] - 4 if len(dims) == 3 and dims[1] > 4 else None


def cli_val(args: argparse.Namespace, cfg: Any) -> dict:
    m = validate(args.model, args.data, imgsz=args.imgsz, batch=getattr(args, "batch", None) or 1)
    per = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m["per_class"].items(), key=lambda kv: -kv[1])[:5])
    m["model"] = str(args.model)
    m["summary"] = f"{args.model}: mAP50-95 {m['map50_95']:.4f}, mAP50 {m['map50']:.4f}" + (f" (best classes: {per})" if per else "")
    return m
