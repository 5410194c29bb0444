"""The build's reports: ``report.json`` (machine-readable, everything measured) and ``report.md``
(human: what met the target, at what accuracy cost, with a latency-vs-ratio plot)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from prune_pack.deploy.export import hw, shape_str


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
        f"**Target** {report['target_ms']:g} ms at {pct} ({report.get('threads')} threads, {_wxh(report.get('imgsz', 640))}, "
        f"{report.get('backend')} {report.get('precision')}, device `{report.get('device')}`)  ",
        f"**Achieved** {_fmt(report.get('achieved_ms'), 2)} ms (the package verified on the device"
        f"{' after fine-tuning' if (report.get('chosen') or {}).get('ratio') else ''}; "
        f"unpruned {_fmt(report.get('baseline_ms'), 2)} ms)  ",
        f"**Lever** {report.get('lever')} — {report.get('reason', '')}  ",
        f"**Prune ratio** requested {_fmt((report.get('chosen') or {}).get('ratio'), 2)}, achieved {_fmt(report.get('achieved_ratio'), 3)}  ",
        f"**Device measurements** {report.get('measurements')} (search {report.get('search_measurements')}, "
        f"verification {report.get('verify_measurements')}; verification steps {(report.get('verification') or {}).get('steps', 0)})  ",
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
        lines += ["", "Device: " + ", ".join(f"{k}={v}" for k, v in ctx.items() if isinstance(v, (str, int, float)))[:600]]
    path = Path(path)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_reports(report: dict[str, Any], out_dir: str | Path) -> dict[str, Optional[Path]]:
    """report.json, latency.png and report.md into ``out_dir``."""
    out_dir = Path(out_dir)
    png = plot_latency(report, out_dir / "latency.png")
    md = write_markdown(report, out_dir / "report.md", png.name if png else None)
    js = write_json(report, out_dir / "report.json")
    return {"json": js, "markdown": md, "plot": png}
