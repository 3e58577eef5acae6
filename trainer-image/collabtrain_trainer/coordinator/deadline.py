"""The round deadline: a multiple of recently measured round times, within bounds."""

from __future__ import annotations

from collections import deque


class AdaptiveDeadline:
    """Deadline for a round, in seconds, learned from how long recent rounds took.

    A fixed timeout is either too short for a slow cluster (every round aborts) or too long
    for a fast one (a lost peer stalls everyone). This one is `factor` times the slowest of
    the last `window` committed rounds plus a margin, clamped to [minimum, maximum]; a round
    that hits the deadline raises it by `backoff` so a cluster that became slower is not
    starved.
    """

    def __init__(
        self,
        initial: float,
        minimum: float,
        maximum: float,
        *,
        factor: float = 3.0,
        margin: float = 1.0,
        window: int = 8,
        backoff: float = 1.5,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(
                f"deadline bounds must satisfy 0 < minimum <= maximum, got {minimum}, {maximum}"
            )
        self.minimum = minimum
        self.maximum = maximum
        self.factor = factor
        self.margin = margin
        self.backoff = backoff
        self._recent: deque[float] = deque(maxlen=window)
        self._current = self._clamp(initial)

    def _clamp(self, seconds: float) -> float:
        return min(self.maximum, max(self.minimum, seconds))

    @property
    def seconds(self) -> float:
        return self._current

    def observe_commit(self, duration: float) -> None:
        self._recent.append(max(0.0, duration))
        self._current = self._clamp(self.factor * max(self._recent) + self.margin)

    def observe_timeout(self) -> None:
        # Measurements from a faster past no longer describe this cluster.
        self._recent.clear()
        self._current = self._clamp(self._current * self.backoff)
