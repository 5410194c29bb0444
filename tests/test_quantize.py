"""deploy/quantize.py: static INT8 (real ONNX Runtime quantizer and runtime) and its accuracy gate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from prune_pack.deploy.export import default_parity_images, export_onnx, export_package  # noqa: E402
from prune_pack.deploy.quantize import AccuracyGateError, head_tail_nodes, int8_gate, quantize_int8, silu_to_quickgelu  # noqa: E402
from prune_pack.errors import UserInputError  # noqa: E402
from prune_pack.pruning.sources import dataset_images  # noqa: E402


def _run(path: Path, imgsz: int) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)})[0]


def _run_model(m, imgsz: int) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: np.zeros((1, 3, imgsz, imgsz), np.float32)})[0]


def test_gate_arithmetic_both_directions():
    assert int8_gate(0.419, 0.416, 0.010) == pytest.approx(0.003)
    assert int8_gate(0.40, 0.41, 0.0) < 0  # better than FP32 always passes
    with pytest.raises(AccuracyGateError, match=r"0\.3900 vs FP32 0\.4190 \(drop 2\.90 points > allowed 1\.00\)"):
        int8_gate(0.419, 0.390, 0.010)
    with pytest.raises(AccuracyGateError):
        int8_gate(0.419, float("nan"))


def test_head_tail_stays_float_and_int8_model_runs(tiny_pt, tmp_path):
    fp32 = export_onnx(tiny_pt, tmp_path / "tiny.onnx", imgsz=160)
    tail = head_tail_nodes(fp32)
    g = onnx.load(str(fp32)).graph
    by_name = {n.name: n for n in g.node}
    ops = [by_name[t].op_type for t in tail]
    # the Detect tail: DFL softmax + its fixed conv, class sigmoid, box decoding, final concat
    assert {"Softmax", "Sigmoid", "Concat", "Sub", "Add"} <= set(ops)
    assert "Conv" not in ops and ops.count("MatMul") == 1  # learned convs are quantized; the DFL dot product is not
    assert any(o == g.output[0].name for t in tail for o in by_name[t].output)
    n_learned_convs = sum(n.op_type == "Conv" for n in g.node)

    info: dict = {}
    q = quantize_int8(fp32, tmp_path / "tiny_int8.onnx", default_parity_images(), 160, info=info)
    qg = onnx.load(str(q)).graph
    qops = [n.op_type for n in qg.node]
    assert qops.count("QuantizeLinear") > 0 and qops.count("DequantizeLinear") > n_learned_convs  # weights + activations
    produced_by = {o: n for n in qg.node for o in n.output}
    for n in qg.node:
        if n.op_type in ("Softmax", "Sigmoid") and n.name in tail:
            assert produced_by[n.input[0]].op_type != "DequantizeLinear", f"{n.name} was quantized"
    assert produced_by[qg.output[0].name].op_type == "Concat"  # the output is computed in float
    assert info["excluded_nodes"] > len(tail) and info["activations"] == "u8" and info["per_channel"]  # + float stem conv/SiLU
    stem = next(n for n in qg.node if n.op_type == "Conv")  # the image-reading conv stays float ...
    assert stem.input[0] == qg.input[0].name and "QuantizeLinear" not in {n.op_type for n in qg.node if qg.input[0].name in n.input}
    y32, y8 = _run(fp32, 160), _run(q, 160)
    assert y8.shape == y32.shape and np.isfinite(y8).all()

    # the optional SiLU fusion: every Sigmoid*Mul pair of the 57 Conv-SiLU blocks becomes one node
    m = onnx.load(str(fp32))
    assert silu_to_quickgelu(m) == 57
    assert [n.op_type for n in m.graph.node].count("QuickGelu") == 57 and _run_model(m, 160).shape == y32.shape


@pytest.fixture(scope="module")
def small_coco(coco128_yaml, tmp_path_factory) -> Path:
    """coco128 with a 16-image val split (a list file), to keep two validations fast."""
    cfg = yaml.safe_load(Path(coco128_yaml).read_text())
    d = tmp_path_factory.mktemp("small")
    lst = d / "val16.txt"
    lst.write_text("\n".join(str(p) for p in dataset_images(coco128_yaml, "val")[:16]) + "\n")
    cfg["val"] = str(lst)
    out = d / "coco16.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_int8_export_of_coco_model_gate_both_directions(coco_pt, small_coco, tmp_path):
    from prune_pack.agent.verifier import verify_package

    reg = tmp_path / "versions.json"
    kw = dict(imgsz=320, int8=True, data_yaml=small_coco, calib_images=8, latency_runs=0, registry=reg)
    # lenient bound: the package is written, INT8, validated at both precisions
    r = export_package(coco_pt, tmp_path / "q.ppk", max_map_drop=0.5, **kw)
    assert r["precision"] == "int8"
    v = {e["precision"]: e["map50_95"] for e in r["validated"] if e["backend"] == "ort"}
    assert set(v) == {"fp32", "int8"} and v["fp32"] > 0.2
    assert v["int8"] > 0.5 * v["fp32"], f"INT8 recipe broken: {v}"  # naive static INT8 collapses towards 0
    vp = verify_package(tmp_path / "q.ppk", allow_unsigned=True, staging_root=tmp_path / "stage")
    assert vp.manifest["precision"] == "int8" and vp.manifest["quantization"]["excluded_nodes"] > 0
    assert _run(vp.model_path, 320).shape[:2] == (1, 84)
    ov = [e for e in r["validated"] if e["backend"] == "openvino"]
    if importlib.util.find_spec("openvino") is not None:  # the same INT8 file, run by OpenVINO, passed the same gate
        assert ov and ov[0]["precision"] == "int8" and v["fp32"] - ov[0]["map50_95"] <= 0.5

    # a bound just below the measured drop refuses the same model, with the numbers, and writes nothing
    drop = v["fp32"] - v["int8"]
    with pytest.raises(AccuracyGateError, match=rf"mAP50-95 {v['int8']:.4f} vs FP32 {v['fp32']:.4f}"):
        export_package(coco_pt, tmp_path / "refused.ppk", max_map_drop=drop - 0.002, **kw)
    assert not (tmp_path / "refused.ppk").exists()


def test_rectangular_int8_package_runs_on_the_agent_at_its_own_shape(coco_pt, small_coco, tmp_path):
    """A 5:4 input (320x256, w x h): quantized on rectangular letterboxes, gated on the val split at
    that shape, and run by the agent's detector at the package's own shape (detection parity with
    Ultralytics at a rectangular shape: tests/test_detect.py)."""
    import cv2

    from prune_pack.agent.backends import load_session
    from prune_pack.agent.detect import Detector
    from prune_pack.agent.verifier import verify_package

    r = export_package(coco_pt, tmp_path / "rect.ppk", imgsz=(256, 320), int8=True, data_yaml=small_coco, calib_images=8,
                       max_map_drop=0.5, latency_runs=0, registry=tmp_path / "versions.json")
    v = {e["precision"]: e["map50_95"] for e in r["validated"] if e["backend"] == "ort"}
    assert v["fp32"] > 0.2 and v["int8"] > 0.5 * v["fp32"], v
    vp = verify_package(tmp_path / "rect.ppk", allow_unsigned=True, staging_root=tmp_path / "stage")
    assert vp.manifest["imgsz"] == [256, 320] and vp.manifest["input"]["shape"] == [1, 3, 256, 320]
    det = Detector(load_session(vp.model_path, "ort", None, 2), conf=0.25)
    assert det.input_shape[-2:] == (256, 320)
    found = 0
    for p in dataset_images(small_coco, "val")[:6]:
        img = cv2.imread(str(p))
        boxes, _ = det.detect_array(img)
        found += len(boxes)
    assert found >= 5


def test_int8_calibrates_on_unlabeled_frames_and_counts_them(coco_pt, small_coco, tmp_path):
    """export --int8 --unlabeled: the frames (sidecars ignored) replace the train split for calibration;
    the val split stays the gate; the result and the manifest say how many frames were used."""
    from prune_pack.agent.package import verify_package

    frames = tmp_path / "frames"
    frames.mkdir()
    for p in dataset_images(small_coco, "train")[-5:]:
        (frames / p.name).write_bytes(p.read_bytes())
        (frames / p.name).with_suffix(".json").write_text("{}")
    r = export_package(coco_pt, tmp_path / "f.ppk", imgsz=160, int8=True, data_yaml=small_coco, calib_images=4,
                       latency_runs=0, registry=tmp_path / "v.json", max_map_drop=1.0, unlabeled=frames, backends=("ort",))
    assert r["precision"] == "int8" and r["frames"] == {"int8_calibration": 4}
    q = verify_package(tmp_path / "f.ppk", allow_unsigned=True, staging_root=tmp_path / "stage").manifest["quantization"]
    assert q["calib_images"] == 4 and q["calibration"] == "unlabeled frames"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no images"):  # before any export work
        export_package(coco_pt, tmp_path / "g.ppk", imgsz=160, int8=True, data_yaml=small_coco, unlabeled=tmp_path / "empty")
