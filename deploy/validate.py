"""Accuracy of exported files on the val split: ONNX Runtime (``pruning.validate``) and OpenVINO,
and the list of backend/precision pairs a package is validated for.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import prune_pack.offline  # noqa: F401 - before Ultralytics
from prune_pack.imgsz import ImgSz, hw


def _log(msg: str) -> None:
    print(f"prune-pack export: {msg}", file=sys.stderr, flush=True)


def val_onnx(path: str | Path, data_yaml: str | Path, imgsz: ImgSz, val_fn: Optional[Callable] = None) -> dict:
    """mAP of a .pt or .onnx on the val split through ``pruning.validate`` (ONNX Runtime), or ``val_fn``."""
    if val_fn is not None:
        return val_fn(path, data_yaml, imgsz)
    from prune_pack.pruning.validate import validate

    r = validate(str(path), str(data_yaml), imgsz=max(hw(imgsz)), batch=1)  # a static ONNX runs at its own shape
    return {"map50_95": float(r["map50_95"]), "map50": float(r["map50"])}


_val = val_onnx  # the name bench scripts and tests use


def openvino_precision(onnx_path: str | Path) -> str:
    """The precision OpenVINO's CPU plugin runs this file at by default on this host: int8 for a
    quantized (QDQ) file, else bf16 where the CPU has native bf16 (AVX512_BF16/AMX), else fp32."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    if any(n.op_type == "QuantizeLinear" for n in m.graph.node):
        return "int8"
    from prune_pack.agent.backends import bf16_supported

    # The one CPU-feature source ($PRUNE_PACK_CPU_FLAGS, else /proc/cpuinfo): the build plans the bf16
    # lever with it, so the gate must see the same CPU.
    return "bf16" if bf16_supported() else "fp32"


def validate_openvino(onnx_path: str | Path, data_yaml: str | Path, imgsz: ImgSz) -> dict:
    """mAP of an ONNX file run by OpenVINO (its default CPU precision, see ``openvino_precision``),
    through Ultralytics' validator: the file is converted to IR with a ``metadata.yaml`` beside it,
    the layout Ultralytics' OpenVINO backend reads."""
    import onnx
    import openvino as ov
    import yaml
    from ultralytics import YOLO

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    import ast

    names = ast.literal_eval(meta["names"]) if "names" in meta else None
    with tempfile.TemporaryDirectory(prefix="pp-ov-") as td:
        d = Path(td) / "model_openvino_model"
        d.mkdir()
        # read_model, not convert_model: the ONNX frontend path the agent compiles from. The two differ
        # on some QDQ files (signed activations, see quantize.activations_to_u8), and the gate must
        # see what the device computes.
        ov.save_model(ov.Core().read_model(str(onnx_path)), str(d / "model.xml"), compress_to_fp16=False)
        (d / "metadata.yaml").write_text(yaml.safe_dump({
            "task": "detect", "stride": int(meta.get("stride", 32)), "batch": 1, "imgsz": list(hw(imgsz)), "names": names,
        }))
        m = YOLO(str(d), task="detect").val(data=str(data_yaml), imgsz=max(hw(imgsz)), batch=1, plots=False, verbose=False,
                                            project=td, name="val", device="cpu", workers=0)
    from prune_pack.pruning.validate import per_class_map

    return {"map50_95": float(m.box.map), "map50": float(m.box.map50), "per_class": per_class_map(m.box, dict(m.names))}


def _validate_backends(final: Path, precision: str, data_yaml: Path, imgsz: ImgSz, fp32_map: float, max_drop: float,
                       backends: Sequence[str]) -> list[dict]:
    """Entries for ``validated`` beyond ORT: each backend's default precision, gated like INT8.
    A backend that fails the gate is left out (the device then refuses it unless forced)."""
    from prune_pack.deploy.quantize import AccuracyGateError, int8_gate

    out = []
    if "openvino" in backends:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return out
        prec = openvino_precision(final)
        _log(f"validating on OpenVINO ({prec})")
        v = validate_openvino(final, data_yaml, imgsz)
        try:
            int8_gate(fp32_map, v["map50_95"], max_drop, what=f"OpenVINO {prec}")
        except AccuracyGateError as e:
            _log(f"not listing openvino/{prec} as validated: {e}")
            return out
        out.append({"backend": "openvino", "precision": prec, "map50_95": v["map50_95"], "map50": v["map50"]})
    return out
