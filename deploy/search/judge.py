"""Candidates, what is known about them, and the one measure-until-decided loop.

The search and the verification of the shipped package decide through the same ``Judge``: one
measurement budget, one replay of earlier measurements (``--resume``), one decision rule
(``stats.decide``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from prune_pack.imgsz import ImgSz, hw, norm_imgsz, shape_str
from prune_pack.deploy.search.stats import BUDGET, UNSURE, Measurement, combined, decide, point_estimate


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
class Record:
    """What is known about one candidate."""

    candidate: Candidate
    measurements: list[Measurement] = field(default_factory=list)
    decision: Optional[str] = None
    same_as: Optional[str] = None  # key of a candidate with identical rounded widths (plateau)
    gate: Optional[bool] = None  # accuracy gate (None = not evaluated)
    viable: Optional[bool] = None  # accuracy floor before recovery (None = not evaluated)
    resumed: int = 0  # measurements taken from a previous run's state

    def point(self, percentile: str) -> Optional[float]:
        return point_estimate(self.measurements, percentile)

    def to_dict(self, percentile: str) -> dict[str, Any]:
        both = combined(self.measurements)
        return {
            "key": self.candidate.key, **self.candidate.to_dict(),
            "decision": self.decision, "same_as": self.same_as, "gate": self.gate, "viable": self.viable,
            "latency_ms": self.point(percentile),
            "ci_ms": [v if math.isfinite(v) else None for v in both.bounds(percentile)] if both else None,
            "measurements": [m.summary(percentile) for m in self.measurements],
        }


@dataclass
class SearchState:
    """Everything measured or evaluated so far, keyed by candidate (``final-`` keys: the shipped
    package's verification); serialisable for ``--resume``."""

    measurements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    signatures: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, bool] = field(default_factory=dict)
    viable: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchState":
        return cls(**{f.name: dict(d.get(f.name, {})) for f in dataclasses.fields(cls)})


class Judge:
    """Measures a candidate until the decision rule decides it, within one measurement budget.

    ``target_ms`` may be set after construction (a relative target is known once the baseline is
    measured). A decided record is never measured again, so noise cannot flip a decision back."""

    def __init__(self, evaluate: Callable[[Candidate], Measurement], target_ms: Optional[float], percentile: str,
                 budget: int, margin: float = 0.02, max_repeats: int = 1, state: Optional[SearchState] = None,
                 on_update: Optional[Callable[[SearchState], None]] = None) -> None:
        self.evaluate, self.target_ms, self.pct = evaluate, target_ms, percentile
        self.budget, self.margin, self.max_repeats = budget, margin, max_repeats
        self.state = state if state is not None else SearchState()
        self.on_update = on_update
        self.used = 0

    def saved(self) -> None:
        if self.on_update:
            self.on_update(self.state)

    def can_measure(self, key: str, have: int = 0) -> bool:
        """Whether one more measurement of ``key`` is possible: replayed from state, or in budget."""
        return len(self.state.measurements.get(key, [])) > have or self.used < self.budget

    def measure(self, rec: Record, key: Optional[str] = None,
                evaluate: Optional[Callable[[Candidate], Measurement]] = None) -> Optional[Measurement]:
        """One more measurement of ``rec`` (replayed when ``--resume`` has it; it still counts: the
        same decisions follow); None when the budget is spent."""
        key = key or rec.candidate.key
        stored = self.state.measurements.get(key, [])
        if len(stored) > len(rec.measurements):
            m = Measurement(stored[len(rec.measurements)])
            rec.resumed += 1
        elif self.used >= self.budget:
            return None
        else:
            m = (evaluate or self.evaluate)(rec.candidate)
            self.state.measurements.setdefault(key, []).append(m.stats)
        self.used += 1
        rec.measurements.append(m)
        self.saved()
        return m

    def decide(self, rec: Record, key: Optional[str] = None,
               evaluate: Optional[Callable[[Candidate], Measurement]] = None) -> str:
        """Measure until decided: PASS, FAIL, NOISY, or BUDGET (spent before a decision)."""
        assert self.target_ms is not None, "the target is resolved before anything is decided"
        while True:
            d = decide(rec.measurements, self.target_ms, self.pct, self.margin, self.max_repeats)
            if d != UNSURE:
                return d
            if self.measure(rec, key, evaluate) is None:
                return BUDGET
