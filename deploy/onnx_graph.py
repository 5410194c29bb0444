"""ONNX graph helpers shared by export and quantization: who produces and who consumes a tensor,
and the rewrites export applies (fixed spatial dims, onnxslim, the last-axis DFL softmax).

Imports onnx only (lazily): no torch, no Ultralytics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from prune_pack.imgsz import ImgSz, hw


def producers(graph: Any) -> dict[str, Any]:
    """{tensor name: the node that outputs it} of an ``onnx.GraphProto`` (graph inputs and initializers have none)."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: Any, skip_first: bool = False) -> dict[str, list]:
    """{tensor name: the nodes that read it}; ``skip_first`` counts only inputs after the first
    (a Q/DQ node's scale and zero point, not its data)."""
    out: dict[str, list] = {}
    for n in graph.node:
        for i in (n.input[1:] if skip_first else n.input):
            out.setdefault(i, []).append(n)
    return out


def _log(msg: str) -> None:
    print(f"prune-pack export: {msg}", file=sys.stderr, flush=True)


def rewrite_onnx(path: Path, fn: Callable[[Any], int]) -> int:
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
    producer = producers(g)
    readers = consumers(g)
    inits = {i.name: i for i in g.initializer}
    done = 0
    for s in list(g.node):
        if s.op_type != "Softmax":
            continue
        t = producer.get(s.input[0])
        after = readers.get(s.output[0], [])
        if t is None or t.op_type != "Transpose" or len(after) != 1 or after[0].op_type != "Conv":
            continue
        c = after[0]
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if perm != [0, 2, 1, 3] or len(readers.get(t.output[0], [])) != 1 or c.input[1] not in inits or len(c.input) > 2:
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


def fix_spatial_dims(path: Path, imgsz: ImgSz) -> None:
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


def slim(path: Path) -> None:
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
