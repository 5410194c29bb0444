"""Benchmark of ``prune-pack build``: targets at 0.9x, 0.75x and 0.6x of the unpruned model's p95,
measured in the same run, on the local profiler (the device is this machine).

Reports per target: device measurements used, achieved/target, mAP50-95 before/after, minutes per
phase, and the goals: target met; no needless pruning (no measured candidate with less pruning
also met the target); <= 8 device measurements; one full fine-tune.

    /work/venv-host/bin/python bench/build.py --imgsz 320 --epochs 1 --allocation uniform

Writes bench/results/build.md (+ build.json) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import prune_pack.offline  # noqa: E402,F401 - before Ultralytics: never the network

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PRUNE_PACK_SHARED", REPO.parent / "shared"))


def _machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    la = os.getloadavg()
    return (f"{cpu}, {psutil.cpu_count(logical=True)} logical cores, load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} "
            f"at start, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "yolov8n-coco.pt"))
    ap.add_argument("--data", default=str(SHARED / "data" / "coco128" / "data.yaml"))
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the train split per fine-tuning epoch")
    ap.add_argument("--allocation", choices=["uniform", "sensitivity"], default="uniform")
    ap.add_argument("--factors", default="0.9,0.75,0.6")
    ap.add_argument("--runs", type=int, default=100, help="profile runs per device measurement")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "build.md"))
    a = ap.parse_args(argv)

    from prune_pack.agent.profiler import profile_model
    from prune_pack.config import parse_config
    from prune_pack.deploy.build import BuildOptions, run_build
    from prune_pack.deploy.export import export_onnx

    if not Path(a.model).is_file() or not Path(a.data).is_file():
        print(f"bench/build.py: needs {a.model} and {a.data}", file=sys.stderr)
        return 2
    machine = _machine()
    cfg = parse_config(json.dumps({"prune": {"allocation": a.allocation}, "profile": {"runs": a.runs, "warmup": 10}}))
    work = Path(tempfile.mkdtemp(prefix="pp-bench-build-"))
    t0 = time.monotonic()
    try:
        onnx = export_onnx(a.model, work / "unpruned.onnx", imgsz=a.imgsz)

        def reference() -> float:
            # The load of a shared machine drifts over minutes: measure the unpruned p95 right before
            # each build (median of three short measurements), so each target is a true factor.
            vals = sorted(float(profile_model(str(onnx), threads=a.threads, warmup=5, runs=a.runs)["p95_ms"]) for _ in range(3))
            return vals[1]

        rows = []
        refs = []
        for f in [float(x) for x in a.factors.split(",")]:
            base_p95 = reference()
            refs.append(base_p95)
            print(f"bench: unpruned p95 {base_p95:.2f} ms at {a.imgsz}, {a.threads} threads", file=sys.stderr)
            target = round(base_p95 * f, 2)
            out = work / f"build-{f}"
            opts = BuildOptions(target_ms=target, out=out, model=a.model, data=a.data, percentile="p95", imgsz=a.imgsz,
                                threads=a.threads, epochs=a.epochs, finetune_fraction=a.fraction, cfg=cfg,
                                sign=None)
            t1 = time.monotonic()
            try:
                run_build(opts)
                rep = json.loads((out / "report.json").read_text())
                err = None
            except Exception as e:  # noqa: BLE001 - a failed target is a bench result, not a crash
                rep, err = {}, f"{type(e).__name__}: {e}"
            minutes = (time.monotonic() - t1) / 60
            row = {"factor": f, "target_ms": target, "unpruned_ref_ms": round(base_p95, 2), "error": err, "minutes": round(minutes, 2)}
            if rep:
                passed = [c for c in rep["candidates"] if c["decision"] == "pass" and c["precision"] == rep["precision"]]
                needless = [c["key"] for c in passed if c["ratio"] < rep["chosen"]["ratio"]]
                full_ft = [k for k in rep.get("finetune", {}) if not k.endswith("-short")]
                row.update(
                    achieved_ms=rep["achieved_ms"], achieved_over_target=round(rep["achieved_ms"] / target, 3),
                    baseline_ms=rep["baseline_ms"], ratio=rep["chosen"]["ratio"], achieved_ratio=rep["achieved_ratio"],
                    measurements=rep["measurements"], steps=rep["verification"]["steps"],
                    map50_95_before=rep["map50_95_before"], map50_95_after=rep["map50_95_after"],
                    map50_before=rep["map50_before"], map50_after=rep["map50_after"],
                    gflops_before=rep["gflops_before"], gflops_after=rep["gflops_after"],
                    phases_min={k: round(v / 60, 2) for k, v in rep["phases_s"].items()},
                    met=rep["achieved_ms"] <= target, needless=needless, full_finetunes=len(full_ft),
                    candidates=[(c["key"], c["latency_ms"], c["decision"]) for c in rep["candidates"]])
            rows.append(row)
            print(f"bench: {json.dumps(row)}", file=sys.stderr)
        total_min = (time.monotonic() - t0) / 60
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cmd = "/work/venv-host/bin/python bench/build.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Benchmark: `prune-pack build --target-ms` (latency-targeted search)", "",
        f"Command: `{cmd.strip()}`  ",
        f"Model {Path(a.model).name}, data {a.data} (coco128: val = 128 COCO val2017 images), imgsz {a.imgsz}, "
        f"{a.threads} threads, ORT FP32, p95, {a.runs} runs per measurement, fine-tune {a.epochs} epoch(s) "
        f"(fraction {a.fraction}), allocation {a.allocation}; device = this machine (local profiler).  ",
        f"Machine: {machine}. Shared with other jobs while measuring: latencies are noisy; each target is a "
        f"factor of the unpruned p95 measured in this run right before its build (median of 3 x {a.runs} runs: "
        f"{', '.join(f'{r:.2f}' for r in refs)} ms).  ",
        f"Total {total_min:.1f} min.", "",
        "| target | p95 target (ms) | achieved (ms) | achieved/target | met | ratio (achieved) | device measurements | "
        "verify steps | mAP50-95 before → after | mAP50 before → after | GFLOPs | needless pruning | full fine-tunes | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            md.append(f"| {r['factor']}× | {r['target_ms']} | – | – | no | – | – | – | – | – | – | – | – | {r['minutes']} |")
            continue
        md.append(
            f"| {r['factor']}× | {r['target_ms']} | {r['achieved_ms']:.2f} | {r['achieved_over_target']} | "
            f"{'yes' if r['met'] else 'no'} | {r['ratio']:.2f} ({r['achieved_ratio']:.3f}) | {r['measurements']} | {r['steps']} | "
            f"{r['map50_95_before']:.4f} → {r['map50_95_after']:.4f} | {r['map50_before']:.4f} → {r['map50_after']:.4f} | "
            f"{r['gflops_before']} → {r['gflops_after']} | {', '.join(r['needless']) or 'none'} | {r['full_finetunes']} | {r['minutes']} |")
    md += ["", "Minutes per phase (search includes its prune/export/profile; validate/prune/export/profile also "
           "count work inside other phases):", ""]
    for r in rows:
        if r.get("phases_min"):
            md.append(f"- {r['factor']}×: " + ", ".join(f"{k} {v}" for k, v in r["phases_min"].items()))
    md += ["", "Candidates measured (key, p95 ms, decision):", ""]
    for r in rows:
        if r.get("candidates"):
            md.append(f"- {r['factor']}×: " + "; ".join(f"{k} {v:.1f} {d}" if v is not None else f"{k} – {d}"
                                                        for k, v, d in r["candidates"]))
        if r.get("error"):
            md.append(f"- {r['factor']}×: failed: {r['error'][:400]}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"unpruned_refs_ms": refs, "machine": machine, "rows": rows}, indent=1))
    print(f"bench: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
