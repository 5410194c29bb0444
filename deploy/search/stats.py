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
# its point. Measured (docs/benchmarks.md, "noise"): on a quiet 2-core host, p95 of 100 runs spans
# 10-45 % of its point; with the other core busy, 60-160 %. A wide measurement is repeated before
# anything is decided from it, and a baseline that will not repeat means a busy machine.
WIDE = 0.5


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

    def width(self, percentile: str) -> float:
        """The interval's span relative to the point (``WIDE`` compares against this)."""
        lo, hi = self.bounds(percentile)
        p = self.point(percentile)
        if not (math.isfinite(lo) and math.isfinite(hi)) or p <= 0:
            return math.inf
        return (hi - lo) / p

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


def agree(a: Measurement, b: Measurement, percentile: str) -> bool:
    """Two measurements of the same model agree when their intervals overlap."""
    alo, ahi = a.bounds(percentile)
    blo, bhi = b.bounds(percentile)
    return alo <= bhi and blo <= ahi


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
    if both.width(percentile) > WIDE:
        return UNSURE if len(measurements) <= max_repeats else NOISY
    for m in list(measurements) + ([both] if len(measurements) > 1 else []):
        if m.width(percentile) > WIDE:
            continue
        lo, hi = m.bounds(percentile)
        if hi <= target_ms:
            return PASS
        if lo > target_ms:
            return FAIL
    if len(measurements) <= max_repeats:
        return UNSURE
    est = point_estimate(measurements, percentile)
    return PASS if est is not None and est <= target_ms * (1.0 - margin) else FAIL
