import asyncio
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from channel.netns import NetnsUnavailable, tbf_transfer_seconds
from channel.relay import RelayProcess, measure_goodput
from common.link import Link, Trace, link_from_options, pace, parse_duration, parse_rate


def test_parsing():
    assert parse_rate("20mbit") == 20e6 and parse_rate("500kbit") == 5e5 and parse_rate("1e6") == 1e6
    assert parse_duration("10ms") == 0.01 and parse_duration("1.5s") == 1.5 and parse_duration("0") == 0
    for bad in ("fast", "-1mbit", "0mbit"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_constant_link_time_is_bytes_over_rate_plus_delay():
    link = Link(Trace.constant(8e6), delay_s=0.010)  # 1 MB/s
    assert link.transfer_time([500_000, 500_000]) == pytest.approx(1.0 + 0.010)


def test_step_trace_integrates_the_rate():
    trace = Trace.step(8e6, 4e6, at=1.0)  # 1 MB/s for a second, then 0.5 MB/s
    assert trace.finish_time(0, 8e6 * 1.0 + 4e6 * 2.0) == pytest.approx(3.0)
    assert trace.finish_time(0.5, 8e6) == pytest.approx(2.0)


def test_markov_trace_is_seeded_and_stays_on_its_states():
    a, b, c = Trace.markov(seed=1), Trace.markov(seed=1), Trace.markov(seed=2)
    assert a == b and a != c
    states = [r * 1e6 for r in (5, 10, 25, 50, 100, 200)]
    assert set(a.rates) <= set(states) and len(set(a.rates)) > 3
    assert all(abs(states.index(y) - states.index(x)) <= 1 for x, y in zip(a.rates, a.rates[1:]))


def test_trace_file(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time,rate\n0,10mbit\n2,5000000\n")
    trace = Trace.from_file(path)
    assert trace.rate_at(1) == 10e6 and trace.rate_at(3) == 5e6
    path.write_text("time,rate\n1,10mbit\n")
    with pytest.raises(ValueError, match="starting at time 0"):
        Trace.from_file(path)


def test_jitter_and_stalls_are_deterministic_under_a_seed():
    def times(seed):
        link = Link(Trace.constant(1e6), delay_s=0.005, jitter_s=0.004, stall_rate=2.0, stall_s=0.2, seed=seed)
        return link.transfer_time([10_000] * 50), link.stalls

    (t1, s1), (t2, s2), (t3, _) = times(7), times(7), times(8)
    assert t1 == t2 and s1 == s2 and t1 != t3
    assert s1 > 0
    base = 50 * 10_000 * 8 / 1e6
    assert base + s1 * 0.2 <= t1 <= base + s1 * 0.2 + 0.005 + 0.004 + 1e-9


def test_arrivals_stay_in_order():
    link = Link(Trace.constant(1e7), jitter_s=0.05, seed=3)
    arrivals = [link.send(100, 0.0) for _ in range(200)]
    assert arrivals == sorted(arrivals)


def test_link_from_options_errors():
    with pytest.raises(ValueError):
        link_from_options(rate="20mbit", delay="soon")
    assert link_from_options(trace="step:100mbit:10mbit:1s").trace.rates == [100e6, 10e6]


def test_pace_releases_frames_at_link_times():
    clock = {"t": 0.0}
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        clock["t"] += s

    frames = list(pace([b"x" * 1000] * 3, Link(Trace.constant(8e3 * 1000)), len, lambda: clock["t"], sleep))
    assert len(frames) == 3
    assert clock["t"] == pytest.approx(3 * 1000 * 8 / 8e6)


@pytest.mark.parametrize("rate", ["1mbit", "20mbit", "200mbit"])
def test_relay_goodput_within_five_percent(rate):
    bits = parse_rate(rate)
    goodput = asyncio.run(measure_goodput(link_from_options(rate=rate), int(bits / 8 * 1.0)))
    assert goodput == pytest.approx(bits, rel=0.05)


def test_relay_in_a_process_of_its_own_shapes_the_rate_and_ends_with_its_parent():
    bits = parse_rate("20mbit")
    goodput = asyncio.run(measure_goodput({"rate": "20mbit"}, int(bits / 8 * 0.5)))
    assert goodput == pytest.approx(bits, rel=0.05)
    orphan = subprocess.Popen([sys.executable, "-c", "import sys, time; from channel.relay import RelayProcess; "
                               "r = RelayProcess('127.0.0.1:9', rate='1mbit'); print(r.process.pid, flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    relay_pid = int(orphan.stdout.readline())
    orphan.kill()
    orphan.wait()
    for _ in range(100):  # the relay reads its standard input to the end, which comes with its parent's death
        if not Path(f"/proc/{relay_pid}").exists() or "zombie" in Path(f"/proc/{relay_pid}/status").read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the relay process outlived its parent")


def test_relay_process_that_cannot_start_says_so():
    with pytest.raises(RuntimeError, match="ended .* before it listened"):
        RelayProcess("127.0.0.1:9", rate="not a rate")


def test_relay_matches_tc_tbf():
    """The same transfer through Linux tc tbf between two namespaces takes a comparable time."""
    nbytes = 2_500_000  # one second at 20 Mbit/s
    try:
        tbf = tbf_transfer_seconds("20mbit", nbytes)
    except NetnsUnavailable as exc:
        print(f"skipped: {exc}")
        pytest.skip(f"network namespaces unavailable here: {exc}")
    relay = nbytes * 8 / asyncio.run(measure_goodput(link_from_options(rate="20mbit"), nbytes))
    # tbf shapes whole Ethernet frames (about 4.5% headers on top of TCP payload); the relay shapes payload.
    assert relay == pytest.approx(tbf, rel=0.10)
    assert not math.isnan(tbf)
