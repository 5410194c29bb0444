"""The build's search (pure, torch-free, deterministic given its evaluator) and the verification
of what it chose.

``search`` explores levers in order of accuracy cost -- runtime/precision/input-size changes at full
width first, then channel pruning over a discrete grid of ratios -- and returns the mildest
candidate whose measured percentile meets the target. Tests drive it with recorded latency tables
standing in for a device.

Decisions under noise (hysteresis, ``stats.decide``): a candidate passes when the upper confidence
bound of its percentile is <= target and fails when the lower bound is > target; in between, or when
the interval is too wide to mean anything, it is measured again and the pooled repeats decide. The
unpruned baseline is measured twice: two measurements that disagree beyond their intervals mean a
busy machine, and the search ends "undecided" instead of extrapolating from noise. Latency is a
property of the architecture, not of the weights, so the search runs on pruned but not recovered
candidates; candidates whose rounded widths are identical (a plateau of the grid) share one
measurement; a ratio whose un-recovered accuracy is beyond hope (``viable``) is never measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence, Union

from prune_pack.deploy.search.judge import Candidate, Judge, Record, SearchState
from prune_pack.deploy.search.latency import LatencyModel
from prune_pack.deploy.search.stats import (
    BUDGET, FAIL, NOISY, PASS, PERCENTILES, UNSURE, WIDE, Measurement, agree, decide, point_estimate,
)
from prune_pack.deploy.settings import Target
from prune_pack.errors import UserInputError

MET, UNREACHABLE, UNDECIDED = "met", "unreachable", "undecided"


@dataclass
class SearchResult:
    target_ms: float  # resolved (a relative target: from the measured baseline)
    percentile: str
    chosen: Optional[Candidate]
    lever: Optional[str]  # none | backend | precision | imgsz | pruning | pruning+<precision>
    records: dict[str, Record]
    order: list[str]  # keys in the order they were decided
    measurements_used: int
    grid: list[Candidate]  # the pruning grid that was searched (empty when no pruning was needed)
    reason: str = ""
    outcome: str = MET  # met | unreachable | undecided (the device too noisy, or the budget spent)
    baseline_ms: Optional[float] = None
    floor_ratio: Optional[float] = None  # the mildest ratio found beyond the accuracy floor, if any
    base: Optional[Candidate] = None  # levers[0], what the user asked for

    @property
    def chosen_record(self) -> Optional[Record]:
        return self.records.get(self.chosen.key) if self.chosen else None

    def best(self) -> Optional[Record]:
        """The fastest measured candidate within the gates (for the 'unreachable' message)."""
        measured = [r for r in self.records.values() if r.measurements and r.gate is not False and r.viable is not False]
        return min(measured, key=lambda r: r.point(self.percentile) or math.inf, default=None)

    def next_more_pruned(self, signature: Optional[Callable[[Candidate], Hashable]] = None,
                         final_ms: Optional[float] = None, margin: float = 0.02) -> Optional[Candidate]:
        """The verification step: a grid point after the chosen one whose rounded widths differ.

        Without ``final_ms`` the next such point. With it (the recovered model's miss), the step is
        sized by the miss: the device ran the same architecture ``final_ms / searched`` slower than
        during the search (load drift, new weights), so the step goes to the mildest point whose
        search-time latency -- measured, else predicted by the ``LatencyModel`` -- clears the target
        by that factor. Still one step, always toward more pruning, never beyond the floor.
        """
        if not self.chosen or not self.grid:
            return None
        after = [c for c in self.grid if c.ratio > self.chosen.ratio
                 and (self.floor_ratio is None or c.ratio < self.floor_ratio)]
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
        model = LatencyModel.fit(base, [(r.candidate.ratio, r.point(self.percentile)) for r in fam]) if base else None
        for c in after:
            r = self.records.get(c.key)
            est = r.point(self.percentile) if r and r.measurements else (model.predict(c.ratio) if model else None)
            if est is not None and est <= need:
                return c
        return after[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_ms": self.target_ms, "percentile": self.percentile, "outcome": self.outcome,
            "chosen": self.chosen.to_dict() if self.chosen else None, "lever": self.lever,
            "measurements_used": self.measurements_used, "reason": self.reason, "baseline_ms": self.baseline_ms,
            "floor_ratio": self.floor_ratio,
            "candidates": [self.records[k].to_dict(self.percentile) for k in self.order],
        }


class _Searcher:
    """The search's memory: records by key, plateau twins, gate and floor verdicts."""

    def __init__(self, judge: Judge, signature: Optional[Callable[[Candidate], Hashable]],
                 gate: Optional[Callable[[Candidate], bool]], viable: Optional[Callable[[Candidate], bool]]) -> None:
        self.j, self.signature_fn, self.gate_fn, self.viable_fn = judge, signature, gate, viable
        self.records: dict[str, Record] = {}
        self.order: list[str] = []
        self.by_signature: dict[Hashable, str] = {}
        self.baseline_ms: Optional[float] = None

    def _sig(self, c: Candidate) -> Optional[Hashable]:
        if self.signature_fn is None or c.ratio == 0:
            return None
        st = self.j.state
        if c.key not in st.signatures:
            st.signatures[c.key] = self.signature_fn(c)
        # JSON round trips turn tuples into lists; compare canonical JSON text.
        return (c.family, json.dumps(st.signatures[c.key], sort_keys=True, default=str))

    def judge(self, c: Candidate) -> Record:
        """Decide one candidate (measuring as needed); a decided candidate is never re-measured."""
        rec = self.records.get(c.key)
        if rec is not None and rec.decision in (PASS, FAIL):
            return rec
        if not self.j.can_measure(c.key, len(rec.measurements) if rec else 0):
            # before pruning it for its signature: that costs minutes on a big model
            rec = self.records.setdefault(c.key, Record(c))
            rec.decision = BUDGET
            return rec
        rec = self.records.setdefault(c.key, Record(c))
        sig = self._sig(c)
        if sig is not None and sig in self.by_signature and self.by_signature[sig] != c.key:
            twin = self.records[self.by_signature[sig]]
            rec.same_as, rec.decision, rec.measurements = twin.candidate.key, twin.decision, list(twin.measurements)
            self.order.append(c.key)
            return rec
        rec.decision = self.j.decide(rec)
        if rec.decision in (PASS, FAIL):
            if sig is not None:
                self.by_signature[sig] = c.key
            self.order.append(c.key)
        return rec

    def baseline(self, c: Candidate, relative: Optional[float], harshest: float) -> Record:
        """Measure the unpruned baseline until two measurements agree (at most three), then resolve a
        relative target from it and decide it. NOISY when it will not repeat -- unless the target is
        absolute and the noise changes nothing: every measurement meets it, or even the fastest of them
        pruned by ``harshest`` at the steepest latency law (k = 4) would still miss it."""
        rec = self.records.setdefault(c.key, Record(c))
        pct = self.j.pct

        def steady(ms: list[Measurement]) -> bool:
            ref = self.j.target_ms or (relative or 1.0) * (point_estimate(ms, pct) or math.inf)
            return agree(ms[-1], ms[-2], pct) and all(m.width(pct, ref) <= WIDE for m in ms)

        while not (len(rec.measurements) >= 2 and steady(rec.measurements[-2:])):
            if len(rec.measurements) >= 3:
                sides = {decide([m], self.j.target_ms, pct, 0.0, 0) for m in rec.measurements} \
                    if relative is None else set()
                fastest = min(m.bounds(pct)[0] for m in rec.measurements)
                out_of_reach = LatencyModel(fastest, 4.0).predict(harshest) > (self.j.target_ms or 0.0)
                if not (sides == {PASS} or (sides == {FAIL} and out_of_reach)):
                    rec.decision, self.baseline_ms = NOISY, rec.point(pct)
                    return rec
                break
            if self.j.measure(rec) is None:
                rec.decision, self.baseline_ms = BUDGET, rec.point(pct)
                return rec
        # The baseline is the two measurements that agreed: a burst of load before them would, for
        # one, loosen a relative target. All of them when none agreed (an absolute target, decided).
        agreed = rec.measurements[-2:] if steady(rec.measurements[-2:]) else rec.measurements
        self.baseline_ms = point_estimate(agreed, pct)
        if relative is not None:
            self.j.target_ms = relative * (self.baseline_ms or math.inf)
        rec.decision = self.j.decide(rec)
        self.order.append(c.key)
        return rec

    def _verdict(self, store: dict[str, bool], fn: Optional[Callable[[Candidate], bool]], c: Candidate) -> bool:
        if fn is None:
            return True
        if c.key not in store:
            store[c.key] = bool(fn(c))
            self.j.saved()
        return store[c.key]

    def gate(self, rec: Record) -> bool:
        if rec.gate is None:
            rec.gate = self._verdict(self.j.state.gates, self.gate_fn, rec.candidate)
        return rec.gate

    def viable(self, c: Candidate) -> bool:
        rec = self.records.setdefault(c.key, Record(c))
        if rec.viable is None:
            rec.viable = self._verdict(self.j.state.viable, self.viable_fn, c)
        return rec.viable


def _skip_smaller_input(s: _Searcher, levers: Sequence[Candidate], i: int, base: Candidate, target_ms: float) -> bool:
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
    lat = rec.point(s.j.pct)
    return lat is not None and lat * lv.pixels / rec.candidate.pixels > target_ms


def lever_name(base: Candidate, c: Candidate) -> str:
    changed = [name for name, a, b in (("backend", c.backend, base.backend), ("precision", c.precision, base.precision),
                                       ("imgsz", c.imgsz, base.imgsz)) if a != b]
    if c.ratio > 0:
        return "+".join(["pruning"] + changed)
    return "+".join(changed) or "none"


def guess_index(grid: Sequence[Candidate], lo: int, hi: Optional[int], lat: dict[int, float], target: float,
                upper: Optional[int] = None) -> int:
    """Next grid index to probe, strictly inside (lo, min(hi, upper)).

    The ``LatencyModel`` only *proposes*: the choice is clamped into the open bracket, so steps and
    plateaus in the real curve cost at most extra probes, never a wrong bracket. Inside a measured
    bracket the guess interpolates linearly in ratio between its ends.
    """
    ratios = [0.0] + [c.ratio for c in grid]  # index i of grid is position i + 1 here

    def r_of(i: int) -> float:
        return ratios[i + 1]

    if hi is not None and lo >= 0 and lo in lat and hi in lat and lat[lo] > lat[hi]:
        a, b = lat[lo], lat[hi]
        r = r_of(lo) + (r_of(hi) - r_of(lo)) * (a - target) / (a - b)
    else:
        r = LatencyModel.fit(lat[-1], [(r_of(i), L) for i, L in lat.items() if i >= 0]).ratio_for(target)
    end = min(x for x in (hi, upper, len(grid)) if x is not None)
    # The smallest grid ratio >= the prediction (predictions err on the mild side otherwise).
    idx = next((i for i in range(lo + 1, end) if r_of(i) >= r - 1e-9), end - 1)
    return max(lo + 1, min(idx, end - 1))


def search(
    evaluate: Callable[[Candidate], Measurement],
    levers: Sequence[Candidate],
    target: Union[Target, float],
    percentile: str = "p95",
    ratios: Sequence[float] = (),
    max_measurements: int = 8,
    margin: float = 0.02,
    max_repeats: int = 1,
    signature: Optional[Callable[[Candidate], Hashable]] = None,
    gate: Optional[Callable[[Candidate], bool]] = None,
    viable: Optional[Callable[[Candidate], bool]] = None,
    state: Optional[SearchState] = None,
    on_update: Optional[Callable[[SearchState], None]] = None,
    prune_family: Optional[Candidate] = None,
    judge: Optional[Judge] = None,
) -> SearchResult:
    """Find the candidate with the least accuracy cost whose latency meets ``target``.

    ``levers``: full-width candidates in order of accuracy cost; ``levers[0]`` is the baseline
    (what the user asked for; a relative target is a fraction of its measured latency). Each is
    measured in turn; the first that meets the target and passes ``gate`` (the accuracy gate, e.g.
    INT8 mAP drop; the baseline is not gated) wins. Otherwise ``ratios`` (ascending, > 0) are
    searched in the pruning family -- ``prune_family``, else the fastest measured lever that passed
    its gate -- by bracketing: a latency-model guess, then interpolation inside the [fails, passes]
    bracket until its ends are grid neighbours, so the result is the mildest passing grid point
    measured. ``signature`` (rounded widths) lets a probe on a plateau inherit its twin's decision;
    ``viable`` (the accuracy floor before recovery) cuts the grid where accuracy is beyond hope.

    ``evaluate`` is called at most ``max_measurements`` times (repeats included; or ``judge``'s
    budget when given); ``state`` holds earlier measurements (``--resume``), replayed in their place.
    """
    target = target if isinstance(target, Target) else Target(float(target))
    if percentile not in PERCENTILES:
        raise UserInputError(f"--percentile {percentile}: choose from {', '.join(PERCENTILES)}")
    if not levers:
        raise ValueError("search needs at least the baseline candidate")
    j = judge or Judge(evaluate, None, percentile, max_measurements, margin, max_repeats, state, on_update)
    j.target_ms = None if target.relative else target.value
    s = _Searcher(j, signature, gate, viable)
    base = levers[0]
    grid: list[Candidate] = []
    all_ratios = sorted({round(float(r), 4) for r in ratios if r > 0})
    floor_ratio: Optional[float] = None

    def result(chosen: Optional[Candidate], reason: str, outcome: str = MET) -> SearchResult:
        # A full-width winner still gets its family's grid: if the shipped model misses on
        # verification, the one step goes into pruning.
        g = grid or ([dataclasses.replace(chosen, ratio=r) for r in all_ratios] if chosen and chosen.ratio == 0 else [])
        return SearchResult(j.target_ms or math.nan, percentile, chosen, lever_name(base, chosen) if chosen else None,
                            s.records, s.order, j.used, g, reason, outcome if chosen or outcome != MET else UNREACHABLE,
                            s.baseline_ms, floor_ratio, base)

    base_rec = s.baseline(base, target.value if target.relative else None, max(all_ratios, default=0.0))
    if base_rec.decision in (NOISY, BUDGET):
        return result(*_halted(s, base, base_rec))
    rec = _full_width(s, levers, base_rec)
    if rec is not None and rec.decision in (NOISY, BUDGET):
        return result(*_halted(s, base, rec))
    if rec is not None:
        lv = rec.candidate
        return result(lv, "target met by the unpruned model" if lv == base else
                      f"target met by changing {lever_name(base, lv)} (no pruning)")
    if not all_ratios:
        return result(None, "no lever met the target and pruning is disabled")
    if prune_family is None:
        # skipped (unmeasured) smaller-input levers are not candidates
        ok = [s.records[lv.key] for lv in levers if lv.key in s.records and s.records[lv.key].measurements
              and (lv is base or s.gate(s.records[lv.key]))]
        prune_family = min(ok, key=lambda r: r.point(percentile) or math.inf).candidate
    fam_base = s.judge(dataclasses.replace(prune_family, ratio=0.0))
    if fam_base.decision in (NOISY, BUDGET):
        return result(*_halted(s, base, fam_base))
    grid = [dataclasses.replace(prune_family, ratio=r) for r in all_ratios]
    hi, floor_ratio, halted = _bracket(s, grid, fam_base.point(percentile) or math.inf)
    if halted is not None:
        return result(*_halted(s, base, halted))
    if hi is None:
        if floor_ratio is not None:
            return result(None, f"no ratio within the accuracy floor meets the target (pruning {floor_ratio:.0%} "
                                "would already lose too much before recovery)")
        return result(None, "the maximum pruning ratio does not meet the target")
    return result(grid[hi], "mildest passing pruning ratio on the grid")


def _halted(s: _Searcher, base: Candidate, rec: Record) -> tuple[Optional[Candidate], str, str]:
    """(chosen, reason, outcome) when the search cannot go on: the device is too noisy, or the budget
    is spent (then the mildest passing candidate measured, if any)."""
    if rec.decision == NOISY:
        return None, (f"the device was too noisy to decide {rec.candidate.key}: repeated measurements "
                      "disagreed beyond their confidence intervals (a busy machine)"), UNDECIDED
    passing = [s.records[k] for k in s.order if s.records[k].decision == PASS
               and (s.records[k].candidate.ratio > 0 or s.records[k].candidate == base or s.records[k].gate)]
    if passing:
        best = min(passing, key=lambda r: (r.candidate.ratio, r.point(s.j.pct) or math.inf))
        return best.candidate, f"measurement budget ({s.j.budget}) spent; mildest passing candidate measured", MET
    return None, f"measurement budget ({s.j.budget}) spent before any candidate met the target", UNDECIDED


def _full_width(s: _Searcher, levers: Sequence[Candidate], base_rec: Record) -> Optional[Record]:
    """The levers in order of accuracy cost: the first that meets the target and passes its gate (the
    baseline is not gated), or the record that halted the search (NOISY/BUDGET), or None."""
    base = levers[0]
    for i, lv in enumerate(levers):
        if i and _skip_smaller_input(s, levers, i, base, s.j.target_ms or math.inf):
            continue
        rec = base_rec if i == 0 else s.judge(lv)
        if rec.decision in (NOISY, BUDGET) or (rec.decision == PASS and (i == 0 or s.gate(rec))):
            return rec
    return None


def _bracket(s: _Searcher, grid: list[Candidate], base_ms: float) -> tuple[Optional[int], Optional[float], Optional[Record]]:
    """Bracket the pruning grid until the [fails, passes] ends are neighbours: (index of the mildest
    passing point or None, the mildest ratio found beyond the floor or None, the record that halted
    the search (NOISY/BUDGET) or None)."""
    lat: dict[int, float] = {-1: base_ms}
    lo, hi, upper, floor_ratio = -1, None, len(grid), None
    while (min(hi, upper) if hi is not None else upper) - lo > 1:
        idx = guess_index(grid, lo, hi, lat, s.j.target_ms, upper)
        if not s.viable(grid[idx]):
            upper = idx  # beyond the accuracy floor before recovery: so is every harsher ratio
            floor_ratio = grid[idx].ratio
            continue
        rec = s.judge(grid[idx])
        if rec.decision in (NOISY, BUDGET):
            return hi, floor_ratio, rec
        p = rec.point(s.j.pct)
        if p is not None:
            lat[idx] = p
        if rec.decision == PASS:
            hi = idx
        else:
            lo = idx
    return hi, floor_ratio, None


@dataclass
class Verification:
    candidate: Optional[Candidate]  # what ships (None: still missing after the one step)
    decision: str
    steps: int  # 0, or 1 when the first recovered model missed and one more-pruned point was used
    records: list[dict[str, Any]]
    measurements_used: int


def verify(result: SearchResult, judge: Judge, prepare_final: Callable[[Candidate, bool], None],
           measure_final: Callable[[Candidate], Measurement],
           signature: Optional[Callable[[Candidate], Hashable]] = None) -> Verification:
    """Measure the recovered model at the chosen point; on a miss, step once toward more pruning.

    ``prepare_final(candidate, short)`` produces the shippable model for a candidate (the full
    recovery when ``short`` is False, a short one after a step); ``measure_final`` profiles it on
    the device, through ``judge`` (the search's budget and replay, keys ``final-<candidate>``). The
    step never goes back: a miss moves to the next grid point whose rounded widths differ, and that
    is the last try (noise must not make the build oscillate).
    """
    assert result.chosen is not None
    pct = result.percentile
    used0, steps, records = judge.used, 0, []
    cand: Optional[Candidate] = result.chosen
    short = False
    while cand is not None:
        prepare_final(cand, short)
        rec = Record(cand)
        d = judge.decide(rec, key=f"final-{cand.key}", evaluate=measure_final)
        if d == BUDGET:  # the pooled estimate decides (conservatively, with margin)
            d = decide(rec.measurements, result.target_ms, pct, judge.margin, 0) if rec.measurements else FAIL
            d = FAIL if d == UNSURE else d
        records.append({"key": cand.key, **cand.to_dict(), "short_recovery": short, "decision": d,
                        "latency_ms": rec.point(pct), "measurements": [m.summary(pct) for m in rec.measurements]})
        if d == PASS:
            return Verification(cand, PASS, steps, records, judge.used - used0)
        if d == NOISY or steps >= 1 or cand.ratio == 0 and not result.grid:
            break
        cand = result.next_more_pruned(signature, final_ms=records[-1]["latency_ms"], margin=judge.margin)
        if cand is not None and not judge.can_measure(f"final-{cand.key}"):
            break  # no budget left to measure the step: do not spend a recovery on it
        steps += 1
        short = True
    return Verification(None, records[-1]["decision"] if records else FAIL, steps, records, judge.used - used0)
