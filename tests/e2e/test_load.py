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
