"""Metric primitives of the agent that a fleet can aggregate (torch-free, numpy only).

Percentiles over a window are for humans; they cannot be added across devices or over time. The
cumulative latency histogram with fixed bounds (Prometheus' ``le`` buckets, seconds) can: the
exporter (``deploy.exporter``) passes it on unchanged, and ``histogram_quantile`` here is
Prometheus' estimate, so a dashboard and the tests compute the same number from the same buckets.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any, Optional, Sequence

import numpy as np

SAMPLE_WINDOW = 256  # latency / frame-age percentiles over the last N processed frames
RATE_WINDOW_S = 5.0  # input / processed fps over the last N seconds
# Fixed for every device and every version of this schema: 0.5 ms to 2.5 s, dense up to 100 ms where CPU
# detectors and their targets live. Changing them is a telemetry schema change.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05,
                     0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """Counts per bucket (not cumulative; the last slot is over the top bound) and the sum; not thread-safe."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.slots = [0] * (len(self.bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.slots[bisect.bisect_left(self.bounds, seconds)] += 1  # ``le``: a bound is inclusive
        self.sum_s += seconds

    def to_dict(self) -> dict[str, Any]:
        """``counts[i]`` = observations <= ``bounds[i]`` (cumulative); ``count`` = all (the +Inf bucket)."""
        cum, acc = [], 0
        for n in self.slots[:-1]:
            acc += n
            cum.append(acc)
        return {"bounds": list(self.bounds), "counts": cum, "count": acc + self.slots[-1], "sum": round(self.sum_s, 6)}


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int], count: int) -> Optional[float]:
    """Prometheus' ``histogram_quantile`` over one cumulative histogram (linear within a bucket,
    the first bucket starts at 0, a rank in +Inf answers the highest finite bound); None when empty."""
    if count <= 0:
        return None
    rank = q * count
    i = next((k for k, c in enumerate(counts) if c >= rank), None)
    if i is None:
        return float(bounds[-1])
    lo, below = (0.0, 0) if i == 0 else (float(bounds[i - 1]), counts[i - 1])
    inside = counts[i] - below
    if inside <= 0:
        return lo
    return lo + (float(bounds[i]) - lo) * (rank - below) / inside


def percentiles(samples: deque, qs: tuple[int, ...]) -> dict[str, Optional[float]]:
    if not samples:
        return {f"p{q}": None for q in qs}
    vals = np.percentile(np.fromiter(samples, float, len(samples)), qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, vals)}


def mark(times: deque, now: float) -> None:
    """Record an event for a rate; old entries go at once, so memory stays bounded without readers."""
    times.append(now)
    while times[0] < now - RATE_WINDOW_S:
        times.popleft()


def rate(times: deque, now: float, since: float) -> float:
    while times and times[0] < now - RATE_WINDOW_S:
        times.popleft()
    span = min(RATE_WINDOW_S, now - since)
    return round(len(times) / span, 2) if span > 0.05 else 0.0
