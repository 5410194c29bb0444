"""ONNX export with a parity proof, optional static INT8, manifest and packaging.

``export_onnx`` goes through Ultralytics' own exporter (never a fork of it), on a temporary
copy of the checkpoint because the exporter writes next to its input (a user's folder or the
read-only ../shared). Every export is followed by ``check_parity``: ONNX Runtime against the
PyTorch model on real images, raw outputs and detections after NMS; a mismatch is an error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from prune_pack.errors import ParityError, PrunePackError, UserInputError

os.environ.setdefault("YOLO_OFFLINE", "1")


def _log(msg: str) -> None:
    # Long phases report progress on stderr so that --json stdout stays one clean line.
    print(f"prune-pack export: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- input shape

# An input size is Ultralytics' ``imgsz``: an int (square) or (height, width), both multiples of 32.
ImgSz = int | tuple[int, int]


def hw(imgsz: ImgSz | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an input size."""
    if isinstance(imgsz, (int, np.integer)):
        return int(imgsz), int(imgsz)
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


# ----------------------------------------------------------------------------- loading


def load_model(model_pt: str | Path) -> tuple[Any, dict]:
    """(YOLO, pruning provenance) for an unpruned (provenance ``{}``) or pruned checkpoint."""
    from prune_pack.pruning.checkpoint import load_checkpoint

    yolo, prov = load_checkpoint(model_pt)
    return yolo, dict(prov or {})


# ----------------------------------------------------------------------------- export


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
    the last axis (``fast_dfl_softmax``). Returns ``out_onnx``."""
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
            _fix_spatial_dims(f, imgsz)
        if simplify:
            _slim(f)
        if fast_dfl:
            _rewrite_onnx(f, fast_dfl_softmax)
        shutil.move(str(f), out)
    return out


def _rewrite_onnx(path: Path, fn: Callable[[Any], int]) -> int:
    import onnx

    m = onnx.load(str(path))
    n = fn(m)
    if n:
        onnx.checker.check_model(m)
        onnx.save(m, str(path))
    return n


def fast_dfl_softmax(model: Any) -> int:
    """Rewrite the DFL's ``Transpose(0,2,1,3) -> Softmax(axis=1) -> Conv(16->1, 1x1)`` into
    ``Transpose(0,1,3,2) -> Softmax(axis=-1) -> MatMul(16x1)``. Same arithmetic (the 1x1 conv is a
    dot product with 0..15), but ONNX Runtime's Softmax over a non-last axis transposes
    internally and cost 17 % of an INT8 yolov8n at 640 (ORT profiler); over the last axis it is
    ~0.4 %. ``check_parity`` proves the rewritten graph against PyTorch. Returns rewrites made."""
    import numpy as np_
    from onnx import helper, numpy_helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    done = 0
    for s in list(g.node):
        if s.op_type != "Softmax":
            continue
        t = producer.get(s.input[0])
        after = consumers.get(s.output[0], [])
        if t is None or t.op_type != "Transpose" or len(after) != 1 or after[0].op_type != "Conv":
            continue
        c = after[0]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if perm != [0, 2, 1, 3] or len(consumers.get(t.output[0], [])) != 1 or c.input[1] not in inits or len(c.input) > 2:
            continue
        w = numpy_helper.to_array(inits[c.input[1]])
        if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
            continue
        wname = c.input[1] + "_matmul"
        g.initializer.append(numpy_helper.from_array(w.reshape(-1, 1).astype(np_.float32), wname))
        new = [
            helper.make_node("Transpose", [t.input[0]], [t.output[0] + "_last"], name=t.name + "_last", perm=[0, 1, 3, 2]),
            helper.make_node("Softmax", [t.output[0] + "_last"], [s.output[0] + "_last"], name=s.name + "_last", axis=-1),
            helper.make_node("MatMul", [s.output[0] + "_last", wname], [c.output[0]], name=c.name + "_matmul"),
        ]
        idx = list(g.node).index(t)
        for old in (t, s, c):
            g.node.remove(old)
        for k, n in enumerate(new):
            g.node.insert(idx + k, n)
        if not any(n.input and c.input[1] in n.input for n in g.node):
            g.initializer.remove(inits[c.input[1]])
        # The conv's output had shape (1,1,4,A); MatMul gives (1,4,A,1): drop the stale annotation.
        for vi in list(g.value_info):
            if vi.name == c.output[0]:
                g.value_info.remove(vi)
        done += 1
    return done


def _fix_spatial_dims(path: Path, imgsz: ImgSz) -> None:
    """Keep only the batch dimension dynamic: a fixed H x W lets ORT plan memory and keeps the
    anchor count static (the device always feeds the packaged size)."""
    import onnx

    m = onnx.load(str(path))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(list(dims)[2:], hw(imgsz)):
        d.ClearField("dim_param")
        d.dim_value = v
    for o in m.graph.output:
        odims = o.type.tensor_type.shape.dim
        if len(odims) == 3:
            odims[2].ClearField("dim_param")
            odims[2].dim_value = 0
            odims[2].ClearField("dim_value")
    onnx.save(m, str(path))


def _slim(path: Path) -> None:
    import onnx
    import onnxslim

    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    try:
        s = onnxslim.slim(m)
    except Exception as e:  # noqa: BLE001 - an unslimmed model is still correct
        _log(f"onnxslim failed ({type(e).__name__}: {e}); keeping the unslimmed graph")
        return
    if not any(p.key for p in s.metadata_props):
        for k, v in meta.items():
            p = s.metadata_props.add()
            p.key, p.value = k, v
    onnx.save(s, str(path))


# ----------------------------------------------------------------------------- parity


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
    try:
        from prune_pack.agent.profiler import profile_model

        r = profile_model(str(onnx_path), threads=threads, warmup=warmup, runs=runs)
        return {k: r.get(k) for k in ("p50_ms", "p90_ms", "mean_ms", "runs", "threads")} | {"backend": "ort", "context": r.get("context")}
    except ImportError:
        pass
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
    for _ in range(warmup):
        s.run(None, {i.name: x})
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, {i.name: x})
        t.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(np.mean(t)),
            "runs": runs, "threads": threads, "backend": "ort"}


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


def _val(path: str | Path, data_yaml: str | Path, imgsz: ImgSz, val_fn: Optional[Callable] = None) -> dict:
    """mAP of a .pt or .onnx on the val split (the pruning colleague's validate when present)."""
    if val_fn is not None:
        return val_fn(path, data_yaml, imgsz)
    try:
        from prune_pack.pruning.finetune import validate

        r = validate(str(path), str(data_yaml), imgsz=max(hw(imgsz)), batch=1)  # a static ONNX runs at its own shape
        return {"map50_95": float(r["map50_95"]), "map50": float(r["map50"])}
    except ImportError:
        pass
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="pp-val-") as td:
        m = YOLO(str(path), task="detect").val(data=str(data_yaml), imgsz=max(hw(imgsz)), batch=1, plots=False, verbose=False,
                                               project=td, name="val", device="cpu", workers=0)
    return {"map50_95": float(m.box.map), "map50": float(m.box.map50)}


def openvino_precision(onnx_path: str | Path) -> str:
    """The precision OpenVINO's CPU plugin runs this file at by default on this host: int8 for a
    quantized (QDQ) file, else bf16 where the CPU has native bf16 (AVX512_BF16/AMX), else fp32."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    if any(n.op_type == "QuantizeLinear" for n in m.graph.node):
        return "int8"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


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
    from prune_pack.pruning.finetune import per_class_map

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


# ----------------------------------------------------------------------------- pipeline


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
) -> dict:
    """export -> parity -> (INT8 -> val both -> gate) -> manifest -> package.

    ``int8_engine``: ``ort`` or ``nncf`` (``quantize.quantize_int8_with``; ``auto`` = ``ort`` here, the
    target backend being unknown). An NNCF file is made for OpenVINO, so its accuracy gate is OpenVINO's.

    ``out`` ending in ``.onnx`` writes the bare model (no manifest, no signature). ``data_yaml``
    must be a resolved dataset yaml (``sources.resolve_dataset``); with it the FP32 model is
    validated too, and INT8 is refused when it loses more than ``max_map_drop`` mAP50-95.
    """
    from prune_pack.deploy.quantize import int8_gate, quantize_int8_with, resolve_int8_engine
    from prune_pack.pruning.sources import dataset_images

    model_pt = Path(model_pt)
    out = Path(out)
    if int8 and data_yaml is None:
        raise UserInputError("--int8 needs --data: calibration images and the accuracy gate come from the dataset")
    if int8 and dynamic:
        raise UserInputError("--int8 with --dynamic is not supported: the INT8 model is calibrated for a static shape")
    engine = resolve_int8_engine(int8_engine, None) if int8 else None
    name = name or model_pt.stem
    yolo, prune_prov = load_model(model_pt)
    names = dict(yolo.names)
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
        final, precision, quant = fp32, "fp32", None
        validated: list[dict] = []
        accuracy: dict[str, dict] = {}  # precision -> the full validation result (per class too)
        metrics: dict = model_stats(yolo, imgsz)
        if data_yaml is not None:
            _log("validating FP32 ONNX on the val split")
            v32 = accuracy["fp32"] = _val(fp32, data_yaml, imgsz, val_fn)
            validated.append({"backend": "ort", "precision": "fp32", "map50_95": v32["map50_95"], "map50": v32["map50"]})
            metrics.update(map50_95=v32["map50_95"], map50=v32["map50"])
        if int8:
            from prune_pack.deploy.quantize import calib_count, resolve_int8_engine

            calib = dataset_images(data_yaml, "train", limit=calib_count(resolve_int8_engine(int8_engine), calib_images))
            if not calib:
                raise UserInputError(f"dataset {data_yaml}: no training images for INT8 calibration")
            q = td / "model_int8.onnx"
            _log(f"quantizing to INT8 with {engine} (calibration on {len(calib)} training images)")
            quant = {}
            quantize_int8_with(engine, fp32, q, calib, imgsz, info=quant)
            gate_backend = "openvino" if engine == "nncf" else "ort"
            _log(f"validating INT8 ONNX on the val split ({gate_backend})")
            v8 = validate_openvino(q, data_yaml, imgsz) if gate_backend == "openvino" else _val(q, data_yaml, imgsz, val_fn)
            accuracy["int8"] = v8
            int8_gate(v32["map50_95"], v8["map50_95"], max_map_drop, what=f"INT8 ({engine})")
            validated.append({"backend": gate_backend, "precision": "int8", "map50_95": v8["map50_95"], "map50": v8["map50"]})
            backends = [b for b in backends if b != gate_backend]  # validated above
            metrics.update(map50_95=v8["map50_95"], map50=v8["map50"], fp32_map50_95=v32["map50_95"])
            final, precision = q, "int8"
        if data_yaml is not None:
            validated += _validate_backends(final, precision, Path(data_yaml), imgsz, v32["map50_95"], max_map_drop, backends)
        if out.suffix == ".onnx":
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(final, out)
            return {"out": str(out), "precision": precision, "parity": parity, "validated": validated, "accuracy": accuracy,
                    "summary": f"wrote {out} ({precision}, parity OK)"}
        if latency_runs > 0:
            _log("measuring host latency (ORT, 2 threads)")
            metrics["host_latency"] = host_latency(final, threads=2, runs=latency_runs) | {"imgsz": norm_imgsz(imgsz)}
        from prune_pack.agent import package as pkg

        if version is not None:
            pkg.record_version(name, version, registry)  # the next automatic version stays newer
        man = build_manifest(name=name, version=version, onnx_path=final, names=names, precision=precision, imgsz=imgsz,
                             provenance=provenance_of(model_pt, prune_prov), metrics=metrics, validated=validated,
                             parity=parity, quantization=quant, target=target)
        path = pkg.write_package(final, man, out, signing_key=sign, registry=registry)
        version = pkg.read_manifest(path)["version"]
    return {
        "out": str(path),
        "name": name,
        "version": version,
        "precision": precision,
        "signed": bool(sign),
        "parity": parity,
        "validated": validated,
        "accuracy": accuracy,
        "metrics": metrics,
        "summary": f"wrote {path} ({name} v{version}, {precision}, parity OK, {'signed' if sign else 'unsigned'})",
    }


def cli_export(args: argparse.Namespace, cfg: Any) -> dict:
    """``prune-pack export``: flags win over the config's ``export`` section."""
    from prune_pack.deploy.settings import ExportSection
    from prune_pack.pruning.sources import resolve_dataset, resolve_model

    ec = cfg.export if cfg is not None else ExportSection()
    model = resolve_model(args.model)
    out = Path(args.out)
    if out.suffix not in (".onnx", ".ppk", ".zip") and out.suffix:
        raise UserInputError(f"--out {out}: expected a .ppk package or a bare .onnx")
    imgsz = parse_imgsz(args.imgsz) if args.imgsz else parse_imgsz(ec.imgsz, "export.imgsz")
    if args.sign and not Path(args.sign).is_file():
        raise UserInputError(f"--sign {args.sign}: key file not found")
    max_drop = ec.int8_max_map_drop if getattr(args, "max_map_drop", None) is None else args.max_map_drop / 100.0
    calib = getattr(args, "calib_images", None) or ec.int8_calib_images
    with tempfile.TemporaryDirectory(prefix="pp-data-") as td:
        data = resolve_dataset(args.data, td) if args.data else None
        return export_package(
            model, out, imgsz=imgsz, int8=args.int8, data_yaml=data, sign=args.sign, name=args.name,
            version=args.version_number, dynamic=args.dynamic or ec.dynamic_batch, simplify=ec.simplify, opset=ec.opset,
            n_parity_images=ec.parity_images, calib_images=calib, max_map_drop=max_drop, int8_engine=ec.int8_engine,
        )
