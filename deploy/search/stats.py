"""Latency statistics of device measurements: one point estimate, one decision rule.

A measurement is what ``agent.profiler.profile_model`` returns for one profile call: percentiles
with 95 % confidence intervals and, when the device sends them, the raw latencies.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from prune_pack.errors import PrunePackError

PERCENTILES = ("p50", "p90", "p95", "p99")
PASS, FAIL, UNSURE = "pass", "fail", "unsure"
# Decisions that end a search without a verdict on the candidate:
BUDGET = "budget"  # the measurement budget was spent first
NOISY = "noisy"  # repeated measurements stayed too wide, or the baseline would not repeat

# A measurement is "wide" when its percentile's confidence interval spans more than this share of
# the target. Measured: on a quiet 2-core host p95 of 100 runs near its target spans 10-40 % of it
# (docs/benchmarks.md: 36.5 ms with CI up to 48.3 against 40); with other work on the cores, far more
# (the README demo at 896: 114-289 ms against 40, 440 %). A wide measurement is repeated before
# anything is decided from it; still wide after the repeats, the decision is NOISY.
WIDE = 0.5
# ... unless the whole interval is this far from the target: 114-289 ms says "fails 40 ms" however wide it is.
FAR = 2.0


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

    def width(self, percentile: str, ref_ms: float) -> float:
        """The interval's span relative to ``ref_ms`` (the target: ``WIDE`` compares against this)."""
        lo, hi = self.bounds(percentile)
        if not (math.isfinite(lo) and math.isfinite(hi)) or not ref_ms > 0:
            return math.inf
        return (hi - lo) / ref_ms

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


def combined(measurements: Sequence[Measurement]) -> Optional[Measurement]:
    """What several measurements say together: their pool, else the last one."""
    if not measurements:
        return None
    return (pool(measurements) if len(measurements) > 1 else None) or measurements[-1]


def point_estimate(measurements: Sequence[Measurement], percentile: str) -> Optional[float]:
    """The one latency of a candidate measured one or more times: the percentile of the pooled raw
    samples, or, when the device sent none, the median of the measurements' points."""
    if not measurements:
        return None
    pooled = pool(measurements) if len(measurements) > 1 else None
    if pooled is not None and pooled.stats.get(f"{percentile}_ms") is not None:
        return pooled.point(percentile)
    return float(statistics.median(m.point(percentile) for m in measurements))


# Two measurements of one model "agree" when the gap between their intervals is at most this share
# of their mean point. Not zero: a p50 interval of 100 runs spans well under 1 %, while a quiet host
# drifts 4-8 % between two measurements minutes apart (docs/benchmarks.md: 35.9 then 33.2 ms, 40.0 /
# 42.0 ms); a busy one 30-60 % (36.3 then 22.6 ms with four other jobs on two cores).
AGREE_SLACK = 0.10


def agree(a: Measurement, b: Measurement, percentile: str) -> bool:
    """Whether two measurements of the same model say the same, within ``AGREE_SLACK``."""
    alo, ahi = a.bounds(percentile)
    blo, bhi = b.bounds(percentile)
    gap = max(alo - bhi, blo - ahi, 0.0)
    return gap <= AGREE_SLACK * (a.point(percentile) + b.point(percentile)) / 2


def decide(measurements: Sequence[Measurement], target_ms: float, percentile: str, margin: float,
           max_repeats: int) -> str:
    """PASS / FAIL from the confidence interval; UNSURE asks for one more measurement.

    A wide measurement (``WIDE``) decides nothing on its own: it is repeated, and the pooled
    repeats decide. After ``1 + max_repeats`` measurements that straddle the target, the point
    estimate decides, and must clear the target by ``margin`` (relative) to pass: a candidate only
    just under the target on average would miss on the next day's measurement. Still wide then:
    NOISY (the caller reports it instead of extrapolating from noise).
    """
    if not measurements:
        return UNSURE
    both = combined(measurements)
    assert both is not None
    for m in list(measurements) + ([both] if len(measurements) > 1 else []):
        lo, hi = m.bounds(percentile)
        if m.width(percentile, target_ms) > WIDE and not (lo > FAR * target_ms or hi * FAR < target_ms):
            continue  # too wide to say anything this close to the target
        if hi <= target_ms:
            return PASS
        if lo > target_ms:
            return FAIL
    if both.width(percentile, target_ms) > WIDE:
        return UNSURE if len(measurements) <= max_repeats else NOISY
    if len(measurements) <= max_repeats:
        return UNSURE
    est = point_estimate(measurements, percentile)
    return PASS if est is not None and est <= target_ms * (1.0 - margin) else FAIL
