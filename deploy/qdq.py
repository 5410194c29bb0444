"""Which nodes of an exported detector quantize and which stay float, and QDQ fix-ups: shared by
both INT8 engines (``quantize`` for ONNX Runtime, ``quantize_nncf`` for OpenVINO). onnx/numpy only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from prune_pack.deploy.onnx_graph import consumers, producers


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
    producer = producers(m.graph)
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
    readers = consumers(g)
    done = 0
    for s in list(g.node):
        if s.op_type != "Sigmoid":
            continue
        after = readers.get(s.output[0], [])
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
    by_out = producers(model.graph)
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
    produced_by = producers(g)
    users = consumers(g, skip_first=True)

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
    producer = producers(model.graph)
    skip = set(excluded)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in skip
            and getattr(producer.get(n.input[1]), "op_type", None) != "DequantizeLinear"]
