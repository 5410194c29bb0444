"""Which speed to spend first: the full-width levers in order of accuracy cost, and the pruning grid."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from prune_pack.imgsz import ImgSz
from prune_pack.deploy.search import Candidate
from prune_pack.errors import UserInputError


def camera_shape(aspect: Optional[float], imgsz: int) -> Optional[tuple[int, int]]:
    """The rectangular input (h, w) that holds an image of ``aspect`` (height / width) at full
    ``imgsz`` resolution along its long side, rounded up to the stride (32): (480, 640) for 4:3,
    (384, 640) for 16:9. None when that is the square itself (``aspect`` near 1, or unknown).

    A fixed camera's frames all have one aspect ratio; a square input spends the rest of its pixels
    on letterbox padding (25 % of a 640x640 input for 4:3 frames, 44 % for 16:9)."""
    if not aspect or aspect <= 0:
        return None
    short = min(imgsz, math.ceil(imgsz * min(aspect, 1 / aspect) / 32) * 32)
    if short >= imgsz:
        return None
    return (short, imgsz) if aspect < 1 else (imgsz, short)


def plan_levers(backend: str, precision: str, imgsz: int, available: Sequence[str], bf16: bool,
                sizes: Sequence[int] = (), aspect: Optional[float] = None) -> list[Candidate]:
    """Full-width candidates in order of accuracy cost; the first is what the user asked for.

    ``aspect`` (the images' height / width, with ``precision auto`` only) adds, where it is not
    square, the rectangular input of that aspect at full resolution (``camera_shape``) for the
    fastest float lever and for INT8: it drops letterbox padding, and costs accuracy only on images
    of another shape (gated like the rest). ``sizes`` (smaller long sides, ``precision auto`` only)
    add the last, fastest lever at each of them (rectangular when ``aspect`` is): a smaller input
    costs accuracy (gated against FP32 at ``imgsz``) but far less than pruning does.

    ``precision auto``: ORT FP32 (no cost) -> OpenVINO FP32 (same math, another runtime; with
    ``--backend auto``) -> OpenVINO BF16 (where the CPU has native bf16) -> INT8 (gated by mAP), on
    OpenVINO where it is installed (NNCF's file there: 1.35-1.4x OpenVINO BF16, bench/results/nncf.md;
    ORT's own INT8 was slower than OpenVINO BF16 on every CPU measured), else on ORT.
    """
    if precision != "auto":
        b = backend
        if b == "auto":
            b = "openvino" if precision == "bf16" or "openvino" in available else "ort"
        if precision == "bf16" and b != "openvino":
            raise UserInputError("bf16 runs on OpenVINO only: use --backend openvino (or auto)")
        if b == "openvino" and "openvino" not in available:
            raise UserInputError("--backend openvino: OpenVINO is not installed (pip install 'prune-pack[openvino]')")
        return [Candidate(0.0, b, precision, imgsz)]
    base_backend = "ort" if backend in ("auto", "ort") else backend
    levers = [Candidate(0.0, base_backend, "fp32", imgsz)]
    if "openvino" in available and backend in ("auto", "openvino"):
        if base_backend != "openvino":
            levers.append(Candidate(0.0, "openvino", "fp32", imgsz))
        if bf16:
            levers.append(Candidate(0.0, "openvino", "bf16", imgsz))
        int8 = Candidate(0.0, "openvino", "int8", imgsz)
    else:
        int8 = Candidate(0.0, base_backend, "int8", imgsz)

    def shape(long: int) -> ImgSz:
        return camera_shape(aspect, long) or long

    if shape(imgsz) != imgsz:
        levers.append(dataclasses.replace(levers[-1], imgsz=shape(imgsz)))
    levers.append(int8)
    if shape(imgsz) != imgsz:
        levers.append(dataclasses.replace(int8, imgsz=shape(imgsz)))
    levers += [dataclasses.replace(int8, imgsz=shape(int(sz))) for sz in sorted(set(sizes), reverse=True) if 32 <= sz < imgsz]
    return levers


def ratio_grid(max_ratio: float, step: float) -> list[float]:
    n = int(math.floor(max_ratio / step + 1e-9))
    return [round(step * i, 4) for i in range(1, n + 1)]


def suggestions(imgsz: int, levers: Sequence[Candidate]) -> str:
    """What could still help when a target is out of reach."""
    tips = []
    if not any(c.precision == "int8" for c in levers):
        tips.append("INT8 (--int8 or --precision auto)")
    if imgsz > 320:
        tips.append(f"a smaller input size (--imgsz {max(320, (imgsz * 3 // 4) // 32 * 32)})")
    tips.append("more device threads (--threads)")
    tips.append("a smaller base model or a higher --target-ms")
    return ", ".join(tips)
