"""``prune-pack build``: the most accurate package whose latency *on the device* meets a target.

The loop, one step a function: resolve the model and data -> plan the levers -> ``search`` (pure,
``deploy.search``) over candidates the ``Pipeline`` prunes, exports and profiles -> recover the
chosen one, package it and ``verify`` it on the device -> refuse it when it falls below the accuracy
floor -> report. Work happens in ``OUT/.work`` (``WorkArea``, resumable); the deliverables appear in
OUT only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prune_pack.agent.settings import merged
from prune_pack.deploy.build_state import WorkArea
from prune_pack.imgsz import shape_str
from prune_pack.deploy.levers import camera_shape, plan_levers, ratio_grid, suggestions
from prune_pack.deploy.pipeline import Pipeline, log
from prune_pack.deploy.search import (
    MET, PASS, PERCENTILES, UNDECIDED, Candidate, Judge, SearchResult, Verification, lever_name, search, verify,
)
from prune_pack.deploy.settings import BuildSection, Target, parse_target
from prune_pack.errors import AccuracyFloorError, DeviceTooNoisy, TargetUnreachable, UserInputError


@dataclass
class BuildOptions(BuildSection):
    """The build section (flags merged over the config, see ``cli_build``) plus run-only fields."""

    model: Optional[str] = None  # None (with data None) = the built-in demo
    data: Optional[str] = None
    broker: Optional[str] = None
    sign: Optional[str] = None
    resume: bool = False
    criterion: Optional[str] = None
    finetune_fraction: float = 1.0  # share of the train split per recovery epoch (the demo: half)
    unlabeled: Optional[str] = None  # frames of the deployment scene: calibration, INT8 calibration, distillation
    train_device: Optional[str] = None  # recovery on auto|cpu|cuda[:N]; None = finetune.train_device
    cfg: Any = None  # the validated Config (prune/finetune/export/profile/mqtt/device sections)

    @property
    def target(self) -> Target:
        if self.target_ms is None:
            raise UserInputError("a latency target is needed: --target-ms MS (or a fraction such as 0.7x), "
                                 "or build.target_ms in --config")
        return parse_target(self.target_ms)


def _check(opts: BuildOptions) -> None:
    opts.target  # noqa: B018 - parses, or says what is wrong
    if opts.percentile not in PERCENTILES:
        raise UserInputError(f"--percentile {opts.percentile}: choose from {', '.join(PERCENTILES)}")
    if opts.imgsz < 32 or opts.imgsz % 32:
        raise UserInputError(f"--imgsz {opts.imgsz}: must be a positive multiple of 32")
    if not 0 <= opts.max_map_drop < 1:
        raise UserInputError(f"--max-map-drop {opts.max_map_drop * 100:g}: points of mAP50-95, between 0 and 100")
    if (opts.model is None) != (opts.data is None):
        raise UserInputError("--model and --data go together (the data recovers and validates the model); "
                             "leave both out for the built-in demo")
    if opts.sign and not Path(opts.sign).expanduser().is_file():
        raise UserInputError(f"--sign {opts.sign}: key file not found")
    if opts.device != "local" and not (opts.broker or opts.cfg.mqtt.broker):
        raise UserInputError(f"--device {opts.device}: a remote device needs a broker (--broker URL or mqtt.broker in --config)")


def _resolve(opts: BuildOptions, work: WorkArea) -> Pipeline:
    """The model, the dataset (rewritten into the work area), the signing key; --resume must match."""
    import yaml

    from prune_pack.agent.package import ensure_default_key
    from prune_pack.deploy import demo
    from prune_pack.pruning.sources import resolve_dataset, resolve_model, sha256_file

    with work.phase("resolve"):
        if opts.model is None:
            log("no --model/--data: using the built-in demo model and its synthetic dataset")
            model_pt, data_src = demo.demo_model(), demo.ensure_demo_dataset()
        else:
            model_pt, data_src = resolve_model(opts.model), Path(opts.data or "")
        data_yaml = resolve_dataset(data_src, work.dir / "data")
        names = {int(k): str(v) for k, v in yaml.safe_load(data_yaml.read_text())["names"].items()}
        sha = sha256_file(model_pt)
        fp = {"model_sha256": sha, "data": str(Path(data_src).resolve()), "imgsz": opts.imgsz, "threads": opts.threads,
              "device": opts.device, "max_ratio": opts.max_ratio, "ratio_step": opts.ratio_step,
              "precision": opts.precision, "backend": opts.backend, "target": str(opts.target),
              "unlabeled": str(Path(opts.unlabeled).resolve()) if opts.unlabeled else None}
        if opts.resume and work.state.fingerprint not in (None, fp):
            raise UserInputError(f"--resume: {work.out} holds a build of another model/settings; use another --out")
        work.state.fingerprint, work.state.model_sha256 = fp, sha
        if opts.sign:
            key_path = Path(opts.sign).expanduser().resolve()
        else:
            key_path, created = ensure_default_key()
            if created:
                log(f"created your signing key {key_path} (devices must trust {key_path.with_suffix('.pub')})")
    return Pipeline(opts, work, model_pt, data_src, data_yaml, key_path, names)


def _levers(opts: BuildOptions, pipe: Pipeline) -> list[Candidate]:
    """The full-width levers this device can run, in order of accuracy cost."""
    from prune_pack.agent import backends as be

    if opts.device != "local":
        with pipe.work.phase("resolve"):
            log(f"checking that device {opts.device} is online")
            pipe.device().ping(timeout=min(30.0, opts.profile_timeout_s))
        # This host's runtimes say nothing about the device's: ONNX Runtime is what every agent has.
        available, bf16 = (["ort", "openvino"], True) if opts.backend == "openvino" else (["ort"], False)
        if opts.backend == "auto":
            log(f"device {opts.device}: assuming ONNX Runtime only (pass --backend openvino if it has OpenVINO)")
    else:
        available, bf16 = be.available_backends(), be.bf16_supported()
    sizes = [opts.imgsz - 32 * k for k in range(1, opts.imgsz_steps + 1)] if opts.precision == "auto" else []
    aspect = None
    if opts.precision == "auto" and opts.input_shape == "auto":
        from prune_pack.pruning.sources import dataset_images, median_aspect

        aspect = median_aspect(dataset_images(pipe.data_yaml, "val") + dataset_images(pipe.data_yaml, "train"))
        rect = camera_shape(aspect, opts.imgsz)
        if rect:
            log(f"the dataset's images are {aspect:.2f} as high as wide (median): also trying the input "
                f"{shape_str(rect)}, which drops the square's letterbox padding")
    return plan_levers(opts.backend, opts.precision, opts.imgsz, available, bf16, sizes, aspect)


def _search(opts: BuildOptions, pipe: Pipeline, levers: list[Candidate]) -> tuple[SearchResult, Judge]:
    work = pipe.work
    reserve = 2 if opts.max_measurements >= 4 else 1  # for verifying the recovered package
    judge = Judge(pipe.measure, None, opts.percentile, max(1, opts.max_measurements - reserve),
                  state=work.state.search, on_update=lambda st: work.save())
    log(f"target {opts.target} at {opts.percentile}, {opts.imgsz}x{opts.imgsz}, {opts.threads} threads, "
        f"device {opts.device}; levers {', '.join(c.key for c in levers)}; up to {opts.max_measurements} device "
        f"measurements; accuracy floor {opts.max_map_drop * 100:g} points mAP50-95")
    with work.phase("search"):
        res = search(pipe.measure, levers, opts.target, opts.percentile, ratio_grid(opts.max_ratio, opts.ratio_step),
                     signature=pipe.widths, gate=pipe.gate, viable=pipe.viable, judge=judge)
    if res.outcome == UNDECIDED:
        raise DeviceTooNoisy(f"undecided: {res.reason}; unpruned {_ms(res.baseline_ms)}. Nothing was packaged: "
                             "rerun on a quieter device, or raise profile.runs / build.max_measurements")
    res = prefer_lever(opts, res, pipe.lever_drop, pipe.best_recovered_drop)
    if res.chosen is None:
        best = res.best()
        best_txt = f"best {best.point(opts.percentile):.1f} ms ({best.candidate.key})" if best else "nothing measured"
        raise TargetUnreachable(
            f"target {_target_txt(opts, res)} at {opts.percentile} not reachable up to prune ratio "
            f"{opts.max_ratio:g} ({res.reason}; unpruned {_ms(res.baseline_ms)}, {best_txt}); what could help: "
            f"{suggestions(opts.imgsz, levers)}")
    log(f"chosen {res.chosen.key} ({res.lever}); {res.measurements_used} device measurement(s) so far")
    return res, judge


def lever_over_gate(opts: BuildOptions, res: SearchResult, lever_drop: Callable[[Candidate], Optional[float]]
                    ) -> Optional[tuple[Candidate, float]]:
    """The cheapest full-width lever that met the target but cost more than the cheap gate
    (export.int8_max_map_drop), still within the floor: (candidate, mAP50-95 cost) or None.

    The build ships such a lever only when pruning would cost more: the levers go in order of
    accuracy cost, and one over the gate may cost more than a little pruning, or far less."""
    best: Optional[tuple[Candidate, float]] = None
    for r in res.records.values():
        c = r.candidate
        if c.ratio or r.decision != PASS or r.gate is not False:
            continue
        drop = lever_drop(c)
        if drop is not None and drop <= opts.max_map_drop + 1e-9 and (best is None or drop < best[1]):
            best = (c, drop)
    return best


def prefer_lever(opts: BuildOptions, res: SearchResult, lever_drop: Callable[[Candidate], Optional[float]],
                 best_recovered_drop: Callable[[float], float]) -> SearchResult:
    """After the search: a lever over the gate instead of pruning that cannot do better, even after
    the best recovery measured (``best_recovered_drop(ratio)``), or that cannot meet the target."""
    over = lever_over_gate(opts, res, lever_drop) if res.outcome != UNDECIDED else None
    if over is None or (res.chosen is not None and res.chosen.ratio == 0):
        return res
    if res.chosen is None:
        return _take_lever(res, over, "pruning cannot meet the target within the floor")
    least = best_recovered_drop(res.chosen.ratio)
    if over[1] <= least:
        return _take_lever(res, over, f"pruning ({res.chosen.key}) would cost at least {least * 100:.1f} points "
                                      "even after the best recovery measured")
    return res


def _take_lever(res: SearchResult, over: tuple[Candidate, float], why: str) -> SearchResult:
    c, drop = over
    log(f"chosen {c.key}: it costs {drop * 100:.2f} points mAP50-95, over the INT8 gate but within the floor, "
        f"and {why}")
    return dataclasses.replace(
        res, chosen=c, lever=lever_name(res.base or c, c), grid=[], outcome=MET,
        reason=f"{c.key} meets the target at {drop * 100:.2f} points mAP50-95 (over the INT8 gate, within the floor); {why}")


class _LeverIsCheaper(Exception):
    """Raised inside the verification: the recovered pruned model cost more than a lever over the gate."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def check_floor(opts: BuildOptions, res: SearchResult, c: Candidate, before: float, after: Optional[float]) -> None:
    """The accuracy floor: raise (exit 5) when ``after`` is more than ``max_map_drop`` below ``before``,
    with what the target would cost, the fastest candidate within the floor, and how to accept."""
    if after is None or before - after <= opts.max_map_drop + 1e-9:
        return
    pct = opts.percentile
    within = [r for r in res.records.values() if r.measurements and (r.candidate == res.base or r.gate)]
    fastest = min(within, key=lambda r: r.point(pct) or float("inf"), default=None)
    fastest_txt = (f"the fastest within the floor is {fastest.candidate.key} at {fastest.point(pct):.1f} ms"
                   if fastest else "nothing measured is within the floor")
    drop = (before - after) * 100
    raise AccuracyFloorError(
        f"meeting {_target_txt(opts, res)} at {pct} costs too much accuracy: {c.key} keeps mAP50-95 "
        f"{after:.4f} after recovery (unpruned {before:.4f}: -{drop:.1f} points, floor {opts.max_map_drop * 100:g}); "
        f"{fastest_txt}. Nothing was packaged. To accept the loss: --max-map-drop {drop + 0.1:.1f}; to keep the "
        f"accuracy: a higher --target-ms, or recover on the deployment's own frames")


def _verify(opts: BuildOptions, pipe: Pipeline, res: SearchResult, judge: Judge, before: dict
            ) -> tuple[SearchResult, Verification]:
    """Recover, package and measure the chosen candidate (``verify``); the result it ends with."""
    name = Path(pipe.model_pt).stem + ("-" + str(opts.target).replace(" ", ""))
    over = lever_over_gate(opts, res, pipe.lever_drop) if res.chosen and res.chosen.ratio > 0 else None

    def prepare_final(c: Candidate, short: bool) -> None:
        final_pt = pipe.model_pt if c.ratio == 0 else pipe.recovered(c, short)
        after = (pipe.final_package(c, final_pt, name, res.target_ms).get("after") or {}).get("map50_95")
        if over and c.ratio > 0 and after is not None and before["map50_95"] - after > over[1]:
            raise _LeverIsCheaper(f"the recovered {c.key} cost {(before['map50_95'] - after) * 100:.1f} points")
        check_floor(opts, res, c, before["map50_95"], after)

    judge.budget = max(judge.budget, opts.max_measurements)
    with pipe.work.phase("verify"):
        try:
            ver = verify(res, judge, prepare_final, pipe.measure_package, signature=pipe.widths)
        except _LeverIsCheaper as e:
            assert over is not None
            res = _take_lever(res, over, e.why)
            ver = verify(res, judge, prepare_final, pipe.measure_package, signature=pipe.widths)
    if ver.candidate is None:
        last = ver.records[-1]["latency_ms"] if ver.records else None
        what = f"{last:.1f} ms" if last is not None else "not measured"
        if ver.decision == "noisy":
            raise DeviceTooNoisy(f"undecided: the recovered package measured {what} with an interval too wide to decide "
                                 f"against {res.target_ms:.1f} ms; nothing was packaged: rerun on a quieter device")
        if ver.steps:
            what += " after one step toward more pruning"
        elif res.grid and not judge.can_measure("final-next"):
            what += f"; the {opts.max_measurements}-measurement budget was spent before a step toward more pruning"
        raise TargetUnreachable(
            f"the recovered model misses {res.target_ms:.1f} ms at {opts.percentile} on the device ({what}); the target "
            f"is at the edge of the noise: rerun, raise build.max_measurements, or set a slightly higher --target-ms; "
            f"what could help: {suggestions(opts.imgsz, [res.chosen] if res.chosen else [])}")
    return res, ver


def _hand_over(work: WorkArea, pkg: Path, files: dict) -> None:
    """Deliverables appear in OUT only now, each by an atomic rename."""
    dest = {pkg: work.out / pkg.name}
    for k in ("json", "markdown", "plot"):
        if files.get(k):
            dest[Path(files[k])] = work.out / Path(files[k]).name
    for src, dst in dest.items():
        os.replace(src, dst)
    work.discard()


def _target_txt(opts: BuildOptions, res: SearchResult) -> str:
    return f"{opts.target} ({res.target_ms:.1f} ms)" if opts.target.relative else str(opts.target)


def _ms(v: Optional[float]) -> str:
    return f"{v:.1f} ms" if v is not None else "not measured"


def run_build(opts: BuildOptions) -> dict[str, Any]:
    """The whole build; returns the CLI's result dict. OUT gets the package, report.json, report.md
    and latency.png only when everything succeeded."""
    from prune_pack.deploy.report import assemble_report, build_result, write_reports

    _check(opts)
    out = Path(opts.out).expanduser().resolve()
    existed = out.exists()
    if existed and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    t_start = time.monotonic()
    work = WorkArea(out, opts.resume)
    pipe: Optional[Pipeline] = None
    try:
        pipe = _resolve(opts, work)
        levers = _levers(opts, pipe)
        res, judge = _search(opts, pipe, levers)
        before = pipe.reference()  # the unpruned FP32 ONNX model: the same runtime path as what ships
        res, ver = _verify(opts, pipe, res, judge, before)
        report = assemble_report(opts, pipe, res, ver, levers, before, t_start)
        with work.phase("report"):
            files = write_reports(report, work.dir)
        _hand_over(work, Path(report["package_path"]), files)
        return build_result(opts, report, out, t_start)
    except (TargetUnreachable, UserInputError):
        # A decision, not an accident: leave OUT as it was (no half-written build to resume).
        work.discard()
        if not existed:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        # Interrupted or failed mid-way: keep OUT/.work so that --resume reuses what was measured.
        with contextlib.suppress(Exception):
            work.save()
        log(f"stopped; `prune-pack build ... --out {out} --resume` continues from what was measured")
        raise
    finally:
        if pipe is not None:
            with contextlib.suppress(Exception):
                pipe.close()


def _demo_defaults(section: BuildSection) -> BuildSection:
    """The built-in demo's own defaults where the config left the general ones."""
    from prune_pack.deploy import demo

    base = BuildSection()
    return dataclasses.replace(section, imgsz=demo.DEMO_IMGSZ if section.imgsz == base.imgsz else section.imgsz,
                               epochs=demo.DEMO_EPOCHS if section.epochs == base.epochs else section.epochs)


def cli_build(args: Any, cfg: Any) -> dict[str, Any]:
    """``prune-pack build``: flags win over the config's ``build`` section, which wins over defaults."""
    from prune_pack.deploy import demo

    if args.int8 and args.precision not in (None, "int8"):
        raise UserInputError(f"--int8 contradicts --precision {args.precision}")
    is_demo = args.model is None and args.data is None
    b = merged(_demo_defaults(cfg.build) if is_demo else cfg.build,
               target_ms=args.target_ms, percentile=args.percentile, imgsz=args.imgsz, threads=args.threads,
               epochs=args.epochs, precision="int8" if args.int8 else args.precision, backend=args.backend,
               device=args.device, out=args.out,
               max_map_drop=args.max_map_drop / 100.0 if args.max_map_drop is not None else None)
    if b.epochs < 1:
        raise UserInputError(f"--epochs {b.epochs}: at least one recovery epoch is needed")
    opts = BuildOptions(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)},
                        model=args.model, data=args.data, broker=args.broker, sign=args.sign, resume=bool(args.resume),
                        criterion=args.criterion, finetune_fraction=demo.DEMO_FRACTION if is_demo else 1.0,
                        unlabeled=args.unlabeled, train_device=args.train_device, cfg=cfg)
    return run_build(opts)


__all__ = ["BuildOptions", "check_floor", "cli_build", "lever_name", "lever_over_gate", "prefer_lever", "run_build"]
