"""The pruned checkpoint: a normal Ultralytics ``.pt`` plus a ``prune_pack`` record.

Layout (what ``finetune.py`` and ``deploy/`` rely on):
- ``model``: the pruned ``DetectionModel`` itself (FP32, see ``write_checkpoint``), pickled with its
  real widths; C2f blocks are ``prune_pack.pruning.graph.C2fPrunable``. Never rebuild it from
  ``model.yaml`` (that yaml describes the *unpruned* architecture).
- ``train_args``, ``date``, ``version``, ``license``, ``docs``, ``epoch`` (-1), ``ema``/``optimizer``
  (None): what ``ultralytics.YOLO(path)`` expects.
- ``prune_pack``: ``{"format": 1, "widths": {layer: [orig, new]}, "provenance": {...}}`` with the base
  model's sha256, criterion, requested/achieved ratio, calibration data and the rest of ``info``.
"""

from __future__ import annotations

import copy
import pickle
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prune_pack.errors import UserInputError

FORMAT = 1


def write_checkpoint(model: torch.nn.Module, path: str | Path, train_args: dict, extra: dict) -> Path:
    """Write ``model`` as an FP32 Ultralytics checkpoint (what ``YOLO(path)`` loads), atomically.

    FP32 rather than Ultralytics' fp16: the bias compensation and fine-tuning results must not be
    rounded away before export. ``extra`` adds keys (``prune_pack``, ``finetune``, ...).
    """
    from ultralytics import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "args") and not isinstance(model.args, dict):
        model.args = dict(vars(model.args))
    # Calibration/training leftovers must not be pickled (the criterion holds a model reference).
    if hasattr(model, "criterion"):
        model.criterion = None
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def save_pruned(yolo: Any, path: str | Path, provenance: dict) -> Path:
    """Write ``yolo`` (an ``ultralytics.YOLO`` holding a pruned model) as a loadable checkpoint."""
    train_args = dict(getattr(yolo, "ckpt", {}).get("train_args", {}) or {})
    train_args.update({"model": str(path), "task": "detect"})
    record = {"format": FORMAT, "widths": provenance.get("widths", {}), "provenance": provenance}
    return write_checkpoint(yolo.model, path, train_args, {"prune_pack": record})


def load_checkpoint(path: str | Path) -> tuple[Any, dict]:
    """``(ultralytics.YOLO, provenance)``; provenance is ``{}`` for an unpruned checkpoint.

    One-line errors for a missing/corrupt file and for non-detection models.
    """
    from ultralytics import YOLO

    from prune_pack.pruning.graph import check_detection_model
    from prune_pack.pruning.sources import resolve_model

    p = resolve_model(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, AttributeError,
            ModuleNotFoundError, ImportError, TypeError) as e:
        raise UserInputError(f"{path}: not a readable Ultralytics checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"{path}: not an Ultralytics checkpoint (no 'model' module inside)")
    check_detection_model(model, str(path))
    try:
        yolo = YOLO(str(p), task="detect")
    except Exception as e:  # noqa: BLE001 - Ultralytics raises many types for a bad file; one line for the user
        raise UserInputError(f"{path}: Ultralytics could not load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    rec = ckpt.get("prune_pack") or {}
    return yolo, dict(rec.get("provenance", {}))


def load_detection_checkpoint(model_pt: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load an Ultralytics detection ``.pt`` (pruned or not) as an FP32 module, plus its checkpoint dict.

    Raises one ``UserInputError`` for anything that is not a loadable detection checkpoint (a
    truncated or foreign file), and never lets Ultralytics auto-install a module a pickle names.
    """
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.nn.tasks import load_checkpoint as ul_load

    from prune_pack.pruning.sources import resolve_model

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
        model, ckpt = ul_load(str(path))
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


def save_recovered(model: torch.nn.Module, out: str | Path, source_ckpt: dict, record: dict, train_args: dict) -> Path:
    """Write a recovered ``model`` as an FP32 Ultralytics checkpoint keeping the source's pruning record."""
    extra: dict[str, Any] = {"train_metrics": record.get("metrics_after"), "finetune": record}
    if "prune_pack" in source_ckpt:
        extra["prune_pack"] = source_ckpt["prune_pack"]
    return write_checkpoint(model, out, train_args, extra)
