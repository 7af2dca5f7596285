"""The segment trials of `kvwire bench segments`, on a tiny model over the real relay."""

from channel.evaluation.haystack import needle_samples
from channel.evaluation.segment_trials import SEGMENTS, run_trials, summarize
from common.profile import parse_profile

TABLE = {"version": 1, "model": "tiny", "samples": 1, "prefill_s_per_token": 0.001, "profiles": {
    "raw": {"fidelity": 1.0, "encode_s_per_token": 0, "receiver_s_per_token": 0, "first_token_s": 0.0},
    "int8": {"fidelity": 0.9, "encode_s_per_token": 0, "receiver_s_per_token": 0, "first_token_s": 0.0}}}


def test_trials_compare_methods_on_the_same_link(llama_receiver, tiny_llama):
    receiver = llama_receiver
    samples = needle_samples(tiny_llama.tokenizer, 256, [0.5])
    rows = run_trials(tiny_llama, receiver.target, samples, [parse_profile("raw")], [30.0, 1e-3], trials=1, segment_tokens=64,
                      trace="step:200mbit:100mbit:1s", delay="1ms", max_new_tokens=4, table=TABLE)
    by = {(r["deadline_s"], r["method"]): r for r in rows}
    assert set(by) == {(30.0, "raw"), (30.0, SEGMENTS), (1e-3, "raw"), (1e-3, SEGMENTS)}
    assert by[(30.0, "raw")]["hit"] and by[(30.0, "raw")]["fidelity"] == 1.0  # lossless, in time
    assert by[(30.0, SEGMENTS)]["hit"] and by[(30.0, SEGMENTS)]["profiles"][0] == "int8"  # the probe
    assert len(by[(30.0, SEGMENTS)]["profiles"]) == -(-by[(30.0, SEGMENTS)]["tokens"] // 64)
    assert not by[(1e-3, "raw")]["hit"] and by[(1e-3, "raw")]["fidelity"] == 0.0  # cancelled at the deadline
    summary = {(s["deadline_s"], s["method"]): s for s in summarize(rows)}
    assert summary[(1e-3, SEGMENTS)]["hit_rate"] == 0.0 and summary[(30.0, "raw")]["hit_rate"] == 1.0
