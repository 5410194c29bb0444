"""FP32 vs INT8 (ONNX Runtime static QDQ): mAP50-95 on a val split and CPU latency, same run.

    /work/venv-host/bin/python bench/int8.py                       # yolov8n-coco + coco128, 640
    /work/venv-host/bin/python bench/int8.py --prune-ratio 0.3     # + one pruned model (no fine-tuning)
    /work/venv-host/bin/python bench/int8.py --pruned my_pruned.pt # + a pruned (fine-tuned) checkpoint

Latency: every model in one process, runs interleaved round-robin (so CPU contention from
other jobs hits all models alike), ORT 2 intra-op threads, 1 inter-op, sequential, on real
letterboxed val images; p50 and min over the runs. A third number, CPU ms per inference with
1 thread (process CPU time), is insensitive to other jobs stealing the cores and is reported
as the "work" ratio. ORT's profiler gives the per-op split of the FP32 and INT8 models.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harvest import cpu_name  # bench/harvest.py: lscpu model name, family and model (the hosts differ by those)

os.environ.setdefault("YOLO_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))


def log(msg: str) -> None:
    print(f"[int8 bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ort_session(path: Path, threads: int, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(models: dict[str, Path], inputs: list[np.ndarray], runs: int, threads: int, warmup: int = 3) -> dict:
    sess = {k: ort_session(p, threads) for k, p in models.items()}
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for s in sess.values():
        name = s.get_inputs()[0].name
        for i in range(warmup):
            s.run(None, {name: inputs[i % len(inputs)]})
    for r in range(runs):
        x = inputs[r % len(inputs)]
        for k, s in sess.items():
            c0, t0 = time.process_time(), time.perf_counter()
            s.run(None, {s.get_inputs()[0].name: x})
            wall[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: {"p50_ms": float(np.median(wall[k])), "min_ms": float(np.min(wall[k])), "cpu_ms": float(np.median(cpu[k])),
                "runs": runs, "threads": threads} for k in models}


def op_profile(path: Path, x: np.ndarray, runs: int = 10) -> dict[str, float]:
    """Share of kernel time per op type (ORT profiler, 1 thread)."""
    with tempfile.TemporaryDirectory() as td:
        s = ort_session(path, 1, profile=str(Path(td) / "p"))
        name = s.get_inputs()[0].name
        for _ in range(runs):
            s.run(None, {name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    by: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(by.values()) or 1
    return {op: round(100.0 * d / total, 1) for op, d in by.most_common(12)}


def ov_latency(models: dict[str, Path], x: np.ndarray, runs: int, threads: int) -> dict:
    try:
        from prune_pack.agent.backends import load_session
    except ImportError:
        return {}
    out: dict = {}
    sess = {}
    for k, (p, prec) in models.items():
        try:
            sess[k] = load_session(p, backend="openvino", precision=prec, threads=threads)
        except Exception as e:  # noqa: BLE001 - report, do not abort the bench
            out[k] = {"error": str(e)[:200]}
    for s in sess.values():
        for _ in range(3):
            s.run(x)
    t: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(runs):
        for k, s in sess.items():
            t0 = time.perf_counter()
            s.run(x)
            t[k].append((time.perf_counter() - t0) * 1e3)
    for k in sess:
        out[k] = {"p50_ms": float(np.median(t[k])), "min_ms": float(np.min(t[k])), "runs": runs, "threads": threads}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "yolov8n-coco.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "coco128" / "data.yaml"))
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--calib", type=int, default=32, help="calibration images from the train split")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--prune-ratio", type=float, default=0.0, help="also prune the model by this ratio (no fine-tuning)")
    ap.add_argument("--prune-allocation", default="uniform", help="allocation for --prune-ratio (uniform is fastest)")
    ap.add_argument("--pruned", help="also bench this pruned checkpoint")
    ap.add_argument("--methods", default="minmax", help="calibration methods to compare (comma-separated)")
    ap.add_argument("--variants", action="store_true", help="also the ablations: plain export / no SiLU fusion / S8S8")
    ap.add_argument("--openvino", action="store_true", help="also OpenVINO latency on the FP32 (bf16) and INT8 files")
    ap.add_argument("--second-split", action="store_true",
                    help="also mAP on the train split used as a second val set (a noise estimate for the gate)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--work", help="keep the ONNX files here (default: a temp dir)")
    a = ap.parse_args()

    from prune_pack.deploy.export import _val, check_parity, export_onnx, letterbox_batch
    from prune_pack.deploy.quantize import quantize_int8
    from prune_pack.pruning.sources import dataset_images, resolve_dataset

    work = Path(a.work or tempfile.mkdtemp(prefix="pp-int8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = resolve_dataset(a.data, work / "data")
    calib = dataset_images(data, "train", limit=a.calib)
    val_imgs = dataset_images(data, "val")
    t_start = time.time()

    sources: dict[str, Path] = {"unpruned": Path(a.model)}
    prune_info = None
    if a.prune_ratio > 0:
        from prune_pack.pruning.checkpoint import save_pruned
        from prune_pack.pruning.prune import prune_model

        log(f"pruning {a.model} by {a.prune_ratio}")
        y, prune_info = prune_model(a.model, a.prune_ratio, data_yaml=data, imgsz=a.imgsz, allocation=a.prune_allocation)
        sources["pruned"] = save_pruned(y, work / "pruned.pt", prune_info)
    if a.pruned:
        sources["pruned"] = Path(a.pruned)

    onnx: dict[str, Path] = {}
    prec: dict[str, str] = {}
    quant_info: dict[str, dict] = {}
    for tag, pt in sources.items():
        log(f"exporting {tag}")
        onnx[f"{tag}/fp32"] = export_onnx(pt, work / f"{tag}_fp32.onnx", imgsz=a.imgsz)
        check_parity(pt, onnx[f"{tag}/fp32"], val_imgs[:4], a.imgsz)
        prec[f"{tag}/fp32"] = "fp32"
        for method in a.methods.split(","):
            k = f"{tag}/int8" + ("" if method == "minmax" else f"-{method}")
            log(f"quantizing {k}")
            quant_info[k] = {}
            onnx[k] = quantize_int8(onnx[f"{tag}/fp32"], work / f"{k.replace('/', '_')}.onnx", calib, a.imgsz, method=method,
                                    info=quant_info[k])
            prec[k] = "int8"
    if a.variants:
        log("ablations")
        plain = export_onnx(a.model, work / "plain_fp32.onnx", imgsz=a.imgsz, fast_dfl=False)
        onnx["ablation/plain-export-fp32"] = plain
        onnx["ablation/floor-int8"] = quantize_int8(plain, work / "floor_int8.onnx", calib, a.imgsz, fuse_silu=False, float_stem=False)
        onnx["ablation/silu-fused-float-int8"] = quantize_int8(onnx["unpruned/fp32"], work / "silu.onnx", calib, a.imgsz, fuse_silu=True)
        onnx["ablation/int8-stem"] = quantize_int8(onnx["unpruned/fp32"], work / "qstem.onnx", calib, a.imgsz, float_stem=False)
        onnx["ablation/s8s8-int8"] = quantize_int8(onnx["unpruned/fp32"], work / "s8s8.onnx", calib, a.imgsz, activations="s8")
        onnx["ablation/qoperator-int8"] = quantize_int8(onnx["unpruned/fp32"], work / "qop.onnx", calib, a.imgsz, quant_format="qoperator")
        onnx["ablation/head-quantized-int8"] = quantize_int8(onnx["unpruned/fp32"], work / "headq.onnx", calib, a.imgsz, exclude_head=False)

    inputs = letterbox_batch(val_imgs[:8], a.imgsz)
    log(f"latency: {len(onnx)} models interleaved, {a.runs} runs, 2 threads")
    lat2 = interleaved_latency(onnx, inputs, a.runs, threads=2)
    log("latency: 1 thread (CPU time)")
    lat1 = interleaved_latency(onnx, inputs, max(10, a.runs // 2), threads=1)
    prof = {k: op_profile(onnx[k], inputs[0]) for k in ("unpruned/fp32", "unpruned/int8")}
    ov = {}
    if a.openvino:
        log("OpenVINO latency")
        ov = ov_latency({k: (onnx[k], "bf16" if prec.get(k) == "fp32" else "int8") for k in onnx if k in prec and "ablation" not in k},
                        inputs[0], max(10, a.runs // 2), threads=2)

    maps: dict[str, dict] = {}
    for k, p in onnx.items():
        if k.startswith("ablation/") and k not in ("ablation/floor-int8", "ablation/head-quantized-int8", "ablation/silu-fused-float-int8"):
            continue
        log(f"mAP of {k}")
        maps[k] = _val(p, data, a.imgsz)

    maps2: dict[str, dict] = {}
    if a.second_split:
        import yaml

        cfg = yaml.safe_load(Path(data).read_text())
        cfg["val"] = cfg["train"]
        data2 = work / "train-as-val.yaml"
        data2.write_text(yaml.safe_dump(cfg))
        for k in maps:
            if k.startswith("unpruned/") or k in ("ablation/floor-int8", "ablation/silu-fused-float-int8"):
                log(f"mAP of {k} on the train split")
                maps2[k] = _val(onnx[k], data2, a.imgsz)

    base = lat2["unpruned/fp32"]
    rows = []
    for k in onnx:
        m = maps.get(k, {})
        fp32_of = k.split("/")[0] + "/fp32" if not k.startswith("ablation/") else "unpruned/fp32"
        rows.append({
            "model": k,
            "map50_95": m.get("map50_95"),
            "map50": m.get("map50"),
            "map_drop_points_vs_own_fp32": None if not m else round(100 * (maps[fp32_of]["map50_95"] - m["map50_95"]), 2),
            "map_drop_points_vs_unpruned_fp32": None if not m else round(100 * (maps["unpruned/fp32"]["map50_95"] - m["map50_95"]), 2),
            "train_split_map50_95": maps2.get(k, {}).get("map50_95"),
            "train_split_drop_points": None if k not in maps2 else round(100 * (maps2["unpruned/fp32"]["map50_95"] - maps2[k]["map50_95"]), 2),
            "p50_ms_2t": round(lat2[k]["p50_ms"], 2),
            "min_ms_2t": round(lat2[k]["min_ms"], 2),
            "cpu_ms_1t": round(lat1[k]["cpu_ms"], 2),
            "speedup_p50_vs_unpruned_fp32": round(base["p50_ms"] / lat2[k]["p50_ms"], 2),
            "speedup_min_vs_unpruned_fp32": round(base["min_ms"] / lat2[k]["min_ms"], 2),
            "speedup_cpu_vs_unpruned_fp32": round(lat1["unpruned/fp32"]["cpu_ms"] / lat1[k]["cpu_ms"], 2),
        })
    import onnxruntime

    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "conditions": {
            "imgsz": a.imgsz, "calib_images": len(calib), "val_images": len(val_imgs), "runs": a.runs,
            "onnxruntime": onnxruntime.__version__, "cpu": cpu_name(), "nproc": os.cpu_count(),
            "loadavg_end": os.getloadavg(), "seconds": round(time.time() - t_start),
        },
        "rows": rows,
        "op_profile_pct": prof,
        "openvino": ov,
        "quantization": quant_info,
        "prune_info": {k: v for k, v in (prune_info or {}).items() if k not in ("widths", "sensitivity")},
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    print("\n| model | mAP50-95 val | drop vs own FP32 (pts) | drop on train split (pts) | p50 ms (2t) | min ms (2t) | CPU ms (1t) | speed-up p50 / min / CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mp = "-" if r["map50_95"] is None else f"{r['map50_95']:.4f}"
        dr = "-" if r["map_drop_points_vs_own_fp32"] is None else f"{r['map_drop_points_vs_own_fp32']:+.2f}"
        d2 = "-" if r["train_split_drop_points"] is None else f"{r['train_split_drop_points']:+.2f}"
        print(f"| {r['model']} | {mp} | {dr} | {d2} | {r['p50_ms_2t']} | {r['min_ms_2t']} | {r['cpu_ms_1t']} | "
              f"{r['speedup_p50_vs_unpruned_fp32']} / {r['speedup_min_vs_unpruned_fp32']} / {r['speedup_cpu_vs_unpruned_fp32']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
