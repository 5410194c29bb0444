"""A package `prune-pack build` made vs what a user gets by hand: OpenVINO at its default precision
(BF16 where the CPU has it) on the unpruned FP32 export. One interleaved run, measured by the
product (``agent.backends.load_session`` + ``agent.profiler.measure``) on real letterboxed images.

    /work/venv-host/bin/python bench/vs_openvino.py --package build/yolov8n-coco-9.5ms.ppk \
        [--model ../shared/models/yolov8n-coco.pt] [--imgsz 640] [--images ../shared/data/coco128/images/val2017] \
        [--rounds 10] [--runs 15] [--warmup 3] [--threads 2] [--pubkey KEY.pub] [--work /tmp/vs-openvino]

Prints one table row per configuration (p50/p95, speedup of the package over OpenVINO on the
unpruned model) and the package's validated mAP50-95 from its manifest beside the FP32 reference.
The package runs on the backend and precision its manifest lists first after FP32 (what the build
chose); the unpruned export also runs on ONNX Runtime FP32 for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import prune_pack.offline  # noqa: E402,F401 - before Ultralytics: never the network
REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "yolov8n-coco.pt")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "coco128" / "images" / "val2017")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pubkey", type=Path, help="public key the package is signed with (default: this user's, as the build uses)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vs-openvino")
    a = ap.parse_args()

    from prune_pack.agent.backends import bf16_supported, load_session
    from prune_pack.agent.keys import default_key_path
    from prune_pack.agent.verifier import verify_package
    from prune_pack.agent.profiler import image_inputs, latency_stats, measure
    from prune_pack.deploy.export import export_onnx

    vp = verify_package(a.package, trusted_keys=[a.pubkey or default_key_path().with_suffix(".pub")])
    man = vp.manifest
    chosen = next((v for v in man.get("validated", []) if v["precision"] != "fp32"), man["validated"][0])
    a.work.mkdir(parents=True, exist_ok=True)
    ref_onnx = a.work / f"{a.model.stem}-{a.imgsz}.onnx"
    if not ref_onnx.is_file():
        export_onnx(a.model, ref_onnx, imgsz=a.imgsz)
    configs = [("unpruned FP32 export", ref_onnx, "openvino", "bf16" if bf16_supported() else "fp32"),
               ("unpruned FP32 export", ref_onnx, "ort", "fp32"),
               (a.package.name, vp.model_path, chosen["backend"], chosen["precision"])]
    sessions = []
    for label, path, backend, prec in configs:
        s = load_session(path, backend, prec, a.threads)
        exec_prec = s.info().get("inference_precision")
        sessions.append({"label": label, "backend": backend, "precision": f"{prec}" + (f" (OpenVINO runs {exec_prec})" if exec_prec else ""),
                         "s": s, "x": image_inputs(a.images, s.input_shape, limit=8), "lat": [],
                         "shape": "x".join(map(str, s.input_shape[-2:][::-1]))})
    load = os.getloadavg()
    t0 = time.time()
    for r in range(a.rounds):
        k = r % len(sessions)
        for c in sessions[k:] + sessions[:k]:
            c["lat"] += [v / 1e6 for v in measure(c["s"].run, c["x"], a.warmup, a.runs, None)]
    stats = [latency_stats(c["lat"]) for c in sessions]
    ref = stats[0]
    print(f"{a.rounds} rounds x {a.runs} runs per configuration, interleaved, {time.time() - t0:.0f} s, {a.threads} threads, "
          f"loadavg {load[0]:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| model | input (w x h) | backend | precision | p50 ms | p95 ms | p50 vs OpenVINO unpruned | p95 vs OpenVINO unpruned |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for c, s in zip(sessions, stats):
        print(f"| {c['label']} | {c['shape']} | {c['backend']} | {c['precision']} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | "
              f"{ref['p50_ms'] / s['p50_ms']:.2f}x | {ref['p95_ms'] / s['p95_ms']:.2f}x |")
    fp32 = next((v for v in man["validated"] if v["precision"] == "fp32"), None)
    print(f"\npackage {man['name']} v{man['version']}: validated {json.dumps(man['validated'])}")
    if fp32:
        print(f"mAP50-95 of the chosen configuration: {chosen['map50_95']:.4f} (FP32 of the same file: {fp32['map50_95']:.4f}; "
              f"see the build's report for the FP32 reference at the requested size)")
    vp.discard()
    return 0


if __name__ == "__main__":
    sys.exit(main())
