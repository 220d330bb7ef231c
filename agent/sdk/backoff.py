"""Retry delays for anything that reconnects: the agent to its controller, alert delivery."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter").

    Each delay is uniform in [base, min(cap, base * 2**attempt)], so a fleet that lost its
    controller at the same moment does not come back in lockstep.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return self._rng.uniform(self.base, max(self.base, ceiling))

    def reset(self) -> None:
        self.attempt = 0
