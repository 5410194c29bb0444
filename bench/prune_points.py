"""One pruning point at a time (prune + validate), and an interleaved latency run over saved points.

    python bench/prune_points.py prune --ratio 0.075 [--calib-images 128] [--kwargs '{"round_to": 16}'] \
        [--out /tmp/points] [--imgsz 640]        # -> one JSON line: GFLOPs, mAP50-95 at imgsz, seconds
    python bench/prune_points.py time A.pt B.pt ... [--rounds 12] [--runs 15]
        # -> per model: ORT p50 and speedup vs the FIRST model, all measured in one interleaved run

``prune`` calls ``prune_model`` with its defaults plus ``--kwargs`` (any of its keyword arguments), on
coco128 with ``../shared/models/yolov8n-coco.pt`` unless ``--model``/``--data`` say otherwise. Used for
run 4 of bench/results/pruning.md.
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


def cmd_prune(a: argparse.Namespace) -> dict:
    from ultralytics import YOLO

    from prune_pack.pruning.checkpoint import save_pruned
    from prune_pack.pruning.prune import prune_model
    from prune_pack.pruning.sources import resolve_dataset

    kw = json.loads(a.kwargs)
    t = time.monotonic()
    yolo, info = prune_model(a.model, a.ratio, data_yaml=a.data, imgsz=a.imgsz, calib_images=a.calib_images, progress=False, **kw)
    seconds = time.monotonic() - t
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    pt = a.out / f"r{a.ratio}-n{a.calib_images}{'-' + tag if tag else ''}.pt"
    save_pruned(yolo, pt, info)
    with tempfile.TemporaryDirectory() as td:
        m = YOLO(str(pt)).val(data=str(resolve_dataset(a.data, td)), imgsz=a.imgsz, batch=16, plots=False, verbose=False,
                              device="cpu", workers=0, project=td, name="v")
    return {"pt": str(pt), "ratio": a.ratio, "calib_images": a.calib_images, "kwargs": kw, "gflops": info["gflops_after"],
            "achieved_ratio": info["achieved_ratio"], "bn_recalibrated": info["bn_recalibrated"],
            "map50_95": round(float(m.box.map), 4), "prune_s": round(seconds, 1)}


def cmd_time(a: argparse.Namespace) -> list[dict]:
    from bench.pruning import export_onnx, interleaved_p50

    work = Path(tempfile.mkdtemp(prefix="pp-points-"))
    onnx = [export_onnx(Path(p), a.imgsz, work) for p in a.models]
    p50 = interleaved_p50(onnx, a.imgsz, a.threads, a.rounds, a.runs)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [{"model": str(p), "p50_ms": round(t, 2), "speedup": round(p50[0] / t, 3), "load": load} for p, t in zip(a.models, p50)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--calib-images", type=int, default=128)
    p.add_argument("--kwargs", default="{}", help="more prune_model keyword arguments, as JSON")
    p.add_argument("--model", default=str(SHARED / "models" / "yolov8n-coco.pt"))
    p.add_argument("--data", default=str(SHARED / "data" / "coco128" / "data.yaml"))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--out", type=Path, default=Path("/tmp/points"))
    t = sub.add_parser("time")
    t.add_argument("models", nargs="+")
    t.add_argument("--imgsz", type=int, default=640)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--rounds", type=int, default=12)
    t.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    out = cmd_prune(a) if a.cmd == "prune" else cmd_time(a)
    for row in out if isinstance(out, list) else [out]:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
