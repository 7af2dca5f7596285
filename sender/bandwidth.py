"""Bandwidth estimation from the stream itself: an EWMA over acknowledged transfers (or
acknowledged segments of one, see sender.adaptive), with a safety factor.

A transfer's reply acknowledges every chunk, so its bytes over the time from the first
frame to the reply is one goodput sample. Timing single frames does not work: gRPC's
flow-control window (several MB once BDP probing grows it) swallows whole transfers
before the link has carried them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MIN_SAMPLE_BYTES = 64 * 1024  # tiny transfers say more about latency than rate


@dataclass
class BandwidthEstimator:
    alpha: float = 0.3  # weight of the newest sample
    safety: float = 0.8  # plan with this fraction of the estimate
    # An estimate older than this is forgotten, so a sender that stopped sending caches (it
    # sent text instead) probes the link again rather than trusting a rate from long ago.
    max_age_s: float = 30.0
    _ewma: float | None = None
    _last: float | None = None
    _at: float = 0.0

    def update(self, nbytes: int, seconds: float, now: float | None = None) -> None:
        if nbytes < MIN_SAMPLE_BYTES or seconds <= 0:
            return
        rate = nbytes * 8 / seconds
        self._last = rate
        self._at = time.monotonic() if now is None else now
        self._ewma = rate if self._ewma is None else self.alpha * rate + (1 - self.alpha) * self._ewma

    def observe_stream(self, pulls: list[tuple[float, int]], end: float) -> None:
        """pulls: (time the frame was handed to gRPC, its size), in order; end: when the reply came."""
        if pulls:
            self.update(sum(size for _, size in pulls), end - pulls[0][0])

    def _stale(self, now: float | None) -> bool:
        if self._ewma is not None and (time.monotonic() if now is None else now) - self._at > self.max_age_s:
            self._ewma = self._last = None
        return self._ewma is None

    def estimate(self, now: float | None = None) -> float | None:
        """Bit/s to plan with, or None before any transfer (or after max_age_s without one)."""
        return None if self._stale(now) else self.safety * self._ewma

    def cautious_estimate(self, now: float | None = None) -> float | None:
        """Like estimate(), but a drop in the newest sample counts at once (for deadlines within a transfer)."""
        return None if self._stale(now) else self.safety * min(self._ewma, self._last)
