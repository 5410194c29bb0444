"""Fine-tuning and validation of (pruned) detectors through Ultralytics' own trainer and validator.

A pruned ``DetectionModel`` has non-standard widths that its ``yaml`` no longer describes.
Ultralytics' ``DetectionTrainer.get_model`` rebuilds the model from that yaml and copies only
the tensors whose shapes match, which silently resets every pruned layer to random full-width
weights (the classic pruning + fine-tuning bug). ``PrunedDetectionTrainer`` keeps the loaded
module instead, and the result is written as an FP32 checkpoint (Ultralytics stores FP16).

This is the ``labels`` method of ``recover.recover`` (the one entry point; ``distill.py`` is the
label-free one). With a teacher it adds Ultralytics' own ``distill_model=`` (``ultralytics.nn.distill_model``):
it distils the three neck feature maps that feed the Detect head through learned 1x1 projectors,
so a pruned (narrower) student and a wider teacher fit together, and it is independent of the
class head, so it also works after the classes were transferred to a user's dataset.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

import prune_pack.offline  # noqa: F401 - before Ultralytics
import torch
import torch.nn as nn

from prune_pack.errors import UserInputError
from prune_pack.pruning.checkpoint import load_detection_checkpoint, save_recovered
from prune_pack.pruning.graph import layer_widths  # conv widths: the fingerprint a YAML rebuild changes
from prune_pack.pruning.sources import resolve_dataset, resolve_model, sha256_file
from prune_pack.pruning.validate import dataset_names, metrics_from_validator, ultralytics_run, validate

# Ultralytics' default distillation weight ('dis'); ``distill_weight`` scales it.
_ULTRALYTICS_DIS = 6.0
DEFAULT_LR = 0.002  # SGD, about 1/10 of Ultralytics' training rate: a trained model needs small steps
DEFAULT_BATCH = 16



# ----------------------------------------------------------------------------- loading


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
                    "metrics": metrics_from_validator(self.validator, self.data["names"]) if self.validator else None,
                }
            return ok

        def final_eval(self) -> None:
            return None

    return PrunedDetectionTrainer


def finetune(
    model_pt: Union[str, Path],
    data_yaml: Union[str, Path],
    out: Union[str, Path],
    *,
    epochs: Optional[float] = 10,
    imgsz: int = 640,
    teacher: Optional[Union[str, Path]] = None,
    lr: float = DEFAULT_LR,
    batch: int = DEFAULT_BATCH,
    workers: int = 2,
    train_device: str = "cpu",
    distill_weight: float = 1.0,
    progress: bool = True,
    project_dir: Optional[Union[str, Path]] = None,
    time_budget_min: Optional[float] = None,
    patience: int = 0,
    measure: bool = True,
    fraction: float = 1.0,
    seed: int = 0,
) -> dict:
    """Fine-tune a (pruned) detection checkpoint on labels with Ultralytics' trainer, keeping its widths.

    Called through ``recover.recover`` (method ``labels``), which resolves ``train_device``
    (``cpu`` or ``cuda:N``). Writes an FP32 checkpoint to ``out`` (the best EMA; with validation only
    at the end that is the last one) that keeps the input's ``prune_pack`` key and adds a
    ``finetune`` record. ``time_budget_min`` caps training time (Ultralytics' ``time=``; epochs are
    then re-estimated). ``teacher`` adds Ultralytics' feature distillation. Returns metrics
    before/after (mAP50-95, mAP50, per class) and run facts.
    """
    epochs = int(math.ceil(epochs)) if epochs else 0
    if epochs < 1 and not time_budget_min:
        raise UserInputError(f"--epochs must be >= 1, got {epochs}")
    if imgsz < 32 or imgsz % 32:
        raise UserInputError(f"--imgsz must be a multiple of 32 (>= 32), got {imgsz}")
    if lr <= 0 or batch < 1:
        raise UserInputError(f"lr ({lr}) must be > 0 and batch ({batch}) >= 1")
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
        names = dataset_names(data)
        widths_in = layer_widths(model)
        adapted = adapt_classes(model, names)
        class_convs = _head_class_convs(model)
        if adapted and progress:
            print(f"finetune: class head rebuilt for the dataset's {len(names)} classes (box branches and pruned widths kept)", file=sys.stderr)
        project = Path(project_dir).expanduser().resolve() if project_dir else tmp_root / "runs"
        overrides = _overrides(data, epochs, imgsz, lr, batch, workers, train_device, progress, project, time_budget_min,
                               patience, fraction, seed, str(model_pt), teacher_path, distill_weight)
        before = validate(model, data, imgsz=imgsz, device=train_device, progress=progress) if measure else None
        result = _train(model, overrides, progress)
        best = result.pop("best_model")
        _check_widths(widths_in, layer_widths(best), class_convs)
        record = {
            "method": "labels", "epochs": result["epochs_run"], "epochs_requested": epochs, "time_budget_min": time_budget_min,
            "lr": lr, "nbs": batch, "batch": batch, "imgsz": imgsz, "train_device": train_device,
            "data": str(Path(data_yaml).expanduser().resolve()), "classes": names, "classes_adapted": adapted,
            "teacher": str(teacher_path) if teacher_path else None,
            "teacher_sha256": sha256_file(teacher_path) if teacher_path else None,
            "distill_weight": distill_weight if teacher_path else None,
            "source": str(Path(model_pt).expanduser().resolve()), "source_sha256": source_sha,
            "metrics_before": before, "metrics_after": result["after"], "seconds": result["seconds"],
            "previous": ckpt.get("finetune"), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        train_args = {**result["train_args"], "data": record["data"]}  # not the temp copy, which is deleted
        save_recovered(best, out, ckpt, record, train_args)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    after = result["after"] or {}
    summary = (f"fine-tuned {result['epochs_run']} epoch(s) in {result['seconds']:.0f} s: mAP50-95 "
               f"{(before or {}).get('map50_95', float('nan')):.4f} -> {after.get('map50_95', float('nan')):.4f}"
               f"{' (with feature distillation)' if teacher_path else ''}; wrote {out}")
    return {"out": str(out), "method": "labels", "before": before, "after": result["after"], "epochs": result["epochs_run"],
            "seconds": result["seconds"], "distill": bool(teacher_path), "classes_adapted": adapted, "widths_kept": True,
            "losses": result["losses"], "run_dir": str(project) if project_dir else None, "summary": summary}


def _check_widths(widths_in: dict, widths_out: dict, class_convs: set[str]) -> None:
    changed = {k for k in set(widths_in) | set(widths_out)
               if widths_in.get(k) != widths_out.get(k) and k not in class_convs}
    if changed:  # would mean the trainer rebuilt the model: never write such a checkpoint
        raise RuntimeError(f"fine-tuning changed layer widths ({sorted(changed)[:3]}...); refusing to save")


def _overrides(data: Path, epochs: int, imgsz: int, lr: float, batch: int, workers: int, train_device: str, progress: bool,
               project: Path, time_budget_min: Optional[float], patience: int, fraction: float, seed: int, source: str,
               teacher: Optional[Path], distill_weight: float) -> dict[str, Any]:
    """Ultralytics trainer arguments; every deviation from its defaults says why."""
    overrides: dict[str, Any] = {
        "model": source,  # provenance only: get_model() returns the loaded module
        "data": str(data), "task": "detect", "mode": "train", "epochs": max(int(epochs), 1), "imgsz": imgsz,
        "batch": batch, "workers": workers,
        "device": train_device.replace("cuda:", ""),  # Ultralytics names CUDA devices by index
        "optimizer": "SGD",  # 'auto' would ignore lr0 and pick AdamW with its own rate
        "lr0": lr,
        # One optimizer step per batch: with Ultralytics' nbs=64 accumulation a 128-image
        # fine-tuning set gets 2 steps per epoch, far too few to recover a pruned model.
        "nbs": batch,
        "warmup_epochs": min(1.0, max(epochs - 1, 0)),  # a trained model needs little warm-up
        "warmup_bias_lr": 0.0,  # Ultralytics' 0.1 bias warm-up start would wreck trained biases
        "amp": False,  # same arithmetic on CPU and GPU, and no check_amp() (which would want to download a model)
        "plots": False,  # plots download a font
        "val": patience > 0,  # otherwise validate only after the last epoch
        "patience": patience if patience > 0 else 100000,
        "project": str(project), "name": "finetune", "exist_ok": True, "save": True, "verbose": progress,
        "fraction": fraction, "seed": seed,
        "deterministic": False,  # deterministic kernels are slower on CPU and we don't compare bitwise
        "cache": False,
    }
    if time_budget_min:
        overrides["time"] = float(time_budget_min) / 60.0
    if teacher is not None:
        overrides["distill_model"] = str(teacher)
        overrides["dis"] = _ULTRALYTICS_DIS * float(distill_weight)
    return overrides


def _train(model: nn.Module, overrides: dict[str, Any], progress: bool) -> dict:
    t0 = time.monotonic()
    with ultralytics_run(not progress):
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
    best["model"] = best["model"].cpu()
    return {"losses": losses, "best_model": best["model"], "after": best["metrics"], "epochs_run": int(trainer.epoch) + 1,
            "seconds": round(seconds, 1), "train_args": args}
