"""``prune_model``: a real, smaller YOLOv8 detector from an Ultralytics ``.pt``; and ``prune-pack prune``.

Steps: load (one-line errors) -> C2f into prunable form -> dependency graph -> calibration
statistics (unlabeled frames of the deployment scene, else the train split of ``data_yaml``, else
Ultralytics' bundled images) -> importance -> allocation -> compensation -> Torch-Pruning surgery ->
BatchNorm re-estimation -> info (widths, params, GFLOPs, provenance, frames used).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from prune_pack.errors import UserInputError
from prune_pack.pruning import graph as G
from prune_pack.pruning import importance as I
from prune_pack.pruning import plan as P
from prune_pack.pruning.checkpoint import load_checkpoint, save_pruned
from prune_pack.pruning.plan import Compensation
from prune_pack.pruning.sources import dataset_images, resolve_dataset, sha256_file, unlabeled_images

ALLOCATIONS = ("uniform", "global", "sensitivity")
MAX_RATIO = 0.9
# BatchNorm re-estimation needs enough images to beat the stored statistics: measured on coco128 at
# 640 (10 % pruned), 32 images -0.7 points, 128 images +1.9 (bench/results/pruning.md, run 4).
RECALIBRATE_MIN_IMAGES = 64


def _gflops(model: torch.nn.Module, imgsz: int) -> float:
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(model, imgsz))


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_model(
    model_pt: str | Path,
    ratio: float,
    criterion: str = "auto",
    data_yaml: str | Path | None = None,
    imgsz: int = 640,
    allocation: str = "sensitivity",
    max_layer_ratio: float = 0.75,
    round_to: int = 16,
    calib_images: int = 128,
    compensation: Compensation | str = Compensation.LSQ,
    progress: bool = True,
    sens_images: int = 4,
    sens_imgsz: int | None = None,
    recalibrate_bn: bool | str = "auto",
    calib_cache: dict | None = None,
    unlabeled: str | Path | None = None,
) -> tuple[Any, dict]:
    """Prune ``ratio`` of the prunable output channels of a detection model.

    ``ratio`` is the requested share of prunable channels removed, before rounding; the achieved
    share is in ``info["achieved_ratio"]``. ``sens_images``/``sens_imgsz`` size the sensitivity probe
    (default: 4 images at min(imgsz, 320)), which dominates the run time.
    ``compensation`` (``plan.Compensation``) ``lsq`` (default) refits each consumer's kept weights and
    bias by least squares on the calibration images (measured: uniform 10% act_var at 320 on coco128,
    mAP50-95 0.120 with mean-only compensation -> 0.229); ``mean`` folds only the removed channels'
    mean into the bias. ``recalibrate_bn`` then re-estimates the BatchNorm statistics on the
    calibration images (no training; see ``plan.recalibrate_bn``); ``"auto"`` does so when at least
    ``RECALIBRATE_MIN_IMAGES`` were read (it hurt with 32, helped with 128).
    ``unlabeled``: a folder of frames of the deployment scene (``sources.unlabeled_images``); up to
    ``calib_images`` of them, evenly spread, replace the train split for every statistic (least
    squares, BatchNorm, data-aware criteria); ``info["frames"]`` counts them.
    ``round_to`` 16: ONNX Runtime's AVX-512 convolutions work in blocks of 16 channels, so a width
    of 56 costs what 64 does (measured: 7.5 % pruned, 1.19x with multiples of 8, 1.26x with 16, same mAP).
    ``calib_cache``: a dict the caller keeps between calls; the calibration statistics of the same
    model, data and size are then computed once (the build prunes several ratios).
    Returns ``(ultralytics.YOLO, info)``; save with ``save_pruned(yolo, path, info)``.
    """
    compensation = Compensation.of(compensation)
    criterion = _check_args(ratio, max_layer_ratio, allocation, imgsz, criterion, compensation)
    log = (lambda msg: print(f"prune: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    t0 = time.monotonic()

    yolo, prev = load_checkpoint(model_pt)
    if prev:
        log("note: the input is already pruned; pruning it further")
    base_sha = sha256_file(model_pt)
    model = copy.deepcopy(yolo.model).float().eval()
    model.zero_grad(set_to_none=True)
    params_before, gflops_before = _params(model), _gflops(model, imgsz)
    G.make_prunable(model)
    dg, groups = G.build_groups(model)
    widths_before = {g.name: g.size for g in groups}
    images, sens_source, calib_source, frames = _calibration_images(data_yaml, unlabeled, calib_images, imgsz,
                                                                    sens_images, sens_imgsz, log)
    ctx = I.CalibContext(model=model, images=images)
    plan, sens, recalibrated = {g.name: g.size for g in groups}, {}, False
    if ratio > 0:
        key = (base_sha, str(unlabeled or data_yaml), imgsz, len(images))
        plan, sens = _plan_and_cut(model, dg, groups, ctx, sens_source, key, ratio, criterion, allocation, round_to,
                                   max_layer_ratio, imgsz, sens_imgsz, compensation, calib_cache, log if progress else None)
        recalibrated = len(ctx.images) >= RECALIBRATE_MIN_IMAGES if recalibrate_bn == "auto" else bool(recalibrate_bn)
        if recalibrated:
            P.recalibrate_bn(model, ctx.images, ctx.batch)

    total = sum(widths_before.values())
    removed = sum(widths_before[n] - plan[n] for n in widths_before)
    yolo.model = model
    info: dict = {
        "requested_ratio": float(ratio), "achieved_ratio": round(removed / total, 4), "channels_before": total,
        "channels_after": total - removed, "widths": {n: [widths_before[n], plan[n]] for n in widths_before},
        "params_before": params_before, "params_after": _params(model), "gflops_before": round(gflops_before, 3),
        "gflops_after": round(_gflops(model, imgsz), 3), "criterion": criterion, "allocation": allocation,
        "bias_compensation": compensation.value, "bn_recalibrated": recalibrated, "max_layer_ratio": max_layer_ratio,
        "round_to": round_to, "imgsz": imgsz, "calibration": calib_source, "calib_images": len(ctx.images),
        "frames": {"calibration": frames, "bn_recalibration": frames if recalibrated else 0},
        "base_model": str(model_pt), "base_sha256": base_sha, "base_provenance": prev or None,
        "sensitivity": sens, "seconds": round(time.monotonic() - t0, 1),
    }
    log(f"removed {removed}/{total} channels ({info['achieved_ratio']:.1%}), params {params_before} -> {info['params_after']}, "
        f"GFLOPs {info['gflops_before']} -> {info['gflops_after']} in {info['seconds']} s")
    return yolo, info


def _check_args(ratio: float, max_layer_ratio: float, allocation: str, imgsz: int, criterion: str | None,
                compensation: Compensation) -> str:
    """One-line errors before any work; the criterion ``auto`` resolved."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= MAX_RATIO:
        raise UserInputError(f"--ratio {ratio}: expected a fraction of channels to remove in [0, {MAX_RATIO}]")
    if not 0.0 < max_layer_ratio < 1.0:
        raise UserInputError(f"max_layer_ratio {max_layer_ratio}: expected a value in (0, 1)")
    if allocation not in ALLOCATIONS:
        raise UserInputError(f"allocation '{allocation}': choose from {', '.join(ALLOCATIONS)}")
    if imgsz < 32 or imgsz % 32:
        raise UserInputError(f"--imgsz {imgsz}: expected a positive multiple of 32")
    lsq = compensation is Compensation.LSQ
    if criterion in (None, "", "auto"):
        criterion = "lsq" if lsq else I.DEFAULT_CRITERION  # the error the refit leaves, when there is a refit
    I.get_criterion(criterion)  # unknown names fail before any work
    if criterion == "lsq" and not lsq:
        raise UserInputError("criterion 'lsq' scores the error left after the least-squares refit: "
                             "it needs compensation 'lsq' (the default)")
    return criterion


def _calibration_images(data_yaml: str | Path | None, unlabeled: str | Path | None, calib_images: int, imgsz: int,
                        sens_images: int, sens_imgsz: int | None, log: Any) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    """(calibration tensor, sensitivity-probe tensor, where they came from, unlabeled frames used).

    Never the val split: val is where accuracy is measured."""
    if unlabeled is not None:
        paths = unlabeled_images(unlabeled, limit=calib_images)
        source = f"{unlabeled} (unlabeled frames, {len(paths)} images)"
    elif data_yaml is not None:
        # Images are read inside the with-block: a read-only dataset is resolved to a mirror in td.
        with tempfile.TemporaryDirectory() as td:
            paths = dataset_images(resolve_dataset(data_yaml, td), "train", limit=calib_images)
            if not paths:
                raise UserInputError(f"{data_yaml}: the train split has no images to calibrate on")
            return (I.load_images(paths, imgsz), I.load_images(paths[:sens_images], sens_imgsz or min(imgsz, 320)),
                    f"{data_yaml} (train split, {len(paths)} images)", 0)
    else:
        paths = I.bundled_images()
        source = "ultralytics bundled assets (bus.jpg, zidane.jpg): pass --data for a representative calibration set"
        log(f"no --data: calibrating on {', '.join(p.name for p in paths)}")
    images = I.load_images(paths, imgsz)
    return images, I.load_images(paths[:sens_images], sens_imgsz or min(imgsz, 320)), source, (
        len(images) if unlabeled is not None else 0)


def _plan_and_cut(model: torch.nn.Module, dg: Any, groups: list, ctx: I.CalibContext, sens_source: torch.Tensor,
                  key: tuple, ratio: float, criterion: str, allocation: str, round_to: int, max_layer_ratio: float,
                  imgsz: int, sens_imgsz: int | None, compensation: Compensation, calib_cache: dict | None,
                  log: Any) -> tuple[dict, dict]:
    """Calibration statistics -> scores -> allocation -> compensation + surgery; (plan, sensitivity)."""
    lsq = compensation is Compensation.LSQ
    ctx.in_stats, grams = _calibrate(model, groups, ctx, lsq, calib_cache, key)
    ctx.grams = grams or {}
    scores = calib_cache.get((key, criterion)) if calib_cache is not None else None
    if scores is None:  # the ranking does not depend on the ratio: a build computes it once
        if criterion == "taylor":
            ctx.grads = I.taylor_scores(model, groups, ctx.images)
        scores = I.group_scores(groups, criterion, ctx, progress=log if criterion == "lsq" else None)
        if calib_cache is not None:
            calib_cache[(key, criterion)] = scores
    sens: dict = {}
    if allocation == "uniform":
        plan = P.uniform_plan(groups, ratio, round_to, max_layer_ratio)
    elif allocation == "global":
        plan = P.global_plan(groups, scores, ratio, round_to, max_layer_ratio)
    else:
        s_ctx = I.CalibContext(model=model, images=sens_source, in_stats=ctx.in_stats)
        if log:
            log(f"measuring layer sensitivity on {len(s_ctx.images)} images at {sens_imgsz or min(imgsz, 320)} ({len(groups)} groups)")
        plan, sens = P.sensitivity_plan(model, groups, scores, s_ctx, ratio, round_to, max_layer_ratio, imgsz,
                                        compensation, progress=log)
    P.apply_plan(model, dg, groups, plan, scores, ctx, compensation, grams=grams)
    return plan, sens


def _calibrate(model: torch.nn.Module, groups: list, ctx: I.CalibContext, lsq: bool, cache: dict | None,
               key: tuple) -> tuple[dict, dict | None]:
    """The consumers' per-channel input statistics and, for least squares, their input Gram matrices,
    in one forward pass over the calibration images (stored by module name in ``cache``)."""
    names = {m: n for n, m in model.named_modules()}
    mods = {n: m for m, n in names.items()}
    hit = cache.get(key) if cache is not None else None
    if hit is None or (lsq and hit[1] is None):
        acc = P.GramAccumulator(len(ctx.images)) if lsq else None
        stats = I.collect_input_stats(model, groups, ctx.images, ctx.batch, also=acc)
        grams = acc.result() if acc else None
        hit = ({names[c]: v for c, v in stats.items()}, {names[c]: v for c, v in grams.items()} if grams else None)
        if cache is not None:
            cache[key] = hit
    return {mods[n]: v for n, v in hit[0].items()}, ({mods[n]: v for n, v in hit[1].items()} if lsq and hit[1] else None)


def cli_prune(args: argparse.Namespace, cfg: Any) -> dict:
    """``prune-pack prune``: flags over the config's ``prune`` section over its defaults (``settings.merged``)."""
    from prune_pack.agent.settings import merged

    pc = merged(cfg.prune, criterion=args.criterion, allocation=args.allocation,
                compensation=getattr(args, "compensation", None))
    out = Path(args.out)
    if out.suffix != ".pt":
        raise UserInputError(f"--out {args.out}: expected a .pt path")
    yolo, info = prune_model(args.model, args.ratio, criterion=pc.criterion, data_yaml=args.data, imgsz=args.imgsz,
                             allocation=pc.allocation, max_layer_ratio=pc.max_layer_ratio, round_to=pc.round_to,
                             calib_images=pc.calib_images, compensation=pc.compensation, recalibrate_bn=pc.recalibrate_bn,
                             unlabeled=getattr(args, "unlabeled", None), progress=not getattr(args, "json", False))
    save_pruned(yolo, out, info)
    res = {k: v for k, v in info.items() if k not in ("sensitivity", "base_provenance")}
    res["out"] = str(out)
    frames = info["frames"]["calibration"]
    res["summary"] = (f"{out}: removed {info['achieved_ratio']:.1%} of channels (requested {info['requested_ratio']:.1%}), "
                      f"params {info['params_before']:,} -> {info['params_after']:,}, "
                      f"GFLOPs {info['gflops_before']} -> {info['gflops_after']} ({info['criterion']}, {info['allocation']})"
                      + (f"; calibrated on {frames} unlabeled frames" if frames else ""))
    return res
