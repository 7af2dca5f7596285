"""Segmented transfers over real gRPC: mixed cache and text segments, and adaptation to a link that drops."""

import grpc
import pytest

from channel.relay import BackgroundRelay
from common.kvstate import greedy_decode, reference_generate
from common.link import link_from_options
from common.planner import load_table
from sender.adaptive import TEXT, SegmentPlanner, send_segments
from sender.client import Client
from sender.prefill import prefill_prompt

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
           "and Norway who, under their leader Rollo, agreed to swear fealty to King Charles III. ") * 4
QUESTION = "Who was the leader of the Norse raiders?"
TABLE = {"version": 1, "model": "tiny", "samples": 1, "prefill_s_per_token": 0.001, "profiles": {
    "raw": {"fidelity": 1.0, "encode_s_per_token": 0, "receiver_s_per_token": 0, "first_token_s": 0.0}}}


def answer(client, loaded, pre, result, max_new_tokens=16):
    return list(client.generate(result.session_id, token_ids=pre.tail_ids, max_new_tokens=max_new_tokens).token_ids)


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2"])
def test_all_text_segments_give_the_full_prompt_answer(model, request):
    loaded = request.getfixturevalue(model)
    receiver = request.getfixturevalue(model.replace("tiny_", "") + "_receiver")
    pre = prefill_prompt(loaded, CONTEXT, QUESTION)
    with Client(receiver.target) as client:
        # A link planned at 1 kbit/s and a deadline nothing can meet: every segment falls back to text.
        result = send_segments(client, pre.kv, pre.cache_ids, loaded.fingerprint,
                               SegmentPlanner(TABLE), deadline_s=1e-6, segment_tokens=48, initial_bps=1e3)
        tokens = answer(client, loaded, pre, result)
    assert len(result.segments) == -(-pre.kv.seq_len // 48) > 2
    assert set(result.profiles) == {TEXT}
    assert result.bytes_sent < 8 * pre.kv.seq_len  # token ids, not a cache
    assert tokens == reference_generate(loaded.model, pre.prompt.ids, 16)


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2"])
def test_mixed_cache_and_text_segments_give_the_full_prompt_answer(model, request):
    loaded = request.getfixturevalue(model)
    receiver = request.getfixturevalue(model.replace("tiny_", "") + "_receiver")
    pre = prefill_prompt(loaded, CONTEXT, QUESTION)
    schedule = ["raw", TEXT, "raw", TEXT, TEXT, "raw"]
    tokens_per_segment = -(-pre.kv.seq_len // len(schedule))
    with Client(receiver.target) as client:
        result = send_segments(client, pre.kv, pre.cache_ids, loaded.fingerprint, None,
                               deadline_s=10, segment_tokens=tokens_per_segment, schedule=schedule)
        tokens = answer(client, loaded, pre, result)
    assert result.profiles == schedule
    assert tokens == reference_generate(loaded.model, pre.prompt.ids, 16)


def test_a_quantized_segment_changes_the_cache_but_keeps_positions(llama_receiver, tiny_llama):
    pre = prefill_prompt(tiny_llama, CONTEXT, QUESTION)
    with Client(llama_receiver.target) as client:
        result = send_segments(client, pre.kv, pre.cache_ids, tiny_llama.fingerprint, None,
                               deadline_s=10, segment_tokens=64, schedule=["int8", "raw"] + [TEXT] * (-(-pre.kv.seq_len // 64) - 2))
        session = llama_receiver.servicer.sessions.get(result.session_id)
    kv = session.kv
    assert kv.seq_len == pre.kv.seq_len and kv.kept_tokens(0) == pre.kv.seq_len
    assert all((p == pre.kv.positions[0]).all() for p in kv.positions)
    assert (kv.keys[0][:, :, 64:128] == pre.kv.keys[0][:, :, 64:128]).all()  # the raw segment is exact
    assert not (kv.keys[0][:, :, :64] == pre.kv.keys[0][:, :, :64]).all()  # the int8 one is not
    assert (kv.keys[0][:, :, :64] - pre.kv.keys[0][:, :, :64]).abs().max() < 0.05 * pre.kv.keys[0].abs().max()


def test_sliding_window_models_take_cache_segments_but_refuse_text(gemma3_receiver, tiny_gemma3):
    receiver = gemma3_receiver
    pre = prefill_prompt(tiny_gemma3, CONTEXT, QUESTION)  # longer than its 16-token sliding window
    ids = pre.cache_ids
    count = -(-len(ids) // 64)
    with Client(receiver.target) as client:
        result = send_segments(client, pre.kv, ids, tiny_gemma3.fingerprint, None, 10, 64, schedule=["raw"] * count)
        tokens = answer(client, tiny_gemma3, pre, result)
        with pytest.raises(grpc.RpcError) as info:
            send_segments(client, pre.kv, ids, tiny_gemma3.fingerprint, None, 10, 64,
                          schedule=["raw"] + [TEXT] * (count - 1))
    assert tokens == reference_generate(tiny_gemma3.model, pre.prompt.ids, 16)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "sliding-window" in info.value.details()


def test_segments_refused_where_they_cannot_be_assembled(llama_receiver, tiny_llama):
    pre = prefill_prompt(tiny_llama, CONTEXT, QUESTION)
    ids = pre.cache_ids
    with Client(llama_receiver.target) as client:
        with pytest.raises(ValueError, match="precision stages only"):
            send_segments(client, pre.kv, ids, tiny_llama.fingerprint, None, 10, 64,
                          schedule=["q2c:0.5+int8"] + ["raw"] * (len(ids) // 64))
        bad = list(ids)
        bad[70] = 10**6
        with pytest.raises(grpc.RpcError) as info:
            send_segments(client, pre.kv, bad, tiny_llama.fingerprint, None, 10, 64,
                          schedule=["raw", TEXT] + ["raw"] * (len(ids) // 64 - 1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the vocabulary" in info.value.details()


@pytest.mark.parametrize("drop", [True, False])
def test_a_rate_drop_mid_transfer_moves_later_segments_to_smaller_profiles(drop, smollm2_receiver, smollm2):
    """200 Mbit/s, then (with drop) 10 Mbit/s from 0.15 s: the segments planned after the drop is seen
    are smaller. Without the drop every segment keeps the best profile."""
    pre = prefill_prompt(smollm2, CONTEXT * 2, QUESTION)  # ~580 tokens, 64-token segments
    planner = SegmentPlanner(load_table("smollm2-135m"))
    trace = "step:200mbit:10mbit:0.15s" if drop else "step:200mbit:200mbit:0.15s"
    with BackgroundRelay(smollm2_receiver.target, lambda: link_from_options(None, trace, "2ms")) as relay, \
            Client(relay.target) as client:
        result = send_segments(client, pre.kv, pre.cache_ids, smollm2.fingerprint, planner,
                               deadline_s=4.0, segment_tokens=64, initial_bps=200e6)
        tokens = answer(client, smollm2, pre, result, 8)
    first, last = result.segments[0], result.segments[-1]
    assert first.profile == "fp16"
    stored = smollm2_receiver.servicer.sessions.get(result.session_id).kv
    # The receiver answers from the mixed cache it assembled, exactly as that cache decodes in process.
    assert tokens == greedy_decode(smollm2.model, stored.to_cache(smollm2.config), pre.tail_ids, stored.seq_len, 8)
    if drop:
        # Planned on what the acknowledgements measured after the drop, segments are at most half fp16's size.
        after = [s for s in result.segments if s.estimate_bps < 20e6]
        assert after and all(s.bytes / (s.end - s.start) < 0.6 * first.bytes / 64 for s in after), result.profiles
    else:
        assert set(result.profiles) == {"fp16"}, [(s.profile, s.estimate_bps, s.budget_s) for s in result.segments]


def test_sender_ask_in_segments_cli(llama_receiver, tmp_path):
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "context.txt").write_text(CONTEXT)
    (tmp_path / "table.json").write_text(json.dumps(TABLE))
    command = [sys.executable, "-m", "channel.cli", "sender", "ask", "--question", QUESTION, "--context-file",
               str(tmp_path / "context.txt"), "--target", llama_receiver.target, "--model", "tiny-llama",
               "--max-new-tokens", "4", "--segments", "32", "--calibration", str(tmp_path / "table.json")]
    fast = subprocess.run(command + ["--deadline", "60"], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert fast.returncode == 0, fast.stderr
    assert "segments, deadline 60 s" in fast.stdout and "raw" in fast.stdout and "met the deadline" in fast.stdout
    late = subprocess.run(command + ["--deadline", "0", "--bandwidth", "1kbit"], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert late.returncode == 0, late.stderr
    assert "text" in late.stdout and " raw " not in late.stdout  # at 1 kbit/s text is always sooner
