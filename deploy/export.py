"""ONNX export with a parity proof, optional static INT8, manifest and packaging.

``export_onnx`` goes through Ultralytics' own exporter (never a fork of it), on a temporary
copy of the checkpoint because the exporter writes next to its input (a user's folder or the
read-only ../shared). Every export is followed by ``parity.check_parity``: ONNX Runtime against
the PyTorch model on real images, raw outputs and detections after NMS; a mismatch is an error.
Graph rewrites live in ``onnx_graph``, accuracy on the val split in ``validate``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np  # noqa: F401 - kept for callers that relied on export's namespace

import prune_pack.offline  # noqa: F401 - before Ultralytics
from prune_pack.deploy.onnx_graph import fast_dfl_softmax, fix_spatial_dims, rewrite_onnx, slim  # noqa: F401
from prune_pack.deploy.parity import (  # noqa: F401 - re-exported: build, tests and bench import them from here
    BOX_ATOL_REL, SCORE_ATOL, _unmatched, check_parity, default_parity_images, letterbox_batch)
from prune_pack.deploy.validate import (  # noqa: F401 - re-exported (see above)
    _val, _validate_backends, openvino_precision, val_onnx, validate_openvino)
from prune_pack.errors import ParityError, PrunePackError, UserInputError  # noqa: F401 - ParityError re-exported
from prune_pack.imgsz import ImgSz, hw, norm_imgsz, parse_imgsz, shape_str  # noqa: F401 - re-exported (old home)


def _log(msg: str) -> None:
    # Long phases report progress on stderr so that --json stdout stays one clean line.
    print(f"prune-pack export: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- export


def load_model(model_pt: str | Path) -> tuple[Any, dict]:
    """(YOLO, pruning provenance) for an unpruned (provenance ``{}``) or pruned checkpoint."""
    from prune_pack.pruning.checkpoint import load_checkpoint

    yolo, prov = load_checkpoint(model_pt)
    return yolo, dict(prov or {})


def export_onnx(
    model_pt: str | Path,
    out_onnx: str | Path,
    imgsz: ImgSz = 640,
    dynamic: bool = False,
    simplify: bool = True,
    opset: Optional[int] = None,
    fast_dfl: bool = True,
) -> Path:
    """Export a detection checkpoint to ONNX (static ``imgsz``: square or (h, w); ``dynamic`` = dynamic
    batch) through Ultralytics' exporter, slimmed with onnxslim, with the DFL softmax moved to
    the last axis (``onnx_graph.fast_dfl_softmax``). Returns ``out_onnx``."""
    from ultralytics import YOLO

    src = Path(model_pt)
    if not src.is_file():
        raise UserInputError(f"model file not found: {src}")
    out = Path(out_onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pp-export-") as td:
        tmp_pt = Path(td) / (src.stem + ".pt")
        shutil.copy2(src, tmp_pt)
        kwargs: dict[str, Any] = dict(format="onnx", imgsz=list(hw(imgsz)), simplify=False, dynamic=dynamic, device="cpu", verbose=False)
        if opset:
            kwargs["opset"] = opset
        # Ultralytics' dynamic=True makes batch, height and width dynamic; we slim ourselves
        # afterwards so that the shapes we fix below are propagated by onnxslim.
        try:
            f = YOLO(str(tmp_pt)).export(**kwargs)
        except Exception as e:  # noqa: BLE001 - exporter failures become one line
            raise PrunePackError(f"ONNX export of {src} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        f = Path(f)
        if dynamic:
            fix_spatial_dims(f, imgsz)
        if simplify:
            slim(f)
        if fast_dfl:
            rewrite_onnx(f, fast_dfl_softmax)
        shutil.move(str(f), out)
    return out


# ----------------------------------------------------------------------------- manifest


def onnx_io(onnx_path: str | Path) -> dict:
    """Input name/shape/dtype as ONNX Runtime sees them (dynamic dims as their symbol)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    dtype = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}.get(i.type, i.type)
    return {
        "input": {"name": i.name, "shape": [d if isinstance(d, int) else str(d) for d in i.shape], "dtype": dtype},
        "outputs": [{"name": o.name, "shape": [d if isinstance(d, int) else str(d) for d in o.shape]} for o in s.get_outputs()],
    }


def model_stats(yolo: Any, imgsz: ImgSz) -> dict:
    """Parameters and GFLOPs (Ultralytics' own counters) of the PyTorch model."""
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    net = yolo.model
    return {"params": int(get_num_params(net)), "gflops": round(float(get_flops(net, list(hw(imgsz)))), 3)}


def host_latency(onnx_path: str | Path, threads: int = 2, warmup: int = 3, runs: int = 20) -> dict:
    """p50 latency on this host, with its settings (the device measures its own)."""
    from prune_pack.agent.profiler import profile_model

    r = profile_model(str(onnx_path), threads=threads, warmup=warmup, runs=runs)
    return {k: r.get(k) for k in ("p50_ms", "p90_ms", "mean_ms", "runs", "threads")} | {"backend": "ort", "context": r.get("context")}


def build_manifest(
    *,
    name: str,
    onnx_path: str | Path,
    names: dict,
    precision: str,
    imgsz: ImgSz,
    provenance: dict,
    metrics: dict,
    validated: list[dict],
    version: Optional[int] = None,
    parity: Optional[dict] = None,
    quantization: Optional[dict] = None,
    target: Optional[dict] = None,
) -> dict:
    """Everything the device and a reviewer need to know about one deployment.

    ``agent.package.write_package`` adds ``schema``, ``sha256``, ``size``, ``created``,
    ``prune_pack_version``, ``signer`` and, when ``version`` is None, the next version number
    for ``name``.
    """
    from prune_pack import __version__

    io = onnx_io(onnx_path)
    man: dict[str, Any] = {
        "name": name,
        "precision": precision,
        "imgsz": norm_imgsz(imgsz),  # int, or [h, w] (Ultralytics' order)
        "input": io["input"],
        "outputs": io["outputs"],
        "names": [str(names[k]) for k in sorted(names, key=int)],
        "provenance": provenance,
        "metrics": metrics,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "prune_pack_version": __version__,
    }
    if validated:  # absent = nothing measured (agent.package then allows only the own precision)
        man["validated"] = validated
    if version is not None:
        man["version"] = int(version)
    if parity is not None:
        man["parity"] = parity
    if quantization is not None:
        man["quantization"] = quantization
    if target is not None:  # {latency_ms, percentile}: what the device's dashboards and alerts compare with
        man["target"] = target
    return man


def provenance_of(model_pt: Path, prune_prov: dict) -> dict:
    """Where the model came from: the checkpoint's hash and, for a pruned one, how it was pruned."""
    from prune_pack.pruning.sources import sha256_file

    own = sha256_file(model_pt)
    prov: dict[str, Any] = {
        "source_sha256": own,
        "base_sha256": prune_prov.get("base_sha256") or prune_prov.get("base_model_sha256") or own,
        "pruned": bool(prune_prov),
    }
    for k, v in prune_prov.items():
        if k not in prov and isinstance(v, (str, int, float, bool, list, dict, type(None))):
            prov[k] = v  # criterion, ratio, widths, allocation, fine-tuning ... as the pruner recorded them
    return prov


# ----------------------------------------------------------------------------- pipeline


def int8_calibration_images(data_yaml: Optional[str | Path], engine: str, count: Optional[int],
                            unlabeled: Optional[str | Path] = None) -> list[Path]:
    """INT8 calibration images: ``count`` (else the engine's default) unlabeled frames when given
    (the deployment scene's own activation ranges), else the dataset's train split."""
    from prune_pack.deploy.quantize import calib_count
    from prune_pack.pruning.sources import dataset_images, unlabeled_images

    n = calib_count(engine, count)
    if unlabeled is not None:
        return unlabeled_images(unlabeled, limit=n)
    if data_yaml is None:
        raise UserInputError("--int8 needs --data (or --unlabeled FRAMES) for calibration images")
    calib = dataset_images(data_yaml, "train", limit=n)
    if not calib:
        raise UserInputError(f"dataset {data_yaml}: no training images for INT8 calibration")
    return calib


def _quantize_and_gate(fp32: Path, td: Path, engine: str, calib: list[Path], data_yaml: Path, imgsz: ImgSz,
                       v32: dict, max_map_drop: float, val_fn: Optional[Callable]) -> tuple[Path, dict, dict, str]:
    """INT8 file, its quantization record, its val result and the backend that gated it."""
    from prune_pack.deploy.quantize import int8_gate, quantize_int8_with

    q = td / "model_int8.onnx"
    _log(f"quantizing to INT8 with {engine} (calibration on {len(calib)} images)")
    quant: dict = {}
    quantize_int8_with(engine, fp32, q, calib, imgsz, info=quant)
    gate_backend = "openvino" if engine == "nncf" else "ort"
    _log(f"validating INT8 ONNX on the val split ({gate_backend})")
    v8 = validate_openvino(q, data_yaml, imgsz) if gate_backend == "openvino" else val_onnx(q, data_yaml, imgsz, val_fn)
    int8_gate(v32["map50_95"], v8["map50_95"], max_map_drop, what=f"INT8 ({engine})")
    return q, quant, v8, gate_backend


def _gate(fp32: Path, td: Path, data_yaml: Optional[str | Path], imgsz: ImgSz, engine: Optional[str], calib: list[Path],
          max_map_drop: float, val_fn: Optional[Callable], backends: Sequence[str],
          metrics: dict) -> tuple[Path, str, Optional[dict], list[dict], dict[str, dict]]:
    """Validate FP32, quantize and gate INT8 (with ``engine``), validate other backends; updates ``metrics``.
    Returns (final file, precision, quantization record, ``validated`` entries, full accuracy per precision)."""
    final, precision, quant = fp32, "fp32", None
    validated: list[dict] = []
    accuracy: dict[str, dict] = {}  # precision -> the full validation result (per class too)
    if data_yaml is None:
        return final, precision, quant, validated, accuracy
    _log("validating FP32 ONNX on the val split")
    v32 = accuracy["fp32"] = val_onnx(fp32, data_yaml, imgsz, val_fn)
    validated.append({"backend": "ort", "precision": "fp32", "map50_95": v32["map50_95"], "map50": v32["map50"]})
    metrics.update(map50_95=v32["map50_95"], map50=v32["map50"])
    if engine:
        final, quant, v8, gate_backend = _quantize_and_gate(fp32, td, engine, calib, Path(data_yaml), imgsz, v32,
                                                            max_map_drop, val_fn)
        accuracy["int8"] = v8
        validated.append({"backend": gate_backend, "precision": "int8", "map50_95": v8["map50_95"], "map50": v8["map50"]})
        backends = [b for b in backends if b != gate_backend]  # validated above
        metrics.update(map50_95=v8["map50_95"], map50=v8["map50"], fp32_map50_95=v32["map50_95"])
        precision = "int8"
    validated += _validate_backends(final, precision, Path(data_yaml), imgsz, v32["map50_95"], max_map_drop, backends)
    return final, precision, quant, validated, accuracy


def _pack(final: Path, out: Path, *, name: str, version: Optional[int], registry: Optional[str | Path],
          sign: Optional[str | Path], manifest: dict) -> tuple[Path, int]:
    from prune_pack.agent import package as pkg

    if version is not None:
        pkg.record_version(name, version, registry)  # the next automatic version stays newer
    man = build_manifest(name=name, version=version, onnx_path=final, **manifest)
    path = pkg.write_package(final, man, out, signing_key=sign, registry=registry)
    return path, pkg.read_manifest(path)["version"]


def export_package(
    model_pt: str | Path,
    out: str | Path,
    imgsz: ImgSz = 640,
    int8: bool = False,
    data_yaml: Optional[str | Path] = None,
    sign: Optional[str | Path] = None,
    name: Optional[str] = None,
    version: Optional[int] = None,
    dynamic: bool = False,
    simplify: bool = True,
    opset: Optional[int] = None,
    parity_images: Optional[Sequence[str | Path]] = None,
    n_parity_images: int = 4,
    calib_images: Optional[int] = None,
    max_map_drop: float = 0.010,
    latency_runs: int = 20,
    registry: Optional[str | Path] = None,
    backends: Sequence[str] = ("ort", "openvino"),
    val_fn: Optional[Callable[[Any, Any, int], dict]] = None,
    int8_engine: str = "ort",
    target: Optional[dict] = None,
    unlabeled: Optional[str | Path] = None,
) -> dict:
    """export -> parity -> (INT8 -> val both -> gate) -> manifest -> package.

    ``int8_engine``: ``ort`` or ``nncf`` (``quantize.quantize_int8_with``; ``auto`` = ``ort`` here, the
    target backend being unknown). An NNCF file is made for OpenVINO, so its accuracy gate is OpenVINO's.
    ``unlabeled``: a folder of frames (``sources.unlabeled_images``) that replaces the train split
    for INT8 calibration; the val split stays the only accuracy gate. ``frames`` in the result
    counts the frames used.

    ``out`` ending in ``.onnx`` writes the bare model (no manifest, no signature). ``data_yaml``
    must be a resolved dataset yaml (``sources.resolve_dataset``); with it the FP32 model is
    validated too, and INT8 is refused when it loses more than ``max_map_drop`` mAP50-95.
    """
    from prune_pack.deploy.quantize import resolve_int8_engine
    from prune_pack.pruning.sources import dataset_images

    model_pt, out = Path(model_pt), Path(out)
    if int8 and data_yaml is None:
        raise UserInputError("--int8 needs --data: the accuracy gate (and, without --unlabeled, calibration) come from the dataset")
    if int8 and dynamic:
        raise UserInputError("--int8 with --dynamic is not supported: the INT8 model is calibrated for a static shape")
    engine = resolve_int8_engine(int8_engine, None) if int8 else None
    calib = int8_calibration_images(data_yaml, engine, calib_images, unlabeled) if engine else []
    name = name or model_pt.stem
    yolo, prune_prov = load_model(model_pt)
    with tempfile.TemporaryDirectory(prefix="pp-pack-") as td:
        td = Path(td)
        fp32 = td / "model.onnx"
        _log(f"exporting {model_pt.name} to ONNX at {shape_str(imgsz)}")
        export_onnx(model_pt, fp32, imgsz=imgsz, dynamic=dynamic, simplify=simplify, opset=opset)
        if parity_images is None and data_yaml is not None:
            parity_images = dataset_images(data_yaml, "val", limit=n_parity_images)
        parity = check_parity(yolo, fp32, parity_images or default_parity_images(n_parity_images), imgsz)
        _log(f"parity OK: max |box| {parity['max_abs_box_px']:.2e} px, |score| {parity['max_abs_score']:.2e}, "
             f"{parity['detections_onnx']} detections matched")
        metrics: dict = model_stats(yolo, imgsz)
        final, precision, quant, validated, accuracy = _gate(fp32, td, data_yaml, imgsz, engine, calib, max_map_drop, val_fn,
                                                             backends, metrics)
        if quant is not None:
            quant["calibration"] = "unlabeled frames" if unlabeled is not None else "train split"
        frames = {"int8_calibration": len(calib) if unlabeled is not None and engine else 0}
        if out.suffix == ".onnx":
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(final, out)
            return {"out": str(out), "precision": precision, "parity": parity, "validated": validated, "accuracy": accuracy,
                    "frames": frames, "summary": f"wrote {out} ({precision}, parity OK)"}
        if latency_runs > 0:
            _log("measuring host latency (ORT, 2 threads)")
            metrics["host_latency"] = host_latency(final, threads=2, runs=latency_runs) | {"imgsz": norm_imgsz(imgsz)}
        path, version = _pack(final, out, name=name, version=version, registry=registry, sign=sign, manifest=dict(
            names=dict(yolo.names), precision=precision, imgsz=imgsz, provenance=provenance_of(model_pt, prune_prov),
            metrics=metrics, validated=validated, parity=parity, quantization=quant, target=target))
    return {
        "out": str(path), "name": name, "version": version, "precision": precision, "signed": bool(sign),
        "parity": parity, "validated": validated, "accuracy": accuracy, "metrics": metrics, "frames": frames,
        "summary": f"wrote {path} ({name} v{version}, {precision}, parity OK, {'signed' if sign else 'unsigned'})",
    }


def cli_export(args: argparse.Namespace, cfg: Any) -> dict:
    """``prune-pack export``: flags over the config's ``export`` section over its defaults (``settings.merged``)."""
    from prune_pack.agent.settings import merged
    from prune_pack.pruning.sources import resolve_dataset, resolve_model

    max_drop = getattr(args, "max_map_drop", None)
    ec = merged(cfg.export, imgsz=args.imgsz, int8_calib_images=getattr(args, "calib_images", None),
                int8_max_map_drop=None if max_drop is None else max_drop / 100.0,
                dynamic_batch=True if args.dynamic else None)
    model = resolve_model(args.model)
    out = Path(args.out)
    if out.suffix not in (".onnx", ".ppk", ".zip") and out.suffix:
        raise UserInputError(f"--out {out}: expected a .ppk package or a bare .onnx")
    imgsz = parse_imgsz(ec.imgsz, "--imgsz" if args.imgsz else "export.imgsz")
    if args.sign and not Path(args.sign).is_file():
        raise UserInputError(f"--sign {args.sign}: key file not found")
    unlabeled = getattr(args, "unlabeled", None)
    if unlabeled and not args.int8:
        raise UserInputError("--unlabeled feeds INT8 calibration: it needs --int8")
    with tempfile.TemporaryDirectory(prefix="pp-data-") as td:
        data = resolve_dataset(args.data, td) if args.data else None
        return export_package(
            model, out, imgsz=imgsz, int8=args.int8, data_yaml=data, sign=args.sign, name=args.name,
            version=args.version_number, dynamic=ec.dynamic_batch, simplify=ec.simplify, opset=ec.opset,
            n_parity_images=ec.parity_images, calib_images=ec.int8_calib_images, max_map_drop=ec.int8_max_map_drop,
            int8_engine=ec.int8_engine, unlabeled=unlabeled,
        )
