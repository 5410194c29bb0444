"""Backends × precisions on one model, measured by the product (``agent.backends`` + ``agent.profiler``).

Every configuration is loaded once, then measured in interleaved rounds (the order rotates each
round) so that load drift on a shared machine hits all of them alike; statistics are pooled per
configuration. Rows: ORT fp32, ORT int8 (a static QDQ file), OpenVINO fp32 / bf16 (where the CPU
has AVX512_BF16/AMX) / int8 (the same QDQ file), and a third-party dynamically quantized file on
both backends.

    /work/venv-host/bin/python bench/backends.py --onnx bench/out/yolov8n-coco.onnx \
        [--int8 qdq.onnx | --calib DIR [--int8-out bench/out/yolov8n-coco-int8.onnx]] \
        [--third-party ../shared/models/yolov8n_int8.onnx] [--threads 2] [--rounds 4] [--runs 20] [--warmup 5]

``--calib DIR`` makes the QDQ file here with ONNX Runtime's ``quantize_static`` (MinMax, per-tensor,
U8 activations / S8 weights by default; ``--activation s8`` for S8S8) from the first ``--calib-n``
images, preprocessed like Ultralytics. That is a quick stand-in for ``deploy.quantize`` (no
accuracy gate): latency only. On the AVX512-VNNI EPYC of the team machine, ORT ran S8S8 QDQ
1.6x *slower* than fp32 and U8S8 2x faster (bench/results/backends.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))


def make_qdq(onnx: Path, calib: Path, n: int, out: Path, activation: str = "u8") -> Path:
    import cv2
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from prune_pack.agent.backends import load_session
    from prune_pack.agent.detect import preprocess

    s = load_session(onnx)
    files = sorted(p for p in calib.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if not files:
        raise SystemExit(f"no images in {calib}")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(files)

        def get_next(self):
            f = next(self.it, None)
            return None if f is None else {s.input_name: preprocess(cv2.imread(str(f)), s.input_shape)[0]}

    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="fp32 ONNX export")
    ap.add_argument("--int8", type=Path, help="static QDQ INT8 version of --onnx")
    ap.add_argument("--calib", type=Path, help="images to build the QDQ file here when --int8 is not given")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--activation", choices=["u8", "s8"], default="u8", help="activation type of the QDQ file made with --calib")
    ap.add_argument("--int8-out", type=Path, default=REPO / "bench" / "out" / "int8-qdq.onnx")
    ap.add_argument("--third-party", type=Path, default=SHARED / "models" / "yolov8n_int8.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runs", type=int, default=20, help="measured runs per configuration per round")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up runs per configuration per round (excluded)")
    args = ap.parse_args()

    from prune_pack.agent import backends as be
    from prune_pack.agent.manifest import sha256_file
    from prune_pack.agent.profiler import device_context, latency_stats, measure, random_input

    int8 = args.int8
    if int8 is None and args.calib:
        t = time.time()
        int8 = make_qdq(args.onnx, args.calib, args.calib_n, args.int8_out, args.activation)
        print(f"made {int8} in {time.time() - t:.0f} s", file=sys.stderr)
    files = [("fp32 export", args.onnx)]
    if int8:
        files.append(("static QDQ", int8))
    if args.third_party and args.third_party.exists():
        files.append(("third-party dynamic int8", args.third_party))

    configs = []
    for label, path in files:
        fprec = be.model_precision(path)
        for backend in be.available_backends():
            for prec in be.runnable_precisions(backend, fprec):
                t = time.time()
                try:
                    s = be.load_session(path, backend, prec, args.threads)
                except Exception as e:  # noqa: BLE001 - a bench reports what does not run and goes on
                    print(f"skip {label} {backend}/{prec}: {e}", file=sys.stderr)
                    continue
                configs.append({"file": label, "path": str(path), "backend": backend, "precision": prec, "session": s,
                                "load_s": round(time.time() - t, 2), "x": random_input(s.input_shape, s.input_dtype), "lat": []})
    t_start = time.time()
    for r in range(args.rounds):
        k = r % len(configs)
        for c in configs[k:] + configs[:k]:
            c["lat"] += [v / 1e6 for v in measure(c["session"].run, [c["x"]], args.warmup, args.runs, None)]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    ctx = device_context()
    rows = []
    for c in configs:
        s = latency_stats(c["lat"])
        info = c["session"].info()
        rows.append({"file": c["file"], "backend": c["backend"], "precision": c["precision"],
                     "inference_precision": info.get("inference_precision"), "p50_ms": s["p50_ms"],
                     "p50_ci_ms": s["p50_ci_ms"], "p90_ms": s["p90_ms"], "mean_ms": s["mean_ms"], "runs": len(c["lat"]),
                     "load_s": c["load_s"], "sha256": sha256_file(c["path"])[:12]})
    print(f"model {args.onnx.name}, input {list(configs[0]['session'].input_shape)}, {args.threads} threads, "
          f"{ctx['cpu_model']}, flags {ctx['cpu_flags']}, loadavg after {ctx['loadavg']}, {time.time() - t_start:.0f} s\n")
    print("| file | backend | precision | OV exec precision | p50 ms | p50 95% CI | p90 ms | mean ms | runs |")
    print("|---|---|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        ci = r["p50_ci_ms"]
        print(f"| {r['file']} | {r['backend']} | {r['precision']} | {r['inference_precision'] or '-'} | {r['p50_ms']:.1f} | "
              f"{ci[0]:.1f}–{ci[1]:.1f} | {r['p90_ms']:.1f} | {r['mean_ms']:.1f} | {r['runs']} |")
    print(json.dumps({"threads": args.threads, "rounds": args.rounds, "cpu": ctx["cpu_model"], "flags": ctx["cpu_flags"],
                      "loadavg": ctx["loadavg"], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
