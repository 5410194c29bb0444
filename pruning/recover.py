"""The one recovery entry point: ``recover`` wins back a pruned model's accuracy.

The method is chosen here and only here (``choose_method``): ``distill`` matches the unpruned
teacher's outputs on unlabeled images (``distill.py``: the train split's images, or frames of the
deployment scene with ``unlabeled``), ``labels`` runs Ultralytics' supervised trainer
(``finetune.py``), ``auto`` distils when the model keeps the teacher's classes. Both take the same
argument names; defaults that differ by method (learning rate, batch) are resolved here.
``train_device`` (``auto``/``cpu``/``cuda[:N]``) is resolved here too, once, for both methods.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import prune_pack.offline  # noqa: F401 - before Ultralytics
from prune_pack.errors import UserInputError

METHODS = ("auto", "labels", "distill")
PathLike = Union[str, Path]


def resolve_train_device(spec: Optional[str]) -> str:
    """``auto`` (or None) -> ``cuda:0`` when torch sees a CUDA device, else ``cpu``; ``cpu``; ``cuda``/``cuda:N``
    -> ``cuda:N`` when that device exists, else one line saying so (never a silent fall-back to the CPU)."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise UserInputError(f"--train-device {spec}: expected auto, cpu, cuda or cuda:N")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index) >= count:
            raise UserInputError(f"--train-device {spec}: torch sees {count} CUDA device(s) on this machine"
                                 + (" (none: no GPU, or a CPU-only torch build)" if not count else "")
                                 + "; use --train-device cpu or auto")
        return f"cuda:{index}"
    raise UserInputError(f"--train-device {spec}: expected auto, cpu, cuda or cuda:N")


def choose_method(method: str, model_pt: PathLike, data_yaml: PathLike, teacher: Optional[PathLike] = None) -> str:
    """``labels`` or ``distill`` for ``auto``: distillation needs a teacher (given, or the base
    model the pruner recorded) with the model's classes, and a dataset with those classes."""
    if method not in METHODS:
        raise UserInputError(f"--method {method}: choose from {', '.join(METHODS)}")
    if method != "auto":
        return method
    from prune_pack.pruning.checkpoint import load_detection_checkpoint
    from prune_pack.pruning.distill import default_teacher
    from prune_pack.pruning.sources import resolve_dataset, resolve_model
    from prune_pack.pruning.validate import dataset_names

    model, ckpt = load_detection_checkpoint(model_pt)
    t = resolve_model(teacher) if teacher is not None else default_teacher(ckpt)
    if t is None:
        return "labels"
    with tempfile.TemporaryDirectory(prefix="prune-pack-ft-") as tmp:
        names = dataset_names(resolve_dataset(data_yaml, tmp))
    tm = load_detection_checkpoint(t)[0]
    same = dict(model.names) == dict(tm.names) == {int(k): v for k, v in names.items()}
    return "distill" if same else "labels"


def recover(
    model_pt: PathLike,
    data_yaml: PathLike,
    out: PathLike,
    *,
    method: str = "auto",
    teacher: Optional[PathLike] = None,
    imgsz: int = 640,
    epochs: Optional[float] = 10,
    fraction: float = 1.0,
    time_budget_min: Optional[float] = None,
    lr: Optional[float] = None,
    batch: Optional[int] = None,
    workers: int = 2,
    train_device: Optional[str] = "auto",
    unlabeled: Optional[PathLike] = None,
    labels_distill: bool = False,
    distill_weight: float = 1.0,
    patience: int = 0,
    measure: bool = True,
    progress: bool = True,
    project_dir: Optional[PathLike] = None,
    seed: int = 0,
) -> dict:
    """Recover a pruned checkpoint and write it to ``out``; the one entry point for both methods.

    ``method``: ``auto``/``labels``/``distill`` (``choose_method``). ``epochs`` are passes over the
    train split (``fraction`` of it per pass), for both methods, also when ``unlabeled`` frames are
    given: frames change what distillation sees, not how long it runs. ``time_budget_min`` caps
    the time (with ``epochs`` None: the budget alone). ``lr``/``batch`` None: the method's measured
    default (distill: AdamW 3e-4, batch 8 on the CPU / 32 on CUDA; labels: SGD 0.002, batch 16).
    ``teacher``: the unpruned model (default: the one the pruner recorded); with ``labels`` it adds
    Ultralytics' feature distillation only when ``labels_distill``. ``unlabeled``: a folder of frames
    of the deployment scene for distillation (``labels`` cannot use them: counted 0). The val split
    stays the only accuracy gate (``measure``: before and after).
    Returns the method's result plus ``method``, ``train_device`` and ``frames`` {stage: count}.
    """
    device = resolve_train_device(train_device)
    how = choose_method(method, model_pt, data_yaml, teacher)
    if how == "distill":
        from prune_pack.pruning.distill import DEFAULT_LR, distill

        r = distill(model_pt, data_yaml, out, teacher=teacher, imgsz=imgsz, epochs=epochs, fraction=fraction,
                    time_budget_min=time_budget_min, lr=lr or DEFAULT_LR, batch=batch, workers=workers,
                    train_device=device, unlabeled=unlabeled, seed=seed, measure=measure, progress=progress)
    else:
        from prune_pack.pruning import finetune as ft

        if unlabeled is not None and progress:
            import sys

            print("recover: supervised fine-tuning needs labels; the unlabeled frames are not used "
                  "(distillation would use them: --method distill)", file=sys.stderr)
        r = ft.finetune(model_pt, data_yaml, out, epochs=epochs, imgsz=imgsz, teacher=teacher if labels_distill else None,
                        lr=lr or ft.DEFAULT_LR, batch=batch or ft.DEFAULT_BATCH, workers=workers, train_device=device,
                        distill_weight=distill_weight, progress=progress, project_dir=project_dir,
                        time_budget_min=time_budget_min, patience=patience, measure=measure, fraction=fraction, seed=seed)
        r["frames"] = {"distillation": 0}
    r.update(method=how, train_device=device)
    return r


def cli_finetune(args: argparse.Namespace, cfg: Any) -> dict:
    """``prune-pack finetune``: flags over the config's ``finetune`` section over its defaults (``settings.merged``)."""
    from prune_pack.agent.settings import merged

    budget = getattr(args, "time_budget_min", None)
    fc = merged(cfg.finetune, method=args.method, epochs=args.epochs, lr0=args.lr0, batch=args.batch,
                distill_weight=args.distill_weight, train_device=getattr(args, "train_device", None),
                workers=getattr(args, "workers", None))
    # With a time budget and no explicit --epochs the budget alone bounds the run (the config's epochs would cap it).
    epochs = args.epochs if budget else fc.epochs
    teacher = getattr(args, "teacher", None)
    return recover(args.model, args.data, args.out, method=fc.method, teacher=teacher, imgsz=args.imgsz, epochs=epochs,
                   time_budget_min=budget, lr=fc.lr0, batch=fc.batch, workers=fc.workers, train_device=fc.train_device,
                   unlabeled=getattr(args, "unlabeled", None), labels_distill=fc.distill or teacher is not None,
                   distill_weight=fc.distill_weight, patience=fc.patience, project_dir=getattr(args, "project", None),
                   progress=not getattr(args, "json", False))
