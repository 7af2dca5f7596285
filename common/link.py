"""The link model: rate over time, one-way delay, jitter and stalls.

One model serves two placements: in process around the sender's frame stream
(`pace`, which releases frames when the link would have delivered them), and the
standalone TCP relay (`channel.relay`), which shapes the real bytes of a connection.
Both are deterministic under a fixed seed.

Rates are in bit/s; times in seconds from the start of the link.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

MARKOV_RATES_MBIT = (5, 10, 25, 50, 100, 200)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float:
    """'20mbit', '500kbit', '1gbit', '2e6' -> bit/s."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmg]?)(?:bit|bps|b/s)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read rate {text!r}; try 20mbit, 500kbit or 1gbit")
    rate = float(match.group(1)) * _UNITS[match.group(2)]
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {text!r}")
    return rate


def parse_duration(text: str) -> float:
    """'10ms', '1.5s', '250us', '0' -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read duration {text!r}; try 10ms or 1.5s")
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[match.group(2)]


@dataclass
class Trace:
    """Piecewise-constant rate: `rates[i]` holds from `times[i]` until `times[i+1]`.

    The last rate holds forever, unless `duration_s` says where the recorded or generated trace
    ends (a replay must not read past it: the rest would be the last rate, constant).
    """

    times: list[float]
    rates: list[float]
    duration_s: float | None = None

    def __post_init__(self):
        if not self.times or len(self.times) != len(self.rates) or self.times[0] != 0:
            raise ValueError("a trace needs matching times and rates, starting at time 0")
        if any(b <= a for a, b in zip(self.times, self.times[1:])):
            raise ValueError("trace times must increase")
        if any(r <= 0 for r in self.rates):
            raise ValueError("trace rates must be positive")

    @classmethod
    def constant(cls, rate: float) -> Trace:
        return cls([0.0], [rate])

    @classmethod
    def step(cls, before: float, after: float, at: float) -> Trace:
        return cls([0.0, at], [before, after])

    @classmethod
    def markov(cls, seed: int = 0, dwell_s: float = 0.5, duration_s: float = 600.0,
               rates_mbit: tuple[float, ...] = MARKOV_RATES_MBIT) -> Trace:
        """A random walk over the rate states: every `dwell_s` it moves one state up, down, or stays."""
        rng = random.Random(seed)
        state = rng.randrange(len(rates_mbit))
        times, rates = [], []
        for i in range(math.ceil(duration_s / dwell_s)):
            times.append(i * dwell_s)
            rates.append(rates_mbit[state] * 1e6)
            state = min(max(state + rng.choice((-1, 0, 1)), 0), len(rates_mbit) - 1)
        return cls(times, rates, duration_s)

    @classmethod
    def from_file(cls, path: str | Path) -> Trace:
        """CSV rows of `time,rate` (seconds, bit/s or a rate like 20mbit); a header row is allowed."""
        times, rates = [], []
        with open(path, newline="") as handle:
            for row in csv.reader(handle):
                if not row or row[0].strip().startswith("#"):
                    continue
                try:
                    times.append(float(row[0]))
                except ValueError:
                    if not times:
                        continue  # header
                    raise ValueError(f"{path}: bad time {row[0]!r}") from None
                rates.append(parse_rate(row[1]))
        return cls(times, rates)

    def rate_at(self, t: float) -> float:
        return self.rates[bisect.bisect_right(self.times, t) - 1]

    def finish_time(self, start: float, bits: float) -> float:
        """When `bits` sent from `start` have all left the sender at the trace's rate."""
        index = bisect.bisect_right(self.times, start) - 1
        t = start
        while True:
            end = self.times[index + 1] if index + 1 < len(self.times) else math.inf
            capacity = (end - t) * self.rates[index]
            if bits <= capacity:
                return t + bits / self.rates[index]
            bits -= capacity
            t = end
            index += 1


@dataclass
class Link:
    """A shaped link: serialization at the trace's rate, then delay, jitter and stalls.

    Stalls model loss-induced retransmission timeouts: a Poisson process of
    `stall_rate` events per second of transmission, each freezing the link for `stall_s`.
    """

    trace: Trace
    delay_s: float = 0.0
    jitter_s: float = 0.0
    stall_rate: float = 0.0
    stall_s: float = 0.2
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _free_at: float = field(init=False, default=0.0)
    _last_arrival: float = field(init=False, default=0.0)
    _next_stall: float = field(init=False, default=math.inf)

    def __post_init__(self):
        if min(self.delay_s, self.jitter_s, self.stall_rate, self.stall_s) < 0:
            raise ValueError("delay, jitter and stall figures must be >= 0")
        self.reset()

    def reset(self) -> None:
        self._rng = random.Random(self.seed)
        self._free_at = 0.0
        self._last_arrival = 0.0
        self._next_stall = self._rng.expovariate(self.stall_rate) if self.stall_rate > 0 else math.inf
        self.stalls = 0

    def send(self, nbytes: int, now: float) -> float:
        """Send `nbytes` at time `now`; return when the last byte arrives (in order, never earlier than before)."""
        start = max(now, self._free_at)
        done = self.trace.finish_time(start, nbytes * 8)
        while self._next_stall < done:  # a stall during this segment pushes it back
            done += self.stall_s
            self.stalls += 1
            self._next_stall += self.stall_s + self._rng.expovariate(self.stall_rate)
        self._free_at = done
        jitter = self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0
        arrival = max(done + self.delay_s + jitter, self._last_arrival)
        self._last_arrival = arrival
        return arrival

    def transfer_time(self, sizes: list[int], start: float = 0.0) -> float:
        """Time from `start` until the last of these back-to-back messages arrives (link state is reset first)."""
        self.reset()
        arrival = start
        for size in sizes:
            arrival = self.send(size, start)
        return arrival - start


def link_from_options(rate: str | None = None, trace: str | None = None, delay: str = "0", jitter: str = "0",
                      stall_rate: float = 0.0, stall: str = "200ms", seed: int = 0) -> Link:
    """Build a link from CLI-style strings. `trace` is constant (default), markov, step:A:B:T or a CSV path."""
    if trace in (None, "", "constant"):
        shape = Trace.constant(parse_rate(rate or "100mbit"))
    elif trace == "markov":
        shape = Trace.markov(seed)
    elif trace.startswith("step:"):
        _, before, after, at = trace.split(":")
        shape = Trace.step(parse_rate(before), parse_rate(after), parse_duration(at))
    else:
        shape = Trace.from_file(trace)
    return Link(shape, parse_duration(delay), parse_duration(jitter), stall_rate, parse_duration(stall), seed)


def pace(frames, link: Link, wire_bytes, clock=None, sleep=None):
    """Release each frame when the link would have delivered it (in-process placement).

    `wire_bytes(frame)` gives its size on the wire. Yields the frames unchanged.
    """
    import time

    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    link.reset()
    start = clock()
    for frame in frames:
        arrival = link.send(wire_bytes(frame), clock() - start)
        wait = arrival - (clock() - start)
        if wait > 0:
            sleep(wait)
        yield frame
