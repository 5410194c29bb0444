"""Static INT8 quantization (ONNX Runtime's quantizer, or NNCF for OpenVINO), and the accuracy gate.

Two engines make the same kind of file (a QDQ ONNX, which the agent runs on either backend), each
laid out for one runtime: ``quantize_int8`` (ORT's ``quantize_static``, below) for ONNX Runtime and
``quantize_int8_nncf`` (NNCF's ONNX backend) for OpenVINO; ``export.int8_engine`` picks one
(``resolve_int8_engine``: auto = nncf for an OpenVINO target), ``quantize_int8_with`` runs it.

ORT recipe (the defaults; every choice measured with ``bench/int8.py``, see ``bench/results/int8.md``):
- QDQ format (QOperator measured the same), per-channel symmetric int8 weights, uint8
  activations: U8S8 is the pair AVX-512 VNNI's ``vpdpbusd`` multiplies natively; S8S8 was no
  faster than FP32 here (no AMX on this CPU).
- MinMax calibration on the user's own training images (Ultralytics-identical letterbox):
  entropy gave the same mAP for 3x the time and ~7 GB of RAM at 640, percentile was worse.
- The Detect head's tail (DFL softmax and dot product, box decoding, final Concat, class
  Sigmoid) stays float: quantizing it took yolov8n-coco from 0.419 to 0.000 mAP50-95 (the
  "naive static quantization drops mAP to zero" report).
- The stem conv (3 input channels) stays float: its int8 version was slower than FP32.
- SiLU stays QLinearSigmoid + QLinearMul (``fuse_silu`` is ~8 % faster, ~0.4 points less accurate).
Result: 1.95x less CPU time than FP32 (the 2.5x goal is not met: int8 SiLU/Concat/Resize are
~30 % of the INT8 time and ORT has no fused int8 Conv+SiLU), mAP50-95 0.18 points below FP32 on coco128 val.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np

from prune_pack.deploy.export import ImgSz, hw
from prune_pack.errors import AccuracyGateError, PrunePackError, UserInputError


def int8_gate(fp32_map: float, int8_map: float, max_drop: float = 0.010, what: str = "INT8") -> float:
    """Refuse a quantized model whose mAP50-95 is more than ``max_drop`` (absolute, 0.010 = 1.0
    point) below its FP32 source. Returns the drop (negative = the quantized model is better)."""
    drop = float(fp32_map) - float(int8_map)
    if not np.isfinite(drop) or drop > max_drop:
        raise AccuracyGateError(
            f"{what} model refused: mAP50-95 {int8_map:.4f} vs FP32 {fp32_map:.4f} "
            f"(drop {drop * 100:.2f} points > allowed {max_drop * 100:.2f})"
        )
    return drop


# ----------------------------------------------------------------------------- calibration


class LetterboxReader:
    """``CalibrationDataReader`` feeding letterboxed images exactly as the predictor does."""

    def __init__(self, images: Sequence[str | Path], input_name: str, imgsz: ImgSz) -> None:
        self._name = input_name
        self._images = list(images)
        self._imgsz = imgsz
        self._it: Optional[Iterable] = None

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._it is None:
            self._it = iter(self._images)
        from prune_pack.deploy.export import letterbox_batch

        p = next(self._it, None)
        if p is None:
            return None
        return {self._name: letterbox_batch([p], self._imgsz)[0]}

    def rewind(self) -> None:
        self._it = None


# ----------------------------------------------------------------------------- head exclusion


def head_tail_nodes(model: Any) -> list[str]:
    """Names of the nodes between the last learned Convs of the Detect head and the outputs.

    Found by walking the graph backwards from its outputs and stopping at every Conv, except
    the DFL's fixed Conv (its input is a Softmax; ``export.fast_dfl_softmax`` makes it a
    MatMul): that is exactly the Detect tail (per-level Reshape/Concat, DFL Softmax + dot
    product, box decoding, class Sigmoid, final Concat), whatever the model's width after
    pruning, without relying on node names.
    """
    import onnx

    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    producer = {o: n for n in m.graph.node for o in n.output}
    keep: list[str] = []
    seen: set[int] = set()
    stack = [producer[o.name] for o in m.graph.output if o.name in producer]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "Conv":
            src = producer.get(n.input[0])
            if src is None or src.op_type != "Softmax":
                continue  # a learned Conv: quantized; the walk stops here
        keep.append(n.name)
        stack += [producer[i] for i in n.input if i in producer]
    return keep


def silu_to_quickgelu(model: Any) -> int:
    """Replace each SiLU (``x * Sigmoid(x)``) by one ``com.microsoft.QuickGelu(alpha=1)`` node.

    Quantized as-is, SiLU becomes QLinearSigmoid (a scalar table lookup) + QLinearMul; as one
    QuickGelu node the quantizer leaves it in float between a DQ and a Q. Measured on
    yolov8n-coco at 640 (bench/results/int8.md): ~8 % less CPU time, but mAP50-95 on coco128 val
    1.52 points below FP32 instead of 0.18 (over val + train splits: 1.36 vs 0.98), so it is off
    by default (``fuse_silu=False``).
    Returns the number of SiLUs replaced.
    """
    from onnx import helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    done = 0
    for s in list(g.node):
        if s.op_type != "Sigmoid":
            continue
        after = consumers.get(s.output[0], [])
        if len(after) != 1 or after[0].op_type != "Mul" or sorted(after[0].input) != sorted([s.input[0], s.output[0]]):
            continue
        mul = after[0]
        q = helper.make_node("QuickGelu", [s.input[0]], [mul.output[0]], name=mul.name + "_silu", domain="com.microsoft", alpha=1.0)
        idx = list(g.node).index(s)
        g.node.remove(s)
        g.node.remove(mul)
        g.node.insert(idx, q)
        done += 1
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def head_output_convs(model: Any) -> list[str]:
    """The Detect head's last learned Convs (the 1x1 convs producing box-distribution and class
    logits, one pair per level): the Convs whose output feeds the head tail."""
    tail = set(head_tail_nodes(model))
    by_out = {o: n for n in model.graph.node for o in n.output}
    return sorted({by_out[i].name for n in model.graph.node if n.name in tail for i in n.input
                   if i in by_out and by_out[i].op_type == "Conv" and by_out[i].name not in tail})


def stem_nodes(model: Any) -> list[str]:
    """The Conv that reads the image (and its activation): it stays float.

    With 3 input channels its int8 GEMM has K = 27, too short for VNNI to pay for quantizing the
    image and dequantizing the 320x320 output: the ORT profiler showed the INT8 stem 35 % slower
    than the FP32 one (yolov8n, 640)."""
    g = model.graph
    inputs = {i.name for i in g.input} - {i.name for i in g.initializer}
    return _with_activations(g, [n for n in g.node if n.op_type == "Conv" and n.input[0] in inputs])


def _with_activations(graph: Any, convs: list) -> list[str]:
    """Names of ``convs`` and of the activation nodes that read their outputs: a conv kept float
    keeps its SiLU (Sigmoid + Mul, or QuickGelu after ``silu_to_quickgelu``) float too."""
    outs = {n.output[0] for n in convs}
    return [n.name for n in convs] + [c.name for c in graph.node
                                      if c.op_type in ("QuickGelu", "Sigmoid", "Mul", "Relu") and set(c.input) & outs]


# ----------------------------------------------------------------------------- quantize


def _copy_metadata(src: Path, out: Path) -> None:
    """Keep Ultralytics' metadata (names, stride, imgsz) so that ``YOLO(model.onnx).val()`` works."""
    import onnx

    q = onnx.load(str(out))
    src_meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    have = {p.key for p in q.metadata_props}
    for k, v in src_meta.items():
        if k not in have:
            p = q.metadata_props.add()
            p.key, p.value = k, v
    onnx.save(q, str(out))


def quantize_int8(
    fp32_onnx: str | Path,
    out_onnx: str | Path,
    calib_images: Sequence[str | Path],
    imgsz: ImgSz,
    method: Literal["minmax", "percentile", "entropy"] = "minmax",
    per_channel: bool = True,
    exclude_head: bool = True,
    quant_format: Literal["qdq", "qoperator"] = "qdq",
    activations: Literal["u8", "s8"] = "u8",
    op_types: Optional[Sequence[str]] = None,
    preprocess: bool = True,
    fuse_silu: bool = False,
    float_stem: bool = True,
    info: Optional[dict] = None,
) -> Path:
    """Static INT8 quantization of an FP32 ONNX detector, calibrated on ``calib_images``.

    ``info`` (a dict), when given, receives the settings and the excluded nodes (for the manifest).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calib_images:
        raise UserInputError("INT8 calibration needs at least one image")
    src = Path(fp32_onnx)
    out = Path(out_onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise UserInputError(f"calibration method {method!r}: expected one of {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="pp-quant-") as td:
        model_in = src
        if preprocess:
            # Shape inference + ORT's basic fusions first: the quantizer then sees the graph ORT
            # will run (recommended by ORT for static quantization).
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(td) / "pre.onnx"
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                model_in = pre
            except Exception:  # noqa: BLE001 - preprocessing is an optimisation only
                model_in = src
        m = onnx.load(str(model_in))
        excluded = head_tail_nodes(m) if exclude_head else []
        if fuse_silu and silu_to_quickgelu(m):
            model_in = Path(td) / "silu.onnx"
            onnx.save(m, str(model_in))
        if float_stem:
            excluded += stem_nodes(m)
        input_name = m.graph.input[0].name
        extra: dict[str, Any] = {
            "WeightSymmetric": True,  # int8 weights centred on 0: no zero-point term in the GEMM
            "ActivationSymmetric": activations == "s8",
        }
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        reader = LetterboxReader(calib_images, input_name, imgsz)
        kwargs: dict[str, Any] = dict(
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=excluded,
            extra_options=extra,
        )
        if op_types:
            kwargs["op_types_to_quantize"] = list(op_types)
        try:
            quantize_static(str(model_in), str(out), reader, **kwargs)
        except Exception as e:  # noqa: BLE001 - one line for the CLI
            raise PrunePackError(f"INT8 quantization of {src.name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    _copy_metadata(src, out)
    if info is not None:
        info.update(
            method=method, per_channel=per_channel, format=quant_format, activations=activations,
            weights="s8", calib_images=len(calib_images), excluded_nodes=len(excluded), fuse_silu=fuse_silu,
            float_stem=float_stem,
            float_ops=sorted({n.op_type for n in onnx.load(str(out)).graph.node if n.name in set(excluded)}),
        )
    return out


# ----------------------------------------------------------------------------- NNCF (OpenVINO-friendly QDQ)

INT8_ENGINES = ("ort", "nncf")


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


def activations_to_u8(model: Any) -> int:
    """Turn NNCF's int8 activation quantizers into the equivalent uint8 ones, in place.

    Why: OpenVINO 2026.4 reading such a file directly (``Core.compile_model(path)``, what the agent
    does) drops the scales of *signed* activation Q/DQ pairs: yolov8n's class scores collapse to
    ~0.01 (``ov.convert_model`` of the same file is right, so Ultralytics' validator did not see it).
    With uint8 activations both read paths agree with ONNX Runtime, and U8S8 is also the pair
    ORT's VNNI kernels run fastest. Exact: ``q_u8 = q_s8 + 128`` with ``zp_u8 = zp_s8 + 128`` gives
    the same clamp range and the same dequantized values. A zero point is only changed when every
    node using it is an activation QuantizeLinear or the DequantizeLinear right after one.
    Returns the number of zero points changed.
    """
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    produced_by = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input[1:]:
            users.setdefault(i, []).append(n)

    def act_q(n: Any) -> bool:
        return n.op_type == "QuantizeLinear" and n.input[0] not in inits

    def act_dq(n: Any) -> bool:
        src = produced_by.get(n.input[0])
        return n.op_type == "DequantizeLinear" and src is not None and act_q(src)

    done = 0
    changed_q: set[str] = set()
    for zp in {n.input[2] for n in g.node if act_q(n) and len(n.input) > 2}:
        t = inits.get(zp)
        if t is None or t.data_type != onnx.TensorProto.INT8 or not all(act_q(u) or act_dq(u) for u in users[zp]):
            continue
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a.astype(np.int16) + 128).astype(np.uint8), zp))
        changed_q |= {u.output[0] for u in users[zp] if act_q(u)}
        done += 1
    for vi in g.value_info:  # the quantized tensors' recorded type follows the zero point's
        if vi.name in changed_q:
            vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return done


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
    from prune_pack.deploy.export import letterbox_batch

    # Images are letterboxed lazily, one per calibration step, as Ultralytics' predictor does.
    dataset = nncf.Dataset(list(calib_images), lambda p: {input_name: letterbox_batch([p], imgsz)[0]})
    import logging

    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # NNCF logs one INFO line per ignored node
    common: dict[str, Any] = {"preset": presets[preset], "subset_size": len(calib_images), "fast_bias_correction": fast_bias_correction,
                              "ignored_scope": nncf.IgnoredScope(names=excluded) if excluded else None}
    ev: Optional[MapEvaluator] = None
    try:
        if accuracy_control is None:
            q = nncf.quantize(m, dataset, **common)
        else:
            from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

            ev = MapEvaluator(accuracy_control.images, imgsz)
            q = nncf.quantize_with_accuracy_control(
                m, dataset, nncf.Dataset(list(range(len(ev)))), ev, max_drop=accuracy_control.max_drop, **common,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=accuracy_control.max_iterations, ranking_subset_size=accuracy_control.ranking_subset,
                    num_ranking_workers=1),  # one model compiled at a time: the CPU is the bottleneck, not compilation
            )
    except PrunePackError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the CLI
        msg = (str(e).splitlines() or [""])[0][:300]
        raise PrunePackError(f"NNCF INT8 quantization of {src.name} failed: {type(e).__name__}: {msg}") from None
    finally:
        nncf_logger.setLevel(level)
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


def early_convs(model: Any, k: int) -> list[str]:
    """The ``k`` Convs after the stem, in graph (= topological) order, with their SiLU nodes: the
    high-resolution layers NNCF's accuracy control reverted first on yolov8n (bench/results/nncf.md)."""
    return _with_activations(model.graph, [n for n in model.graph.node if n.op_type == "Conv"][1:k + 1])


def quantized_ops(model: Any) -> set[str]:
    """Names of the compute nodes of a QDQ model that read at least one dequantized tensor."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq for i in n.input)}


def float_convs(model: Any, excluded: Iterable[str] = ()) -> list[str]:
    """Convs of a QDQ model that run in float although not in ``excluded``: their weight does not
    come from a DequantizeLinear (what NNCF's accuracy control reverted)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    skip = set(excluded)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in skip
            and getattr(producer.get(n.input[1]), "op_type", None) != "DequantizeLinear"]


# Calibration images per engine when the config leaves it open (``export.int8_calib_images: null``):
# ORT's MinMax recipe was measured at 32; NNCF lost 1.05 points with 32 and 0.76 with 128
# (bench/results/nncf.md), so it gets 128.
DEFAULT_CALIB_IMAGES = {"ort": 32, "nncf": 128}


def calib_count(engine: str, configured: Optional[int] = None) -> int:
    """Calibration image count for ``engine`` (``ort``/``nncf``): the configured one, else its default."""
    return int(configured) if configured else DEFAULT_CALIB_IMAGES.get(engine, 32)


def resolve_int8_engine(engine: str, backend: Optional[str] = None) -> str:
    """``export.int8_engine`` for a file that ``backend`` will run: ``auto`` is ``nncf`` for
    OpenVINO (when nncf is installed) and ``ort`` otherwise: ORT runs an NNCF file slower than
    FP32 (its Q/DQ sit on Conv inputs only, so ORT cannot fuse QLinearConv; bench/results/nncf.md)."""
    if engine not in ("auto", *INT8_ENGINES):
        raise UserInputError(f"INT8 engine {engine!r}: expected auto, {', '.join(INT8_ENGINES)}")
    if engine != "auto" or backend != "openvino":
        return "ort" if engine == "auto" else engine
    try:
        import nncf  # noqa: F401
    except ImportError:
        return "ort"  # auto falls back; an explicit "nncf" raises MissingExtraError when used
    return "nncf"


def quantize_int8_with(
    engine: str,
    fp32_onnx: str | Path,
    out_onnx: str | Path,
    calib_images: Sequence[str | Path],
    imgsz: ImgSz,
    info: Optional[dict] = None,
) -> Path:
    """The INT8 step of export and build: ``engine`` ``ort`` (``quantize_int8``) or ``nncf``
    (``quantize_int8_nncf``), each with its measured defaults; ``info`` gets ``engine`` too."""
    if engine not in INT8_ENGINES:
        raise UserInputError(f"INT8 engine {engine!r}: expected one of {', '.join(INT8_ENGINES)} (resolve 'auto' first)")
    if engine == "nncf":
        import importlib.util

        if importlib.util.find_spec("openvino") is None:  # the file is made for, and gated on, OpenVINO
            from prune_pack.errors import MissingExtraError

            raise MissingExtraError("INT8 quantization with NNCF", "nncf", "openvino")
    fn = quantize_int8_nncf if engine == "nncf" else quantize_int8
    out = fn(fp32_onnx, out_onnx, calib_images, imgsz, info=info)
    if info is not None:
        info["engine"] = engine
    return out
