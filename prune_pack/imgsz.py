"""The input-size type shared by export, quantization, the build and the reports (a leaf: imports only ``errors``).

An input size is Ultralytics' ``imgsz``: an int (square) or (height, width), both multiples of 32.
"""

from __future__ import annotations

from typing import Sequence

from prune_pack.errors import UserInputError

ImgSz = int | tuple[int, int]


def hw(imgsz: ImgSz | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an input size."""
    if isinstance(imgsz, int) or hasattr(imgsz, "__index__"):  # int, numpy integer
        return int(imgsz), int(imgsz)  # type: ignore[arg-type]
    h, w = (int(v) for v in imgsz)
    return h, w


def norm_imgsz(imgsz: ImgSz | Sequence[int]) -> ImgSz:
    """The canonical form: an int when square, else an (h, w) tuple (JSON turns tuples into lists)."""
    h, w = hw(imgsz)
    return h if h == w else (h, w)


def shape_str(imgsz: ImgSz | Sequence[int]) -> str:
    """``640`` or ``640x480``: width x height, the way cameras state resolutions."""
    h, w = hw(imgsz)
    return str(h) if h == w else f"{w}x{h}"


def parse_imgsz(text: str | int, flag: str = "--imgsz") -> ImgSz:
    """``640`` (square) or ``WIDTHxHEIGHT`` (``640x384`` for a 16:9 camera), each a multiple of 32."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise UserInputError(f"{flag} {text}: expected a size like 640 or WIDTHxHEIGHT like 640x384") from None
    if min(w, h) <= 0 or w % 32 or h % 32:
        raise UserInputError(f"{flag} {text}: every side must be a positive multiple of 32 (the model's largest stride)")
    return norm_imgsz((h, w))
