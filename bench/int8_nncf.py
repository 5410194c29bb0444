"""NNCF INT8 vs our ORT-made QDQ INT8, on OpenVINO and ONNX Runtime: latency (one interleaved run,
measured by the product: ``agent.backends.load_session`` + ``agent.profiler.measure``) and mAP50-95.

    /work/venv-host/bin/python bench/int8_nncf.py [--model ../shared/models/yolov8n-coco.pt] \
        [--data ../shared/data/coco128/data.yaml] [--imgsz 640] [--work /tmp/nncf-bench] \
        [--variants mixed-32,performance-32,mixed-128,...] [--latency-variants mixed-128,performance-128] \
        [--rounds 6] [--runs 10] [--warmup 3] [--threads 2] [--no-val] [--json out.json] \
        [--sizes 640,608,576] [--int8-backends openvino,ort] [--no-qdq] [--no-ov-fp32] [--size-bf16]

Variants are ``PRESET-N[-nofbc][-stem][-head][-acD]``: NNCF preset (mixed | performance), N calibration images
(coco128 train, first N sorted), ``nofbc`` = fast bias correction off, ``stem`` = the image-reading
conv kept float, ``head`` = the Detect head's six output convs kept float, ``fK`` = the K convs after the
stem kept float too (``quantize_int8_nncf(float_early_convs=K)``), ``acD`` = NNCF's accuracy-aware
quantization (``quantize_with_accuracy_control``) with max_drop D/1000 mAP50-95 measured on the coco128
*train* images not used for calibration (the val split stays unseen; ``-acm5`` = max_drop -0.005). Every variant is validated on OpenVINO; only ``--latency-variants`` are timed.
``--sizes``: every variant is also built at these input sizes (``576``, or ``WIDTHxHEIGHT`` like ``640x480``) (FP32 ONNX exported at that size, then quantized);
the reference stays FP32 on ORT at ``--imgsz`` (the build's gate), and the speed reference OpenVINO bf16 at ``--imgsz``.
Result rows are named ``FILE-SIZE`` (``nncf-mixed-128-stem-576``); ``VARIANT@SIZE`` builds/times a variant at that size only.
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

import prune_pack.offline  # noqa: E402,F401 - before Ultralytics: never the network

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))


def log(msg: str) -> None:
    print(f"[nncf bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_variant(v: str) -> dict:
    parts = v.split("-")
    ac = [p for p in parts[2:] if p.startswith("ac")]
    return {"preset": parts[0], "n": int(parts[1]), "fast_bias_correction": "nofbc" not in parts[2:],
            "float_stem": "stem" in parts[2:], "float_head_convs": "head" in parts[2:],
            "float_early_convs": next((int(p[1:]) for p in parts[2:] if p[:1] == "f" and p[1:].isdigit()), 0),
            "ac_max_drop": (int(ac[0][2:].replace("m", "-") or 5) / 1000) if ac else None}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "yolov8n-coco.pt")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "coco128" / "data.yaml")
    ap.add_argument("--imgsz", type=int, default=640, help="reference size: FP32 ORT (accuracy) and OV bf16 (speed) run here")
    ap.add_argument("--sizes", default="", help="comma list of input sizes to build the NNCF variants at (default: --imgsz)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nncf-bench"))
    ap.add_argument("--qdq-calib", type=int, default=32, help="calibration images of the ORT QDQ file (deploy.quantize default)")
    ap.add_argument("--no-qdq", action="store_true", help="leave out the ORT-made QDQ file")
    ap.add_argument("--variants", default="mixed-32,performance-32,mixed-128,performance-128,mixed-128-nofbc,mixed-128-stem")
    ap.add_argument("--latency-variants", default="mixed-128,performance-128,mixed-128-stem")
    ap.add_argument("--int8-backends", default="openvino,ort", help="backends the INT8 files are timed on")
    ap.add_argument("--no-ov-fp32", action="store_true", help="do not time OpenVINO f32 at --imgsz")
    ap.add_argument("--size-bf16", action="store_true", help="also time OpenVINO bf16 of the FP32 file at every other size")
    ap.add_argument("--ac-split", default="train",
                    help="images the accuracy-control loop validates on (acD variants): train (those not used for "
                         "calibration), or val-a (the first half of val; then also report every file on val B, the other half)")
    ap.add_argument("--ac-iterations", type=int, default=8, help="accuracy control: at most this many revert steps")
    ap.add_argument("--ac-ranking", type=int, default=32, help="accuracy control: ranking subset size (images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=10, help="measured runs per configuration per round")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up runs per configuration per round (excluded)")
    ap.add_argument("--no-val", action="store_true")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--val-ort", default="mixed-128", help="NNCF variants also validated on ORT (comma list)")
    ap.add_argument("--second-split", action="store_true",
                    help="also validate on the train split (a second, independent-of-val estimate of the loss; "
                         "the model saw COCO train and calibration uses these images, so absolute values are higher)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from prune_pack.agent.backends import load_session
    from prune_pack.agent.profiler import device_context, image_inputs, latency_stats, measure
    from prune_pack.deploy.export import _val, export_onnx, hw, parse_imgsz, shape_str, validate_openvino
    from prune_pack.deploy.quantize import AccuracyControl, quantize_int8, quantize_int8_nncf
    from prune_pack.pruning.sources import dataset_images, resolve_dataset

    base = args.imgsz
    sizes = [base] + [parse_imgsz(x) for x in args.sizes.split(",") if x and parse_imgsz(x) != base]
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    data = resolve_dataset(str(args.data), str(w / "data"))
    files: dict[str, Path] = {}
    size_of: dict[str, object] = {}
    info: dict[str, dict] = {}
    for sz in sizes:
        fp32 = w / f"fp32-{shape_str(sz)}.onnx"
        if not fp32.is_file():
            log(f"exporting FP32 ONNX at {sz}")
            export_onnx(args.model, fp32, imgsz=sz)
        files[f"fp32-{shape_str(sz)}"], size_of[f"fp32-{shape_str(sz)}"] = fp32, sz
    if not args.no_qdq:
        qdq = w / f"qdq-ort-{args.qdq_calib}-{base}.onnx"
        if not qdq.is_file():
            t = time.time()
            quantize_int8(files[f"fp32-{base}"], qdq, dataset_images(data, "train", limit=args.qdq_calib), base)
            log(f"ORT QDQ made in {time.time() - t:.0f} s")
        files[f"qdq-ort-{base}"], size_of[f"qdq-ort-{base}"] = qdq, base
    variants = [v for v in args.variants.split(",") if v]

    def at(v: str, sz: object) -> bool:  # "VARIANT@SIZE": only at that size (640 or WxH)
        return "@" not in v or v.split("@")[1] == shape_str(sz)

    for sz in sizes:
        for v in [x.split("@")[0] for x in variants if at(x, sz)]:
            name = f"nncf-{v}-{shape_str(sz)}"
            p = w / f"{name}.onnx"
            info[name] = {}
            if not p.is_file():
                kw = parse_variant(v)
                d = kw.pop("ac_max_drop")
                if d is not None:
                    # The control images exclude the calibration images: on those the quantized model
                    # scores *higher* than FP32 (its ranges were fitted to them), so the loop sees no drop.
                    if args.ac_split == "val-a":  # first half of val; the report's "val B" column is the other half
                        ctrl = dataset_images(data, "val")[:len(dataset_images(data, "val")) // 2]
                    else:
                        ctrl = dataset_images(data, args.ac_split)[kw["n"] if args.ac_split == "train" else 0:]
                    kw["accuracy_control"] = AccuracyControl(ctrl, max_drop=d, max_iterations=args.ac_iterations,
                                                             ranking_subset=args.ac_ranking)
                t = time.time()
                quantize_int8_nncf(files[f"fp32-{shape_str(sz)}"], p, dataset_images(data, "train", limit=kw.pop("n")), sz, info=info[name], **kw)
                info[name]["quantize_s"] = round(time.time() - t, 1)
                (w / f"{name}.info.json").write_text(json.dumps(info[name], indent=1, default=str))
                log(f"NNCF {name} made in {info[name]['quantize_s']} s")
            elif (w / f"{name}.info.json").is_file():
                info[name] = json.loads((w / f"{name}.info.json").read_text())
            files[name], size_of[name] = p, sz

    # ---------------------------------------------------------------- latency (one interleaved run)
    stats: dict[tuple[str, str, str], dict] = {}
    ctx = device_context()
    load_before = load_after = loadavg()
    lat_s = 0.0
    if not args.no_latency:
        ref = f"fp32-{base}"
        configs = [(ref, "ort", "fp32"), (ref, "openvino", "bf16")] + ([] if args.no_ov_fp32 else [(ref, "openvino", "fp32")])
        if args.size_bf16:
            configs += [(f"fp32-{shape_str(sz)}", "openvino", "bf16") for sz in sizes[1:]]
        int8 = ([] if args.no_qdq else [f"qdq-ort-{base}"])
        int8 += [f"nncf-{v.split('@')[0]}-{shape_str(sz)}" for sz in sizes for v in args.latency_variants.split(",") if v and at(v, sz)]
        configs += [(f, b, "int8") for f in int8 for b in args.int8_backends.split(",") if b]
        sessions = []
        for f, b, prec in configs:
            s = load_session(files[f], b, prec, args.threads)
            sessions.append({"file": f, "backend": b, "precision": prec, "s": s, "lat": [],
                             "inference_precision": s.info().get("inference_precision")})
        # Real letterboxed val images (the quantized activations' range is only realistic on real images),
        # one input set per size.
        val_dir = Path(dataset_images(data, "val", limit=1)[0]).parent
        xs = {sz: image_inputs(val_dir, (1, 3, *hw(sz)), limit=8) for sz in sizes}
        load_before = loadavg()
        t0 = time.time()
        for r in range(args.rounds):
            k = r % len(sessions)
            for c in sessions[k:] + sessions[:k]:
                c["lat"] += [v / 1e6 for v in measure(c["s"].run, xs[size_of[c["file"]]], args.warmup, args.runs, None)]
            log(f"latency round {r + 1}/{args.rounds} (loadavg {loadavg()})")
        lat_s = time.time() - t0
        load_after = loadavg()
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
    maps3: dict[tuple[str, str], dict] = {}
    data3 = w / "data-val-b.yaml"
    if args.ac_split == "val-a":
        import yaml

        cfg = yaml.safe_load(Path(data).read_text())
        vals = dataset_images(data, "val")
        (w / "val-b.txt").write_text("\n".join(str(p) for p in vals[len(vals) // 2:]) + "\n")
        cfg["val"] = str(w / "val-b.txt")
        data3.write_text(yaml.safe_dump(cfg))
    if not args.no_val:
        todo = [(f"fp32-{base}", "ort"), (f"fp32-{base}", "openvino")]
        todo += [(f"fp32-{shape_str(sz)}", "ort") for sz in sizes[1:]]
        if not args.no_qdq:
            todo += [(f"qdq-ort-{base}", "ort"), (f"qdq-ort-{base}", "openvino")]
        todo += [(f"nncf-{v.split('@')[0]}-{shape_str(sz)}", "openvino") for sz in sizes for v in variants if at(v, sz)]
        todo += [(f"nncf-{v.split('@')[0]}-{shape_str(sz)}", "ort") for sz in sizes for v in args.val_ort.split(",")
                 if v and v in variants and at(v, sz)]
        for f, b in todo:
            t = time.time()
            sz = size_of[f]
            maps[(f, b)] = validate_openvino(files[f], data, sz) if b == "openvino" else _val(files[f], data, sz)
            log(f"mAP {f} on {b}: {maps[(f, b)]['map50_95']:.4f} ({time.time() - t:.0f} s, loadavg {loadavg()})")
            if args.second_split:
                maps2[(f, b)] = validate_openvino(files[f], data2, sz) if b == "openvino" else _val(files[f], data2, sz)
                log(f"  train split: {maps2[(f, b)]['map50_95']:.4f}")
            if args.ac_split == "val-a":
                maps3[(f, b)] = validate_openvino(files[f], data3, sz) if b == "openvino" else _val(files[f], data3, sz)
                log(f"  val B: {maps3[(f, b)]['map50_95']:.4f}")

    # ---------------------------------------------------------------- report
    print(f"model {args.model.name}, sizes {sizes} (reference {base}), {args.threads} threads, {ctx['cpu_model']}, flags {ctx['cpu_flags']}; "
          f"latency {args.rounds} rounds x {args.runs} runs (+{args.warmup} warm-up) per config, {lat_s:.0f} s, "
          f"loadavg before {load_before} / after {load_after}\n")
    fp32_map = maps.get((f"fp32-{base}", "ort"), {}).get("map50_95")
    if stats:
        ref_ov = stats[(f"fp32-{base}", "openvino", "bf16")]["p50_ms"]
        ref_ort = stats[(f"fp32-{base}", "ort", "fp32")]["p50_ms"]
        print(f"| file | backend | precision (OV exec) | p50 ms | p50 95% CI | p90 ms | vs OV bf16@{base} | vs ORT fp32@{base} | mAP50-95 (this backend) | loss vs FP32@{base} (pts) |")
        print("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
        for (f, b, prec), s in stats.items():
            # OpenVINO validation runs the file at OpenVINO's default precision (bf16 here): not the fp32 row
            m = None if (b, prec) == ("openvino", "fp32") else maps.get((f, b), {}).get("map50_95")
            ci = "–".join("?" if c is None else f"{c:.1f}" for c in (s["p50_ci_ms"] or (None, None)))
            print(f"| {f} | {b} | {prec} ({s['inference_precision'] or '-'}) | {s['p50_ms']:.1f} | {ci} | "
                  f"{s['p90_ms']:.1f} | {ref_ov / s['p50_ms']:.2f}x | {ref_ort / s['p50_ms']:.2f}x | "
                  f"{'-' if m is None else f'{m:.4f}'} | {'-' if m is None or fp32_map is None else f'{(fp32_map - m) * 100:+.2f}'} |")
    if maps:
        ref2 = maps2.get((f"fp32-{base}", "ort"), {}).get("map50_95")
        ref3 = maps3.get((f"fp32-{base}", "ort"), {}).get("map50_95")
        print(f"\n| file | backend | mAP50-95 val | mAP50 val | loss vs FP32 ORT@{base}, val (pts) | mAP50-95 train split | loss, train split (pts) "
              f"| mAP50-95 val B | loss, val B (pts) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for (f, b), m in maps.items():
            m2 = maps2.get((f, b), {}).get("map50_95")
            m3 = maps3.get((f, b), {}).get("map50_95")
            tr = "- | -" if m2 is None or ref2 is None else f"{m2:.4f} | {(ref2 - m2) * 100:+.2f}"
            vb = "- | -" if m3 is None or ref3 is None else f"{m3:.4f} | {(ref3 - m3) * 100:+.2f}"
            print(f"| {f} | {b} | {m['map50_95']:.4f} | {m['map50']:.4f} | {(fp32_map - m['map50_95']) * 100:+.2f} | {tr} | {vb} |")
    for name, i in info.items():
        if i.get("accuracy_control"):
            print(f"\n{name}: accuracy control {json.dumps(i['accuracy_control'], default=str)}")
    if args.json:
        args.json.write_text(json.dumps({
            "sizes": sizes,
            "latency": [{"file": f, "backend": b, "precision": p, **s} for (f, b, p), s in stats.items()],
            "map": [{"file": f, "backend": b, **m} for (f, b), m in maps.items()],
            "map_train_split": [{"file": f, "backend": b, **m} for (f, b), m in maps2.items()], "info": info,
            "map_val_b": [{"file": f, "backend": b, **m} for (f, b), m in maps3.items()],
            "loadavg": [load_before, load_after], "cpu": ctx["cpu_model"], "flags": ctx["cpu_flags"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
