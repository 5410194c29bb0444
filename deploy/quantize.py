"""Static INT8 quantization with ONNX Runtime, and the accuracy gate that guards it.

Recipe (the defaults; every choice measured with ``bench/int8.py``, see ``bench/results/int8.md``):
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

import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np

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

    def __init__(self, images: Sequence[str | Path], input_name: str, imgsz: int) -> None:
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


def stem_nodes(model: Any) -> list[str]:
    """The Conv that reads the image (and its activation): it stays float.

    With 3 input channels its int8 GEMM has K = 27, too short for VNNI to pay for quantizing the
    image and dequantizing the 320x320 output: the ORT profiler showed the INT8 stem 35 % slower
    than the FP32 one (yolov8n, 640)."""
    g = model.graph
    inputs = {i.name for i in g.input} - {i.name for i in g.initializer}
    out: list[str] = []
    for n in g.node:
        if n.op_type == "Conv" and n.input[0] in inputs:
            out.append(n.name)
            out += [c.name for c in g.node if n.output[0] in c.input and c.op_type in ("QuickGelu", "Sigmoid", "Mul", "Relu")]
    return out


# ----------------------------------------------------------------------------- quantize


def quantize_int8(
    fp32_onnx: str | Path,
    out_onnx: str | Path,
    calib_images: Sequence[str | Path],
    imgsz: int,
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
    # Keep Ultralytics' metadata (names, stride, imgsz) so that YOLO(model.onnx).val() works.
    q = onnx.load(str(out))
    src_meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    have = {p.key for p in q.metadata_props}
    for k, v in src_meta.items():
        if k not in have:
            p = q.metadata_props.add()
            p.key, p.value = k, v
    onnx.save(q, str(out))
    if info is not None:
        info.update(
            method=method, per_channel=per_channel, format=quant_format, activations=activations,
            weights="s8", calib_images=len(calib_images), excluded_nodes=len(excluded), fuse_silu=fuse_silu,
            float_stem=float_stem,
            float_ops=sorted({n.op_type for n in onnx.load(str(out)).graph.node if n.name in set(excluded)}),
        )
    return out
