"""The build's reports: ``report.json`` (machine-readable, everything measured) and ``report.md``
(human: what met the target, at what accuracy cost, with a latency-vs-ratio plot)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from prune_pack.imgsz import hw, shape_str


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_latency(report: dict[str, Any], path: str | Path) -> Optional[Path]:
    """Latency vs prune ratio: measured candidates (pass/fail, per runtime/precision family),
    their confidence intervals, the target line and the verified shipped model."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a build server; never pick an interactive backend
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pct = report["percentile"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    fams: dict[str, list[dict]] = {}
    for c in report.get("candidates", []):
        if c.get("latency_ms") is None:
            continue
        fams.setdefault(f"{c['backend']} {c['precision']} @{shape_str(c['imgsz'])}", []).append(c)
    markers = ["o", "s", "^", "D", "v"]
    for i, (fam, cs) in enumerate(sorted(fams.items())):
        cs = sorted(cs, key=lambda c: c["ratio"])
        xs = [c.get("achieved_ratio") if c.get("achieved_ratio") is not None else c["ratio"] for c in cs]
        ys = [c["latency_ms"] for c in cs]
        ax.plot(xs, ys, "-", color=f"C{i}", alpha=0.4)
        for x, c in zip(xs, cs):
            lo, hi = (c.get("ci_ms") or [None, None])[:2]
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                ax.plot([x, x], [lo, hi], "-", color=f"C{i}", lw=1)
            ok = c.get("decision") == "pass"
            ax.plot([x], [c["latency_ms"]], markers[i % len(markers)], color=f"C{i}",
                    mfc=f"C{i}" if ok else "white", ms=7)
        ax.plot([], [], markers[i % len(markers)], color=f"C{i}", label=f"{fam} (filled = meets target)")
    target = report["target_ms"]
    ax.axhline(target, color="red", ls="--", lw=1.2, label=f"target {target:g} ms ({pct})")
    v = report.get("verification") or {}
    if report.get("achieved_ms") is not None:
        x = report.get("achieved_ratio") if report.get("achieved_ratio") is not None else (report.get("chosen") or {}).get("ratio", 0)
        ax.plot([x], [report["achieved_ms"]], "*", color="black", ms=14,
                label=f"shipped (fine-tuned) {report['achieved_ms']:.1f} ms" + (f", {v.get('steps')} step" if v.get("steps") else ""))
    ax.set_xlabel("channels removed (achieved ratio)")
    ax.set_ylabel(f"{pct} latency on the device (ms)")
    ax.set_title(f"Latency vs pruning ({report.get('threads')} threads, {_wxh(report.get('imgsz', 640))})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _wxh(imgsz: Any) -> str:
    h, w = hw(imgsz)
    return f"{w}x{h}"


def write_markdown(report: dict[str, Any], path: str | Path, plot_name: Optional[str]) -> Path:
    pct = report["percentile"]
    before, after = report.get("accuracy_before") or {}, report.get("accuracy_after") or {}
    lines = [
        f"# prune-pack build: {report.get('model_name', 'model')}",
        "",
        f"**Target** {report.get('target', '')} = {report['target_ms']:.1f} ms at {pct} ({report.get('threads')} threads, {_wxh(report.get('imgsz', 640))}, "
        f"{report.get('backend')} {report.get('precision')}, device `{report.get('device')}`)  ",
        f"**Achieved** {_fmt(report.get('achieved_ms'), 2)} ms (the package verified on the device"
        f"{' after fine-tuning' if (report.get('chosen') or {}).get('ratio') else ''}; "
        f"unpruned {_fmt(report.get('baseline_ms'), 2)} ms)  ",
        f"**Lever** {report.get('lever')} — {report.get('reason', '')}  ",
        f"**Prune ratio** requested {_fmt((report.get('chosen') or {}).get('ratio'), 2)}, achieved {_fmt(report.get('achieved_ratio'), 3)}  ",
        f"**Device measurements** {report.get('measurements')} (search {report.get('search_measurements')}, "
        f"verification {report.get('verify_measurements')}; verification steps {(report.get('verification') or {}).get('steps', 0)})  ",
        f"**Accuracy floor** {_fmt(report.get('max_map_drop', 0) * 100, 1)} points mAP50-95 below the unpruned model "
        f"(`--max-map-drop`)  ",
        f"**Frames of the deployment scene** {_frames_line(report.get('frames') or {})}  ",
        f"**Package** `{Path(str(report.get('package', ''))).name}`",
        "",
    ]
    if plot_name:
        lines += [f"![latency vs prune ratio]({plot_name})", ""]
    lines += ["## Accuracy", "", "| | before | after | change |", "|---|---|---|---|"]
    for k, label in (("map50_95", "mAP50-95"), ("map50", "mAP50")):
        b, a = before.get(k), after.get(k)
        d = (a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {_fmt(d)} |")
    pb, pa = before.get("per_class") or {}, after.get("per_class") or {}
    if pb or pa:
        lines += ["", "Per class (mAP50-95):", "", "| class | before | after |", "|---|---|---|"]
        for name in list(pb) + [n for n in pa if n not in pb]:
            lines.append(f"| {name} | {_fmt(pb.get(name))} | {_fmt(pa.get(name))} |")
    lines += ["", "## Model", "", "| | before | after |", "|---|---|---|",
              f"| parameters | {_fmt(report.get('params_before'))} | {_fmt(report.get('params_after'))} |",
              f"| GFLOPs | {_fmt(report.get('gflops_before'), 2)} | {_fmt(report.get('gflops_after'), 2)} |"]
    costs = report.get("lever_costs") or []
    if costs:
        lines += ["", "## What each lever cost", "", "| lever | candidate | latency (ms) | mAP50-95 cost |", "|---|---|---|---|"]
        for c in costs:
            lines.append(f"| {c['lever']} | {c['key']} | {_fmt(c.get('latency_ms'), 2)} | {_fmt(c.get('map_cost'))} |")
    lines += ["", f"## Candidates measured ({pct}, ms; CI = 95 % confidence interval of the percentile)", "",
              "| candidate | ratio | achieved | latency | CI | decision | note |", "|---|---|---|---|---|---|---|"]
    for c in report.get("candidates", []):
        ci = c.get("ci_ms") or [None, None]
        note = f"same widths as {c['same_as']}" if c.get("same_as") else (f"{len(c.get('measurements', []))} measurement(s)")
        if c.get("gate") is False:
            note += "; refused by the accuracy gate"
        lines.append(f"| {c['key']} | {_fmt(c['ratio'], 2)} | {_fmt(c.get('achieved_ratio'), 3)} | {_fmt(c.get('latency_ms'), 2)} | "
                     f"{_fmt(ci[0], 1)}–{_fmt(ci[1], 1)} | {c.get('decision')} | {note} |")
    for v in (report.get("verification") or {}).get("records", []):
        lines.append(f"| final {v['key']} | {_fmt(v['ratio'], 2)} | | {_fmt(v.get('latency_ms'), 2)} | | {v['decision']} | "
                     f"{'short recovery' if v.get('short_recovery') else 'fine-tuned'} |")
    lines += ["", "## Time per phase (s)", "", "| phase | seconds |", "|---|---|"]
    for k, v in (report.get("phases_s") or {}).items():
        lines.append(f"| {k} | {v:.1f} |")
    ctx = report.get("device_context") or {}
    if ctx:
        shown = ", ".join(f"{k}={v}" for k, v in ctx.items() if isinstance(v, (str, int, float, list)) and v is not None)
        lines += ["", "Device (the shipped package's verification): " + shown[:600]]
    path = Path(path)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _frames_line(frames: dict[str, Any]) -> str:
    if not frames.get("folder"):
        return "none (`--unlabeled DIR`: recovery on the cameras' own frames)"
    return (f"`{frames['folder']}`: {frames.get('pruning_calibration', 0)} for pruning calibration, "
            f"{frames.get('distillation', 0)} for distillation, {frames.get('int8_calibration', 0)} for INT8 calibration")


def write_reports(report: dict[str, Any], out_dir: str | Path) -> dict[str, Optional[Path]]:
    """report.json, latency.png and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    png = plot_latency(report, out_dir / "latency.png")
    md = write_markdown(report, out_dir / "report.md", png.name if png else None)
    js = write_json(report, out_dir / "report.json")
    return {"json": js, "markdown": md, "plot": png}


def assemble_report(opts: Any, pipe: Any, res: Any, ver: Any, levers: Sequence[Any], before: dict,
                    t_start: float) -> dict[str, Any]:
    """report.json's content: the search, the verification, accuracy before/after, what each lever cost."""
    from prune_pack.deploy.search import lever_name, point_estimate, Measurement

    chosen = ver.candidate
    st = pipe.work.state
    pct = opts.percentile
    final_stats = st.search.measurements.get(f"final-{chosen.key}", [])
    achieved_ms = point_estimate([Measurement(s) for s in final_stats], pct)  # what the decision used
    pkg_info = st.packages[chosen.key]
    after = pkg_info.get("after") or {}
    _, pinfo = pipe.pruned(chosen.ratio)
    cands = []
    for k in res.order:
        d = res.records[k].to_dict(pct)
        d["achieved_ratio"] = pipe.pruned(d["ratio"])[1].get("achieved_ratio") if d["ratio"] else 0.0
        cands.append(d)
    lever = lever_name(levers[0], chosen)
    metrics = pkg_info.get("metrics") or {}
    # What each lever cost: precision levers from their accuracy gate, pruning from the recovered result.
    costs = []
    for lv in levers[1:]:
        r = res.records.get(lv.key)
        if lv == chosen or r is None or not r.measurements:
            continue  # the chosen one: its row below, from the package and its verification
        q = pipe.val_cache.get(lv.key)
        costs.append({"lever": lever_name(levers[0], lv), "key": lv.key, "latency_ms": r.point(pct),
                      "map_cost": (before.get("map50_95", 0) - q["map50_95"]) if q else None, "gate": r.gate})
    for key, info in st.packages.items():  # recovered and packaged, then not shipped: a cheaper lever was
        r, got = res.records.get(key), (info.get("after") or {}).get("map50_95")
        if key != chosen.key and r is not None and isinstance(got, (int, float)):
            costs.append({"lever": lever_name(levers[0], r.candidate) + " (recovered, not shipped)", "key": key,
                          "latency_ms": r.point(pct), "map_cost": before.get("map50_95", 0) - got, "gate": False})
    if isinstance(after.get("map50_95"), (int, float)) and isinstance(before.get("map50_95"), (int, float)):
        costs.append({"lever": lever, "key": chosen.key, "latency_ms": achieved_ms,
                      "map_cost": before["map50_95"] - after["map50_95"], "gate": True})
    last = final_stats[-1] if final_stats else {}
    rec = next((v for k, v in st.recovered.items() if k.startswith(f"r{chosen.ratio:.3f}")), {}) if chosen.ratio else {}
    # How many of the deployment's own frames (--unlabeled) fed which step.
    frames = {"folder": opts.unlabeled,
              "pruning_calibration": (pinfo.get("frames") or {}).get("calibration", 0) if chosen.ratio else 0,
              "distillation": (rec.get("frames") or {}).get("distillation", 0),
              "int8_calibration": (pkg_info.get("frames") or {}).get("int8_calibration", 0)}
    context = {"backend": chosen.backend, "precision": chosen.precision,
               **{k: last.get(k) for k in ("threads", "runs")}, **(last.get("context") or {})}
    return {
        "model": str(pipe.model_pt), "model_name": Path(pipe.model_pt).stem, "data": str(pipe.data_src),
        "target": str(opts.target), "target_ms": res.target_ms, "percentile": pct, "imgsz": chosen.imgsz,
        "threads": opts.threads, "backend": chosen.backend, "precision": chosen.precision, "device": opts.device,
        "max_map_drop": opts.max_map_drop, "lever": lever, "reason": res.reason, "chosen": chosen.to_dict(),
        "achieved_ratio": pinfo.get("achieved_ratio", 0.0) if chosen.ratio > 0 else 0.0,
        "achieved_ms": achieved_ms, "baseline_ms": res.baseline_ms,
        "measurements": res.measurements_used + ver.measurements_used,
        "search_measurements": res.measurements_used, "verify_measurements": ver.measurements_used,
        "max_measurements": opts.max_measurements, "candidates": cands,
        "verification": {"steps": ver.steps, "decision": ver.decision, "records": ver.records},
        "accuracy_before": before, "accuracy_after": after,
        "map50_95_before": before.get("map50_95"), "map50_95_after": after.get("map50_95"),
        "map50_before": before.get("map50"), "map50_after": after.get("map50"),
        "params_before": pinfo.get("params_before") or metrics.get("params"), "params_after": metrics.get("params"),
        "gflops_before": pinfo.get("gflops_before") or metrics.get("gflops"), "gflops_after": metrics.get("gflops"),
        "widths": pinfo.get("widths"), "lever_costs": costs, "finetune": dict(st.recovered),
        "package_info": {k: pkg_info.get(k) for k in ("name", "version", "precision", "signed", "validated", "parity")},
        "package_path": pkg_info["out"], "package": str(pipe.work.out / Path(pkg_info["out"]).name),
        "key": str(pipe.key_path), "phases_s": dict(st.phases_s), "total_s": round(time.monotonic() - t_start, 1),
        "device_context": context, "frames": frames,
    }


def build_result(opts: Any, report: dict[str, Any], out: Path, t_start: float) -> dict[str, Any]:
    """The CLI's answer: the numbers a script needs, and a summary with the commands to check the package."""
    pct, achieved, base = report["percentile"], report["achieved_ms"], report["baseline_ms"]
    chosen = report["chosen"]
    pkg = report["package"]
    pub = str(Path(report["key"]).with_suffix(".pub"))
    result = {
        "target": report["target"], "target_ms": report["target_ms"], "percentile": pct,
        "achieved_ms": round(achieved, 3), "baseline_ms": round(base, 3) if base is not None else None,
        "measurements": report["measurements"], "ratio": chosen["ratio"], "achieved_ratio": report["achieved_ratio"],
        "lever": report["lever"], "backend": chosen["backend"], "precision": chosen["precision"], "imgsz": chosen["imgsz"],
        "map50_95_before": report["map50_95_before"], "map50_95_after": report["map50_95_after"],
        "map50_before": report["map50_before"], "map50_after": report["map50_after"],
        "max_map_drop": report["max_map_drop"], "frames": report["frames"], "verification_steps": report["verification"]["steps"],
        "package": pkg, "report": str(out / "report.md"), "seconds": round(time.monotonic() - t_start, 1),
        "profile_command": f"prune-pack profile {pkg} --backend {chosen['backend']} --precision {chosen['precision']}",
        "verify_command": f"prune-pack verify {pkg} --pubkey {pub}",
    }
    result["summary"] = (
        # A pass decided by a confidence interval may have its point estimate just above the target.
        f"{pct} {achieved:.1f} ms {'<=' if achieved <= report['target_ms'] else 'at'} target {report['target']} "
        f"({report['target_ms']:.1f} ms; unpruned {base:.1f} ms) via {report['lever']} (ratio {chosen['ratio']:.2f}, "
        f"{chosen['backend']}/{chosen['precision']}); mAP50-95 {_fmt(report['map50_95_before'])} -> "
        f"{_fmt(report['map50_95_after'])} (floor {report['max_map_drop'] * 100:g} points); {report['measurements']} "
        f"device measurements; wrote {pkg} and {result['report']}\n"
        f"  profile it: {result['profile_command']}\n  verify it:  {result['verify_command']}")
    return result
