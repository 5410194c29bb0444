"""The parity proof of every export: ONNX Runtime against the PyTorch model on real images.

Raw outputs (boxes in pixels, class scores) within measured tolerances, and the detections after
Ultralytics' NMS matched one to one; a mismatch is a ``ParityError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import prune_pack.offline  # noqa: F401 - before Ultralytics
from prune_pack.errors import ParityError, UserInputError
from prune_pack.imgsz import ImgSz, hw, norm_imgsz


def letterbox_batch(images: Sequence[str | Path], imgsz: ImgSz) -> list[np.ndarray]:
    """Each image as a (1, 3, h, w) float32 tensor, preprocessed exactly like
    Ultralytics' predictor (its own LetterBox, BGR->RGB, /255)."""
    import cv2
    from ultralytics.data.augment import LetterBox

    lb = LetterBox(new_shape=hw(imgsz), auto=False, stride=32)
    out = []
    for p in images:
        im = cv2.imread(str(p))
        if im is None:
            raise UserInputError(f"cannot read image {p}")
        x = lb(image=im)[:, :, ::-1].transpose(2, 0, 1)
        out.append(np.ascontiguousarray(x, dtype=np.float32)[None] / 255.0)
    return out


def default_parity_images(n: int = 4) -> list[Path]:
    """Real images that ship inside Ultralytics (no download): bus.jpg, zidane.jpg."""
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    files = sorted(p for p in assets.glob("*.jpg"))
    return files[:n]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a (N,4) and b (M,4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def _unmatched(a: np.ndarray, b: np.ndarray, conf: float, margin: float, min_iou: float) -> int:
    """Detections of ``a`` (rows x1 y1 x2 y2 score cls) with no same-class box in ``b`` at
    IoU >= min_iou. Detections within ``margin`` of the threshold may legitimately exist on one
    side only (a 1e-6 score change crosses it), so they are not counted."""
    sure = a[a[:, 4] >= conf + margin]
    if not len(sure):
        return 0
    if not len(b):
        return len(sure)
    iou = _iou(sure[:, :4], b[:, :4])
    same = sure[:, 5][:, None] == b[:, 5][None, :]
    return int((~((iou >= min_iou) & same).any(1)).sum())


# Tolerance on the raw output (1, 4 + nc, anchors). Both sides are FP32; they differ only by
# summation order (MLAS vs PyTorch kernels, Conv+BN folded by the exporter, fused ops), i.e. a
# relative error of ~1e-7 per op that grows through ~60 layers to ~1e-6..1e-5: on box
# coordinates in pixels (up to imgsz) that is ~1e-3 px, on sigmoid scores (0..1) ~1e-6.
# Measured (yolov8n-coco, 640, 4 coco128 val images): boxes 1.2e-3 px, scores 2.0e-6; random-
# init tiny model at 160: 2.3e-5 px, 2e-8. Allowed: boxes 1e-4 * imgsz (0.064 px at 640, ~50x
# the measured worst) and scores 1e-3 (0.1 % confidence): far below any visible effect, far
# above reordering noise. Real defects are orders larger (a conv weight x1.5 in the middle of
# yolov8n moves boxes by pixels; tests/test_export.py).
BOX_ATOL_REL = 1e-4
SCORE_ATOL = 1e-3


def check_parity(
    model: Any,
    onnx_path: str | Path,
    images: Optional[Sequence[str | Path]] = None,
    imgsz: ImgSz = 640,
    box_atol: Optional[float] = None,
    score_atol: float = SCORE_ATOL,
    conf: float = 0.25,
    iou: float = 0.7,
    min_iou: float = 0.9,
) -> dict:
    """Prove the ONNX model computes what the PyTorch model computes on real images.

    ``model`` is a .pt path or a loaded ``YOLO``. Checks (1) the max abs difference of the raw
    outputs (boxes in pixels, class scores) and (2) the detections after Ultralytics' NMS: every
    detection on either side has a same-class partner at IoU >= ``min_iou``. Raises
    ``ParityError`` with the numbers; returns them otherwise.
    """
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    yolo = model if isinstance(model, YOLO) else YOLO(str(model))
    net = yolo.model.float().eval()
    images = list(images) if images else default_parity_images()
    if not images:
        raise UserInputError("parity check needs at least one image")
    box_atol = BOX_ATOL_REL * max(hw(imgsz)) if box_atol is None else box_atol
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    box_diff = score_diff = 0.0
    n_torch = n_onnx = unmatched = 0
    for x in letterbox_batch(images, imgsz):
        with torch.inference_mode():
            y = net(torch.from_numpy(x))
        y_pt = (y[0] if isinstance(y, (list, tuple)) else y).numpy()
        y_ox = sess.run(None, {iname: x})[0]
        if y_pt.shape != y_ox.shape:
            raise ParityError(f"parity check failed for {onnx_path}: output shape {y_ox.shape} != PyTorch {y_pt.shape}")
        d = np.abs(y_pt - y_ox)
        box_diff = max(box_diff, float(d[:, :4].max()))
        score_diff = max(score_diff, float(d[:, 4:].max()))
        dets = [
            non_max_suppression(torch.from_numpy(np.ascontiguousarray(v)), conf, iou)[0].numpy()
            for v in (y_pt, y_ox)
        ]
        n_torch += len(dets[0])
        n_onnx += len(dets[1])
        margin = max(score_atol, 1e-4)
        unmatched += _unmatched(dets[0], dets[1], conf, margin, min_iou) + _unmatched(dets[1], dets[0], conf, margin, min_iou)
    result = {
        "images": len(images),
        "imgsz": norm_imgsz(imgsz),
        "max_abs_box_px": box_diff,
        "max_abs_score": score_diff,
        "box_atol_px": box_atol,
        "score_atol": score_atol,
        "detections_torch": n_torch,
        "detections_onnx": n_onnx,
        "unmatched_detections": unmatched,
    }
    problems = []
    if not box_diff <= box_atol:  # 'not <=' also catches NaN
        problems.append(f"max |box| diff {box_diff:.4g} px > {box_atol:.4g}")
    if not score_diff <= score_atol:
        problems.append(f"max |score| diff {score_diff:.4g} > {score_atol:.4g}")
    if unmatched:
        problems.append(f"{unmatched} detections without a same-class partner at IoU>={min_iou} ({n_torch} PyTorch vs {n_onnx} ONNX)")
    if problems:
        raise ParityError(f"parity check failed for {Path(onnx_path).name} on {len(images)} images: " + "; ".join(problems))
    return result
