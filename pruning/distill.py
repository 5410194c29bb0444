"""Label-free recovery of a pruned detector: distil the unpruned teacher's raw head outputs.

Why not only Ultralytics' supervised fine-tuning: on a small train split (coco128, 128 images) and
a CPU budget, supervised fine-tuning of a 20 % pruned YOLOv8n *lowered* mAP50-95 (0.037 -> 0.027,
docs/benchmarks.md): a few sparse boxes per image are a weak, noisy signal for a network whose
every layer was disturbed. The teacher's outputs are a dense target at every anchor (8400 at 640)
and need no labels, so any image of the deployment domain serves, with any augmentation.

Loss, per anchor, on the Detect head's raw outputs (which keep their shape under pruning):
- classes: BCE of the student's logits against the teacher's sigmoid probabilities;
- boxes: KL divergence between the teacher's and the student's DFL bin distributions, weighted by
  the teacher's best class probability (boxes only matter where there is an object);
both normalised by the teacher's total confidence in the batch (as the detection loss normalises by
its target scores). BatchNorm statistics stay frozen: small CPU batches would make them noisy.

Images: the train split, or a folder of unlabeled frames of the deployment scene (``unlabeled``):
recovery is bound by data, and the scene's own frames recover far more (issue #15). Training runs
on ``train_device`` (``cpu`` or ``cuda:N``, resolved by ``recover``) with the same code on both.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import prune_pack.offline  # noqa: F401 - before Ultralytics
import torch
import torch.nn as nn
import torch.nn.functional as F

from prune_pack.errors import UserInputError
from prune_pack.pruning.checkpoint import load_detection_checkpoint, save_recovered
from prune_pack.pruning.graph import layer_widths
from prune_pack.pruning.sources import dataset_images, resolve_dataset, resolve_model, sha256_file, unlabeled_images
from prune_pack.pruning.validate import dataset_names, validate

DEFAULT_LR = 3e-4  # AdamW
# Batch per device: 8 fits a 2-core CPU's budget; 32 at 640 kept an H200 busy with 10 loader workers (issue #15).
DEFAULT_BATCH = {"cpu": 8, "cuda": 32}


def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(class loss, box loss) between raw Detect outputs ``{"boxes": B x 4*reg_max x A, "scores": B x nc x A}``."""
    sb, ss, tb, ts = student["boxes"], student["scores"], teacher["boxes"], teacher["scores"]
    b, _, a = ss.shape
    tprob = ts.sigmoid()
    weight = tprob.max(1).values  # B x A: how much an anchor holds an object, per the teacher
    norm = weight.sum().clamp_min(1.0)
    cls = F.binary_cross_entropy_with_logits(ss, tprob, reduction="none").sum(1)
    s_log = sb.view(b, 4, -1, a).log_softmax(2)
    t_p = tb.view(b, 4, -1, a).softmax(2)
    kl = (t_p * (t_p.clamp_min(1e-9).log() - s_log)).sum(2).sum(1)
    return cls.sum() / norm, (kl * weight).sum() / norm


class FeatureTaps:
    """Outputs of the top-level layers whose shape pruning kept in both models (e.g. the C2f outputs
    of groups the plan left whole): intermediate targets, so the gradient need not travel the whole
    network from the head (FitNets' hints, without projectors since the shapes already match)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, imgsz: int) -> None:
        self.out: dict[tuple[int, int], torch.Tensor] = {}
        self.handles: list = []
        shapes: list[dict[int, tuple]] = []
        for k, m in enumerate((student, teacher)):
            seen: dict[int, tuple] = {}
            hs = [layer.register_forward_hook(lambda mod, i, o, j=j: seen.__setitem__(j, tuple(o.shape)) if torch.is_tensor(o) else None)
                  for j, layer in enumerate(m.model[:-1])]
            with torch.no_grad():
                m.eval()(torch.zeros(1, 3, imgsz, imgsz))
            for h in hs:
                h.remove()
            shapes.append(seen)
        # The stem and the input-resolution layers are skipped: cheap to match but mostly unpruned.
        self.layers = [j for j in shapes[0] if j >= 2 and shapes[0][j] == shapes[1].get(j)]
        for k, m in enumerate((student, teacher)):
            for j in self.layers:
                self.handles.append(m.model[j].register_forward_hook(
                    lambda mod, i, o, key=(k, j): self.out.__setitem__(key, o)))

    def loss(self) -> torch.Tensor:
        """Mean over tapped layers of the squared error normalised by the teacher's feature energy."""
        terms = [((self.out[(0, j)] - self.out[(1, j)]) ** 2).mean() / (self.out[(1, j)] ** 2).mean().clamp_min(1e-6)
                 for j in self.layers if (0, j) in self.out and (1, j) in self.out]
        self.out.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _raw(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(x)
    return out[1] if isinstance(out, tuple) else out  # eval: (decoded, raw); train: raw


class AugmentedImages(torch.utils.data.Dataset):
    """Item ``i``: one image picked and augmented by a generator seeded with (seed, i): random scale
    (0.6-1.2 of the letterbox fit), horizontal flip and placement on a grey (114) canvas, RGB in
    0..1 as the predictor feeds the model. Seeded per item, so any number of loader workers (CPU
    or GPU feeding) gives the same batches."""

    def __init__(self, paths: list[Path], imgsz: int, seed: int, length: int) -> None:
        self.paths, self.imgsz, self.seed, self.length = paths, imgsz, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        import cv2

        rng = random.Random(self.seed * 1_000_003 + i)
        imgsz = self.imgsz
        im = None
        while im is None:  # an unreadable file (a frame cut short mid-copy) is skipped
            im = cv2.imread(str(rng.choice(self.paths)))
        h, w = im.shape[:2]
        r = imgsz / max(h, w) * rng.uniform(0.6, 1.2)
        im = cv2.resize(im, (max(8, round(w * r)), max(8, round(h * r))), interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            im = im[:, ::-1]
        hh, ww = im.shape[:2]
        y0, x0 = rng.randint(0, max(0, hh - imgsz)), rng.randint(0, max(0, ww - imgsz))
        im = im[y0 : y0 + imgsz, x0 : x0 + imgsz]
        hh, ww = im.shape[:2]
        canvas = np.full((imgsz, imgsz, 3), 114, np.uint8)
        oy, ox = rng.randint(0, imgsz - hh), rng.randint(0, imgsz - ww)
        canvas[oy : oy + hh, ox : ox + ww] = im
        return torch.from_numpy(np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1))).float() / 255.0


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a loader worker decodes images; the training process owns the cores


def _batches(paths: list[Path], batch: int, imgsz: int, seed: int, workers: int, device: torch.device,
             steps: Optional[int]) -> Iterator[torch.Tensor]:
    """Endless (or ``steps``) augmented batches on ``device``; ``workers`` processes prepare them in parallel."""
    length = (steps or 10**9) * batch
    loader = torch.utils.data.DataLoader(
        AugmentedImages(paths, imgsz, seed, length), batch_size=batch, num_workers=workers, worker_init_fn=_one_thread,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGCHLD) if main else None
    try:
        for x in loader:
            yield x.to(device, non_blocking=True)
    finally:
        # Worker processes make torch install a SIGCHLD handler for good; it outlived the loader and
        # crashed the process at the next child that exited (measured: the test suite, SIGSEGV in the
        # handler's frame after distillation + NNCF). The workers are gone now: give the signal back.
        del loader
        if main:
            signal.signal(signal.SIGCHLD, before)
            from torch.utils.data._utils import signal_handling

            signal_handling._SIGCHLD_handler_set = False  # the next loader installs it afresh


def default_teacher(ckpt: dict) -> Optional[Path]:
    """The unpruned model a pruned checkpoint was made from, if its recorded path still exists."""
    rec = ckpt.get("prune_pack") or {}
    base = (rec.get("provenance") or {}).get("base_model")
    while isinstance((rec.get("provenance") or {}).get("base_provenance"), dict):  # pruned more than once
        rec = {"provenance": rec["provenance"]["base_provenance"]}
        base = rec["provenance"].get("base_model") or base
    return Path(base) if base and Path(base).is_file() else None


def distill(
    model_pt: Union[str, Path],
    data_yaml: Union[str, Path],
    out: Union[str, Path],
    *,
    teacher: Optional[Union[str, Path]] = None,
    imgsz: int = 640,
    epochs: Optional[float] = None,
    fraction: float = 1.0,
    iterations: Optional[int] = None,
    time_budget_min: Optional[float] = None,
    lr: float = DEFAULT_LR,
    batch: Optional[int] = None,
    workers: int = 0,
    train_device: str = "cpu",
    unlabeled: Optional[Union[str, Path]] = None,
    images: Optional[int] = None,
    seed: int = 0,
    feature_weight: float = 10.0,
    measure: bool = True,
    progress: bool = True,
) -> dict:
    """Recover a pruned checkpoint by matching its teacher's raw outputs on unlabeled images.

    Images: the frames in ``unlabeled`` when given, else the train split's images (labels are not
    read; val is never trained on). Runs ``iterations`` AdamW steps (cosine learning rate from
    ``lr``); ``epochs`` sets them to ``epochs * fraction`` passes over the *train split's* image
    count, with or without frames, so that frames change what recovery sees, not how long it
    takes; with neither, as many as fit in ``time_budget_min`` wall-clock minutes (a budget also
    caps the other two). The teacher defaults to the base model recorded by the pruner. Writes an
    FP32 checkpoint keeping the ``prune_pack`` record, with a ``finetune`` record (``method: distill``).
    """
    batch = batch or DEFAULT_BATCH["cuda" if train_device.startswith("cuda") else "cpu"]
    _check_args(imgsz, batch, lr, epochs, iterations, time_budget_min)
    out = Path(out).expanduser()
    log = (lambda m: print(f"distill: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    student, ckpt = load_detection_checkpoint(model_pt)
    source_sha = sha256_file(resolve_model(model_pt))
    teacher_path, tmodel = _teacher(student, ckpt, model_pt, teacher)
    widths_in = layer_widths(student)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)  # Ultralytics' trainer leaves one core idle; we do not
    torch.manual_seed(seed)
    tmp = Path(tempfile.mkdtemp(prefix="prune-pack-kd-"))
    try:
        data = resolve_dataset(data_yaml, tmp / "data")  # the mirror of a read-only dataset lives in tmp
        if len(dataset_names(data)) != student.model[-1].nc:
            raise UserInputError(f"the model predicts {student.model[-1].nc} classes, the dataset {data_yaml} has "
                                 f"{len(dataset_names(data))}; transfer the classes with the supervised fine-tuning first")
        train = dataset_images(data, "train", limit=images)
        paths = unlabeled_images(unlabeled, limit=images) if unlabeled is not None else train
        if not paths:
            raise UserInputError(f"{data_yaml}: the train split has no images to distil on")
        if iterations is None and epochs:
            iterations = max(1, math.ceil(epochs * fraction * max(len(train), 1) / batch))
        before = validate(student, data_yaml, imgsz=imgsz) if measure else None
        if before:
            log(f"before: mAP50-95 {before['map50_95']:.4f}")
        log(f"{iterations or 'time-budgeted'} iterations of {batch} on {len(paths)} "
            f"{'unlabeled frames' if unlabeled is not None else 'train images'} ({train_device}, {workers} loader workers)")
        run = _loop(student, tmodel, paths, imgsz, batch, lr, iterations, time_budget_min, seed, feature_weight, workers,
                    torch.device(train_device), log)
        if layer_widths(student) != widths_in:
            raise RuntimeError("distillation changed layer widths; refusing to save")
        after = validate(student, data_yaml, imgsz=imgsz) if measure else None
        record = {
            "method": "distill", "feature_weight": feature_weight, "iterations": run["iterations"],
            "images_seen": run["iterations"] * batch, "batch": batch, "lr": lr, "imgsz": imgsz,
            "time_budget_min": time_budget_min, "train_images": len(train), "train_device": train_device,
            "unlabeled": str(Path(unlabeled).expanduser().resolve()) if unlabeled is not None else None,
            "unlabeled_frames": len(paths) if unlabeled is not None else 0, "data": str(Path(data_yaml).expanduser().resolve()),
            "teacher": str(teacher_path), "teacher_sha256": sha256_file(teacher_path),
            "source": str(Path(model_pt).expanduser().resolve()), "source_sha256": source_sha, "metrics_before": before,
            "metrics_after": after, "seconds": run["seconds"], "previous": ckpt.get("finetune"),
        }
        save_recovered(student, out, ckpt, record, {"data": record["data"], "imgsz": imgsz, "task": "detect"})
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    b, a = (before or {}).get("map50_95"), (after or {}).get("map50_95")
    it = run["iterations"]
    summary = (f"distilled {it} iterations ({it * batch} images) in {run['seconds']:.0f} s"
               + (f": mAP50-95 {b:.4f} -> {a:.4f}" if b is not None and a is not None else "") + f"; wrote {out}")
    log(summary)
    return {"out": str(out), "method": "distill", "before": before, "after": after, "iterations": it,
            "epochs": round(it * batch / max(len(train), 1), 3), "seconds": run["seconds"], "teacher": str(teacher_path),
            "widths_kept": True, "losses": run["losses"], "train_device": train_device, "batch": batch,
            "frames": {"distillation": record["unlabeled_frames"]}, "summary": summary}


def _check_args(imgsz: int, batch: int, lr: float, epochs: Optional[float], iterations: Optional[int],
                time_budget_min: Optional[float]) -> None:
    if imgsz < 32 or imgsz % 32:
        raise UserInputError(f"--imgsz must be a multiple of 32 (>= 32), got {imgsz}")
    if batch < 1 or lr <= 0:
        raise UserInputError(f"batch ({batch}) must be >= 1 and lr ({lr}) > 0")
    if iterations is None and not epochs and not time_budget_min:
        raise UserInputError("distillation needs --epochs or --time-budget-min")
    if (iterations is not None and iterations < 1) or (epochs is not None and epochs <= 0):
        raise UserInputError(f"epochs ({epochs}) and iterations ({iterations}) must be positive")


def _teacher(student: nn.Module, ckpt: dict, model_pt: Any, teacher: Optional[Union[str, Path]]) -> tuple[Path, nn.Module]:
    """The teacher's path and frozen module; one line when there is none or its classes differ."""
    teacher_path = resolve_model(teacher) if teacher is not None else default_teacher(ckpt)
    if teacher_path is None:
        raise UserInputError(f"{model_pt}: no teacher recorded or found; pass --teacher (the unpruned model)")
    tmodel = load_detection_checkpoint(teacher_path)[0].eval()
    for p in tmodel.parameters():
        p.requires_grad_(False)
    s_head, t_head = student.model[-1], tmodel.model[-1]
    if (s_head.nc, s_head.reg_max) != (t_head.nc, t_head.reg_max) or dict(student.names) != dict(tmodel.names):
        raise UserInputError(f"distillation needs the teacher's classes: {model_pt} predicts {s_head.nc}, the teacher "
                             f"{teacher_path} {t_head.nc} (other class names?); use the supervised fine-tuning instead")
    return teacher_path, tmodel


def _loop(student: nn.Module, tmodel: nn.Module, paths: list[Path], imgsz: int, batch: int, lr: float,
          iterations: Optional[int], time_budget_min: Optional[float], seed: int, feature_weight: float, workers: int,
          device: torch.device, log: Callable[[str], None]) -> dict:
    """The training loop (cosine AdamW, BatchNorm frozen); the student ends on the CPU in eval mode."""
    taps = FeatureTaps(student, tmodel, min(imgsz, 128)) if feature_weight > 0 else None  # shapes probed on the CPU
    student.to(device)
    tmodel.to(device)
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = _batches(paths, batch, imgsz, seed, workers, device, iterations)
    t0, it, budget = time.monotonic(), 0, (time_budget_min or 0) * 60.0
    loss_cls = loss_box = float("nan")
    last_log = t0
    try:
        while True:
            elapsed = time.monotonic() - t0
            frac = max(it / iterations if iterations else 0.0, elapsed / budget if budget else 0.0)
            if frac >= 1.0:
                break
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * frac))
            x = next(gen)
            with torch.no_grad():
                target = _raw(tmodel, x)
            student.train()
            for m in student.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            lc, lb = distill_loss(_raw(student, x), target)
            loss = lc + lb + (feature_weight * taps.loss().to(device) if taps is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            loss_cls, loss_box = float(lc.detach()), float(lb.detach())
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                done = f"{it}/{iterations}" if iterations else f"{elapsed / 60:.1f}/{time_budget_min:g} min"
                log(f"{done}: iteration {it}, class loss {loss_cls:.3f}, box loss {loss_box:.3f}")
    finally:
        gen.close()  # stops the loader's workers
        if taps is not None:
            taps.remove()
        student.cpu().eval()
        tmodel.cpu()
        for p in params:
            p.requires_grad_(False)
    return {"iterations": it, "seconds": round(time.monotonic() - t0, 1),
            "losses": {"cls": round(loss_cls, 5), "box": round(loss_box, 5)}}
