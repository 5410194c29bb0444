"""Write ``tests/data/tiny.onnx``: a few-KB, torch-free stand-in for an exported YOLOv8 detector.

Device-side tests (package, profiler, detect, streams, daemon) need a real ONNX model that
ONNX Runtime and OpenVINO can run, without torch or ultralytics on the machine. This one has
the same interface as an Ultralytics export: input ``images`` float32 1x3x64x64 (RGB, 0..1),
output ``output0`` float32 (1, 4 + NC, N) with rows cx, cy, w, h in input pixels followed by
per-class scores in [0, 1], and Ultralytics-style metadata (names, stride, imgsz, task).
Weights are seeded, so the file is byte-identical on every run:

    /work/venv-host/bin/python tests/data/make_tiny_onnx.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NAMES = ["person", "car", "dog"]  # NC = 3 classes
IMGSZ = 64
CHANNELS = (8, 16)  # two stride-2 convs: 64 -> 32 -> 16, so N = 16 * 16 = 256 candidates
OPSET = 17
IR_VERSION = 8  # readable by every ONNX Runtime >= 1.14 and OpenVINO >= 2023


def build(names: list[str] = NAMES, imgsz: int = IMGSZ) -> onnx.ModelProto:
    nc = len(names)
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    x, cin = "images", 3
    for i, cout in enumerate(CHANNELS):
        w = const(f"conv{i}.weight", (rng.standard_normal((cout, cin, 3, 3)) * (1.0 / np.sqrt(cin * 9))).astype(np.float32))
        b = const(f"conv{i}.bias", np.zeros(cout, np.float32))
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        # SiLU as Ultralytics exports it: x * sigmoid(x)
        nodes.append(helper.make_node("Sigmoid", [f"conv{i}"], [f"sig{i}"]))
        nodes.append(helper.make_node("Mul", [f"conv{i}", f"sig{i}"], [f"act{i}"]))
        x, cin = f"act{i}", cout
    head_w = const("head.weight", (rng.standard_normal((4 + nc, cin, 1, 1)) * 0.5).astype(np.float32))
    head_b = const("head.bias", np.zeros(4 + nc, np.float32))
    nodes.append(helper.make_node("Conv", [x, head_w, head_b], ["head"], kernel_shape=[1, 1]))
    nodes.append(helper.make_node("Reshape", ["head", const("flat_shape", np.array([1, 4 + nc, -1], np.int64))], ["flat"]))
    nodes.append(helper.make_node("Sigmoid", ["flat"], ["prob"]))
    # Boxes: sigmoid scaled to the input size (cx, cy, w, h in pixels); scores: sigmoid.
    nodes.append(helper.make_node("Split", ["prob", const("split", np.array([4, nc], np.int64))], ["box01", "scores"], axis=1))
    nodes.append(helper.make_node("Mul", ["box01", const("scale", np.array(float(imgsz), np.float32))], ["boxes"]))
    nodes.append(helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1))

    n = (imgsz // 4) ** 2
    graph = helper.make_graph(
        nodes,
        "tiny_yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="prune-pack tests")
    model.ir_version = IR_VERSION
    meta = {
        "description": "prune-pack tiny test detector (random weights)",
        "task": "detect",
        "stride": "4",
        "batch": "1",
        "imgsz": f"[{imgsz}, {imgsz}]",
        "names": repr({i: s for i, s in enumerate(names)}),  # Ultralytics writes a dict repr
    }
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def main(out: str | Path = Path(__file__).with_name("tiny.onnx")) -> Path:
    out = Path(out)
    out.write_bytes(build().SerializeToString())
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
