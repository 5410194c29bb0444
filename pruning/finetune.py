"""Fine-tuning and validation of (pruned) detectors through Ultralytics' own trainer and validator.

A pruned ``DetectionModel`` has non-standard widths that its ``yaml`` no longer describes.
Ultralytics' ``DetectionTrainer.get_model`` rebuilds the model from that yaml and copies only
the tensors whose shapes match, which silently resets every pruned layer to random full-width
weights (the classic pruning + fine-tuning bug). ``PrunedDetectionTrainer`` keeps the loaded
module instead, and the result is written as an FP32 checkpoint (Ultralytics stores FP16).

Distillation uses Ultralytics' own ``distill_model=`` (``ultralytics.nn.distill_model``): it
distils the three neck feature maps that feed the Detect head through learned 1x1 projectors,
so a pruned (narrower) student and a wider teacher fit together, and it is independent of the
class head, so it also works after the classes were transferred to a user's dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported anywhere

import torch
import torch.nn as nn
import yaml

from prune_pack.errors import UserInputError
from prune_pack.pruning.graph import layer_widths  # conv widths: the fingerprint a YAML rebuild changes
from prune_pack.pruning.sources import resolve_dataset, resolve_model, sha256_file

# Ultralytics' default distillation weight ('dis'); ``distill_weight`` scales it.
_ULTRALYTICS_DIS = 6.0

ModelLike = Union[str, Path, nn.Module]


# ----------------------------------------------------------------------------- loading


def load_detection_checkpoint(model_pt: Union[str, Path]) -> tuple[nn.Module, dict]:
    """Load an Ultralytics detection ``.pt`` (pruned or not) as an FP32 module, plus its checkpoint dict.

    Raises one ``UserInputError`` for anything that is not a loadable detection checkpoint (a
    truncated or foreign file), and never lets Ultralytics auto-install a module a pickle names.
    """
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    path = resolve_model(model_pt)
    try:
        # Reading the pickle's global names is cheap and fails on a damaged zip before Ultralytics
        # would; a missing module would otherwise make Ultralytics try `pip install` (offline hang).
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means "not a torch checkpoint"
        raise UserInputError(f"{model_pt}: not a loadable checkpoint (empty, truncated or not a torch file: {_first_line(e)})") from None
    import importlib.util

    for name in needed:
        top = name.split(".", 1)[0]
        if importlib.util.find_spec(top) is None:
            raise UserInputError(f"{model_pt}: checkpoint needs Python module '{top}' ({name}), which is not installed; "
                                 "is it an Ultralytics detection checkpoint?")
    try:
        model, ckpt = load_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - Ultralytics raises TypeError/RuntimeError/... for broken files
        raise UserInputError(f"{model_pt}: not a loadable Ultralytics checkpoint ({_first_line(e)})") from None
    if not isinstance(model, DetectionModel) or getattr(model, "task", "detect") != "detect":
        raise UserInputError(f"{model_pt}: a '{getattr(model, 'task', type(model).__name__)}' model; "
                             "prune-pack fine-tunes detection models only")
    if getattr(model.model[-1], "one2one_cv2", None) is not None:
        raise UserInputError(f"{model_pt}: end-to-end (NMS-free) detection heads are not supported")
    return model.float(), ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _head_class_convs(model: nn.Module) -> set[str]:
    """Names of the Detect head's last class convs (the only convs class transfer may change)."""
    head = model.model[-1]
    idx = len(model.model) - 1
    names = set()
    for attr in ("cv3", "one2one_cv3"):
        for i, seq in enumerate(getattr(head, attr, None) or ()):
            names.add(f"model.{idx}.{attr}.{i}.{len(seq) - 1}")
    return names


# ----------------------------------------------------------------------------- class transfer


def adapt_classes(model: nn.Module, names: dict[int, str]) -> bool:
    """Rebuild the Detect head's class outputs for ``names`` in place; True when anything changed.

    As Ultralytics does for unpruned models: rows of classes whose names match (case-insensitive)
    keep their trained weights, new classes get a fresh conv with the usual prior bias
    (``log(5 / nc / (640 / stride)^2)``); with the same class count and no name in common the head
    is kept as it is (renamed classes). Box branches, DFL and all pruned widths stay untouched.
    """
    head = model.model[-1]
    names = {int(k): str(v) for k, v in names.items()}
    old_names = {int(k): str(v) for k, v in (getattr(model, "names", None) or {}).items()}
    nc_new, nc_old = len(names), head.nc
    if old_names == names and nc_old == nc_new:
        return False

    def norm(s: str) -> str:
        return s.strip().lower()

    lookup = {norm(v): k for k, v in old_names.items() if k < nc_old}
    src = [lookup.get(norm(names[k]), -1) for k in range(nc_new)]
    if nc_new == nc_old and all(i < 0 for i in src):
        src = list(range(nc_new))  # same count, nothing in common: user renamed the classes, keep the head
    if src != list(range(nc_new)) or nc_new != nc_old:
        for attr in ("cv3", "one2one_cv3"):
            branch = getattr(head, attr, None)
            for i, seq in enumerate(branch or ()):
                old: nn.Conv2d = seq[-1]
                new = nn.Conv2d(old.in_channels, nc_new, 1).to(old.weight.device, old.weight.dtype)
                with torch.no_grad():
                    stride = float(head.stride[i]) if len(head.stride) > i and float(head.stride[i]) > 0 else 8.0 * 2**i
                    new.bias.fill_(math.log(5 / nc_new / (640 / stride) ** 2))
                    for k, j in enumerate(src):
                        if j >= 0:
                            new.weight[k] = old.weight[j]
                            new.bias[k] = old.bias[j]
                new.weight.requires_grad_(old.weight.requires_grad)
                new.bias.requires_grad_(old.bias.requires_grad)
                seq[-1] = new
    head.nc = nc_new
    head.no = nc_new + head.reg_max * 4
    model.nc = nc_new
    model.names = names
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["nc"] = nc_new
    model.criterion = None  # built for the old class count
    return True


# ----------------------------------------------------------------------------- trainer


def _trainer_class() -> type:
    from ultralytics.models.yolo.detect import DetectionTrainer

    class PrunedDetectionTrainer(DetectionTrainer):
        """``DetectionTrainer`` that trains the given module itself, never a rebuild from its YAML.

        Also keeps the best EMA in memory in FP32 (Ultralytics writes FP16 ``best.pt``/``last.pt``),
        with the metrics it was validated at, and skips ``final_eval`` (a second validation of the
        FP16 ``best.pt`` that would tell us nothing new).
        """

        def __init__(self, model: nn.Module, overrides: dict, _callbacks: Optional[dict] = None) -> None:
            self._source_model = model
            self.best_state: Optional[dict[str, Any]] = None
            super().__init__(overrides=overrides, _callbacks=_callbacks)

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
            # `cfg` (the yaml) is deliberately ignored: it describes the unpruned widths.
            src = weights if isinstance(weights, nn.Module) else self._source_model
            model = copy.deepcopy(src).float()
            for p in model.parameters():
                p.requires_grad_(True)
            model.names = self.data["names"]
            return model

        def save_model(self) -> bool:
            ok = super().save_model()
            if self.best_fitness == self.fitness:  # the same test Ultralytics uses for best.pt
                ema = copy.deepcopy(self.ema.ema)  # DistillationModel.__getstate__ drops hook features
                if hasattr(ema, "student_model"):
                    ema._remove_feature_hooks()
                    ema = ema.student_model
                ema = ema.float()
                ema.criterion = None
                self.best_state = {
                    "model": ema,
                    "epoch": self.epoch,
                    "metrics": _metrics_from_validator(self.validator, self.data["names"]) if self.validator else None,
                }
            return ok

        def final_eval(self) -> None:
            return None

    return PrunedDetectionTrainer


def per_class_map(box: Any, names: dict[int, str]) -> dict[str, float]:
    """{class name: mAP50-95} of an Ultralytics ``Metric`` (``metrics.box``), for the classes in the val labels."""
    return {str(names.get(int(c), int(c))): round(float(box.ap[i].mean() if box.ap.ndim > 1 else box.ap[i]), 5)
            for i, c in enumerate(box.ap_class_index)}


def _metrics_from_validator(validator: Any, names: dict[int, str]) -> Optional[dict]:
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
def _ultralytics_run(quiet: bool) -> Iterator[None]:
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


def _dataset_names(data_yaml: Path) -> dict[int, str]:
    cfg = yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))
    return {int(k): str(v) for k, v in cfg["names"].items()}


def finetune(
    model_pt: Union[str, Path],
    data_yaml: Union[str, Path],
    epochs: int,
    imgsz: int = 640,
    teacher: Optional[Union[str, Path]] = None,
    out: Union[str, Path] = "finetuned.pt",
    lr0: float = 0.002,
    batch: int = 16,
    workers: int = 2,
    device: str = "cpu",
    distill_weight: float = 1.0,
    progress: bool = True,
    project_dir: Optional[Union[str, Path]] = None,
    time_budget_min: Optional[float] = None,
    patience: int = 0,
    measure_before: bool = True,
    fraction: float = 1.0,
    seed: int = 0,
) -> dict:
    """Fine-tune a (pruned) detection checkpoint with Ultralytics' trainer, keeping its widths.

    Writes an FP32 checkpoint to ``out`` (the best EMA; with validation only at the end that is
    the last one) that keeps the input's ``prune_pack`` key and adds a ``finetune`` record.
    ``time_budget_min`` caps training time (Ultralytics' ``time=``; epochs are then re-estimated).
    Returns metrics before/after (mAP50-95, mAP50, per class) and run facts.
    """
    if epochs < 1 and not time_budget_min:
        raise UserInputError(f"--epochs must be >= 1, got {epochs}")
    if imgsz < 32 or imgsz % 32:
        raise UserInputError(f"--imgsz must be a multiple of 32 (>= 32), got {imgsz}")
    if lr0 <= 0:
        raise UserInputError(f"lr0 must be > 0, got {lr0}")
    out = Path(out).expanduser()
    tmp_root = Path(tempfile.mkdtemp(prefix="prune-pack-ft-"))
    try:
        data = resolve_dataset(data_yaml, tmp_root / "data")  # validates train/val/names first: fail before work
        model, ckpt = load_detection_checkpoint(model_pt)
        source_sha = sha256_file(resolve_model(model_pt))  # before `out` may overwrite it
        teacher_path = None
        if teacher is not None:
            teacher_path = resolve_model(teacher)
            load_detection_checkpoint(teacher_path)  # a broken teacher fails here in one line, not mid-run
        names = _dataset_names(data)
        widths_in = layer_widths(model)
        adapted = adapt_classes(model, names)
        class_convs = _head_class_convs(model)
        if adapted and progress:
            print(f"finetune: class head rebuilt for the dataset's {len(names)} classes (box branches and pruned widths kept)", file=sys.stderr)
        if teacher_path is not None and adapted and progress:
            print("finetune: distillation is feature-level (neck maps), so it still applies with other classes", file=sys.stderr)

        project = Path(project_dir).expanduser().resolve() if project_dir else tmp_root / "runs"
        result = _train(model, data, epochs, imgsz, teacher_path, lr0, batch, workers, device, distill_weight,
                        progress, project, time_budget_min, patience, measure_before, fraction, seed, str(model_pt))
        best = result.pop("best_model")

        widths_out = layer_widths(best)
        changed = {k for k in set(widths_in) | set(widths_out)
                   if widths_in.get(k) != widths_out.get(k) and k not in class_convs}
        if changed:  # would mean the trainer rebuilt the model: never write such a checkpoint
            raise RuntimeError(f"fine-tuning changed layer widths ({sorted(changed)[:3]}...); refusing to save")

        record = {
            "epochs": result["epochs_run"],
            "epochs_requested": epochs,
            "time_budget_min": time_budget_min,
            "lr0": lr0,
        # One optimizer step per batch: with Ultralytics' nbs=64 accumulation a 128-image
        # fine-tuning set gets 2 steps per epoch, far too few to recover a pruned model.
        "nbs": batch,
            "batch": batch,
            "imgsz": imgsz,
            "data": str(Path(data_yaml).expanduser().resolve()),
            "classes": names,
            "classes_adapted": adapted,
            "teacher": str(teacher_path) if teacher_path else None,
            "teacher_sha256": sha256_file(teacher_path) if teacher_path else None,
            "distill_weight": distill_weight if teacher_path else None,
            "source": str(Path(model_pt).expanduser().resolve()),
            "source_sha256": source_sha,
            "metrics_before": result["before"],
            "metrics_after": result["after"],
            "seconds": result["seconds"],
            "previous": ckpt.get("finetune"),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        train_args = {**result["train_args"], "data": record["data"]}  # not the temp copy, which is deleted
        save_checkpoint(best, out, ckpt, record, train_args)
        after, before = result["after"] or {}, result["before"] or {}
        summary = (f"fine-tuned {result['epochs_run']} epoch(s) in {result['seconds']:.0f} s: mAP50-95 "
                   f"{before.get('map50_95', float('nan')):.4f} -> {after.get('map50_95', float('nan')):.4f}"
                   f"{' (distilled)' if teacher_path else ''}; wrote {out}")
        return {
            "out": str(out),
            "before": result["before"],
            "after": result["after"],
            "epochs": result["epochs_run"],
            "seconds": result["seconds"],
            "distill": bool(teacher_path),
            "classes_adapted": adapted,
            "widths_kept": True,
            "losses": result["losses"],
            "run_dir": str(project) if project_dir else None,
            "summary": summary,
        }
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _train(model: nn.Module, data: Path, epochs: int, imgsz: int, teacher: Optional[Path], lr0: float, batch: int,
           workers: int, device: str, distill_weight: float, progress: bool, project: Path,
           time_budget_min: Optional[float], patience: int, measure_before: bool, fraction: float, seed: int,
           source: str) -> dict:
    overrides: dict[str, Any] = {
        "model": source,  # provenance only: get_model() returns the loaded module
        "data": str(data),
        "task": "detect",
        "mode": "train",
        "epochs": max(int(epochs), 1),
        "imgsz": imgsz,
        "batch": batch,
        "workers": workers,
        "device": device,
        "optimizer": "SGD",  # 'auto' would ignore lr0 and pick AdamW with its own rate
        "lr0": lr0,
        # One optimizer step per batch: with Ultralytics' nbs=64 accumulation a 128-image
        # fine-tuning set gets 2 steps per epoch, far too few to recover a pruned model.
        "nbs": batch,
        "warmup_epochs": min(1.0, max(epochs - 1, 0)),  # a trained model needs little warm-up
        "warmup_bias_lr": 0.0,  # Ultralytics' 0.1 bias warm-up start would wreck trained biases
        "amp": False,  # no AMP on CPU, and no check_amp() (which would want to download a model)
        "plots": False,  # plots download a font
        "val": patience > 0,  # otherwise validate only after the last epoch
        "patience": patience if patience > 0 else 100000,
        "project": str(project),
        "name": "finetune",
        "exist_ok": True,
        "save": True,
        "verbose": progress,
        "fraction": fraction,
        "seed": seed,
        "deterministic": False,  # deterministic kernels are slower on CPU and we don't compare bitwise
        "cache": False,
    }
    if time_budget_min:
        overrides["time"] = float(time_budget_min) / 60.0
    if teacher is not None:
        overrides["distill_model"] = str(teacher)
        overrides["dis"] = _ULTRALYTICS_DIS * float(distill_weight)

    before = validate(model, data, imgsz=imgsz, batch=batch, device=device, progress=progress) if measure_before else None
    t0 = time.monotonic()
    with _ultralytics_run(not progress):
        trainer = _trainer_class()(model, overrides)
        # As Ultralytics' Model.train() does: hand the trainer a ready module, so setup_model() keeps it.
        trainer.model = trainer.get_model()
        trainer.train()
    seconds = time.monotonic() - t0
    best = trainer.best_state
    if best is None:
        raise RuntimeError("the trainer finished without a checkpoint (no epoch completed)")
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(trainer.args).items()}
    losses = {k: round(float(v), 5) for k, v in (trainer.tloss or {}).items()}  # last epoch's mean train losses
    return {
        "losses": losses,
        "best_model": best["model"],
        "before": before,
        "after": best["metrics"],
        "epochs_run": int(trainer.epoch) + 1,
        "seconds": round(seconds, 1),
        "train_args": args,
    }


def save_checkpoint(model: nn.Module, out: Union[str, Path], source_ckpt: dict, record: dict, train_args: dict) -> Path:
    """Write ``model`` as an FP32 Ultralytics checkpoint keeping the source's pruning record."""
    from prune_pack.pruning.checkpoint import write_checkpoint

    extra: dict[str, Any] = {"train_metrics": record.get("metrics_after"), "finetune": record}
    if "prune_pack" in source_ckpt:
        extra["prune_pack"] = source_ckpt["prune_pack"]
    return write_checkpoint(model, out, train_args, extra)


def iterative_prune_finetune(
    model_pt: Union[str, Path],
    data_yaml: Union[str, Path],
    ratio: float,
    steps: int = 3,
    epochs_per_step: int = 1,
    final_epochs: int = 0,
    criterion: str = "auto",
    imgsz: int = 640,
    teacher: Optional[Union[str, Path]] = None,
    out: Union[str, Path] = "pruned-iterative.pt",
    progress: bool = True,
    prune_kwargs: Optional[dict] = None,
    method: str = "labels",
    **finetune_kwargs: Any,
) -> dict:
    """Prune a bit, recover briefly, repeat: ``steps`` rounds that together remove ``ratio``.

    Each round removes ``1 - (1 - ratio) ** (1 / steps)`` of the current model's prunable channels
    (``pruning.prune.prune_model``) and fine-tunes ``epochs_per_step`` epochs; ``final_epochs``
    more epochs follow the last round. ``method`` picks the recovery (``labels``, ``distill`` from
    the original unpruned model, or ``auto``, see ``choose_method``). Every round's checkpoint
    carries the pruner's provenance chain and a ``finetune`` record. Returns per-round metrics.
    """
    from prune_pack.pruning.checkpoint import save_pruned
    from prune_pack.pruning.prune import prune_model

    if not 0.0 < ratio < 1.0:
        raise UserInputError(f"ratio {ratio}: expected a fraction in (0, 1)")
    if steps < 1 or epochs_per_step < 1:
        raise UserInputError("steps and epochs_per_step must be >= 1")
    with tempfile.TemporaryDirectory(prefix="prune-pack-it-") as tmp:
        resolve_dataset(data_yaml, tmp)  # fail on bad data before any work
    step_ratio = 1.0 - (1.0 - ratio) ** (1.0 / steps)
    out = Path(out).expanduser()
    rounds: list[dict] = []
    current: Path = resolve_model(model_pt)
    with tempfile.TemporaryDirectory(prefix="prune-pack-it-") as tmp:
        for k in range(steps):
            yolo, info = prune_model(current, step_ratio, criterion=criterion, data_yaml=data_yaml, imgsz=imgsz,
                                     progress=progress, **(prune_kwargs or {}))
            pruned = save_pruned(yolo, Path(tmp) / f"step{k}-pruned.pt", info)
            epochs = epochs_per_step + (final_epochs if k == steps - 1 else 0)
            target = out if k == steps - 1 else Path(tmp) / f"step{k}-ft.pt"
            how = choose_method(method, pruned, data_yaml, teacher or model_pt)
            if how == "distill":
                from prune_pack.pruning.distill import distill

                r = distill(pruned, data_yaml, target, teacher=teacher or model_pt, imgsz=imgsz, epochs=epochs,
                            progress=progress, **finetune_kwargs)
                r["epochs"] = epochs
            else:
                r = finetune(pruned, data_yaml, epochs=epochs, imgsz=imgsz, teacher=teacher, out=target,
                             progress=progress, **finetune_kwargs)
            rounds.append({"step": k + 1, "ratio": round(step_ratio, 4), "achieved_ratio": info.get("achieved_ratio"),
                           "params": info.get("params_after"), "gflops": info.get("gflops_after"),
                           "before": r["before"], "after": r["after"], "epochs": r["epochs"], "seconds": r["seconds"],
                           "method": how})
            current = target
    final = rounds[-1]["after"] or {}
    return {"out": str(out), "steps": rounds, "step_ratio": round(step_ratio, 4),
            "summary": f"{steps} prune/recover rounds of {step_ratio:.3f}: mAP50-95 {final.get('map50_95', float('nan')):.4f}; wrote {out}"}


# ----------------------------------------------------------------------------- validation


def validate(
    model_or_path: ModelLike,
    data_yaml: Union[str, Path],
    imgsz: int = 640,
    batch: int = 16,
    device: str = "cpu",
    progress: bool = False,
    split: str = "val",
) -> dict:
    """mAP of a module, a ``.pt`` (pruned too) or an ``.onnx`` (FP32 or INT8 QDQ) on a dataset's val split.

    Returns ``map50_95``, ``map50``, ``precision``, ``recall`` and ``per_class`` {name: mAP50-95}
    (classes that occur in the val labels). ONNX runs through Ultralytics' AutoBackend, i.e.
    ONNX Runtime; a static-shape ONNX is validated at its own input size, batch 1.
    """
    from ultralytics.models.yolo.detect import DetectionValidator

    with tempfile.TemporaryDirectory(prefix="prune-pack-val-") as tmp:
        data = resolve_dataset(data_yaml, Path(tmp) / "data")
        names = _dataset_names(data)
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
        with _ultralytics_run(not progress):
            validator(model=model)
        metrics = _metrics_from_validator(validator, names)
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


# ----------------------------------------------------------------------------- CLI


def choose_method(method: str, model_pt: Union[str, Path], data_yaml: Union[str, Path],
                  teacher: Optional[Union[str, Path]] = None) -> str:
    """``labels`` or ``distill`` for ``auto``: distillation needs a teacher (given, or the base
    model the pruner recorded) with the model's classes, and a dataset with those classes."""
    if method != "auto":
        return method
    from prune_pack.pruning.distill import default_teacher

    model, ckpt = load_detection_checkpoint(model_pt)
    t = resolve_model(teacher) if teacher is not None else default_teacher(ckpt)
    if t is None:
        return "labels"
    with tempfile.TemporaryDirectory(prefix="prune-pack-ft-") as tmp:
        names = _dataset_names(resolve_dataset(data_yaml, tmp))
    tm = load_detection_checkpoint(t)[0]
    same = dict(model.names) == dict(tm.names) == {int(k): v for k, v in names.items()}
    return "distill" if same else "labels"


def cli_finetune(args: argparse.Namespace, cfg: Any) -> dict:
    section = getattr(cfg, "finetune", None)

    def pick(flag: Any, key: str, default: Any) -> Any:
        if flag is not None:
            return flag
        return getattr(section, key, default) if section is not None else default

    teacher = getattr(args, "teacher", None)
    epochs = pick(getattr(args, "epochs", None), "epochs", 10)
    budget = getattr(args, "time_budget_min", None)
    method = choose_method(pick(getattr(args, "method", None), "method", "auto"), args.model, args.data, teacher)
    progress = not getattr(args, "json", False)
    if method == "distill":
        from prune_pack.pruning.distill import distill

        # Explicit epochs, else the budget alone (the config's epochs would cap a user's budget).
        ep = getattr(args, "epochs", None) if budget else epochs
        kw = {"batch": args.batch} if getattr(args, "batch", None) else {}
        return distill(args.model, args.data, args.out, teacher=teacher, imgsz=args.imgsz, epochs=ep,
                       time_budget_min=budget, progress=progress, **kw)
    return finetune(
        args.model,
        args.data,
        epochs=epochs,
        imgsz=args.imgsz,
        teacher=teacher,
        out=args.out,
        lr0=pick(getattr(args, "lr0", None), "lr0", 0.002),
        batch=pick(getattr(args, "batch", None), "batch", 16),
        workers=pick(None, "workers", 2),
        distill_weight=pick(getattr(args, "distill_weight", None), "distill_weight", 1.0),
        patience=pick(None, "patience", 0),
        time_budget_min=budget,
        project_dir=getattr(args, "project", None),
        progress=progress,
    )


def cli_val(args: argparse.Namespace, cfg: Any) -> dict:
    m = validate(args.model, args.data, imgsz=args.imgsz, batch=getattr(args, "batch", None) or 16)
    per = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m["per_class"].items(), key=lambda kv: -kv[1])[:5])
    m["model"] = str(args.model)
    m["summary"] = f"{args.model}: mAP50-95 {m['map50_95']:.4f}, mAP50 {m['map50']:.4f}" + (f" (best classes: {per})" if per else "")
    return m
