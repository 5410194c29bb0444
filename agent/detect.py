"""Ultralytics-identical pre- and post-processing for YOLOv8 detectors, in numpy + OpenCV.

The device runs without torch, so this module re-implements exactly what Ultralytics' predictor
does for a static-shape ONNX model (``ultralytics.data.augment.LetterBox`` with ``auto=False``,
BGR->RGB, /255, ``ultralytics.utils.nms.non_max_suppression`` and ``ops.scale_boxes``), in float32
like the reference, so detections equal ``YOLO(model.onnx).predict(...)`` for the same image.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

MAX_WH = 7680  # Ultralytics' per-class box offset for class-aware NMS in one pass
MAX_NMS = 30000  # boxes entering NMS at most (highest confidence first), as in Ultralytics


def letterbox(img_bgr: np.ndarray, new_shape: int | Sequence[int] = (640, 640), stride: int = 32, auto: bool = False,
              scaleup: bool = True, color: tuple[int, int, int] = (114, 114, 114)
              ) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to ``new_shape`` (h, w), as ``LetterBox(center=True)``.

    Returns ``(img, (ratio_w, ratio_h), (pad_left, pad_top))``: the pads are the integer offsets of the
    resized image inside the canvas (what ``scale_boxes`` subtracts).
    """
    shape = img_bgr.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    new_shape = (int(new_shape[0]), int(new_shape[1]))
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    # Python's round (banker's rounding) on purpose: Ultralytics uses it, and it decides the exact pixel grid.
    new_unpad = max(round(shape[1] * r), 1), max(round(shape[0] * r), 1)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    dw /= 2
    dh /= 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = img_bgr
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, int(top), int(bottom), int(left), int(right), cv2.BORDER_CONSTANT, value=color)
    return img, (r, r), (int(left), int(top))


def preprocess(img_bgr: np.ndarray, input_shape: Sequence[int], dtype: str = "float32"
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Letterbox to the model input, BGR->RGB, HWC->NCHW, /255 in float32 (the predictor's order of ops).

    ``input_shape`` is the model's (1, 3, H, W) or (H, W). ``meta`` carries what ``postprocess`` needs.
    """
    hw = tuple(int(v) for v in input_shape[-2:])
    img, ratio, pad = letterbox(img_bgr, hw)
    x = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])[None]  # BGR HWC -> RGB CHW, batch of 1
    x = x.astype(np.float32)
    x /= np.float32(255.0)  # float32 division, bit-identical to torch's .float().div_(255)
    if dtype == "float16":
        x = x.astype(np.float16)
    h0, w0 = img_bgr.shape[:2]
    new_w, new_h = round(w0 * ratio[0]), round(h0 * ratio[1])
    meta = {"orig_shape": (h0, w0), "input_shape": hw, "ratio": ratio, "pad": pad,
            "gain": (max(new_w, 1) / w0, max(new_h, 1) / h0)}  # per-axis gains of the rounded size, as scale_boxes
    return x, meta


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: int) -> np.ndarray:
    """Greedy NMS with torchvision's semantics: descending score, drop boxes with IoU > threshold.

    Stops after ``max_keep`` boxes: greedy NMS never revisits a kept box, so the first ``max_det``
    kept are exactly what ``nms(...)[:max_det]`` returns, and a flood of candidates from a broken
    model costs at most max_det vectorised passes instead of one per candidate.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    thr = np.float32(iou_thres)
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        inter = np.maximum(xx2 - xx1, np.float32(0)) * np.maximum(yy2 - yy1, np.float32(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(iou > thr)]  # NaN IoU (degenerate boxes) keeps the box, as torchvision does
    return np.asarray(keep, dtype=np.int64)


def non_max_suppression(pred: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
                        agnostic: bool = False) -> np.ndarray:
    """One image's raw output (4+nc, N) -> (K, 6) [x1, y1, x2, y2, conf, cls] in input pixels.

    Mirrors ``non_max_suppression(multi_label=False, classes=None)``; end-to-end outputs (N, 6) are
    only filtered by confidence and ``max_det``.
    """
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim == 2 and pred.shape[-1] == 6:  # an NMS node in the graph already did the work
        return pred[pred[:, 4] > conf][:max_det].astype(np.float32)
    nc = pred.shape[0] - 4
    scores_all = pred[4:4 + nc]
    cand = scores_all.max(0) > conf
    if not cand.any():
        return np.zeros((0, 6), np.float32)
    x = pred[:, cand].T  # (n, 4+nc)
    xy, wh = x[:, :2], x[:, 2:4] / np.float32(2)
    box = np.concatenate([xy - wh, xy + wh], 1)
    cls_scores = x[:, 4:4 + nc]
    j = cls_scores.argmax(1)
    c = cls_scores[np.arange(len(j)), j]
    keep = c > conf
    det = np.concatenate([box, c[:, None], j[:, None].astype(np.float32)], 1)[keep]
    if not len(det):
        return np.zeros((0, 6), np.float32)
    if len(det) > MAX_NMS:
        det = det[np.argsort(-det[:, 4], kind="stable")[:MAX_NMS]]
    offset = det[:, 5:6] * np.float32(0 if agnostic else MAX_WH)
    i = _nms(det[:, :4] + offset, det[:, 4], iou, max_det)  # float32 like the reference: same ties, same drops
    return det[i]


def scale_boxes(det: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Input-pixel boxes -> original-image pixels, clipped (``ops.scale_boxes`` with ``ratio_pad=None``)."""
    pad_x, pad_y = meta["pad"]
    gain_x, gain_y = meta["gain"]
    h0, w0 = meta["orig_shape"]
    b = det[:, :4]
    b[:, [0, 2]] -= np.float32(pad_x)
    b[:, [1, 3]] -= np.float32(pad_y)
    b[:, [0, 2]] /= np.float32(gain_x)
    b[:, [1, 3]] /= np.float32(gain_y)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w0)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h0)
    return det


def postprocess(raw_output: np.ndarray | Sequence[np.ndarray], meta: dict[str, Any], conf: float = 0.25,
                iou: float = 0.7, max_det: int = 300, agnostic: bool = False) -> np.ndarray:
    """Raw model output (1, 4+nc, N) (or end-to-end (1, N, 6)) -> (K, 6) in original image pixels."""
    if isinstance(raw_output, (list, tuple)):
        raw_output = raw_output[0]
    det = non_max_suppression(np.asarray(raw_output)[0], conf, iou, max_det, agnostic)
    return scale_boxes(det.copy(), meta)


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    val = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        val |= (b & 0x7F) << shift
        if b < 0x80:
            return val, pos
        shift += 7


def _fields(buf: Any, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of one protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
            yield num, wt, val
        elif wt == 2:
            n, pos = _varint(buf, pos)
            yield num, wt, (pos, n)
            pos += n
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (Ultralytics stores names, imgsz, stride there).

    Read straight from the protobuf (ModelProto field 14: key=1, value=2) because the agent
    has no ``onnx`` package and OpenVINO does not expose them; the graph is skipped, not parsed.
    """
    import mmap

    out: dict[str, str] = {}
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for num, wt, val in _fields(mm, 0, len(mm)):
                if num == 14 and wt == 2:
                    off, n = val
                    kv = {f: bytes(mm[o:o + ln]).decode("utf-8", "replace")
                          for f, w, (o, ln) in ((f, w, v) for f, w, v in _fields(mm, off, off + n) if w == 2)}
                    if 1 in kv:
                        out[kv[1]] = kv.get(2, "")
    except (OSError, ValueError, IndexError):  # not a readable ONNX file: no metadata, not an error here
        return {}
    return out


def names_from_session(session: Any, default_nc: int = 0) -> dict[int, str]:
    """Class names from an Ultralytics export's ONNX metadata (``names``), else ``{i: str(i)}``."""
    path = getattr(session, "path", None)
    meta = onnx_metadata(path) if path else {}
    if "names" in meta:
        try:
            names = ast.literal_eval(meta["names"])  # Ultralytics writes str(dict); literal_eval runs no code
            return {int(k): str(v) for k, v in names.items()}
        except (ValueError, SyntaxError, AttributeError):
            pass
    return {i: str(i) for i in range(default_nc)}


@dataclass
class DetectTiming:
    pre_ms: float
    infer_ms: float
    post_ms: float

    @property
    def total_ms(self) -> float:
        return self.pre_ms + self.infer_ms + self.post_ms


class Detector:
    """A session + class names + thresholds: BGR image in, detections in original pixels out."""

    def __init__(self, session: Any, names: Optional[dict[int, str]] = None, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300, agnostic: bool = False) -> None:
        self.session = session
        self.names = dict(names) if names else names_from_session(session)
        self.conf = conf
        self.iou = iou
        self.max_det = max_det
        self.agnostic = agnostic
        self.input_shape = tuple(session.input_shape)
        if len(self.input_shape) < 2 or min(self.input_shape[-2:]) <= 1:
            # Dynamic H/W (a ``dynamic=True`` export) reads as 1: use the export's imgsz, like Ultralytics.
            self.input_shape = (1, 3, *self._meta_imgsz(session))
        self.input_dtype = getattr(session, "input_dtype", "float32")

    @staticmethod
    def _meta_imgsz(session: Any) -> tuple[int, int]:
        path = getattr(session, "path", None)
        try:
            sz = ast.literal_eval(onnx_metadata(path).get("imgsz", "640")) if path else 640
        except (ValueError, SyntaxError):
            sz = 640
        h, w = (sz, sz) if isinstance(sz, int) else (int(sz[0]), int(sz[-1]))
        return h, w

    def detect_array(self, img_bgr: np.ndarray, conf: Optional[float] = None) -> tuple[np.ndarray, DetectTiming]:
        """(K, 6) [x1, y1, x2, y2, conf, cls] and the time spent in each stage."""
        t0 = time.perf_counter()
        x, meta = preprocess(img_bgr, self.input_shape, self.input_dtype)
        t1 = time.perf_counter()
        out = self.session.run(x)
        t2 = time.perf_counter()
        det = postprocess(out, meta, self.conf if conf is None else conf, self.iou, self.max_det, self.agnostic)
        t3 = time.perf_counter()
        return det, DetectTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def to_dicts(self, det: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for x1, y1, x2, y2, c, k in det.tolist():
            k = int(k)
            out.append({"cls": k, "name": self.names.get(k, str(k)), "conf": round(c, 4),
                        "box": [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]})
        return out

    def detect(self, img_bgr: np.ndarray, conf: Optional[float] = None) -> list[dict[str, Any]]:
        """Detections as ``{"cls", "name", "conf", "box": [x1, y1, x2, y2]}`` in original image pixels."""
        return self.to_dicts(self.detect_array(img_bgr, conf)[0])
