"""The latency model of a pruned family: L(r) = L0 * (1 - r)^k."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class LatencyModel:
    """L(r) = base_ms * (1 - r)^k, fitted through measured (ratio, latency) points.

    k = 2 is the FLOPs law of uniform channel pruning; measured 1.9-2.4 for YOLOv8n at 640 and the
    demo at 896. k is kept within [1, 4] (a pruned model saves at least its share of the channels'
    time): a noisy point that shows almost no gain would otherwise fit k ~ 0.3, and the next probe or
    verification step would go to a far harsher ratio (a demo build once jumped from 15 % to 40 %,
    and shipped that when its measurement budget ran out). Without any point, k = 1.5.
    """

    base_ms: float
    k: float = 1.5

    @classmethod
    def fit(cls, base_ms: float, points: Sequence[tuple[float, Optional[float]]]) -> "LatencyModel":
        ks = [math.log(L / base_ms) / math.log(1 - r) for r, L in points
              if 0 < r < 1 and L is not None and 0 < L < base_ms]
        return cls(base_ms, max(1.0, min(4.0, sum(ks) / len(ks))) if ks else 1.5)

    def predict(self, ratio: float) -> float:
        return self.base_ms * (1.0 - ratio) ** self.k

    def ratio_for(self, target_ms: float) -> float:
        """The pruning ratio whose predicted latency is ``target_ms`` (0 when the base meets it)."""
        if not math.isfinite(self.base_ms) or target_ms >= self.base_ms:
            return 0.0
        return 1.0 - (target_ms / self.base_ms) ** (1.0 / self.k)
