"""Concurrent senders against one receiver with a tight memory budget: backpressure, nothing lost."""

from channel import loadtest
from common.profile import parse_profile


def test_load_under_a_tight_budget_loses_nothing(start_receiver, tiny_llama):
    raw = parse_profile("raw")
    prepared = loadtest.prepare(tiny_llama, raw, samples=3, max_new_tokens=4)
    cache_bytes = max(job.prefilled.kv.nbytes for job in prepared)
    receiver = start_receiver("tiny-llama", session_budget_bytes=3 * cache_bytes)
    report = loadtest.run_load(receiver.target, tiny_llama, raw, prepared, concurrency=8, transfers=48,
                               max_new_tokens=4)
    summary = report.summary()
    assert summary["ok"] == 48 and summary["wrong_answers"] == 0 and summary["errors"] == {}
    store = receiver.servicer.sessions
    assert store.peak_bytes <= store.budget_bytes  # memory stayed inside the budget
    assert summary["p50_s"] <= summary["p95_s"] <= summary["p99_s"]


def test_load_through_the_shaping_relay_in_its_own_process(start_receiver, tiny_llama):
    """`kvwire loadtest --rate` shapes through a relay process (RelayProcess): every transfer crosses it, none lost."""
    raw = parse_profile("raw")
    prepared = loadtest.prepare(tiny_llama, raw, samples=2, max_new_tokens=4)
    receiver = start_receiver("tiny-llama")
    report = loadtest.run_plain("tiny-llama", tiny_llama, raw, prepared, concurrency=2, transfers=4, max_new_tokens=4,
                                env={}, rate="200mbit", target=receiver.target)
    summary = report.summary()
    assert summary["ok"] == 4 and summary["wrong_answers"] == 0 and summary["errors"] == {}
    assert report.bytes_sent > 0
