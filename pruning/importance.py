"""What matters: channel importance criteria, one signature, registered by name.

A criterion is ``fn(group, ctx) -> Tensor[group.size]`` (higher = keep). ``ctx`` carries the
calibration statistics that data-aware criteria need: the per-input-channel mean and variance
that every consumer conv sees (``CalibContext.in_stats``), and the images themselves.

Why not L1: in YOLOv8 the channels with the smallest weights often carry a large *constant*
activation (SiLU of a large BN bias). Removing a channel only loses what it varies around its mean
once the mean is folded into the consumers' bias (bias compensation), so the information a channel
carries into its consumers is its activation variance times the energy of the consumer weights
that read it (``act_var``): exactly the output energy lost by replacing it with its mean, for
independent channels. Channels are not independent: with the default least-squares compensation
the kept channels also absorb what they can predict of a removed one, and ``lsq`` (the default
then) scores exactly the error that remains (7.5 % / 10 % pruned yolov8n-coco, coco128 val at 640:
act_var 0.300 / 0.276, lsq 0.351 / 0.323 at the same speed; bench/results/pruning.md run 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from prune_pack.errors import UserInputError
from prune_pack.pruning.graph import ChannelGroup


@dataclass
class CalibContext:
    """Calibration material shared by criteria, the sensitivity probe and bias compensation."""

    model: nn.Module
    images: torch.Tensor  # N x 3 x H x W, float 0..1
    in_stats: dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # conv -> (mean, var) per input channel
    grads: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # taylor scores per producer conv
    grams: dict[nn.Conv2d, tuple[torch.Tensor, int]] = field(default_factory=dict)  # consumer input Grams (lsq)
    batch: int = 8


Criterion = Callable[[ChannelGroup, CalibContext], torch.Tensor]
CRITERIA: dict[str, Criterion] = {}
NEEDS_DATA: set[str] = set()
DEFAULT_CRITERION = "act_var"  # without a least-squares refit; with one, "lsq" (prune_model's auto)


def register(name: str, needs_data: bool = False) -> Callable[[Criterion], Criterion]:
    def deco(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        if needs_data:
            NEEDS_DATA.add(name)
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise UserInputError(f"unknown criterion '{name}' (choose from: auto, {', '.join(sorted(CRITERIA))})")
    return CRITERIA[name]


# ----------------------------------------------------------------------------- calibration


def load_images(paths: Sequence[Path], imgsz: int) -> torch.Tensor:
    """Letterboxed (Ultralytics' own LetterBox, as predict does) RGB tensors in 0..1."""
    import cv2
    from ultralytics.data.augment import LetterBox

    lb = LetterBox((imgsz, imgsz), auto=False, stride=32)
    out = []
    for p in paths:
        im = cv2.imread(str(p))
        if im is None:
            continue
        im = lb(image=im)[..., ::-1].transpose(2, 0, 1)
        out.append(torch.from_numpy(np.ascontiguousarray(im)).float() / 255.0)
    if not out:
        raise UserInputError("no readable calibration images")
    return torch.stack(out)


def bundled_images() -> list[Path]:
    """Ultralytics' bundled bus.jpg and zidane.jpg: the calibration set when no data is given."""
    import ultralytics

    d = Path(ultralytics.__file__).parent / "assets"
    return sorted(d.glob("*.jpg"))


@torch.no_grad()
def run_with_input_hooks(model: nn.Module, convs, hook: Callable, images: torch.Tensor, batch: int = 8) -> None:
    """Run ``images`` through ``model`` in eval mode with ``hook`` seeing every input of ``convs``."""
    handles = [c.register_forward_pre_hook(hook) for c in convs]
    try:
        model.eval()
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_input_stats(model: nn.Module, groups: list[ChannelGroup], images: torch.Tensor, batch: int = 8,
                        also: Callable | None = None) -> dict:
    """Mean and variance of every input channel of every consumer conv, over images and positions.
    ``also(conv, inputs)``: another hook run in the same pass (one forward over the images, not two)."""
    convs = {c for g in groups for c, _, _ in g.consumers}
    acc: dict[nn.Conv2d, list] = {c: [0.0, 0.0, 0] for c in convs}

    def hook(mod: nn.Module, inp: tuple) -> None:
        if also is not None:
            also(mod, inp)
        # Per-batch moments in float32 (two-pass, so no cancellation for channels whose mean is
        # large against their spread), merged across batches in float64 (Chan et al.): converting
        # whole high-resolution activations to float64 cost a third of a 640/896 pruning run.
        x = inp[0]
        n_b = x.shape[0] * x.shape[2] * x.shape[3]
        var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        mean_b, m2_b = mean_b.double(), var_b.double() * n_b
        a = acc[mod]
        if a[2] == 0:
            acc[mod] = [mean_b, m2_b, n_b]
            return
        mean, m2, n = a
        tot = n + n_b
        delta = mean_b - mean
        acc[mod] = [mean + delta * (n_b / tot), m2 + m2_b + delta * delta * (n * n_b / tot), tot]

    run_with_input_hooks(model, convs, hook, images, batch)
    return {c: (mean.float(), (m2 / n).clamp_min(0).float()) for c, (mean, m2, n) in acc.items()}


def taylor_scores(model: nn.Module, groups: list[ChannelGroup], images: torch.Tensor, batch: int = 4, conf: float = 0.25) -> dict:
    """First-order Taylor (Molchanov et al.): (sum of weight x gradient per filter)^2, accumulated.

    The loss is Ultralytics' own detection loss against the model's own confident predictions
    (pseudo-labels), so it works on unlabeled calibration images.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.nms import non_max_suppression

    producers = {p[0]: p[1] for g in groups for p in g.producers}
    scores = {c: torch.zeros(c.out_channels) for c in producers}
    saved_args, saved_crit = getattr(model, "args", None), getattr(model, "criterion", None)
    model.args = get_cfg()
    model.criterion = None
    try:
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            model.eval()
            with torch.no_grad():
                dets = non_max_suppression(model(x)[0], conf_thres=conf, iou_thres=0.7)
            bi, cls, boxes = [], [], []
            h, w = x.shape[2:]
            for j, d in enumerate(dets):
                if len(d):
                    xyxy = d[:, :4]
                    xywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                                        (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], 1)
                    bi.append(torch.full((len(d),), j, dtype=torch.float32))
                    cls.append(d[:, 5:6])
                    boxes.append(xywh)
            if not bi:
                continue
            tgt = {"img": x, "batch_idx": torch.cat(bi), "cls": torch.cat(cls), "bboxes": torch.cat(boxes)}
            model.train()
            model.zero_grad(set_to_none=True)
            loss, _ = model.loss(tgt)
            loss.sum().backward()
            for c, bn in producers.items():
                s = (c.weight * c.weight.grad).sum((1, 2, 3)) if c.weight.grad is not None else 0
                if bn is not None and bn.weight.grad is not None:
                    s = s + bn.weight * bn.weight.grad + bn.bias * bn.bias.grad
                scores[c] += (s.detach() ** 2) if isinstance(s, torch.Tensor) else 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        model.args, model.criterion = saved_args, saved_crit
    return scores


# ----------------------------------------------------------------------------- criteria


def _per_channel(group: ChannelGroup, values: Callable[[nn.Conv2d, nn.Module | None], torch.Tensor]) -> torch.Tensor:
    """Sum a per-output-channel quantity over the group's producers, indexed by group channel."""
    out = torch.zeros(group.size)
    for conv, bn, _, idxs, roots in group.producers:
        v = values(conv, bn).detach().float()
        out.index_add_(0, torch.tensor(roots), v[torch.tensor(idxs)])
    return out


@register("l1")
def l1(group: ChannelGroup, ctx: CalibContext) -> torch.Tensor:
    return _per_channel(group, lambda c, bn: c.weight.abs().sum((1, 2, 3)))


@register("l2")
def l2(group: ChannelGroup, ctx: CalibContext) -> torch.Tensor:
    return _per_channel(group, lambda c, bn: c.weight.pow(2).sum((1, 2, 3))).sqrt()


@register("bn_scale")
def bn_scale(group: ChannelGroup, ctx: CalibContext) -> torch.Tensor:
    return _per_channel(group, lambda c, bn: bn.weight.abs() if bn is not None else c.weight.abs().sum((1, 2, 3)))


@register("taylor", needs_data=True)
def taylor(group: ChannelGroup, ctx: CalibContext) -> torch.Tensor:
    if not ctx.grads:
        raise UserInputError("criterion 'taylor' needs calibration gradients (internal: taylor_scores not run)")
    return _per_channel(group, lambda c, bn: ctx.grads[c])


@register("act_var", needs_data=True)
def act_var(group: ChannelGroup, ctx: CalibContext) -> torch.Tensor:
    """Activation variance x consumer weight energy, summed over every place a channel is read."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for conv, idxs, roots in group.consumers:
        _, var = ctx.in_stats[conv]
        w = conv.weight.detach()
        energy = w.pow(2).sum((0, 2, 3))  # per input channel
        ii = torch.tensor(idxs)
        out.index_add_(0, torch.tensor(roots), (var[ii] * energy[ii]).double())
    return out.float()


def ridged(gram: torch.Tensor, count: int, ridge: float = 1e-3) -> torch.Tensor:
    """A Gram matrix with the ridge every least-squares step here uses: ``ridge`` x its mean
    diagonal, raised when there are fewer samples than unknowns (small maps, few images)."""
    lam = ridge * max(1.0, gram.shape[0] / max(1, count))
    return gram + lam * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)


@register("lsq", needs_data=True)
def lsq_order(group: ChannelGroup, ctx: CalibContext, max_frac: float = 0.75) -> torch.Tensor:
    """The error a channel's removal leaves after its consumers' least-squares refit
    (``plan.lsq_refit``), one channel at a time (Optimal Brain Surgeon on channel blocks).

    For input channel j of a consumer with weight columns W_j (Cout x k^2) and inverse input Gram
    matrix H^-1, the error is tr(W_j ((H^-1)_jj)^-1 W_j^T) / samples, summed over every place the
    channel is read. The cheapest channel goes, each consumer's kept weights take its optimal refit
    and H^-1 loses its block, and the rest are scored again: a channel that its twin predicts is
    cheap only until the twin is gone. Scored one-shot, the same error lost 1.4 points to
    ``act_var`` at 20 % pruned; sequentially it gains 3–5 points at 7.5–20 % (bench/results/pruning.md
    run 5). Returns the removal order as scores (first removed = lowest) for the first ``max_frac``
    of the channels (the most any plan removes); the rest follow by their last scores."""
    states = []
    for conv, idxs, roots in group.consumers:
        if conv not in ctx.grams:
            raise UserInputError("criterion 'lsq' needs the least-squares calibration (compensation: lsq)")
        gram, count = ctx.grams[conv]
        hinv = torch.linalg.inv(ridged(gram, count))
        kk = conv.kernel_size[0] * conv.kernel_size[1]
        w = torch.cat([conv.weight.detach().double().reshape(conv.out_channels, -1),
                       torch.zeros(conv.out_channels, 1, dtype=torch.float64)], 1)  # + the constant (bias) column
        # hinv and w hold the kept input channels only (in ``chans`` order), then the constant feature.
        states.append({"hinv": hinv, "w": w, "kk": kk, "chans": list(range(conv.in_channels)), "count": count,
                       "cin": conv.in_channels, "idxs": torch.tensor(idxs), "roots": torch.tensor(roots)})

    def block_scores(st: dict) -> torch.Tensor:  # each input channel's error if it went now (0: gone)
        kk, n = st["kk"], len(st["chans"])
        hb = st["hinv"][: n * kk, : n * kk].reshape(n, kk, n, kk)
        ar = torch.arange(n)
        blocks = hb[ar, :, ar, :]  # n x kk x kk
        s = torch.linalg.inv(blocks + 1e-12 * torch.eye(kk, dtype=blocks.dtype))
        wb = st["w"][:, : n * kk].reshape(-1, n, kk)
        sc = torch.zeros(st["cin"], dtype=torch.float64)
        sc[torch.tensor(st["chans"])] = torch.einsum("oik,ikl,oil->i", wb, s, wb) / st["count"]
        return sc

    removed: list[int] = []
    alive = set(range(group.size))
    last = torch.zeros(group.size, dtype=torch.float64)
    todo = int(group.size * max_frac)
    # One channel per step: 4 at a time in 256-channel groups halved the time but lost 1.2 / 1.0 points at 7.5 / 10 %.
    while len(removed) < todo:
        total = torch.zeros(group.size, dtype=torch.float64)
        for st in states:
            total.index_add_(0, st["roots"], block_scores(st)[st["idxs"]])
        last = total
        gone = min(alive, key=lambda k: float(total[k]))
        alive.discard(gone)
        removed.append(gone)
        for st in states:
            kk, blocks = st["kk"], set(st["idxs"][st["roots"] == gone].tolist())
            if not blocks:
                continue
            at = [k for k, c in enumerate(st["chans"]) if c in blocks]  # every place it is read
            cols = torch.cat([torch.arange(k * kk, (k + 1) * kk) for k in at])
            hinv, w = st["hinv"], st["w"]
            sj = torch.linalg.inv(hinv[cols][:, cols] + 1e-12 * torch.eye(len(cols), dtype=torch.float64))
            row = hinv[cols, :]
            w = w - w[:, cols] @ sj @ row  # the kept weights' optimal refit
            hinv = hinv - hinv[:, cols] @ sj @ row  # the inverse Gram of the kept inputs ...
            keep = torch.ones(hinv.shape[0], dtype=torch.bool)
            keep[cols] = False  # ... without the removed ones: later steps work on smaller matrices
            st["hinv"], st["w"] = hinv[keep][:, keep], w[:, keep]
            st["chans"] = [c for c in st["chans"] if c not in blocks]
    out = torch.empty(group.size, dtype=torch.float64)
    for pos, r in enumerate(removed):
        out[r] = pos
    rest = sorted(alive, key=lambda k: float(last[k]))
    for pos, r in enumerate(rest):
        out[r] = len(removed) + pos
    return out.float()


def group_scores(groups: list[ChannelGroup], criterion: str, ctx: CalibContext,
                 progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Every group's channel scores; ``progress`` hears each group (``lsq`` takes ~12 s for YOLOv8n, ~2 min for YOLOv8s)."""
    fn = get_criterion(criterion)
    out = {}
    for i, g in enumerate(groups):
        if progress:
            progress(f"scoring channels ({criterion}) {i + 1}/{len(groups)}: {g.name}")
        out[g.name] = fn(g, ctx)
    return out
