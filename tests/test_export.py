"""deploy/export.py: Ultralytics ONNX export, parity proof, manifest and signed package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ultralytics")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from prune_pack.deploy.export import ParityError, check_parity, export_onnx, export_package  # noqa: E402
from prune_pack.pruning.sources import sha256_file  # noqa: E402

IMGSZ = 160


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny_onnx(tiny_pt, tmp_path_factory) -> Path:
    return export_onnx(tiny_pt, tmp_path_factory.mktemp("exp") / "tiny.onnx", imgsz=IMGSZ)


def test_export_static_shape_and_nothing_written_beside_the_checkpoint(tiny_pt, tiny_onnx):
    before = sorted(p.name for p in tiny_pt.parent.iterdir())
    s = _ort(tiny_onnx)
    assert s.get_inputs()[0].shape == [1, 3, IMGSZ, IMGSZ]
    y = s.run(None, {s.get_inputs()[0].name: np.zeros((1, 3, IMGSZ, IMGSZ), np.float32)})[0]
    # 4 box coordinates + 3 classes, one column per anchor of strides 8/16/32
    assert y.shape == (1, 7, sum((IMGSZ // s) ** 2 for s in (8, 16, 32)))
    assert "tiny.onnx" not in before  # the exporter worked on a temp copy


def _corrupt(src: Path, dst: Path, pick, change) -> str:
    m = onnx.load(str(src))
    victim = pick([i for i in m.graph.initializer])
    victim.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(victim).copy()).astype(np.float32), victim.name))
    onnx.save(m, str(dst))
    return victim.name


def test_parity_passes_on_real_images_and_catches_a_corrupted_initializer(tiny_pt, tiny_onnx, tmp_path):
    r = check_parity(tiny_pt, tiny_onnx, imgsz=IMGSZ)
    assert r["images"] >= 2
    assert r["max_abs_box_px"] <= r["box_atol_px"] and r["max_abs_score"] <= r["score_atol"]

    # A random-init network's features are ~0 at the head, so its output is set by the head's
    # biases: shift one DFL bin of the stride-8 box branch (all bins start equal).
    def bump(b):
        b[0] += 2.0
        return b

    bad = tmp_path / "corrupted.onnx"
    name = _corrupt(tiny_onnx, bad, lambda inits: next(i for i in inits if i.name == "model.22.cv2.0.2.bias"), bump)
    with pytest.raises(ParityError, match=r"parity check failed.*box"):
        check_parity(tiny_pt, bad, imgsz=IMGSZ)
    assert name


def test_parity_on_a_trained_model_matches_detections_and_catches_a_scaled_weight(coco_pt, tmp_path):
    from conftest import bus_jpg

    p = export_onnx(coco_pt, tmp_path / "coco.onnx", imgsz=320)
    r = check_parity(coco_pt, p, images=[bus_jpg()], imgsz=320)
    assert r["detections_torch"] >= 3 and r["detections_onnx"] == r["detections_torch"] and r["unmatched_detections"] == 0

    def mid_conv(inits):
        ws = [i for i in inits if i.name.endswith("weight") and len(i.dims) == 4 and "dfl" not in i.name]
        return ws[len(ws) // 2]

    _corrupt(p, tmp_path / "bad.onnx", mid_conv, lambda w: w * 1.5)
    with pytest.raises(ParityError, match="parity check failed"):
        check_parity(coco_pt, tmp_path / "bad.onnx", images=[bus_jpg()], imgsz=320)


def test_dynamic_batch_export_runs_batch_2(tiny_pt, tmp_path):
    p = export_onnx(tiny_pt, tmp_path / "dyn.onnx", imgsz=IMGSZ, dynamic=True)
    s = _ort(p)
    shape = s.get_inputs()[0].shape
    assert not isinstance(shape[0], int) and shape[2:] == [IMGSZ, IMGSZ]
    y = s.run(None, {s.get_inputs()[0].name: np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)})[0]
    assert y.shape[0] == 2
    check_parity(tiny_pt, p, imgsz=IMGSZ)


def test_package_round_trip_signed_and_versioned(tiny_pt, tmp_path):
    from prune_pack.agent.keys import generate_keypair
    from prune_pack.agent.verifier import verify_package
    from prune_pack.errors import PackageRejected

    priv, pub = generate_keypair(tmp_path / "keys")
    reg = tmp_path / "versions.json"
    out = tmp_path / "tiny.ppk"
    r = export_package(tiny_pt, out, imgsz=IMGSZ, sign=priv, name="tiny-det", latency_runs=2, registry=reg)
    assert r["signed"] and r["precision"] == "fp32"

    vp = verify_package(out, trusted_keys=[pub], staging_root=tmp_path / "stage")
    m = vp.manifest
    assert m["name"] == "tiny-det" and m["version"] == 1 and m["precision"] == "fp32"
    assert m["input"] == {"name": "images", "shape": [1, 3, IMGSZ, IMGSZ], "dtype": "float32"}
    assert m["names"] == ["a", "b", "c"]
    assert m["provenance"]["base_sha256"] == sha256_file(tiny_pt) and m["provenance"]["pruned"] is False
    assert m["metrics"]["params"] > 0 and m["metrics"]["gflops"] > 0
    assert m["metrics"]["host_latency"]["threads"] == 2 and m["metrics"]["host_latency"]["p50_ms"] > 0
    assert m["parity"]["unmatched_detections"] == 0
    assert "validated" not in m  # no dataset given: nothing was measured, nothing is claimed
    assert sha256_file(vp.model_path) == m["sha256"]
    s = _ort(vp.model_path)
    assert s.run(None, {"images": np.zeros((1, 3, IMGSZ, IMGSZ), np.float32)})[0].shape[1] == 7

    # the next export of the same name gets a higher version; an explicit one is honoured
    r2 = export_package(tiny_pt, tmp_path / "tiny2.ppk", imgsz=IMGSZ, name="tiny-det", latency_runs=0, registry=reg)
    assert r2["version"] == 2 and not r2["signed"]
    with pytest.raises(PackageRejected, match="unsigned"):
        verify_package(tmp_path / "tiny2.ppk", trusted_keys=[pub])
    r3 = export_package(tiny_pt, tmp_path / "tiny3.ppk", imgsz=IMGSZ, name="tiny-det", version=7, latency_runs=0, registry=reg)
    assert r3["version"] == 7
    assert json.loads(json.dumps(r3["metrics"]))  # the CLI prints results as JSON


def test_cli_export_bare_onnx_and_one_line_errors(tiny_pt, tmp_path, capsys):
    from prune_pack.cli import main

    out = tmp_path / "bare.onnx"
    assert main(["export", "--model", str(tiny_pt), "--imgsz", str(IMGSZ), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["precision"] == "fp32" and out.is_file()
    assert _ort(out).get_inputs()[0].shape == [1, 3, IMGSZ, IMGSZ]

    assert main(["export", "--model", str(tiny_pt), "--int8", "--out", str(tmp_path / "x.ppk")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8 needs --data" in err[0]
    assert main(["export", "--model", str(tiny_pt), "--imgsz", "100", "--out", str(tmp_path / "x.ppk")]) == 2
    assert "multiple of 32" in capsys.readouterr().err

    # WIDTHxHEIGHT: a 16:9 camera's input, no letterbox padding spent on the sky
    assert main(["export", "--model", str(tiny_pt), "--imgsz", "320x192", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _ort(out).get_inputs()[0].shape == [1, 3, 192, 320] and res["parity"]["imgsz"] == [192, 320]
    for bad, why in (("320x200", "multiple of 32"), ("320x", "WIDTHxHEIGHT"), ("axb", "WIDTHxHEIGHT"), ("1x2x3", "WIDTHxHEIGHT")):
        assert main(["export", "--model", str(tiny_pt), "--imgsz", bad, "--out", str(tmp_path / "x.ppk")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and bad in err[0], err


def test_parse_imgsz_is_width_by_height():
    from prune_pack.deploy.export import hw, parse_imgsz, shape_str

    assert parse_imgsz("640") == 640 and parse_imgsz(640) == 640 and parse_imgsz("640x640") == 640
    assert parse_imgsz("640x384") == (384, 640) and parse_imgsz("480×640") == (640, 480)
    assert hw(parse_imgsz("640x384")) == (384, 640) and shape_str((384, 640)) == "640x384" and shape_str(640) == "640"


def test_json_output_is_the_only_stdout_line(tiny_pt, tmp_path):
    """Ultralytics' exporter logs to stdout; with --json that goes to stderr, so scripts can parse stdout whole."""
    import subprocess
    import sys

    out = tmp_path / "j.onnx"
    cmd = [sys.executable, "-m", "prune_pack.cli", "export", "--model", str(tiny_pt), "--imgsz", str(IMGSZ), "--out", str(out)]
    p = subprocess.run(cmd + ["--json", "--verbose"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["precision"] == "fp32"  # the whole of stdout is one JSON object
    assert "export success" in p.stderr  # the library's own output was moved, not lost
    # Without --verbose the library's chatter is left out; stdout is the summary alone, progress on stderr.
    q = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    assert "export success" not in q.stdout + q.stderr and "parity OK" in q.stderr
    assert q.stdout.strip() and "ONNX:" not in q.stdout


def test_pruning_provenance_reaches_the_manifest(tiny_pt, tmp_path):
    from prune_pack.agent.manifest import read_manifest
    from prune_pack.pruning.checkpoint import load_checkpoint, save_pruned

    yolo, _ = load_checkpoint(tiny_pt)
    prov = {"base_sha256": "ab" * 32, "criterion": "l1", "requested_ratio": 0.3, "widths": {"model.2.cv1": [32, 24]}}
    pruned = save_pruned(yolo, tmp_path / "pruned.pt", prov)
    export_package(pruned, tmp_path / "p.ppk", imgsz=IMGSZ, latency_runs=0, registry=tmp_path / "v.json")
    p = read_manifest(tmp_path / "p.ppk")["provenance"]
    assert p["pruned"] is True and p["base_sha256"] == "ab" * 32 and p["source_sha256"] == sha256_file(pruned)
    assert p["criterion"] == "l1" and p["requested_ratio"] == 0.3 and p["widths"] == {"model.2.cv1": [32, 24]}


def test_openvino_precision_honours_the_cpu_flags_override(tmp_path, monkeypatch):
    """The gate reads the CPU through agent.backends.cpu_features, like the build's bf16 lever: one source."""
    from onnx import TensorProto, helper

    from prune_pack.agent.backends import CPU_FLAGS_ENV, bf16_supported
    from prune_pack.deploy.export import openvino_precision

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    f = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(g), str(f))
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 avx512_bf16")
    assert openvino_precision(f) == "bf16" and bf16_supported()
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2")  # a CPU without bf16, whatever /proc/cpuinfo of this host says
    assert openvino_precision(f) == "fp32" and not bf16_supported()


def test_producer_map_is_one_helper():
    """fast_dfl_softmax and the quantizer's graph walks share onnx_graph.producers/consumers."""
    from onnx import TensorProto, helper

    from prune_pack.deploy.onnx_graph import consumers, producers

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Mul", ["a", "x"], ["y"], name="m")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert {k: v.name for k, v in producers(g).items()} == {"a": "r", "y": "m"}
    assert {k: [n.name for n in v] for k, v in consumers(g).items()} == {"x": ["r", "m"], "a": ["m"]}
    assert {k: [n.name for n in v] for k, v in consumers(g, skip_first=True).items()} == {"x": ["m"]}
