"""What is coupled: Ultralytics detection models in prunable form, and their channel groups.

Torch-Pruning's dependency graph traces the model and follows every coupling (residual adds,
concats of the FPN/PAN, SPPF's pooled copies, the Detect head's inputs). The one structure it
cannot index through is C2f's ``chunk(2)`` of a single conv: the two halves would have to be
pruned symmetrically. ``C2fPrunable`` replaces that conv by two convs (same weights, same
outputs), as Torch-Pruning's own YOLOv8 example does, so that each half is its own group.

The class lives here (not in a script) so that a pruned checkpoint unpickles in a fresh
process wherever prune-pack is installed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from prune_pack.errors import UserInputError


class C2fPrunable(nn.Module):
    """C2f (and YOLO11's C3k2) with ``cv1`` split into ``cv0`` (first half) and ``cv1`` (second half)."""

    def __init__(self, cv0: nn.Module, cv1: nn.Module, cv2: nn.Module, m: nn.ModuleList) -> None:
        super().__init__()
        self.cv0, self.cv1, self.cv2, self.m = cv0, cv1, cv2, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _split_conv(conv: nn.Module, lo: int, hi: int) -> nn.Module:
    """A copy of an Ultralytics ``Conv`` keeping output channels [lo, hi)."""
    new = copy.deepcopy(conv)
    c, b = new.conv, new.bn
    keep = slice(lo, hi)
    c.weight = nn.Parameter(c.weight.data[keep].clone())
    if c.bias is not None:
        c.bias = nn.Parameter(c.bias.data[keep].clone())
    c.out_channels = hi - lo
    b.weight = nn.Parameter(b.weight.data[keep].clone())
    b.bias = nn.Parameter(b.bias.data[keep].clone())
    b.running_mean = b.running_mean[keep].clone()
    b.running_var = b.running_var[keep].clone()
    b.num_features = hi - lo
    return new


def make_prunable(model: nn.Module) -> nn.Module:
    """Replace every C2f (incl. subclasses such as C3k2) of a DetectionModel in place; returns it.

    Outputs are unchanged (the split is exact); Ultralytics' bookkeeping attributes (``f``, ``i``,
    ``type``, ``np``) that its forward loop reads are carried over.
    """
    from ultralytics.nn.modules.block import C2f

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, C2f):
                c = child.cv1.conv.out_channels // 2
                new = C2fPrunable(_split_conv(child.cv1, 0, c), _split_conv(child.cv1, c, 2 * c), child.cv2, child.m)
                for attr in ("f", "i", "type", "np"):
                    if hasattr(child, attr):
                        setattr(new, attr, getattr(child, attr))
                setattr(parent, name, new)
                convert(new.m)
            else:
                convert(child)

    convert(model)
    return model


def check_detection_model(model: nn.Module, source: str = "model") -> None:
    """Only plain detection is supported: refuse segmentation/pose/OBB/classification in one line."""
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel

    task = getattr(model, "task", None)
    head = model.model[-1] if hasattr(model, "model") and isinstance(getattr(model, "model"), nn.Sequential) else None
    if not isinstance(model, DetectionModel) or type(head) is not Detect or task not in (None, "detect"):
        kind = task or type(model).__name__
        raise UserInputError(f"{source}: a '{kind}' model ({type(head).__name__ if head is not None else type(model).__name__} head); "
                             "prune-pack prunes detection models (Detect head) only")
    if getattr(head, "end2end", False) or getattr(head, "one2one_cv2", None) is not None:
        raise UserInputError(f"{source}: end-to-end (NMS-free) detection heads are not supported yet")


def protected_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels must keep their shape: Detect's box/class outputs and DFL."""
    head = model.model[-1]
    layers: list[nn.Module] = [head.dfl]
    for seq in list(head.cv2) + list(head.cv3):
        layers.append(seq[-1])
    # Attention blocks (YOLO11's C2PSA) reshape channels into heads; keep them whole.
    for m in model.modules():
        if type(m).__name__ in ("Attention", "PSABlock", "C2PSA", "AAttn", "ABlock", "A2C2f"):
            layers += [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    return layers


@dataclass
class ChannelGroup:
    """Coupled output channels that must be removed together.

    ``producers``: (Conv2d, BatchNorm2d | None, act module, idxs, roots) whose output channels are
    the group's channels (several for residual chains); ``consumers``: (Conv2d, idxs, roots) whose
    *input* channels they feed. ``idxs`` are the layer's own channel indices (concat offsets
    applied), ``roots[j]`` the group channel that ``idxs[j]`` carries: a consumer can see one group
    channel several times (SPPF's pooled copies, C2f's concat of a residual chain).
    """

    name: str
    tp_group: object  # torch_pruning Group (full indices)
    producers: list[tuple[nn.Conv2d, nn.Module | None, nn.Module | None, list[int], list[int]]] = field(default_factory=list)
    consumers: list[tuple[nn.Conv2d, list[int], list[int]]] = field(default_factory=list)
    size: int = 0

    @property
    def root(self) -> nn.Conv2d:
        """The conv Torch-Pruning's group is rooted at (its channel k is group channel k)."""
        return self.tp_group[0].dep.target.module


def _owners(model: nn.Module) -> dict[nn.Conv2d, tuple[str, nn.Module | None, nn.Module | None]]:
    """conv -> (name of its Ultralytics Conv wrapper, its BN, its activation)."""
    out: dict[nn.Conv2d, tuple[str, nn.Module | None, nn.Module | None]] = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "conv", None), nn.Conv2d) and hasattr(m, "bn"):
            out[m.conv] = (name, m.bn, getattr(m, "act", None))
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m not in out:
            out[m] = (name, None, None)
    return out


def build_groups(model: nn.Module, imgsz: int = 64) -> tuple[object, list[ChannelGroup]]:
    """Trace ``model`` (already ``make_prunable``) and return (DependencyGraph, prunable groups).

    Groups whose root would change a protected layer's outputs are left out; groups are in
    network order. The model is traced at a small input (the coupling does not depend on size).
    """
    import torch_pruning as tp

    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    example = torch.zeros(1, 3, imgsz, imgsz)
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, output_transform=lambda out: out[0] if isinstance(out, (tuple, list)) else out,
        verbose=False,
    )
    owners = _owners(model)
    protected = protected_layers(model)
    order = {m: i for i, m in enumerate(model.modules())}
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(ignored_layers=protected, root_module_types=[nn.Conv2d]):
        producers, consumers = [], []
        ok = True
        for item in g.items:
            dep, idxs = item.dep, list(item.idxs)
            roots = list(getattr(item, "root_idxs", None) or [])
            mod = dep.target.module
            if not isinstance(mod, nn.Conv2d):
                continue
            if len(roots) != len(idxs) or any(r is None for r in roots) or mod.groups > 1:
                ok = False  # depthwise chains (YOLO11 head) / unmapped indices: keep the group whole
                break
            if dg.is_out_channel_pruning_fn(dep.handler):
                _, bn, act = owners[mod]
                producers.append((mod, bn, act, idxs, roots))
            elif dg.is_in_channel_pruning_fn(dep.handler):
                consumers.append((mod, idxs, roots))
        if not ok or not producers:
            continue
        producers.sort(key=lambda p: order[p[0]])
        size = len(producers[0][3])
        if any(sorted(set(p[4])) != list(range(size)) for p in producers):
            continue
        name = owners[producers[0][0]][0]
        groups.append(ChannelGroup(name=name, tp_group=g, producers=producers, consumers=consumers, size=size))
    groups.sort(key=lambda gr: order[gr.producers[0][0]])
    if not groups:
        raise UserInputError("the model has no prunable channel groups")
    return dg, groups


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv, by module name (what the checkpoint records)."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
