"""``prune-pack build``: the most accurate package whose latency *on the device* meets a target.

Two halves:

- ``search`` (pure, torch-free, deterministic given its evaluator): explores levers in order of
  accuracy cost -- runtime/precision changes at full width first, then channel pruning over a
  discrete grid of ratios -- and returns the mildest candidate whose measured percentile meets
  the target. Tests drive it with recorded latency tables standing in for a device.
- ``run_build`` / ``cli_build``: the real pipeline around it (prune -> export -> profile on the
  device -> one full fine-tune at the chosen point -> export/package -> verify -> report), with a
  resumable state file and nothing half-written on failure.

Decisions under noise (hysteresis): a candidate *passes* when the upper confidence bound of its
percentile is <= target and *fails* when the lower bound is > target; in between it is measured
again (counted), then decided by the pooled point estimate with a safety margin. A decided
candidate is never measured again, so noise cannot flip a decision back and forth.

Latency is a property of the architecture, not of the weights, so the search runs on pruned but
not fine-tuned candidates, and candidates whose rounded widths are identical (a plateau of the
ratio grid) share one measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

from prune_pack.deploy.export import ImgSz, hw, norm_imgsz, shape_str
from prune_pack.errors import PrunePackError, TargetUnreachable, UserInputError

PERCENTILES = ("p50", "p90", "p95", "p99")
PASS, FAIL, UNSURE = "pass", "fail", "unsure"
STATE_VERSION = 1


# ============================================================================ search (pure)


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: runtime x precision x input size x pruning ratio."""

    ratio: float = 0.0  # requested share of prunable channels removed (0 = unpruned)
    backend: str = "ort"
    precision: str = "fp32"
    imgsz: ImgSz = 640  # square, or (h, w)

    def __post_init__(self) -> None:
        object.__setattr__(self, "imgsz", norm_imgsz(self.imgsz))  # (h, w) from JSON state is a list

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}-{shape_str(self.imgsz)}-r{self.ratio:.3f}"

    @property
    def family(self) -> tuple[str, str, ImgSz]:
        return (self.backend, self.precision, self.imgsz)

    @property
    def pixels(self) -> int:
        h, w = hw(self.imgsz)
        return h * w

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Measurement:
    """Latency statistics of one device profile (``agent.profiler.profile_model``'s keys)."""

    stats: dict[str, Any]

    @classmethod
    def of(cls, value_ms: float, ci: Optional[tuple[Optional[float], Optional[float]]] = None,
           percentile: str = "p95", **extra: Any) -> "Measurement":
        """A synthetic measurement (recorded tables in tests and benches)."""
        stats: dict[str, Any] = {f"{percentile}_ms": float(value_ms), **extra}
        stats[f"{percentile}_ci_ms"] = list(ci) if ci is not None else [value_ms, value_ms]
        return cls(stats)

    def point(self, percentile: str) -> float:
        v = self.stats.get(f"{percentile}_ms")
        if v is None:
            raise PrunePackError(f"the device's profile has no {percentile} latency")
        return float(v)

    def bounds(self, percentile: str) -> tuple[float, float]:
        """The percentile's confidence interval. Too few runs for an upper bound (p99 of 100 runs):
        the slowest run stands in (a weaker but honest bound); else a missing side is unknown."""
        ci = self.stats.get(f"{percentile}_ci_ms") or [None, None]
        lo = float(ci[0]) if ci[0] is not None else -math.inf
        top = self.stats.get("max_ms")
        hi = float(ci[1]) if ci[1] is not None else (float(top) if top is not None else math.inf)
        return lo, hi

    def summary(self, percentile: str) -> dict[str, Any]:
        keep = [f"{p}_ms" for p in PERCENTILES] + [f"{p}_ci_ms" for p in PERCENTILES] + [
            "mean_ms", "min_ms", "max_ms", "std_ms", "runs", "threads", "backend", "precision"]
        return {k: self.stats[k] for k in keep if k in self.stats}


def pool(measurements: Sequence[Measurement]) -> Optional[Measurement]:
    """One measurement from the raw latencies of several (a repeat narrows the interval instead
    of just adding a vote); None when the device did not send its raw latencies."""
    samples: list[float] = []
    for m in measurements:
        xs = m.stats.get("latencies_ms")
        if not xs:
            return None
        samples += [float(x) for x in xs]
    from prune_pack.agent.profiler import latency_stats  # torch-free, like this module

    st = latency_stats(samples)
    st.update(runs=len(samples), pooled=len(measurements))
    return Measurement(st)


def decide(measurements: Sequence[Measurement], target_ms: float, percentile: str, margin: float,
           max_repeats: int) -> str:
    """PASS / FAIL from the confidence interval; UNSURE asks for one more measurement.

    After ``1 + max_repeats`` measurements that straddle the target, the pooled point estimate
    (median) decides, and it must clear the target by ``margin`` (relative) to pass: a candidate
    that is only just under the target on average would miss on the next day's measurement.
    """
    if not measurements:
        return UNSURE
    pooled_m = pool(measurements) if len(measurements) > 1 else None
    for m in list(measurements) + ([pooled_m] if pooled_m else []):
        lo, hi = m.bounds(percentile)
        if hi <= target_ms:
            return PASS
        if lo > target_ms:
            return FAIL
    if len(measurements) <= max_repeats:
        return UNSURE
    return PASS if point_estimate(measurements, percentile, pooled_m) <= target_ms * (1.0 - margin) else FAIL


def point_estimate(measurements: Sequence[Measurement], percentile: str, pooled: Optional[Measurement] = None) -> float:
    """One latency from several measurements of a candidate: the percentile of their pooled raw
    samples, or, when the device sent none, the median of their points. ``pooled``: ``pool(...)``
    of the same measurements, if already made."""
    pooled = pooled or (pool(measurements) if len(measurements) > 1 else None)
    if pooled is not None and pooled.stats.get(f"{percentile}_ms") is not None:
        return pooled.point(percentile)
    pts = sorted(m.point(percentile) for m in measurements)
    return (pts[(len(pts) - 1) // 2] + pts[len(pts) // 2]) / 2


@dataclass
class Record:
    """What the search knows about one candidate."""

    candidate: Candidate
    measurements: list[Measurement] = field(default_factory=list)
    decision: Optional[str] = None
    same_as: Optional[str] = None  # key of a candidate with identical rounded widths (plateau)
    gate: Optional[bool] = None  # accuracy gate (None = not evaluated)
    resumed: int = 0  # measurements taken from a previous run's state

    def point(self, percentile: str) -> Optional[float]:
        if not self.measurements:
            return None
        pooled = pool(self.measurements) if len(self.measurements) > 1 else None
        if pooled is not None:
            return pooled.point(percentile)
        pts = sorted(m.point(percentile) for m in self.measurements)
        return pts[len(pts) // 2]

    def to_dict(self, percentile: str) -> dict[str, Any]:
        return {
            "key": self.candidate.key, **self.candidate.to_dict(),
            "decision": self.decision, "same_as": self.same_as, "gate": self.gate,
            "latency_ms": self.point(percentile),
            "ci_ms": [v if math.isfinite(v) else None for v in (pool(self.measurements) or self.measurements[-1]).bounds(percentile)]
            if self.measurements else None,
            "measurements": [m.summary(percentile) for m in self.measurements],
        }


@dataclass
class SearchState:
    """Everything measured so far, keyed by candidate; serialisable for ``--resume``."""

    measurements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    signatures: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"measurements": self.measurements, "signatures": self.signatures, "gates": self.gates}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchState":
        return cls(dict(d.get("measurements", {})), dict(d.get("signatures", {})), dict(d.get("gates", {})))


@dataclass
class SearchResult:
    target_ms: float
    percentile: str
    chosen: Optional[Candidate]
    lever: Optional[str]  # none | backend | precision | imgsz | pruning | pruning+<precision>
    records: dict[str, Record]
    order: list[str]  # keys in the order they were decided
    measurements_used: int
    grid: list[Candidate]  # the pruning grid that was searched (empty when no pruning was needed)
    reason: str = ""

    @property
    def chosen_record(self) -> Optional[Record]:
        return self.records.get(self.chosen.key) if self.chosen else None

    def best(self) -> Optional[Record]:
        """The fastest measured candidate (for the 'unreachable' message)."""
        measured = [r for r in self.records.values() if r.measurements and r.gate is not False]
        return min(measured, key=lambda r: r.point(self.percentile) or math.inf, default=None)

    def next_more_pruned(self, signature: Optional[Callable[[Candidate], Hashable]] = None,
                         final_ms: Optional[float] = None, margin: float = 0.02) -> Optional[Candidate]:
        """The verification step: a grid point after the chosen one whose rounded widths differ.

        Without ``final_ms`` the next such point. With it (the fine-tuned model's miss), the step is
        sized by the miss: the device ran the same architecture ``final_ms / searched`` slower than
        during the search (load drift, new weights), so the step goes to the mildest point whose
        search-time latency -- measured, else predicted by the fitted L0 * (1 - r)^k law -- clears
        the target by that factor. Still one step, always toward more pruning.
        """
        if not self.chosen or not self.grid:
            return None
        after = [c for c in self.grid if c.ratio > self.chosen.ratio]
        if signature is not None:
            mine = signature(self.chosen) if self.chosen.ratio > 0 else None
            first = next((i for i, c in enumerate(after) if signature(c) != mine), None)
            if first is None:
                return None
            after = after[first:]
        if not after:
            return None
        rec = self.records.get(self.chosen.key)
        searched = rec.point(self.percentile) if rec else None
        if final_ms is None or not searched or final_ms <= searched:
            return after[0]
        need = searched * self.target_ms * (1.0 - margin) / final_ms  # search-time latency that would do
        fam = [r for r in self.records.values() if r.candidate.family == self.chosen.family and r.measurements
               and not r.same_as]
        base = next((r.point(self.percentile) for r in fam if r.candidate.ratio == 0), None)
        k = latency_exponent([(r.candidate.ratio, r.point(self.percentile)) for r in fam], base) if base else 1.5
        for c in after:
            r = self.records.get(c.key)
            est = r.point(self.percentile) if r and r.measurements else (base * (1 - c.ratio) ** k if base else None)
            if est is not None and est <= need:
                return c
        return after[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_ms": self.target_ms, "percentile": self.percentile,
            "chosen": self.chosen.to_dict() if self.chosen else None, "lever": self.lever,
            "measurements_used": self.measurements_used, "reason": self.reason,
            "candidates": [self.records[k].to_dict(self.percentile) for k in self.order],
        }


class _Budget(Exception):
    pass


class _Searcher:
    def __init__(self, evaluate: Callable[[Candidate], Measurement], target_ms: float, percentile: str,
                 max_measurements: int, margin: float, max_repeats: int,
                 signature: Optional[Callable[[Candidate], Hashable]], gate: Optional[Callable[[Candidate], bool]],
                 state: SearchState, on_update: Optional[Callable[[SearchState, Record], None]]) -> None:
        self.evaluate, self.target, self.pct = evaluate, target_ms, percentile
        self.max_measurements, self.margin, self.max_repeats = max_measurements, margin, max_repeats
        self.signature_fn, self.gate_fn, self.state, self.on_update = signature, gate, state, on_update
        self.records: dict[str, Record] = {}
        self.order: list[str] = []
        self.used = 0
        self.by_signature: dict[Hashable, str] = {}

    def _sig(self, c: Candidate) -> Optional[Hashable]:
        if self.signature_fn is None or c.ratio == 0:
            return None
        if c.key in self.state.signatures:
            s = self.state.signatures[c.key]
        else:
            s = self.signature_fn(c)
            self.state.signatures[c.key] = s
        # JSON round trips turn tuples into lists; compare canonical JSON text.
        return (c.family, json.dumps(s, sort_keys=True, default=str))

    def _measure_once(self, rec: Record) -> None:
        if self.used >= self.max_measurements:
            raise _Budget()
        stored = self.state.measurements.get(rec.candidate.key, [])
        if len(stored) > len(rec.measurements):  # --resume: replay (it still counts: same decisions)
            m = Measurement(stored[len(rec.measurements)])
            rec.resumed += 1
        else:
            m = self.evaluate(rec.candidate)
            self.state.measurements.setdefault(rec.candidate.key, []).append(m.stats)
        self.used += 1
        rec.measurements.append(m)
        if self.on_update:
            self.on_update(self.state, rec)

    def judge(self, c: Candidate) -> Record:
        """Decide one candidate (measuring as needed); a decided candidate is never re-measured."""
        if c.key in self.records and self.records[c.key].decision:
            return self.records[c.key]
        if self.used >= self.max_measurements and len(self.state.measurements.get(c.key, [])) == 0:
            raise _Budget()  # before pruning it for its signature: that costs minutes on a big model
        rec = self.records.setdefault(c.key, Record(c))
        sig = self._sig(c)
        if sig is not None and sig in self.by_signature and self.by_signature[sig] != c.key:
            twin = self.records[self.by_signature[sig]]
            rec.same_as, rec.decision, rec.measurements = twin.candidate.key, twin.decision, list(twin.measurements)
            self.order.append(c.key)
            return rec
        while True:
            d = decide(rec.measurements, self.target, self.pct, self.margin, self.max_repeats)
            if d != UNSURE:
                break
            self._measure_once(rec)
        rec.decision = d
        if sig is not None:
            self.by_signature[sig] = c.key
        self.order.append(c.key)
        return rec

    def gate(self, rec: Record) -> bool:
        if rec.gate is None:
            key = rec.candidate.key
            if key in self.state.gates:
                rec.gate = bool(self.state.gates[key])
            else:
                rec.gate = bool(self.gate_fn(rec.candidate)) if self.gate_fn else True
                self.state.gates[key] = rec.gate
                if self.on_update:
                    self.on_update(self.state, rec)
        return rec.gate


def _skip_smaller_input(s: "_Searcher", levers: Sequence[Candidate], i: int, base: Candidate, target_ms: float,
                        percentile: str) -> bool:
    """A smaller-input lever is measured only if its twin (the nearest measured earlier lever of the
    same runtime and precision with more pixels) passed the accuracy gate (fewer pixels only lose
    more) and the twin's latency scaled by the pixel count could meet the target (the guess only
    saves a device measurement; the measurement decides)."""
    lv = levers[i]
    rec = next((s.records[t.key] for t in reversed(levers[:i]) if (t.backend, t.precision) == (lv.backend, lv.precision)
                and t.pixels > lv.pixels and t.key in s.records and s.records[t.key].measurements), None)
    if rec is None:
        return False
    if rec.candidate != base and not s.gate(rec):
        return True
    lat = rec.point(percentile)
    return lat is not None and lat * lv.pixels / rec.candidate.pixels > target_ms


def _lever_name(base: Candidate, c: Candidate) -> str:
    changed = []
    if c.backend != base.backend:
        changed.append("backend")
    if c.precision != base.precision:
        changed.append("precision")
    if c.imgsz != base.imgsz:
        changed.append("imgsz")
    if c.ratio > 0:
        return "+".join(["pruning"] + changed)
    return "+".join(changed) or "none"


def latency_exponent(points: Sequence[tuple[float, Optional[float]]], base: float) -> float:
    """k of L(r) = base * (1 - r)^k through measured (ratio, latency) points (their mean), 1.5 without any.

    k = 2 is the FLOPs law of uniform channel pruning; measured 1.9-2.4 for YOLOv8n at 640 and the
    demo at 896. k is kept >= 1 (a pruned model saves at least its share of the channels' time): a
    noisy measurement that shows almost no gain would otherwise fit k ~ 0.3, and the next probe or
    verification step would go to a far harsher ratio (a demo build once jumped from 15 % to 40 %,
    and shipped that when its measurement budget ran out)."""
    ks = [math.log(L / base) / math.log(1 - r) for r, L in points if 0 < r < 1 and L is not None and 0 < L < base]
    return max(1.0, min(4.0, sum(ks) / len(ks))) if ks else 1.5


def _guess_index(grid: Sequence[Candidate], lo: int, hi: Optional[int], lat: dict[int, float], target: float) -> int:
    """Next grid index to probe, strictly inside (lo, hi).

    Latency is modelled as L(r) = L0 * (1 - r)^k (``latency_exponent``). The model only *proposes*:
    the choice is clamped into the open bracket, so steps and plateaus in the real curve cost at
    most extra probes, never a wrong bracket.
    """
    ratios = [0.0] + [c.ratio for c in grid]  # index i of grid is position i + 1 here

    def r_of(i: int) -> float:
        return ratios[i + 1]

    L0 = lat[-1]
    k = latency_exponent([(r_of(i), L) for i, L in lat.items() if i >= 0], L0)
    if hi is not None and lo >= 0 and lo in lat and hi in lat and lat[lo] > lat[hi]:
        # Inside a measured bracket: interpolate linearly in ratio between its ends.
        a, b = lat[lo], lat[hi]
        r = r_of(lo) + (r_of(hi) - r_of(lo)) * (a - target) / (a - b)
    else:
        r = 1.0 - (target / L0) ** (1.0 / k) if target < L0 else 0.0
    upper = hi if hi is not None else len(grid)
    # The smallest grid ratio >= the prediction (predictions err on the mild side otherwise).
    idx = next((i for i in range(lo + 1, upper) if r_of(i) >= r - 1e-9), upper - 1)
    return max(lo + 1, min(idx, upper - 1))


def search(
    evaluate: Callable[[Candidate], Measurement],
    levers: Sequence[Candidate],
    target_ms: float,
    percentile: str = "p95",
    ratios: Sequence[float] = (),
    max_measurements: int = 8,
    margin: float = 0.02,
    max_repeats: int = 1,
    signature: Optional[Callable[[Candidate], Hashable]] = None,
    gate: Optional[Callable[[Candidate], bool]] = None,
    state: Optional[SearchState] = None,
    on_update: Optional[Callable[[SearchState, Record], None]] = None,
    prune_family: Optional[Candidate] = None,
) -> SearchResult:
    """Find the candidate with the least accuracy cost whose latency meets ``target_ms``.

    ``levers``: full-width candidates in order of accuracy cost; ``levers[0]`` is the baseline
    (what the user asked for). Each is measured in turn; the first that meets the target and
    passes ``gate`` (the accuracy gate, e.g. INT8 mAP drop; the baseline is not gated) wins.
    Otherwise ``ratios`` (ascending, > 0) are searched in the pruning family -- ``prune_family``,
    else the fastest measured lever that passed its gate -- by bracketing: a latency-model guess,
    then interpolation inside the [fails, passes] bracket until the two ends are grid neighbours,
    so the result is the mildest passing grid point that was measured. ``signature`` (rounded
    widths) lets a probe on a plateau inherit its twin's decision without a measurement.

    ``evaluate`` is called at most ``max_measurements`` times (repeats included); ``state`` holds
    earlier measurements (``--resume``), which are replayed in place of device calls.
    """
    if percentile not in PERCENTILES:
        raise UserInputError(f"--percentile {percentile}: choose from {', '.join(PERCENTILES)}")
    if not target_ms > 0:
        raise UserInputError(f"--target-ms {target_ms}: expected a positive number of milliseconds")
    if not levers:
        raise ValueError("search needs at least the baseline candidate")
    s = _Searcher(evaluate, target_ms, percentile, max_measurements, margin, max_repeats, signature, gate,
                  state or SearchState(), on_update)
    base = levers[0]
    grid: list[Candidate] = []

    all_ratios = sorted({round(float(r), 4) for r in ratios if r > 0})

    def result(chosen: Optional[Candidate], reason: str) -> SearchResult:
        lever = _lever_name(base, chosen) if chosen else None
        # A full-width winner still gets its family's grid: if the shipped model misses on
        # verification, the one step goes into pruning.
        g = grid or ([dataclasses.replace(chosen, ratio=r) for r in all_ratios] if chosen and chosen.ratio == 0 else [])
        return SearchResult(target_ms, percentile, chosen, lever, s.records, s.order, s.used, g, reason)

    try:
        for i, lv in enumerate(levers):
            if _skip_smaller_input(s, levers, i, base, target_ms, percentile):
                continue
            rec = s.judge(lv)
            if rec.decision == PASS and (lv is base or s.gate(rec)):
                return result(lv, "target met by the unpruned model" if lv is base else
                              f"target met by changing {_lever_name(base, lv)} (no pruning)")
        ratios = sorted({round(float(r), 4) for r in ratios if r > 0})
        if not ratios:
            return result(None, "no lever met the target and pruning is disabled")
        if prune_family is None:
            # skipped (unmeasured) smaller-input levers are not candidates
            ok = [s.records[lv.key] for lv in levers if lv.key in s.records and (lv is base or s.gate(s.records[lv.key]))]
            fam_rec = min(ok, key=lambda r: r.point(percentile) or math.inf)
            prune_family = fam_rec.candidate
        fam_base = s.judge(dataclasses.replace(prune_family, ratio=0.0))
        grid = [dataclasses.replace(prune_family, ratio=r) for r in ratios]
        lat: dict[int, float] = {-1: fam_base.point(percentile) or math.inf}
        lo, hi = -1, None
        while True:
            if hi is not None and hi - lo <= 1:
                break
            if hi is None and lo == len(grid) - 1:
                break
            idx = _guess_index(grid, lo, hi, lat, target_ms)
            rec = s.judge(grid[idx])
            p = rec.point(percentile)
            if p is not None:
                lat[idx] = p
            if rec.decision == PASS:
                hi = idx
            else:
                lo = idx
        if hi is None:
            return result(None, "the maximum pruning ratio does not meet the target")
        return result(grid[hi], "mildest passing pruning ratio on the grid")
    except _Budget:
        passing = [s.records[k] for k in s.order if s.records[k].decision == PASS
                   and (s.records[k].candidate.ratio > 0 or s.records[k].candidate is base
                        or s.records[k].gate)]
        if passing:
            best = min(passing, key=lambda r: (r.candidate.ratio, r.point(percentile) or math.inf))
            return result(best.candidate, f"measurement budget ({max_measurements}) spent; mildest passing candidate measured")
        return result(None, f"measurement budget ({max_measurements}) spent before any candidate met the target")


@dataclass
class Verification:
    candidate: Optional[Candidate]  # what ships (None: still missing after the one step)
    decision: str
    steps: int  # 0, or 1 when the first fine-tuned model missed and one more-pruned point was used
    records: list[dict[str, Any]]
    measurements_used: int


def verify(result: SearchResult, prepare_final: Callable[[Candidate, bool], None],
           measure_final: Callable[[Candidate], Measurement], max_measurements: int = 2, margin: float = 0.02,
           max_repeats: int = 1, signature: Optional[Callable[[Candidate], Hashable]] = None,
           on_measure: Optional[Callable[[Candidate, Measurement], None]] = None,
           replay: Optional[dict[str, list[dict[str, Any]]]] = None) -> Verification:
    """Measure the fine-tuned model at the chosen point; on a miss, step once toward more pruning.

    ``prepare_final(candidate, short)`` produces the shippable model for a candidate (the full
    fine-tune when ``short`` is False, a short recovery after a step); ``measure_final`` profiles
    it on the device. The step never goes back: a miss moves to the next grid point whose rounded
    widths differ, and that is the last try (noise must not make the build oscillate).
    """
    assert result.chosen is not None
    pct, target = result.percentile, result.target_ms
    used, steps, records = 0, 0, []
    replay = replay if replay is not None else {}
    cand: Optional[Candidate] = result.chosen
    short = False
    while cand is not None:
        prepare_final(cand, short)
        ms: list[Measurement] = []
        d = UNSURE
        while d == UNSURE:
            key = f"final-{cand.key}"
            stored = replay.get(key, [])
            if len(stored) > len(ms):
                m = Measurement(stored[len(ms)])
            elif used >= max_measurements:
                break
            else:
                m = measure_final(cand)
                if on_measure:
                    on_measure(cand, m)
            used += 1
            ms.append(m)
            d = decide(ms, target, pct, margin, max_repeats)
        if d == UNSURE:  # budget spent: the pooled estimate decides (conservatively, with margin)
            d = decide(ms, target, pct, margin, 0) if ms else FAIL
        records.append({"key": cand.key, **cand.to_dict(), "short_recovery": short, "decision": d,
                        "latency_ms": sorted(m.point(pct) for m in ms)[len(ms) // 2] if ms else None,
                        "measurements": [m.summary(pct) for m in ms]})
        if d == PASS:
            return Verification(cand, PASS, steps, records, used)
        if steps >= 1 or cand.ratio == 0 and not result.grid:
            break
        missed = records[-1]["latency_ms"]
        cand = result.next_more_pruned(signature, final_ms=missed, margin=margin)
        if cand is not None and used >= max_measurements and not replay.get(f"final-{cand.key}"):
            break  # no budget left to measure the step: do not spend a recovery on it
        steps += 1
        short = True
    return Verification(None, FAIL, steps, records, used)


# ============================================================================ the pipeline


def _log(msg: str) -> None:
    # Progress goes to stderr so that --json keeps stdout to one JSON line.
    print(f"build: {msg}", file=sys.stderr, flush=True)


@dataclass
class BuildOptions:
    """Resolved settings of one build (flags > config > defaults, see ``cli_build``)."""

    target_ms: float
    out: Path
    model: Optional[str] = None  # None (with data None) = the built-in demo
    data: Optional[str] = None
    percentile: str = "p95"
    imgsz: int = 640
    threads: int = 2
    epochs: int = 10
    precision: str = "fp32"  # fp32 | int8 | bf16 | auto
    backend: str = "ort"  # ort | openvino | auto
    device: str = "local"
    broker: Optional[str] = None
    sign: Optional[str] = None
    resume: bool = False
    max_ratio: float = 0.7
    ratio_step: float = 0.05
    imgsz_steps: int = 2  # precision auto: also try the input size this many 32-pixel steps smaller
    input_shape: str = "auto"  # auto: precision auto also tries the dataset's aspect ratio (camera_shape); square
    max_measurements: int = 8
    profile_timeout_s: float = 300.0
    criterion: Optional[str] = None
    finetune_fraction: float = 1.0
    recovery_epochs: Optional[int] = None  # short recovery after a verification miss (default epochs // 3, >= 1)
    cfg: Any = None  # the validated Config (prune/finetune/export/profile/mqtt/device sections)


class _Work:
    """The output folder's private work area: candidates, state, and the atomic hand-over."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out = out
        self.dir = out / ".work"
        self.state_path = self.dir / "state.json"
        if resume:
            if not self.state_path.is_file():
                raise UserInputError(f"--resume: no interrupted build in {out} (no {self.state_path})")
            self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.state = {"version": STATE_VERSION}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state.setdefault("phases_s", {})
        self.state.setdefault("search", {})
        self.state.setdefault("final", {})
        self.state.setdefault("finetuned", {})
        self.state.setdefault("candidates", {})
        self.state.setdefault("val", {})

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.state_path)

    class _Phase:
        def __init__(self, work: "_Work", name: str) -> None:
            self.work, self.name = work, name

        def __enter__(self) -> None:
            self.t0 = time.monotonic()

        def __exit__(self, *exc: Any) -> None:
            ph = self.work.state["phases_s"]
            ph[self.name] = round(ph.get(self.name, 0.0) + time.monotonic() - self.t0, 2)
            self.work.save()

    def phase(self, name: str) -> "_Work._Phase":
        return _Work._Phase(self, name)


def camera_shape(aspect: Optional[float], imgsz: int) -> Optional[tuple[int, int]]:
    """The rectangular input (h, w) that holds an image of ``aspect`` (height / width) at full
    ``imgsz`` resolution along its long side, rounded up to the stride (32): (480, 640) for 4:3,
    (384, 640) for 16:9. None when that is the square itself (``aspect`` near 1, or unknown).

    A fixed camera's frames all have one aspect ratio; a square input spends the rest of its pixels
    on letterbox padding (25 % of a 640x640 input for 4:3 frames, 44 % for 16:9)."""
    if not aspect or aspect <= 0:
        return None
    short = min(imgsz, math.ceil(imgsz * min(aspect, 1 / aspect) / 32) * 32)
    if short >= imgsz:
        return None
    return (short, imgsz) if aspect < 1 else (imgsz, short)


def plan_levers(backend: str, precision: str, imgsz: int, available: Sequence[str], bf16: bool,
                sizes: Sequence[int] = (), aspect: Optional[float] = None) -> list[Candidate]:
    """Full-width candidates in order of accuracy cost; the first is what the user asked for.

    ``aspect`` (the images' height / width, with ``precision auto`` only) adds, where it is not
    square, the rectangular input of that aspect at full resolution (``camera_shape``) for the
    fastest float lever and for INT8: it drops letterbox padding, and costs accuracy only on images
    of another shape (gated like the rest). ``sizes`` (smaller long sides, ``precision auto`` only)
    add the last, fastest lever at each of them (rectangular when ``aspect`` is): a smaller input
    costs accuracy (gated against FP32 at ``imgsz``) but far less than pruning does.

    ``precision auto``: ORT FP32 (no cost) -> OpenVINO FP32 (same math, another runtime; with
    ``--backend auto``) -> OpenVINO BF16 (where the CPU has native bf16) -> INT8 (gated by mAP), on
    OpenVINO where it is installed (NNCF's file there: 1.35-1.4x OpenVINO BF16, bench/results/nncf.md;
    ORT's own INT8 was slower than OpenVINO BF16 on every CPU measured), else on ORT.
    """
    if precision != "auto":
        b = backend
        if b == "auto":
            b = "openvino" if precision == "bf16" or "openvino" in available else "ort"
        if precision == "bf16" and b != "openvino":
            raise UserInputError("bf16 runs on OpenVINO only: use --backend openvino (or auto)")
        if b == "openvino" and "openvino" not in available:
            raise UserInputError("--backend openvino: OpenVINO is not installed (pip install 'prune-pack[openvino]')")
        return [Candidate(0.0, b, precision, imgsz)]
    base_backend = "ort" if backend in ("auto", "ort") else backend
    levers = [Candidate(0.0, base_backend, "fp32", imgsz)]
    if "openvino" in available and backend in ("auto", "openvino"):
        if base_backend != "openvino":
            levers.append(Candidate(0.0, "openvino", "fp32", imgsz))
        if bf16:
            levers.append(Candidate(0.0, "openvino", "bf16", imgsz))
        int8 = Candidate(0.0, "openvino", "int8", imgsz)
    else:
        int8 = Candidate(0.0, base_backend, "int8", imgsz)

    def shape(long: int) -> ImgSz:
        return camera_shape(aspect, long) or long

    if shape(imgsz) != imgsz:
        levers.append(dataclasses.replace(levers[-1], imgsz=shape(imgsz)))
    levers.append(int8)
    if shape(imgsz) != imgsz:
        levers.append(dataclasses.replace(int8, imgsz=shape(imgsz)))
    levers += [dataclasses.replace(int8, imgsz=shape(int(sz))) for sz in sorted(set(sizes), reverse=True) if 32 <= sz < imgsz]
    return levers


def ratio_grid(max_ratio: float, step: float) -> list[float]:
    n = int(math.floor(max_ratio / step + 1e-9))
    return [round(step * i, 4) for i in range(1, n + 1)]


def _suggestions(opts: BuildOptions, levers: Sequence[Candidate]) -> str:
    tips = []
    if not any(c.precision == "int8" for c in levers):
        tips.append("INT8 (--int8 or --precision auto)")
    if opts.imgsz > 320:
        tips.append(f"a smaller input size (--imgsz {max(320, (opts.imgsz * 3 // 4) // 32 * 32)})")
    tips.append("more device threads (--threads)")
    tips.append("a smaller base model or a higher --target-ms")
    return ", ".join(tips)


class _Pipeline:
    """The host-side work behind the search's callbacks (prune, export, quantize, profile)."""

    def __init__(self, opts: BuildOptions, work: _Work, model_pt: Path, data_yaml: Path, key_path: Path,
                 names: dict[int, str]) -> None:
        self.opts, self.work, self.model_pt, self.data_yaml = opts, work, model_pt, data_yaml
        self.key_path, self.names = key_path, names
        self.cfg = opts.cfg
        self.remote: Any = None
        self.version = 0
        self.val_cache: dict[str, dict] = work.state["val"]
        self.calib_cache: dict = {}  # calibration statistics shared by every ratio this build prunes

    # ---------------------------------------------------------------- artifacts (cached on disk)
    def pruned(self, ratio: float) -> tuple[Path, dict]:
        if ratio == 0:
            return self.model_pt, {}
        d = self.work.dir / "pruned"
        pt, info_path = d / f"r{ratio:.3f}.pt", d / f"r{ratio:.3f}.json"
        if pt.is_file() and info_path.is_file():
            return pt, json.loads(info_path.read_text())
        from prune_pack.pruning.checkpoint import save_pruned
        from prune_pack.pruning.prune import prune_model

        pc = self.cfg.prune
        with self.work.phase("prune"):
            _log(f"pruning {ratio:.0%} of the channels ({pc.allocation} allocation)")
            yolo, info = prune_model(self.model_pt, ratio, criterion=self.opts.criterion or pc.criterion,
                                     data_yaml=self.data_yaml, imgsz=self.opts.imgsz, allocation=pc.allocation,
                                     max_layer_ratio=pc.max_layer_ratio, round_to=pc.round_to,
                                     calib_images=pc.calib_images, bias_compensation=pc.compensation != "none",
                                     reconstruct=pc.compensation == "lsq", recalibrate_bn=pc.recalibrate_bn,
                                     calib_cache=self.calib_cache)
            d.mkdir(parents=True, exist_ok=True)
            save_pruned(yolo, pt, info)
            info_path.write_text(json.dumps(info, default=str))
        return pt, info

    def widths(self, c: Candidate) -> Hashable:
        _, info = self.pruned(c.ratio)
        return {k: v[1] for k, v in sorted((info.get("widths") or {}).items())}

    def onnx(self, c: Candidate) -> Path:
        from prune_pack.deploy.export import export_onnx

        pt, _ = self.pruned(c.ratio)
        d = self.work.dir / "onnx"
        fp32 = d / f"r{c.ratio:.3f}-{shape_str(c.imgsz)}.onnx"
        if not fp32.is_file():
            with self.work.phase("export"):
                _log(f"exporting r={c.ratio:.2f} to ONNX at {shape_str(c.imgsz)}")
                export_onnx(pt, fp32.with_suffix(".tmp.onnx"), imgsz=c.imgsz)
                os.replace(fp32.with_suffix(".tmp.onnx"), fp32)
        if c.precision != "int8":
            return fp32
        engine = self.int8_engine(c)
        q = d / f"r{c.ratio:.3f}-{shape_str(c.imgsz)}-int8{'-nncf' if engine == 'nncf' else ''}.onnx"
        if not q.is_file():
            from prune_pack.deploy.quantize import calib_count, quantize_int8_with
            from prune_pack.pruning.sources import dataset_images

            with self.work.phase("quantize"):
                calib = dataset_images(self.data_yaml, "train", limit=calib_count(engine, self.cfg.export.int8_calib_images))
                _log(f"quantizing r={c.ratio:.2f} to INT8 with {engine} ({len(calib)} calibration images)")
                quantize_int8_with(engine, fp32, q.with_suffix(".tmp.onnx"), calib, c.imgsz)
                os.replace(q.with_suffix(".tmp.onnx"), q)
        return q

    def int8_engine(self, c: Candidate) -> str:
        """``export.int8_engine`` for the backend that will run ``c`` (auto: nncf for OpenVINO)."""
        from prune_pack.deploy.quantize import resolve_int8_engine

        return resolve_int8_engine(self.cfg.export.int8_engine, c.backend)

    def candidate_package(self, c: Candidate) -> Path:
        """Remote devices take packages (signed, so a device with trusted keys accepts them)."""
        from prune_pack.agent.package import write_package

        pkg = self.work.dir / "packages" / f"{c.key}.ppk"
        if not pkg.is_file():
            self.version += 1
            man = {"name": "prune-pack-build-candidate", "version": int(time.time()) * 100 + self.version,
                   "precision": c.precision, "imgsz": c.imgsz, "names": [self.names[k] for k in sorted(self.names)],
                   "validated": [{"backend": c.backend, "precision": c.precision}],
                   "provenance": {"candidate": c.key, "base_sha256": self.work.state.get("model_sha256")}}
            write_package(self.onnx(c), man, pkg, signing_key=self.key_path, registry=self.work.dir / "versions.json")
        return pkg

    # ---------------------------------------------------------------- device
    def _profile(self, target: Path, c: Candidate, package: bool) -> Measurement:
        pcfg = self.cfg.profile
        with self.work.phase("profile"):
            if self.opts.device == "local":
                from prune_pack.agent.profiler import profile_model

                kw: dict[str, Any] = {}
                if package:
                    kw["trusted_keys"] = [self.key_path.with_suffix(".pub")]
                r = profile_model(str(target), threads=self.opts.threads, warmup=pcfg.warmup, runs=pcfg.runs,
                                  seconds=pcfg.seconds, backend=c.backend, precision=c.precision, **kw)
            else:
                pkg = target if package else self.candidate_package(c)
                r = self.device().profile_package(pkg, backend=c.backend, precision=c.precision, runs=pcfg.runs,
                                                  warmup=pcfg.warmup, seconds=pcfg.seconds, threads=self.opts.threads,
                                                  timeout=self.opts.profile_timeout_s, retries=1, force=True)
        r = {k: v for k, v in r.items() if k not in ("context", "model")}
        return Measurement(r)

    def device(self) -> Any:
        if self.remote is None:
            from prune_pack.deploy.remote import RemoteDevice

            self.remote = RemoteDevice(self.cfg.mqtt, self.opts.device, site=self.cfg.device.site, broker=self.opts.broker,
                                       max_inline_mb=self.cfg.agent.max_inline_mb)
            self.remote.connect()
        return self.remote

    def measure(self, c: Candidate) -> Measurement:
        path = self.onnx(c)
        m = self._profile(path, c, package=False)
        pct = self.opts.percentile
        lo, hi = m.bounds(pct)
        _log(f"measured {c.key}: {pct} {m.point(pct):.1f} ms (95% CI {lo:.1f}-{hi:.1f}, target {self.opts.target_ms:g})")
        return m

    # ---------------------------------------------------------------- accuracy
    def validate(self, path: Path, key: str) -> dict:
        if key not in self.val_cache:
            from prune_pack.pruning.finetune import validate

            with self.work.phase("validate"):
                _log(f"validating {key} on the val split")
                self.val_cache[key] = validate(str(path), str(self.data_yaml), imgsz=self.opts.imgsz)
            self.work.save()
        return self.val_cache[key]

    def gate(self, c: Candidate) -> bool:
        """Accuracy gate of a full-width lever: its mAP50-95 (precision and input size together) must
        stay within export.int8_max_map_drop of FP32 at the requested input size."""
        if c.precision == "fp32" and c.imgsz == self.opts.imgsz:
            return True  # the same FP32 math on another runtime
        from prune_pack.deploy.quantize import AccuracyGateError, int8_gate

        ref = dataclasses.replace(c, precision="fp32", backend="ort", imgsz=self.opts.imgsz)
        fp32 = self.validate(self.onnx(ref), ref.key)
        if c.precision == "int8" and self.int8_engine(c) == "nncf":
            # An NNCF file is made for OpenVINO: its gate is what OpenVINO computes.
            from prune_pack.deploy.export import validate_openvino

            if c.key not in self.val_cache:
                with self.work.phase("validate"):
                    _log(f"validating {c.key} (OpenVINO, NNCF INT8) on the val split")
                    self.val_cache[c.key] = validate_openvino(self.onnx(c), self.data_yaml, c.imgsz)
                self.work.save()
            q = self.val_cache[c.key]
        elif c.precision == "bf16":
            from prune_pack.deploy.export import openvino_precision, validate_openvino

            if openvino_precision(self.onnx(c)) != "bf16":
                _log("OpenVINO would not run this model in bf16 here: the bf16 lever cannot be validated")
                return False
            if c.key not in self.val_cache:
                with self.work.phase("validate"):
                    _log(f"validating {c.key} (OpenVINO bf16) on the val split")
                    self.val_cache[c.key] = validate_openvino(self.onnx(c), self.data_yaml, c.imgsz)
            q = self.val_cache[c.key]
        else:
            q = self.validate(self.onnx(c), c.key)
        what = c.precision.upper() + (f" at {shape_str(c.imgsz)}" if c.imgsz != self.opts.imgsz else "")
        try:
            drop = int8_gate(fp32["map50_95"], q["map50_95"], self.cfg.export.int8_max_map_drop, what=what)
            _log(f"{what} accuracy gate passed (mAP50-95 drop {drop:+.4f})")
            return True
        except AccuracyGateError as e:
            _log(str(e))
            return False


def _finetuned(pipe: _Pipeline, c: Candidate, short: bool) -> Path:
    """One full fine-tune at the chosen point (or a short recovery after a step), cached for --resume."""
    opts, work = pipe.opts, pipe.work
    tag = f"r{c.ratio:.3f}{'-short' if short else ''}"
    done = work.state["finetuned"].get(tag)
    if done and Path(done["pt"]).is_file():
        _log(f"reusing the finished fine-tune {tag}")
        return Path(done["pt"])
    from prune_pack.pruning.finetune import choose_method, finetune

    pt, _ = pipe.pruned(c.ratio)
    fc = pipe.cfg.finetune
    epochs = opts.epochs if not short else (opts.recovery_epochs or max(1, opts.epochs // 3))
    out = work.dir / "finetuned" / f"{tag}.pt"
    method = choose_method(fc.method, pt, pipe.data_yaml, teacher=pipe.model_pt)
    with work.phase("finetune"):
        if method == "distill":
            from prune_pack.pruning.distill import distill

            _log(f"recovering r={c.ratio:.2f} for {epochs} epoch(s){' (short recovery)' if short else ''} "
                 "by distillation from the unpruned model")
            r = distill(pt, pipe.data_yaml, out, teacher=pipe.model_pt, imgsz=opts.imgsz,
                        epochs=epochs * opts.finetune_fraction, measure=False)
        else:
            _log(f"fine-tuning r={c.ratio:.2f} for {epochs} epoch(s){' (short recovery)' if short else ''}"
                 f"{' with distillation from the unpruned model' if fc.distill else ''}")
            r = finetune(pt, pipe.data_yaml, epochs=epochs, imgsz=opts.imgsz, teacher=pipe.model_pt if fc.distill else None,
                         out=out, lr0=fc.lr0, batch=fc.batch, workers=fc.workers, distill_weight=fc.distill_weight,
                         patience=fc.patience, fraction=opts.finetune_fraction, measure_before=False)
    work.state["finetuned"][tag] = {"pt": str(out), "method": method, "epochs": r.get("epochs", epochs),
                                    "seconds": r.get("seconds"), "after": r.get("after")}
    work.save()
    return out


def _final_package(pipe: _Pipeline, c: Candidate, final_pt: Path, name: str) -> dict:
    from prune_pack.deploy.export import export_package

    work = pipe.work
    d = work.dir / "final" / c.key
    cached = work.state["final"].get(c.key, {}).get("package")
    if cached and Path(cached["out"]).is_file() and cached.get("source") == str(final_pt):
        return cached
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)

    def val_fn(path: Any, data: Any, imgsz: ImgSz) -> dict:
        # The exporter validates the ONNX it packs; keep the full result (per class) for the report.
        key = f"final-{c.key}-{Path(path).name}"
        return pipe.validate(Path(path), key)

    with work.phase("package"):
        _log(f"exporting, checking parity and packing {c.key}")
        r = export_package(final_pt, d / f"{name}.ppk", imgsz=c.imgsz, int8=c.precision == "int8",
                           data_yaml=pipe.data_yaml, sign=pipe.key_path, name=name, latency_runs=0,
                           calib_images=pipe.cfg.export.int8_calib_images, max_map_drop=pipe.cfg.export.int8_max_map_drop,
                           val_fn=val_fn, registry=work.dir / "versions.json", int8_engine=pipe.int8_engine(c),
                           backends=("ort", "openvino") if c.backend == "openvino" or pipe.opts.backend == "auto" else ("ort",),
                           target={"latency_ms": pipe.opts.target_ms, "percentile": pipe.opts.percentile})
    r = {k: v for k, v in r.items() if k != "summary"}
    r["source"] = str(final_pt)
    r["after"] = (r.pop("accuracy", None) or {}).get(c.precision if c.precision == "int8" else "fp32")
    work.state["final"].setdefault(c.key, {})["package"] = r
    work.save()
    return r


def run_build(opts: BuildOptions) -> dict[str, Any]:
    """The whole build; returns the CLI's result dict. Output folder gets the package, report.json,
    report.md and latency.png only when everything succeeded (work happens in ``OUT/.work``)."""
    from prune_pack.agent import backends as be
    from prune_pack.deploy import demo
    from prune_pack.deploy.report import write_reports
    from prune_pack.pruning.sources import resolve_dataset, resolve_model, sha256_file

    if opts.percentile not in PERCENTILES:
        raise UserInputError(f"--percentile {opts.percentile}: choose from {', '.join(PERCENTILES)}")
    if not opts.target_ms > 0:
        raise UserInputError(f"--target-ms {opts.target_ms}: expected a positive number of milliseconds")
    if opts.imgsz < 32 or opts.imgsz % 32:
        raise UserInputError(f"--imgsz {opts.imgsz}: must be a positive multiple of 32")
    if (opts.model is None) != (opts.data is None):
        raise UserInputError("--model and --data go together (the data fine-tunes and validates the model); "
                             "leave both out for the built-in demo")
    if opts.sign and not Path(opts.sign).expanduser().is_file():
        raise UserInputError(f"--sign {opts.sign}: key file not found")
    if opts.device != "local" and not (opts.broker or opts.cfg.mqtt.broker):
        raise UserInputError(f"--device {opts.device}: a remote device needs a broker (--broker URL or mqtt.broker in --config)")
    out = opts.out.expanduser().resolve()
    existed = out.exists()
    if existed and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    t_start = time.monotonic()
    work = _Work(out, opts.resume)
    pipe: Optional[_Pipeline] = None
    try:
        with work.phase("resolve"):
            if opts.model is None:
                _log("no --model/--data: using the built-in demo model and its synthetic dataset")
                model_pt, data_src = demo.demo_model(), demo.ensure_demo_dataset()
            else:
                model_pt, data_src = resolve_model(opts.model), Path(opts.data)
            data_yaml = resolve_dataset(data_src, work.dir / "data")
            import yaml

            names = {int(k): str(v) for k, v in yaml.safe_load(data_yaml.read_text())["names"].items()}
            sha = sha256_file(model_pt)
            fp = {"model_sha256": sha, "data": str(Path(data_src).resolve()), "imgsz": opts.imgsz, "threads": opts.threads,
                  "device": opts.device, "max_ratio": opts.max_ratio, "ratio_step": opts.ratio_step,
                  "precision": opts.precision, "backend": opts.backend}
            if opts.resume and work.state.get("fingerprint") not in (None, fp):
                raise UserInputError(f"--resume: {out} holds a build of another model/settings; use another --out")
            work.state["fingerprint"] = fp
            work.state["model_sha256"] = sha
            if opts.sign:
                key_path = Path(opts.sign).expanduser().resolve()
            else:
                from prune_pack.agent.package import ensure_default_key

                key_path, created = ensure_default_key()
                if created:
                    print(f"prune-pack: created your signing key {key_path} (devices must trust {key_path.with_suffix('.pub')})",
                          file=sys.stderr)
            work.save()
        pipe = _Pipeline(opts, work, model_pt, data_yaml, key_path, names)
        if opts.device != "local":
            with work.phase("resolve"):
                _log(f"checking that device {opts.device} is online")
                pipe.device().ping(timeout=min(30.0, opts.profile_timeout_s))
        if opts.device == "local":
            available, bf16 = be.available_backends(), be.bf16_supported()
        else:  # this host's runtimes say nothing about the device's: ONNX Runtime is what every agent has
            available, bf16 = (["ort", "openvino"], True) if opts.backend == "openvino" else (["ort"], False)
            if opts.backend == "auto":
                _log(f"device {opts.device}: assuming ONNX Runtime only (pass --backend openvino if it has OpenVINO)")
        sizes = [opts.imgsz - 32 * k for k in range(1, opts.imgsz_steps + 1)] if opts.precision == "auto" else []
        aspect = None
        if opts.precision == "auto" and opts.input_shape == "auto":
            from prune_pack.pruning.sources import dataset_images, median_aspect

            aspect = median_aspect(dataset_images(data_yaml, "val") + dataset_images(data_yaml, "train"))
            rect = camera_shape(aspect, opts.imgsz)
            if rect:
                _log(f"the dataset's images are {aspect:.2f} as high as wide (median): also trying the input "
                     f"{shape_str(rect)}, which drops the square's letterbox padding")
        levers = plan_levers(opts.backend, opts.precision, opts.imgsz, available, bf16, sizes, aspect)
        ratios = ratio_grid(opts.max_ratio, opts.ratio_step)
        state = SearchState.from_json(work.state["search"])
        verify_reserve = 2 if opts.max_measurements >= 4 else 1

        def on_update(st: SearchState, rec: Record) -> None:
            work.state["search"] = st.to_json()
            work.save()

        _log(f"target {opts.target_ms:g} ms at {opts.percentile}, {opts.imgsz}x{opts.imgsz}, {opts.threads} threads, "
             f"device {opts.device}; levers {', '.join(c.key for c in levers)}; up to {opts.max_measurements} device measurements")
        with work.phase("search"):
            res = search(pipe.measure, levers, opts.target_ms, opts.percentile, ratios,
                         max_measurements=max(1, opts.max_measurements - verify_reserve), signature=pipe.widths,
                         gate=pipe.gate, state=state, on_update=on_update)
        work.state["search"] = state.to_json()
        work.save()
        base_rec = res.records[levers[0].key]
        baseline_ms = base_rec.point(opts.percentile)
        if res.chosen is None:
            best = res.best()
            best_txt = (f"best {best.point(opts.percentile):.1f} ms ({best.candidate.key})" if best else "nothing measured")
            raise TargetUnreachable(
                f"target {opts.target_ms:g} ms at {opts.percentile} not reachable up to prune ratio {opts.max_ratio:g} "
                f"({res.reason}; unpruned {baseline_ms:.1f} ms, {best_txt}); what could help: {_suggestions(opts, levers)}"
                + ("; the device's measurements were noisy: raise profile.runs or build.max_measurements, or measure on a quieter device"
                   if "budget" in res.reason else ""))
        _log(f"chosen {res.chosen.key} ({res.lever}); {res.measurements_used} device measurement(s) so far")
        # "Before" is the unpruned FP32 ONNX model: the same runtime path as what ships.
        ref = dataclasses.replace(levers[0], precision="fp32", backend="ort")
        before = pipe.validate(pipe.onnx(ref), ref.key)
        name = Path(model_pt).stem + f"-{opts.target_ms:g}ms"

        def prepare_final(c: Candidate, short: bool) -> None:
            final_pt = pipe.model_pt if c.ratio == 0 else _finetuned(pipe, c, short)
            _final_package(pipe, c, final_pt, name)

        def measure_final(c: Candidate) -> Measurement:
            pkg = Path(work.state["final"][c.key]["package"]["out"])
            m = pipe._profile(pkg, c, package=True)
            pct = opts.percentile
            lo, hi = m.bounds(pct)
            _log(f"verified {c.key} ({'fine-tuned ' if c.ratio > 0 else ''}package): {pct} {m.point(pct):.1f} ms (95% CI {lo:.1f}-{hi:.1f})")
            return m

        def on_final(c: Candidate, m: Measurement) -> None:
            work.state["final"].setdefault(c.key, {}).setdefault("measurements", []).append(m.stats)
            work.save()

        replay = {f"final-{k}": v.get("measurements", []) for k, v in work.state["final"].items()}
        verify_budget = max(1, opts.max_measurements - res.measurements_used)
        with work.phase("verify"):
            ver = verify(res, prepare_final, measure_final,
                         max_measurements=verify_budget,
                         signature=pipe.widths, on_measure=on_final, replay=replay)
        if ver.candidate is None:
            last = ver.records[-1]["latency_ms"] if ver.records else None
            what = f"{last:.1f} ms" if last is not None else "not measured"
            if ver.steps:
                what += " after one step toward more pruning"
            elif res.grid and ver.measurements_used >= verify_budget:
                what += f"; the {opts.max_measurements}-measurement budget was spent before a step toward more pruning"
            raise TargetUnreachable(
                f"the fine-tuned model misses {opts.target_ms:g} ms at {opts.percentile} on the device "
                f"({what}); the target is at the edge of the noise: "
                f"rerun, raise build.max_measurements, or set a slightly higher --target-ms; what could help: {_suggestions(opts, levers)}")
        chosen = ver.candidate
        final = work.state["final"][chosen.key]
        pkg_info = final["package"]
        after = pkg_info.get("after") or {}
        # The estimate the decision uses (the upper of two measurements is not what passed).
        achieved_ms = point_estimate([Measurement(s) for s in final["measurements"]], opts.percentile)
        _, pinfo = pipe.pruned(chosen.ratio)

        report = _assemble_report(opts, res, ver, levers, baseline_ms, achieved_ms, before, after, pkg_info, pinfo,
                                  pipe, work, model_pt, data_src, t_start)
        report["package"] = str(out / Path(pkg_info["out"]).name)
        with work.phase("report"):
            files = write_reports(report, work.dir)
        # The hand-over: deliverables appear in OUT only now, each by an atomic rename.
        pkg_src = Path(pkg_info["out"])
        dest = {pkg_src: out / pkg_src.name}
        for k in ("json", "markdown", "plot"):
            if files.get(k):
                dest[Path(files[k])] = out / Path(files[k]).name
        for src, dst in dest.items():
            os.replace(src, dst)
        shutil.rmtree(work.dir, ignore_errors=True)
        result = {
            "target_ms": opts.target_ms, "percentile": opts.percentile, "achieved_ms": round(achieved_ms, 3),
            "baseline_ms": round(baseline_ms, 3) if baseline_ms is not None else None,
            "measurements": report["measurements"], "ratio": chosen.ratio, "achieved_ratio": report["achieved_ratio"],
            "lever": report["lever"], "backend": chosen.backend, "precision": chosen.precision, "imgsz": chosen.imgsz,
            "map50_95_before": before.get("map50_95"), "map50_95_after": after.get("map50_95"),
            "map50_before": before.get("map50"), "map50_after": after.get("map50"),
            "verification_steps": ver.steps, "package": report["package"], "report": str(out / "report.md"),
            "seconds": round(time.monotonic() - t_start, 1),
        }
        result["summary"] = (
            # A pass decided by a confidence interval may have its point estimate just above the target.
            f"{opts.percentile} {achieved_ms:.1f} ms {'<=' if achieved_ms <= opts.target_ms else 'at'} target {opts.target_ms:g} ms "
            f"(unpruned {baseline_ms:.1f} ms) via "
            f"{report['lever']} (ratio {chosen.ratio:.2f}, {chosen.backend}/{chosen.precision}); mAP50-95 "
            f"{_num(before.get('map50_95'))} -> {_num(after.get('map50_95'))}; {report['measurements']} device measurements; "
            f"wrote {result['package']} and {result['report']}")
        return result
    except (TargetUnreachable, UserInputError):
        # A decision, not an accident: leave OUT as it was (no half-written build to resume).
        shutil.rmtree(work.dir, ignore_errors=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        # Interrupted or failed mid-way: keep OUT/.work so that --resume reuses what was measured.
        with contextlib.suppress(Exception):
            work.save()
        print(f"build: stopped; `prune-pack build ... --out {out} --resume` continues from what was measured",
              file=sys.stderr)
        raise
    finally:
        if pipe is not None and pipe.remote is not None:
            with contextlib.suppress(Exception):
                pipe.remote.close()


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"


def _assemble_report(opts: BuildOptions, res: SearchResult, ver: Verification, levers: Sequence[Candidate],
                     baseline_ms: Optional[float], achieved_ms: float, before: dict, after: dict, pkg_info: dict,
                     pinfo: dict, pipe: _Pipeline, work: _Work, model_pt: Path, data_src: Path, t_start: float) -> dict:
    chosen = ver.candidate
    assert chosen is not None
    pct = opts.percentile
    cands = []
    for k in res.order:
        d = res.records[k].to_dict(pct)
        info_path = work.dir / "pruned" / f"r{d['ratio']:.3f}.json"
        d["achieved_ratio"] = json.loads(info_path.read_text()).get("achieved_ratio") if info_path.is_file() else (0.0 if d["ratio"] == 0 else None)
        cands.append(d)
    lever = _lever_name(levers[0], chosen)
    metrics = pkg_info.get("metrics") or {}
    # What each lever cost: precision levers from their accuracy gate, pruning from the fine-tuned result.
    costs = []
    for lv in levers[1:]:
        r = res.records.get(lv.key)
        if r is None:
            continue
        q = pipe.val_cache.get(lv.key)
        costs.append({"lever": _lever_name(levers[0], lv), "key": lv.key, "latency_ms": r.point(pct),
                      "map_cost": (before.get("map50_95", 0) - q["map50_95"]) if q else None, "gate": r.gate})
    if isinstance(after.get("map50_95"), (int, float)) and isinstance(before.get("map50_95"), (int, float)):
        costs.append({"lever": lever, "key": chosen.key, "latency_ms": achieved_ms,
                      "map_cost": before["map50_95"] - after["map50_95"], "gate": True})
    context = {}
    for r in list(res.records.values())[:1]:
        if r.measurements:
            context = {k: r.measurements[-1].stats.get(k) for k in ("backend", "precision", "threads", "runs")}
    return {
        "model": str(model_pt), "model_name": Path(model_pt).stem, "data": str(data_src),
        "target_ms": opts.target_ms, "percentile": pct, "imgsz": chosen.imgsz, "threads": opts.threads,
        "backend": chosen.backend, "precision": chosen.precision, "device": opts.device,
        "lever": lever, "reason": res.reason, "chosen": chosen.to_dict(),
        "achieved_ratio": pinfo.get("achieved_ratio", 0.0) if chosen.ratio > 0 else 0.0,
        "achieved_ms": achieved_ms, "baseline_ms": baseline_ms,
        "measurements": res.measurements_used + ver.measurements_used,
        "search_measurements": res.measurements_used, "verify_measurements": ver.measurements_used,
        "max_measurements": opts.max_measurements,
        "candidates": cands,
        "verification": {"steps": ver.steps, "decision": ver.decision, "records": ver.records},
        "accuracy_before": before, "accuracy_after": after,
        "map50_95_before": before.get("map50_95"), "map50_95_after": after.get("map50_95"),
        "map50_before": before.get("map50"), "map50_after": after.get("map50"),
        "params_before": pinfo.get("params_before") or metrics.get("params"),
        "params_after": metrics.get("params"),
        "gflops_before": pinfo.get("gflops_before") or metrics.get("gflops"),
        "gflops_after": metrics.get("gflops"),
        "widths": pinfo.get("widths"),
        "lever_costs": costs,
        "finetune": work.state["finetuned"],
        "package_info": {k: pkg_info.get(k) for k in ("name", "version", "precision", "signed", "validated", "parity")},
        "phases_s": dict(work.state["phases_s"]), "total_s": round(time.monotonic() - t_start, 1),
        "device_context": context,
    }


def cli_build(args: Any, cfg: Any) -> dict[str, Any]:
    """``prune-pack build``: flags win over the config's ``build`` section, which wins over defaults."""
    from prune_pack.config import Config
    from prune_pack.deploy import demo

    cfg = cfg if cfg is not None else Config()
    b = cfg.build
    precision = "int8" if getattr(args, "int8", False) else (args.precision or b.precision)
    if getattr(args, "int8", False) and args.precision not in (None, "int8"):
        raise UserInputError(f"--int8 contradicts --precision {args.precision}")
    is_demo = args.model is None and args.data is None
    epochs = args.epochs if args.epochs is not None else (demo.DEMO_EPOCHS if is_demo else b.epochs)
    if epochs < 1:
        raise UserInputError(f"--epochs {epochs}: at least one fine-tuning epoch is needed")
    threads = args.threads if args.threads is not None else b.threads
    imgsz = args.imgsz or (demo.DEMO_IMGSZ if is_demo and b.imgsz == 640 else b.imgsz)
    opts = BuildOptions(
        target_ms=float(args.target_ms), out=Path(args.out or b.out), model=args.model, data=args.data,
        percentile=args.percentile or b.percentile, imgsz=imgsz, threads=threads, epochs=epochs,
        precision=precision, backend=args.backend or b.backend, device=args.device or b.device, broker=args.broker,
        sign=args.sign, resume=bool(args.resume), max_ratio=b.max_ratio, max_measurements=b.max_measurements,
        profile_timeout_s=b.profile_timeout_s, criterion=args.criterion, imgsz_steps=b.imgsz_steps, input_shape=b.input_shape,
        finetune_fraction=demo.DEMO_FRACTION if is_demo else 1.0, cfg=cfg)
    return run_build(opts)
