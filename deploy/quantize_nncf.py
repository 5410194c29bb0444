"""Static INT8 with NNCF's ONNX backend (a QDQ file laid out for OpenVINO), and the mAP evaluator
its accuracy-aware mode calls. Selected through ``quantize.quantize_int8_with`` (``export.int8_engine``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np

from prune_pack.deploy.qdq import (_copy_metadata, activations_to_u8, early_convs, float_convs, head_output_convs,
                                   head_tail_nodes, quantized_ops, stem_nodes)
from prune_pack.errors import PrunePackError, UserInputError
from prune_pack.imgsz import ImgSz, hw


@dataclasses.dataclass
class AccuracyControl:
    """Settings of NNCF's accuracy-aware quantization (``quantize_int8_nncf(accuracy_control=...)``).

    ``images``: labelled images (YOLO layout: ``.../images/x.jpg`` with ``.../labels/x.txt``) the
    control loop measures mAP50-95 on; keep them apart from the split the result is gated on.
    ``max_drop``: allowed mAP50-95 drop (absolute) vs the FP32 file on those images.
    ``max_iterations``: revert steps at most (each one validates on all ``images``).
    ``ranking_subset``: images used to rank the quantizer groups (the most affected ones).
    """

    images: Sequence[str | Path]
    max_drop: float = 0.005
    max_iterations: int = 8
    ranking_subset: int = 32


def _match(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(len(det), 10) true-positive matrix at IoU 0.5:0.95, by the installed Ultralytics validator's
    own ``match_predictions`` and ``box_iou`` (``det`` sorted by descending confidence, as NMS returns it)."""
    import types

    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    if not len(det) or not len(gt):
        return np.zeros((len(det), 10), bool)
    iou = box_iou(torch.from_numpy(gt[:, 1:]).float(), torch.from_numpy(det[:, :4]).float())
    this = types.SimpleNamespace(iouv=torch.linspace(0.5, 0.95, 10))  # all the method reads of its validator
    return BaseValidator.match_predictions(this, torch.from_numpy(det[:, 5]), torch.from_numpy(gt[:, 0]), iou).numpy()


def _nms_multi_label(pred: np.ndarray, conf: float = 0.001, iou: float = 0.7, max_det: int = 300) -> np.ndarray:
    """One image's raw output (4+nc, N) -> (K, 6) input-pixel detections, as the validator's
    ``non_max_suppression(multi_label=True)``: every (box, class) pair above ``conf`` is a candidate."""
    from prune_pack.agent.detect import MAX_NMS, MAX_WH, _nms

    scores = pred[4:]
    c, b = np.nonzero(scores > conf)  # (class, box) pairs
    if not len(b):
        return np.zeros((0, 6), np.float32)
    xy, wh = pred[:2, b].T, pred[2:4, b].T / np.float32(2)
    det = np.concatenate([xy - wh, xy + wh, scores[c, b][:, None], c[:, None].astype(np.float32)], 1)
    if len(det) > MAX_NMS:
        det = det[np.argsort(-det[:, 4], kind="stable")[:MAX_NMS]]
    return det[_nms(det[:, :4] + det[:, 5:6] * np.float32(MAX_WH), det[:, 4], iou, max_det)]


class MapEvaluator:
    """mAP50-95 of an ONNX detector (an ``onnx.ModelProto``) on labelled images, for NNCF's accuracy
    control loop, which calls it with the FP32 model, the quantized one and many partly reverted ones.

    The computation is Ultralytics' validator's (batch 1, letterbox to the model's input, multi-label NMS at conf
    0.001 / IoU 0.7 / 300 detections, matching at IoU 0.5:0.95, ``ap_per_class``) on the agent's own
    pre/post-processing (``agent.detect``): no dataset cache is written and a validation costs about
    the model's inference time (it matched the validator to 0.0005-0.0025 on coco128 val). A model
    with quantizers runs where its file will run (OpenVINO, default precision, read from an ONNX file
    like the agent reads it); the FP32 model runs on ONNX Runtime in FP32, the gate's reference.
    Called as ``evaluator(model, indices)`` -> ``(mAP50-95, per-image mAP50-95)``; the per-image
    values let NNCF pick the most affected images for ranking without one call per image.
    """

    def __init__(self, images: Sequence[str | Path], imgsz: ImgSz, threads: int = 2) -> None:
        import cv2
        from ultralytics.data.utils import img2label_paths

        from prune_pack.agent.detect import letterbox

        self.imgsz, self.threads = imgsz, threads
        self.items: list[tuple[np.ndarray, dict, np.ndarray]] = []
        for img, lab in zip(images, img2label_paths([str(p) for p in images])):
            im = cv2.imread(str(img))
            if im is None:
                raise UserInputError(f"cannot read image {img}")
            h0, w0 = im.shape[:2]
            rows = np.loadtxt(lab, ndmin=2, dtype=np.float32) if Path(lab).is_file() else np.zeros((0, 5), np.float32)
            rows = rows[:, :5].reshape(-1, 5)
            gt = np.stack([rows[:, 0], (rows[:, 1] - rows[:, 3] / 2) * w0, (rows[:, 2] - rows[:, 4] / 2) * h0,
                           (rows[:, 1] + rows[:, 3] / 2) * w0, (rows[:, 2] + rows[:, 4] / 2) * h0], 1)
            lb, ratio, pad = letterbox(im, imgsz)  # kept uint8 (4x less memory than the float input)
            nw, nh = round(w0 * ratio[0]), round(h0 * ratio[1])
            meta = {"orig_shape": (h0, w0), "input_shape": hw(imgsz), "ratio": ratio, "pad": pad,
                    "gain": (max(nw, 1) / w0, max(nh, 1) / h0)}
            self.items.append((lb, meta, gt))
        if not self.items:
            raise UserInputError("accuracy control needs at least one labelled image")
        self._cached: tuple[Any, Any] = (None, None)
        self.history: list[dict] = []  # one entry per full-set validation: what the loop tried
        self.first_quantized: Optional[set[str]] = None  # ops with int8 inputs in the fully quantized model

    def __len__(self) -> int:
        return len(self.items)

    def _session(self, model: Any) -> Any:
        if self._cached[0] is model:  # NNCF validates the same model object several times
            return self._cached[1]
        import onnx

        from prune_pack.agent.backends import load_session

        quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        with tempfile.TemporaryDirectory(prefix="pp-ac-") as td:
            path = Path(td) / "m.onnx"
            if quantized:
                m = onnx.ModelProto()
                m.CopyFrom(model)
                activations_to_u8(m)  # OpenVINO's ONNX reader needs uint8 activation quantizers
                onnx.save(m, str(path))
            else:
                onnx.save(model, str(path))
            s = load_session(path, "openvino" if quantized else "ort", None, self.threads)
        self._cached = (model, s)
        return s

    def __call__(self, model: Any, indices: Iterable[int]) -> tuple[float, list[float]]:
        from ultralytics.utils.metrics import ap_per_class

        from prune_pack.agent.detect import scale_boxes

        s = self._session(model)
        stats: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        per_image: list[float] = []
        for i in indices:
            lb, meta, gt = self.items[int(i)]
            x = np.ascontiguousarray(lb.transpose(2, 0, 1)[::-1])[None].astype(np.float32) / np.float32(255.0)
            out = s.run(x)
            det = scale_boxes(_nms_multi_label(np.asarray(out[0] if isinstance(out, (list, tuple)) else out)[0]), meta)
            st = (_match(det, gt), det[:, 4], det[:, 5], gt[:, 0])
            stats.append(st)
            per_image.append(float(ap_per_class(*st)[5].mean()) if len(gt) else 0.0)
        tp, conf, pcls, tcls = (np.concatenate(a, 0) for a in zip(*stats))
        value = float(ap_per_class(tp, conf, pcls, tcls)[5].mean()) if len(tcls) else 0.0
        if len(per_image) == len(self.items):
            self.history.append({"quantizers": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
                                 "map50_95": round(value, 4)})
            if self.first_quantized is None and self.history[-1]["quantizers"]:
                self.first_quantized = quantized_ops(model)
        return value, per_image


def quantize_int8_nncf(
    fp32_onnx: str | Path,
    out_onnx: str | Path,
    calib_images: Sequence[str | Path],
    imgsz: ImgSz,
    preset: Literal["mixed", "performance"] = "mixed",
    fast_bias_correction: bool = True,
    exclude_head: bool = True,
    float_stem: bool = True,
    float_head_convs: bool = False,
    info: Optional[dict] = None,
    accuracy_control: Optional[AccuracyControl] = None,
    float_early_convs: int = 1,
) -> Path:
    """Static INT8 with NNCF's ONNX backend: a QDQ ONNX file laid out the way OpenVINO's CPU plugin
    fuses best (int8 inputs of every Conv, symmetric per-channel int8 weights; ``mixed`` = asymmetric
    activations where they are not centred, ``performance`` = symmetric everywhere), calibrated on
    letterboxed ``calib_images`` (all of them: ``subset_size`` = their count).

    The Detect tail stays float (``head_tail_nodes``: the ONNX counterpart of the ignored scope of
    Ultralytics' own NNCF export, i.e. the class Sigmoid, DFL and box decoding). Activation
    quantizers are stored as uint8 (``activations_to_u8``). ``info`` gets the settings.

    Defaults measured with ``bench/int8_nncf.py`` (yolov8n-coco, 640, bench/results/nncf.md): on
    OpenVINO ~1.35-1.4x faster than OpenVINO bf16; the ``performance`` preset was as fast and 1.3
    points worse; the float stem (``float_stem``) cost no speed on OpenVINO and was 0.1-0.5 points
    better; 32, 64 and 128 calibration images and ``fast_bias_correction`` off measured the same
    within the 128-image noise. ``float_early_convs=1`` (the conv after the stem also float: the
    first layer NNCF's accuracy control reverted) cost no speed and cut the mAP50-95 loss at 640
    from 0.76 to 0.38 points on coco128 val (0.89 -> 0.41 on its held-out half); 2 costs ~10 % speed.
    ``accuracy_control`` runs ``nncf.quantize_with_accuracy_control`` instead (``AccuracyControl``):
    it needs labelled images the model has not memorised (on COCO train images the quantized
    model scores *above* FP32, so the loop reverts nothing). On ONNX Runtime the
    file is *slower* than FP32 (NNCF quantizes Conv inputs only, so ORT cannot form QLinearConv):
    use ``quantize_int8`` for ORT (``resolve_int8_engine``).
    """
    import onnx

    try:
        import nncf
    except ImportError:
        from prune_pack.errors import MissingExtraError

        raise MissingExtraError("INT8 quantization with NNCF", "nncf", "nncf") from None
    if not calib_images:
        raise UserInputError("INT8 calibration needs at least one image")
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    if preset not in presets:
        raise UserInputError(f"NNCF preset {preset!r}: expected one of {', '.join(presets)}")
    src, out = Path(fp32_onnx), Path(out_onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src))
    excluded = (head_tail_nodes(m) if exclude_head else []) + (stem_nodes(m) if float_stem else [])
    if float_head_convs:
        excluded += head_output_convs(m)
    if float_early_convs:
        excluded += early_convs(m, float_early_convs)
    input_name = m.graph.input[0].name
    from prune_pack.deploy.parity import letterbox_batch

    # Images are letterboxed lazily, one per calibration step, as Ultralytics' predictor does.
    dataset = nncf.Dataset(list(calib_images), lambda p: {input_name: letterbox_batch([p], imgsz)[0]})
    common: dict[str, Any] = {"preset": presets[preset], "subset_size": len(calib_images), "fast_bias_correction": fast_bias_correction,
                              "ignored_scope": nncf.IgnoredScope(names=excluded) if excluded else None}
    q, ev = _run_nncf(m, dataset, common, accuracy_control, imgsz, src.name)
    n_u8 = activations_to_u8(q)
    onnx.save(q, str(out))
    _copy_metadata(src, out)
    if info is not None:
        names = set(excluded)
        info.update(
            float_head_convs=float_head_convs, float_early_convs=float_early_convs, engine="nncf", nncf_version=str(nncf.__version__), preset=preset, fast_bias_correction=fast_bias_correction,
            per_channel=True, format="qdq", activations="u8", activation_quantizers=n_u8, weights="s8",
            calib_images=len(calib_images), excluded_nodes=len(excluded), float_stem=float_stem,
            float_ops=sorted({n.op_type for n in m.graph.node if n.name in names}),
        )
        if ev is not None:
            assert accuracy_control is not None
            info["accuracy_control"] = {
                "max_drop": accuracy_control.max_drop, "images": len(ev), "max_iterations": accuracy_control.max_iterations,
                "ranking_subset": accuracy_control.ranking_subset, "validations": ev.history,
                "reverted_ops": sorted((ev.first_quantized or set()) - quantized_ops(q)),
                "reverted_convs": float_convs(q, names)}
    return out


def _run_nncf(m: Any, dataset: Any, common: dict[str, Any], accuracy_control: Optional[AccuracyControl], imgsz: ImgSz,
              name: str) -> tuple[Any, Optional[MapEvaluator]]:
    """``nncf.quantize`` (or its accuracy-aware variant) with NNCF's per-node INFO lines muted; one-line errors."""
    import logging

    import nncf
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # NNCF logs one INFO line per ignored node
    ev: Optional[MapEvaluator] = None
    try:
        if accuracy_control is None:
            return nncf.quantize(m, dataset, **common), None
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        ev = MapEvaluator(accuracy_control.images, imgsz)
        q = nncf.quantize_with_accuracy_control(
            m, dataset, nncf.Dataset(list(range(len(ev)))), ev, max_drop=accuracy_control.max_drop, **common,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=accuracy_control.max_iterations, ranking_subset_size=accuracy_control.ranking_subset,
                num_ranking_workers=1),  # one model compiled at a time: the CPU is the bottleneck, not compilation
        )
        return q, ev
    except PrunePackError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the CLI
        msg = (str(e).splitlines() or [""])[0][:300]
        raise PrunePackError(f"NNCF INT8 quantization of {name} failed: {type(e).__name__}: {msg}") from None
    finally:
        nncf_logger.setLevel(level)
