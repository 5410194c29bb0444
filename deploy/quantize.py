"""Static INT8 quantization (ONNX Runtime's quantizer, or NNCF for OpenVINO), and the accuracy gate.

Two engines make the same kind of file (a QDQ ONNX, which the agent runs on either backend), each
laid out for one runtime: ``quantize_int8`` (ORT's ``quantize_static``, below) for ONNX Runtime and
``quantize_nncf.quantize_int8_nncf`` (NNCF's ONNX backend) for OpenVINO; node selection shared by both in ``qdq``; ``export.int8_engine`` picks one
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

import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np

from prune_pack.deploy.qdq import (  # noqa: F401 - re-exported: tests and bench import them from here
    _copy_metadata, _with_activations, activations_to_u8, early_convs, float_convs, head_output_convs,
    head_tail_nodes, quantized_ops, silu_to_quickgelu, stem_nodes)
from prune_pack.deploy.quantize_nncf import (  # noqa: F401 - re-exported (the NNCF engine's own module)
    AccuracyControl, MapEvaluator, _match, _nms_multi_label, quantize_int8_nncf)
from prune_pack.errors import AccuracyGateError, PrunePackError, UserInputError  # noqa: F401 - AccuracyGateError re-exported
from prune_pack.imgsz import ImgSz


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
        from prune_pack.deploy.parity import letterbox_batch

        p = next(self._it, None)
        if p is None:
            return None
        return {self._name: letterbox_batch([p], self._imgsz)[0]}

    def rewind(self) -> None:
        self._it = None


# ----------------------------------------------------------------------------- quantize


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


INT8_ENGINES = ("ort", "nncf")


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
