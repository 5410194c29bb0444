"""NNCF INT8 vs our ORT-made QDQ INT8, on OpenVINO and ONNX Runtime: latency (one interleaved run,
measured by the product: ``agent.backends.load_session`` + ``agent.profiler.measure``) and mAP50-95.

    /work/venv-host/bin/python bench/int8_nncf.py [--model ../shared/models/yolov8n-coco.pt] \
        [--data ../shared/data/coco128/data.yaml] [--imgsz 640] [--work /tmp/nncf-bench] \
        [--variants mixed-32,performance-32,mixed-128,...] [--latency-variants mixed-128,performance-128] \
        [--rounds 6] [--runs 10] [--warmup 3] [--threads 2] [--no-val] [--json out.json]

Variants are ``PRESET-N[-nofbc][-stem]``: NNCF preset (mixed | performance), N calibration images
(coco128 train, first N sorted), ``nofbc`` = fast bias correction off, ``stem`` = the image-reading
conv kept float, ``head`` = the Detect head's six output convs kept float. Every variant is validated on OpenVINO; only ``--latency-variants`` are timed.
Files are cached in ``--work`` (delete it to rebuild). mAP: Ultralytics' validator on the val split,
batch 1, through ``deploy.export.validate_openvino`` (OpenVINO, its default CPU precision: bf16 for the
unquantized parts here; read through OpenVINO's ONNX reader like the agent) or ``deploy.export._val`` (ORT).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))


def log(msg: str) -> None:
    print(f"[nncf bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_variant(v: str) -> dict:
    parts = v.split("-")
    return {"preset": parts[0], "n": int(parts[1]), "fast_bias_correction": "nofbc" not in parts[2:],
            "float_stem": "stem" in parts[2:], "float_head_convs": "head" in parts[2:]}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "yolov8n-coco.pt")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "coco128" / "data.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nncf-bench"))
    ap.add_argument("--qdq-calib", type=int, default=32, help="calibration images of the ORT QDQ file (deploy.quantize default)")
    ap.add_argument("--variants", default="mixed-32,performance-32,mixed-128,performance-128,mixed-128-nofbc,mixed-128-stem")
    ap.add_argument("--latency-variants", default="mixed-128,performance-128,mixed-128-stem")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10, help="measured runs per configuration per round")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up runs per configuration per round (excluded)")
    ap.add_argument("--no-val", action="store_true")
    ap.add_argument("--val-ort", default="mixed-128", help="NNCF variants also validated on ORT (comma list)")
    ap.add_argument("--second-split", action="store_true",
                    help="also validate on the train split (a second, independent-of-val estimate of the loss; "
                         "the model saw COCO train and calibration uses these images, so absolute values are higher)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from prune_pack.agent.backends import load_session
    from prune_pack.agent.profiler import device_context, image_inputs, latency_stats, measure
    from prune_pack.deploy.export import _val, export_onnx, validate_openvino
    from prune_pack.deploy.quantize import quantize_int8, quantize_int8_nncf
    from prune_pack.pruning.sources import dataset_images, resolve_dataset

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    data = resolve_dataset(str(args.data), str(w / "data"))
    fp32 = w / f"fp32-{args.imgsz}.onnx"
    if not fp32.is_file():
        log("exporting FP32 ONNX")
        export_onnx(args.model, fp32, imgsz=args.imgsz)
    files: dict[str, Path] = {"fp32": fp32}
    info: dict[str, dict] = {}
    qdq = w / f"qdq-ort-{args.qdq_calib}-{args.imgsz}.onnx"
    if not qdq.is_file():
        t = time.time()
        quantize_int8(fp32, qdq, dataset_images(data, "train", limit=args.qdq_calib), args.imgsz)
        log(f"ORT QDQ made in {time.time() - t:.0f} s")
    files["qdq-ort"] = qdq
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        p = w / f"nncf-{v}-{args.imgsz}.onnx"
        info[v] = {}
        if not p.is_file():
            kw = parse_variant(v)
            t = time.time()
            quantize_int8_nncf(fp32, p, dataset_images(data, "train", limit=kw.pop("n")), args.imgsz, info=info[v], **kw)
            info[v]["quantize_s"] = round(time.time() - t, 1)
            log(f"NNCF {v} made in {info[v]['quantize_s']} s")
        files[f"nncf-{v}"] = p

    # ---------------------------------------------------------------- latency (one interleaved run)
    lat_files = ["fp32", "qdq-ort"] + [f"nncf-{v}" for v in args.latency_variants.split(",") if v]
    configs = [("fp32", "ort", "fp32"), ("fp32", "openvino", "bf16"), ("fp32", "openvino", "fp32")]
    configs += [(f, b, "int8") for f in lat_files[1:] for b in ("openvino", "ort")]
    sessions = []
    for f, b, prec in configs:
        s = load_session(files[f], b, prec, args.threads)
        sessions.append({"file": f, "backend": b, "precision": prec, "s": s, "lat": [],
                         "inference_precision": s.info().get("inference_precision")})
    # Real letterboxed val images (a dummy input would make NMS-free latency the same, but the
    # quantized activations' range is only realistic on real images).
    xs = image_inputs(Path(dataset_images(data, "val", limit=1)[0]).parent, sessions[0]["s"].input_shape, limit=8)
    load_before = loadavg()
    t0 = time.time()
    for r in range(args.rounds):
        k = r % len(sessions)
        for c in sessions[k:] + sessions[:k]:
            c["lat"] += [v / 1e6 for v in measure(c["s"].run, xs, args.warmup, args.runs, None)]
        log(f"latency round {r + 1}/{args.rounds} (loadavg {loadavg()})")
    lat_s = time.time() - t0
    load_after = loadavg()
    ctx = device_context()
    stats = {(c["file"], c["backend"], c["precision"]): latency_stats(c["lat"]) | {"inference_precision": c["inference_precision"]}
             for c in sessions}
    del sessions

    # ---------------------------------------------------------------- accuracy
    maps: dict[tuple[str, str], dict] = {}
    maps2: dict[tuple[str, str], dict] = {}
    data2 = w / "data-trainval.yaml"
    if args.second_split:
        import yaml

        cfg = yaml.safe_load(Path(data).read_text())
        cfg["val"] = cfg["train"]
        data2.write_text(yaml.safe_dump(cfg))
    if not args.no_val:
        todo = [("fp32", "ort"), ("fp32", "openvino"), ("qdq-ort", "ort"), ("qdq-ort", "openvino")]
        todo += [(f"nncf-{v}", "openvino") for v in variants]
        todo += [(f"nncf-{v}", "ort") for v in args.val_ort.split(",") if v and v in variants]
        for f, b in todo:
            t = time.time()
            maps[(f, b)] = validate_openvino(files[f], data, args.imgsz) if b == "openvino" else _val(files[f], data, args.imgsz)
            log(f"mAP {f} on {b}: {maps[(f, b)]['map50_95']:.4f} ({time.time() - t:.0f} s, loadavg {loadavg()})")
            if args.second_split:
                maps2[(f, b)] = validate_openvino(files[f], data2, args.imgsz) if b == "openvino" else _val(files[f], data2, args.imgsz)
                log(f"  train split: {maps2[(f, b)]['map50_95']:.4f}")

    # ---------------------------------------------------------------- report
    ref_ov = stats[("fp32", "openvino", "bf16")]["p50_ms"]
    ref_ort = stats[("fp32", "ort", "fp32")]["p50_ms"]
    fp32_map = maps.get(("fp32", "ort"), {}).get("map50_95")
    print(f"model {args.model.name}, imgsz {args.imgsz}, {args.threads} threads, {ctx['cpu_model']}, flags {ctx['cpu_flags']}; "
          f"latency {args.rounds} rounds x {args.runs} runs (+{args.warmup} warm-up) per config, {lat_s:.0f} s, "
          f"loadavg before {load_before} / after {load_after}\n")
    print("| file | backend | precision (OV exec) | p50 ms | p50 95% CI | p90 ms | vs OV bf16 | vs ORT fp32 | mAP50-95 (this backend) | loss vs FP32 (pts) |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for (f, b, prec), s in stats.items():
        # OpenVINO validation runs the file at OpenVINO's default precision (bf16 here): not the fp32 row
        m = None if (b, prec) == ("openvino", "fp32") else maps.get((f, b), {}).get("map50_95")
        ci = "–".join("?" if c is None else f"{c:.1f}" for c in (s["p50_ci_ms"] or (None, None)))
        print(f"| {f} | {b} | {prec} ({s['inference_precision'] or '-'}) | {s['p50_ms']:.1f} | {ci} | "
              f"{s['p90_ms']:.1f} | {ref_ov / s['p50_ms']:.2f}x | {ref_ort / s['p50_ms']:.2f}x | "
              f"{'-' if m is None else f'{m:.4f}'} | {'-' if m is None or fp32_map is None else f'{(fp32_map - m) * 100:+.2f}'} |")
    if maps:
        ref2 = maps2.get(("fp32", "ort"), {}).get("map50_95")
        print("\n| file | backend | mAP50-95 val | mAP50 val | loss vs FP32 ORT, val (pts) | mAP50-95 train split | loss, train split (pts) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for (f, b), m in maps.items():
            m2 = maps2.get((f, b), {}).get("map50_95")
            tr = "- | -" if m2 is None else f"{m2:.4f} | {(ref2 - m2) * 100:+.2f}"
            print(f"| {f} | {b} | {m['map50_95']:.4f} | {m['map50']:.4f} | {(fp32_map - m['map50_95']) * 100:+.2f} | {tr} |")
    if args.json:
        args.json.write_text(json.dumps({
            "latency": [{"file": f, "backend": b, "precision": p, **s} for (f, b, p), s in stats.items()],
            "map": [{"file": f, "backend": b, **m} for (f, b), m in maps.items()],
            "map_train_split": [{"file": f, "backend": b, **m} for (f, b), m in maps2.items()], "info": info,
            "loadavg": [load_before, load_after], "cpu": ctx["cpu_model"], "flags": ctx["cpu_flags"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
