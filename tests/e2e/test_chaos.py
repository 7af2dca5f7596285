"""A load survives a receiver killed twice (SIGKILL, restarted on its port) and relay resets mid-stream."""

from channel import loadtest
from common.profile import parse_profile


def test_load_survives_receiver_kills_and_relay_resets(tiny_llama):
    raw = parse_profile("raw")
    prepared = loadtest.prepare(tiny_llama, raw, samples=3, max_new_tokens=4)
    report = loadtest.run_chaos("tiny-llama", tiny_llama, raw, prepared, concurrency=4, transfers=60,
                                max_new_tokens=4, env={}, ttl_s=2.0)
    summary = report.summary()
    assert summary["ok"] == 60 and summary["wrong_answers"] == 0 and summary["errors"] == {}, (summary["errors"], report.faults)
    assert summary["completion"] == 1.0
    faults = sorted(f["fault"] for f in report.faults)
    assert faults == ["kill", "kill", "reset", "reset", "reset"]
    assert summary["retries"] > 0  # the faults were felt, and got through
    baseline, after = report.receiver_rss["baseline"], report.receiver_rss["after"]
    assert after < 1.25 * baseline, (baseline, after)
