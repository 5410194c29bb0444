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

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

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
    imgsz: int = 640

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.precision}-{self.imgsz}-r{self.ratio:.3f}"

    @property
    def family(self) -> tuple[str, str, int]:
        return (self.backend, self.precision, self.imgsz)

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
        """The percentile's confidence interval; a missing side is unknown (-inf / +inf)."""
        ci = self.stats.get(f"{percentile}_ci_ms") or [None, None]
        lo = float(ci[0]) if ci[0] is not None else -math.inf
        hi = float(ci[1]) if ci[1] is not None else math.inf
        return lo, hi

    def summary(self, percentile: str) -> dict[str, Any]:
        keep = [f"{p}_ms" for p in PERCENTILES] + [f"{p}_ci_ms" for p in PERCENTILES] + [
            "mean_ms", "min_ms", "max_ms", "std_ms", "runs", "threads", "backend", "precision"]
        return {k: self.stats[k] for k in keep if k in self.stats}


def decide(measurements: Sequence[Measurement], target_ms: float, percentile: str, margin: float,
           max_repeats: int) -> str:
    """PASS / FAIL from the confidence interval; UNSURE asks for one more measurement.

    After ``1 + max_repeats`` measurements that straddle the target, the pooled point estimate
    (median) decides, and it must clear the target by ``margin`` (relative) to pass: a candidate
    that is only just under the target on average would miss on the next day's measurement.
    """
    if not measurements:
        return UNSURE
    for m in measurements:
        lo, hi = m.bounds(percentile)
        if hi <= target_ms:
            return PASS
        if lo > target_ms:
            return FAIL
    if len(measurements) <= max_repeats:
        return UNSURE
    pts = sorted(m.point(percentile) for m in measurements)
    mid = len(pts) // 2
    pooled = pts[mid] if len(pts) % 2 else (pts[mid - 1] + pts[mid]) / 2
    return PASS if pooled <= target_ms * (1.0 - margin) else FAIL


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
        pts = sorted(m.point(percentile) for m in self.measurements)
        return pts[len(pts) // 2]

    def to_dict(self, percentile: str) -> dict[str, Any]:
        return {
            "key": self.candidate.key, **self.candidate.to_dict(),
            "decision": self.decision, "same_as": self.same_as, "gate": self.gate,
            "latency_ms": self.point(percentile),
            "ci_ms": list(self.measurements[-1].bounds(percentile)) if self.measurements else None,
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

    def next_more_pruned(self, signature: Optional[Callable[[Candidate], Hashable]] = None) -> Optional[Candidate]:
        """The grid point after the chosen one whose rounded widths differ (the verification step)."""
        if not self.chosen or not self.grid:
            return None
        grid = self.grid
        after = [c for c in grid if c.ratio > self.chosen.ratio]
        if not after:
            return None
        if signature is None:
            return after[0]
        mine = signature(self.chosen) if self.chosen.ratio > 0 else None
        for c in after:
            if signature(c) != mine:
                return c
        return None

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


def _guess_index(grid: Sequence[Candidate], lo: int, hi: Optional[int], lat: dict[int, float], target: float) -> int:
    """Next grid index to probe, strictly inside (lo, hi).

    Latency is modelled as L(r) = L0 * (1 - r)^k with k fitted through the measured points
    (k = 2 is the FLOPs law of uniform channel pruning; real CPUs fall slower). The model only
    *proposes*: the choice is clamped into the open bracket, so steps and plateaus in the real
    curve cost at most extra probes, never a wrong bracket.
    """
    ratios = [0.0] + [c.ratio for c in grid]  # index i of grid is position i + 1 here

    def r_of(i: int) -> float:
        return ratios[i + 1]

    L0 = lat[-1]
    k = 1.5
    fits = []
    for i, L in lat.items():
        if i >= 0 and 0 < L < L0 and r_of(i) > 0:
            fits.append(math.log(L / L0) / math.log(1 - r_of(i)))
    if fits:
        k = max(0.3, min(4.0, sum(fits) / len(fits)))
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

    def result(chosen: Optional[Candidate], reason: str) -> SearchResult:
        lever = _lever_name(base, chosen) if chosen else None
        return SearchResult(target_ms, percentile, chosen, lever, s.records, s.order, s.used, grid, reason)

    try:
        for lv in levers:
            rec = s.judge(lv)
            if rec.decision == PASS and (lv is base or s.gate(rec)):
                return result(lv, "target met by the unpruned model" if lv is base else
                              f"target met by changing {_lever_name(base, lv)} (no pruning)")
        ratios = sorted({round(float(r), 4) for r in ratios if r > 0})
        if not ratios:
            return result(None, "no lever met the target and pruning is disabled")
        if prune_family is None:
            ok = [s.records[lv.key] for lv in levers if lv is base or s.gate(s.records[lv.key])]
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
        cand = result.next_more_pruned(signature)
        steps += 1
        short = True
    return Verification(None, FAIL, steps, records, used)
