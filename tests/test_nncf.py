"""deploy/quantize.py, NNCF engine: an OpenVINO-friendly QDQ INT8 file (real NNCF, ORT and OpenVINO)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from prune_pack.errors import UserInputError

REPO = Path(__file__).resolve().parent.parent
HAVE_NNCF = importlib.util.find_spec("nncf") is not None
needs_nncf = pytest.mark.skipif(not HAVE_NNCF, reason="nncf is not installed (pip install 'prune-pack[nncf]')")
needs_ov = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")


def test_missing_nncf_is_one_line_missing_extra_error(tmp_path):
    """Absence simulated with sys.modules['nncf'] = None in a fresh interpreter: the NNCF engine
    says which extra to install; 'auto' falls back to the ORT quantizer instead of failing."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["nncf"] = None
        from prune_pack.errors import MissingExtraError
        from prune_pack.deploy.quantize import quantize_int8_nncf, quantize_int8_with, resolve_int8_engine
        assert resolve_int8_engine("auto", "openvino") == "ort"
        for call in (lambda: quantize_int8_nncf("m.onnx", r"{tmp_path}/q.onnx", ["x.jpg"], 160),
                     lambda: quantize_int8_with("nncf", "m.onnx", r"{tmp_path}/q.onnx", ["x.jpg"], 160)):
            try:
                call()
            except MissingExtraError as e:
                print(str(e))
            else:
                raise SystemExit("no error")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("pip install 'prune-pack[nncf]'" in ln for ln in lines)
    assert "nncf is not installed" in lines[0]
    if importlib.util.find_spec("openvino") is not None:  # else the engine first names the missing openvino
        assert lines[1] == lines[0]
    assert not (tmp_path / "q.onnx").exists()


def test_engine_resolution_and_config_key(tmp_path):
    from prune_pack.config import ConfigError, parse_config
    from prune_pack.deploy.quantize import resolve_int8_engine

    assert resolve_int8_engine("auto", "ort") == "ort"
    assert resolve_int8_engine("auto", None) == "ort"  # target unknown (prune-pack export): the ORT file runs everywhere
    assert resolve_int8_engine("auto", "openvino") == ("nncf" if HAVE_NNCF else "ort")
    assert resolve_int8_engine("nncf", "ort") == "nncf"  # explicit wins
    with pytest.raises(UserInputError, match="INT8 engine 'tflite'"):
        resolve_int8_engine("tflite", "ort")
    assert parse_config("export:\n  int8_engine: nncf\n", "c.yaml").export.int8_engine == "nncf"
    assert parse_config("", "c.yaml").export.int8_engine == "auto"
    with pytest.raises(ConfigError, match=r"c\.yaml:2: export\.int8_engine: expected one of 'auto', 'ort', 'nncf'"):
        parse_config("export:\n  int8_engine: onnx\n", "c.yaml")


def test_activations_to_u8_is_exact_and_leaves_weights_alone():
    """The s8 -> u8 activation rewrite (OpenVINO's ONNX reader mishandles signed activation Q/DQ):
    same outputs on ORT, saturation included; a zero point shared with a weight DQ stays int8."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from prune_pack.deploy.quantize import activations_to_u8

    init = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(-7, np.int8), "zp"),
            numpy_helper.from_array(np.array(0.02, np.float32), "ws"), numpy_helper.from_array(np.array(0, np.int8), "wzp"),
            numpy_helper.from_array(np.arange(-4, 4, dtype=np.int8).reshape(2, 4), "w"),
            numpy_helper.from_array(np.array(0.1, np.float32), "s2"), numpy_helper.from_array(np.array(3, np.int8), "zp2"),
            numpy_helper.from_array(np.arange(16, dtype=np.int8).reshape(4, 4), "wb")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"]), helper.make_node("MatMul", ["xd", "wd"], ["y0"]),
             # zp2 is shared by an activation Q and a weight DQ: not rewritable
             helper.make_node("QuantizeLinear", ["y0", "s2", "zp2"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "s2", "zp2"], ["yd"]),
             helper.make_node("DequantizeLinear", ["wb", "s2", "zp2"], ["w2"]), helper.make_node("MatMul", ["yd", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], init)
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    m.ir_version = 8
    x = np.array([[-10.0, -0.3], [0.0, 0.77], [3.3, 99.0]], np.float32)  # both ends saturate

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(m)
    assert activations_to_u8(m) == 1
    z = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert z["zp"].dtype == np.uint8 and int(z["zp"]) == 121 and z["zp2"].dtype == np.int8 and z["wzp"].dtype == np.int8
    np.testing.assert_array_equal(run(m), before)


# ----------------------------------------------------------------------------- real NNCF


@needs_nncf
def test_nncf_int8_file_structure_metadata_and_runs(tiny_pt, tmp_path):
    pytest.importorskip("torch")
    import onnx

    from prune_pack.agent import backends as be
    from prune_pack.deploy.export import default_parity_images, export_onnx
    from prune_pack.deploy.quantize import head_tail_nodes, quantize_int8_with

    fp32 = export_onnx(tiny_pt, tmp_path / "tiny.onnx", imgsz=160)
    tail = set(head_tail_nodes(fp32))
    info: dict = {}
    q = quantize_int8_with("nncf", fp32, tmp_path / "tiny_nncf.onnx", default_parity_images(), 160, info=info)
    assert info["engine"] == "nncf" and info["preset"] == "mixed" and info["calib_images"] == 2
    assert info["float_stem"] and info["excluded_nodes"] > len(tail) and "Sigmoid" in info["float_ops"]
    assert info["activations"] == "u8" and info["activation_quantizers"] > 0

    m = onnx.load(str(q))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    produced_by = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv" and n.name not in tail]
    stem, early = convs.pop(0), convs.pop(0)  # the stem reads the image; both kept float (the measured defaults)
    assert stem.input[0] == g.input[0].name and len(convs) > 50
    assert info["float_early_convs"] == 1 and early.input[1] in inits and early.input[1] not in produced_by  # float weight

    def int8_in(t: str) -> bool:
        # NNCF quantizes before quantization-agnostic ops (C2f's Split, SPPF's MaxPool, Concat, Resize)
        n = produced_by.get(t)
        if n is None or n.op_type == "DequantizeLinear":
            return n is not None
        data = n.input if n.op_type == "Concat" else n.input[:1]
        return n.op_type in ("Split", "MaxPool", "Concat", "Resize", "Reshape") and all(int8_in(i) for i in data)

    for c in convs:  # every learned conv: int8 activations in, symmetric int8 weights (zero point 0)
        assert int8_in(c.input[0]), c.name
        wdq = produced_by[c.input[1]]
        assert wdq.op_type == "DequantizeLinear" and inits[wdq.input[0]].data_type == onnx.TensorProto.INT8, c.name
        zp = onnx.numpy_helper.to_array(inits[wdq.input[2]]) if len(wdq.input) > 2 and wdq.input[2] in inits else np.zeros(1)
        assert not zp.any(), c.name
    act_zps = [inits[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert act_zps and all(z.data_type == onnx.TensorProto.UINT8 for z in act_zps)  # see activations_to_u8
    for n in g.node:  # the Detect tail stays float (Ultralytics' ignored scope)
        if n.name in tail and n.op_type in ("Softmax", "Sigmoid"):
            assert produced_by[n.input[0]].op_type != "DequantizeLinear", n.name
    assert produced_by[g.output[0].name].op_type == "Concat"
    # Ultralytics' metadata survives, so YOLO(model.onnx) and the agent read names/stride/imgsz
    src_meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    meta = {p.key: p.value for p in m.metadata_props}
    assert {k: meta.get(k) for k in ("names", "stride", "imgsz", "task")} == {k: src_meta[k] for k in ("names", "stride", "imgsz", "task")}

    assert be.model_precision(q) == "int8"
    x = np.random.default_rng(0).random((1, 3, 160, 160), dtype=np.float32)
    y32 = be.load_session(fp32, "ort").run(x)[0]
    for backend in ["ort"] + (["openvino"] if "openvino" in be.available_backends() else []):
        s = be.load_session(q, backend, threads=1)
        assert s.info()["precision"] == "int8"
        y8 = s.run(x)[0]
        assert y8.shape == y32.shape and np.isfinite(y8).all(), backend


@needs_nncf
def test_nncf_int8_detections_match_fp32_on_bus(coco_pt, coco128_yaml, tmp_path):
    """The real COCO model at 320: every confident FP32 detection on bus.jpg has a same-class INT8
    partner at IoU >= 0.8, on ONNX Runtime and on OpenVINO (which runs the rest in its default precision)."""
    pytest.importorskip("torch")
    import cv2
    from conftest import bus_jpg

    from prune_pack.agent import backends as be
    from prune_pack.agent.detect import Detector
    from prune_pack.deploy.export import _unmatched, export_onnx
    from prune_pack.deploy.quantize import quantize_int8_nncf
    from prune_pack.pruning.sources import dataset_images

    fp32 = export_onnx(coco_pt, tmp_path / "coco.onnx", imgsz=320)
    q = quantize_int8_nncf(fp32, tmp_path / "coco_nncf.onnx", dataset_images(coco128_yaml, "train", limit=16), 320)
    img = cv2.imread(str(bus_jpg()))
    ref = Detector(be.load_session(fp32, "ort"), conf=0.25).detect_array(img)[0]
    sure = ref[ref[:, 4] >= 0.5]
    assert len(sure) >= 4 and {0, 5} <= set(sure[:, 5].astype(int))  # persons and the bus: a test that can fail
    for backend in ["ort"] + (["openvino"] if "openvino" in be.available_backends() else []):
        det = Detector(be.load_session(q, backend, threads=1), conf=0.25).detect_array(img)[0]
        assert _unmatched(ref, det, conf=0.5, margin=0.0, min_iou=0.8) == 0, (backend, ref.round(2), det.round(2))


@pytest.fixture(scope="module")
def coco16(coco128_yaml, tmp_path_factory) -> Path:
    """coco128 with a 16-image val split (a list file), to keep the validations short."""
    from prune_pack.pruning.sources import dataset_images

    cfg = yaml.safe_load(Path(coco128_yaml).read_text())
    d = tmp_path_factory.mktemp("coco16")
    (d / "val16.txt").write_text("\n".join(str(p) for p in dataset_images(coco128_yaml, "val")[:16]) + "\n")
    cfg["val"] = str(d / "val16.txt")
    (d / "coco16.yaml").write_text(yaml.safe_dump(cfg))
    return d / "coco16.yaml"


@needs_nncf
@needs_ov
def test_export_package_with_nncf_engine_is_gated_on_openvino(coco_pt, coco16, tmp_path):
    pytest.importorskip("torch")
    from prune_pack.agent.verifier import verify_package
    from prune_pack.deploy.export import export_package
    from prune_pack.deploy.quantize import AccuracyGateError

    kw = dict(imgsz=320, int8=True, data_yaml=coco16, calib_images=8, latency_runs=0, registry=tmp_path / "v.json",
              int8_engine="nncf")
    r = export_package(coco_pt, tmp_path / "q.ppk", max_map_drop=0.5, **kw)
    v = {(e["backend"], e["precision"]): e["map50_95"] for e in r["validated"]}
    # the NNCF file is validated (and gated) where it is meant to run: OpenVINO, once
    assert set(v) == {("ort", "fp32"), ("openvino", "int8")}, v
    assert v[("ort", "fp32")] > 0.2 and v[("openvino", "int8")] > 0.5 * v[("ort", "fp32")]
    vp = verify_package(tmp_path / "q.ppk", allow_unsigned=True, staging_root=tmp_path / "stage")
    assert vp.manifest["precision"] == "int8" and vp.manifest["quantization"]["engine"] == "nncf"
    drop = v[("ort", "fp32")] - v[("openvino", "int8")]
    with pytest.raises(AccuracyGateError, match=r"INT8 \(nncf\) model refused"):
        export_package(coco_pt, tmp_path / "refused.ppk", max_map_drop=drop - 0.002, **kw)
    assert not (tmp_path / "refused.ppk").exists()


# ----------------------------------------------------------------------------- accuracy control


@needs_ov
def test_map_evaluator_matches_ultralytics_validator(coco_pt, coco16, tmp_path):
    """The accuracy-control metric is the validator's mAP50-95 (same NMS, matching and AP), computed
    on the agent's pre/post-processing: the FP32 file scores the same as Ultralytics' validator."""
    pytest.importorskip("torch")
    import onnx

    from prune_pack.deploy.export import _val, export_onnx
    from prune_pack.deploy.quantize import MapEvaluator
    from prune_pack.pruning.sources import dataset_images

    fp32 = export_onnx(coco_pt, tmp_path / "coco.onnx", imgsz=320)
    ref = _val(fp32, coco16, 320)["map50_95"]
    ev = MapEvaluator(dataset_images(coco16, "val"), 320)
    assert len(ev) == 16
    value, per_image = ev(onnx.load(str(fp32)), range(len(ev)))
    assert ref > 0.2 and abs(value - ref) < 0.01, (value, ref)
    assert len(per_image) == 16 and all(0.0 <= v <= 1.0 for v in per_image) and max(per_image) > 0.3
    assert ev.history == [{"quantizers": 0, "map50_95": round(value, 4)}]
    assert ev(onnx.load(str(fp32)), range(4))[0] != value  # a subset is its own mAP, not recorded in the history
    assert len(ev.history) == 1


@needs_nncf
@needs_ov
def test_nncf_accuracy_control_reverts_layers_only_when_needed(coco_pt, coco128_yaml, tmp_path):
    """NNCF's accuracy-aware quantization through quantize_int8_nncf: a reachable max_drop keeps the
    plain recipe's file; max_drop 0 (the quantized model is ~1.4 points below FP32 on these 32 val
    images at 224) makes the loop revert the worst-ranked quantizer group to float (one step here),
    and the result still runs on OpenVINO and keeps Ultralytics' metadata."""
    pytest.importorskip("torch")
    import onnx

    from prune_pack.agent import backends as be
    from prune_pack.deploy.export import export_onnx
    from prune_pack.deploy.quantize import AccuracyControl, float_convs, quantize_int8_nncf, quantized_ops
    from prune_pack.pruning.sources import dataset_images

    imgsz = 224
    fp32 = export_onnx(coco_pt, tmp_path / "coco.onnx", imgsz=imgsz)
    calib = dataset_images(coco128_yaml, "train", limit=8)
    control = dataset_images(coco128_yaml, "val", limit=32)  # images the model was not trained or calibrated on
    n_q = lambda p: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(p)).graph.node)

    plain = quantize_int8_nncf(fp32, tmp_path / "plain.onnx", calib, imgsz)
    info: dict = {}
    easy = quantize_int8_nncf(fp32, tmp_path / "easy.onnx", calib, imgsz, info=info,
                              accuracy_control=AccuracyControl(control, max_drop=1.0))
    ac = info["accuracy_control"]
    assert ac["reverted_ops"] == ac["reverted_convs"] == [] and n_q(easy) == n_q(plain)
    (q0, m_fp32), (q_full, m_q) = ((v["quantizers"], v["map50_95"]) for v in ac["validations"])  # FP32, then quantized
    assert q0 == 0 and q_full >= n_q(plain) > 0  # (NNCF folds weight quantizers into int8 initializers on saving)
    assert 0.2 < m_q < m_fp32, "precondition: the quantized model must lose accuracy on the control images"

    info = {}
    hard = quantize_int8_nncf(fp32, tmp_path / "hard.onnx", calib, imgsz, info=info,
                              accuracy_control=AccuracyControl(control, max_drop=0.0, max_iterations=1, ranking_subset=4))
    ac = info["accuracy_control"]
    m = onnx.load(str(hard))
    assert [(v["quantizers"], v["map50_95"]) for v in ac["validations"][:2]] == [(0, m_fp32), (q_full, m_q)]
    assert len(ac["validations"]) == 3 and 0 < ac["validations"][2]["quantizers"] < q_full  # the one revert step
    # what the loop reverted: ops that read int8 tensors in the plain file and only float ones here (a
    # group may be a Conv with its weights, or an Add/Concat/MaxPool input); reverted Convs get float weights
    assert ac["reverted_ops"] and set(ac["reverted_ops"]) == quantized_ops(onnx.load(str(plain))) - quantized_ops(m)
    assert set(ac["reverted_convs"]) == set(float_convs(m)) - set(float_convs(onnx.load(str(plain))))
    assert set(ac["reverted_convs"]) <= set(ac["reverted_ops"]) and n_q(hard) < n_q(plain)
    assert {p.key for p in m.metadata_props} >= {"names", "stride", "imgsz"}
    s = be.load_session(hard, "openvino", threads=1)
    assert s.info()["precision"] == "int8"
    y = s.run(np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32))[0]
    assert y.shape[1] == 84 and np.isfinite(y).all()
