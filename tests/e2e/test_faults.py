"""Faults: a receiver killed mid-transfer, bytes corrupted in flight, a stall past the deadline."""

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

from channel.nodes import free_port
from channel.relay import BackgroundRelay, flip_byte_at
from common import wire
from common.kvstate import reference_generate
from common.link import Link, Trace, link_from_options
from common.profile import parse_profile
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt

CONTEXT = " ".join(f"Fact {i}: the Normans built castle number {i} in Normandy." for i in range(30))


@pytest.fixture(scope="module")
def prepared(tiny_llama):
    return prefill_prompt(tiny_llama, CONTEXT, "Who built the castles?")


def start_receiver_process(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "channel.cli", "receiver", "serve", "--port", str(port),
                             "--http-port", "0", "--model", "tiny-llama"], env={**os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_receiver_killed_mid_transfer_then_restarted(tiny_llama, prepared):
    port = free_port()
    receiver = start_receiver_process(port)
    with Client(f"127.0.0.1:{port}") as probe:
        probe.wait_until_serving(120)
    replacement = {}

    def kill_and_restart():
        time.sleep(0.4)  # mid-transfer: the shaped transfer takes about 2 s
        receiver.kill()
        receiver.wait()
        time.sleep(0.5)
        replacement["process"] = start_receiver_process(port)

    nbytes = sum(map(wire.wire_bytes, wire.encode(prepared.kv, parse_profile("raw"), tiny_llama.fingerprint)))
    rate = nbytes * 8 / 2.0
    try:
        with BackgroundRelay(f"127.0.0.1:{port}", lambda: Link(Trace.constant(rate))) as relay, \
                Client(relay.target, timeout_s=60) as client:
            killer = threading.Thread(target=kill_and_restart)
            killer.start()
            result = Sender(tiny_llama, client, attempts=30).transfer(prepared.kv, parse_profile("raw"))
            killer.join()
            reply = client.generate(result.session_id, token_ids=prepared.tail_ids, max_new_tokens=8)
        assert result.attempts > 1
        assert list(reply.token_ids) == reference_generate(tiny_llama.model, prepared.prompt.ids, 8)
    finally:
        for process in (receiver, replacement.get("process")):
            if process and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def test_chunk_corrupted_in_flight_is_rejected_then_retransmitted(start_receiver, tiny_llama, prepared):
    receiver = start_receiver("tiny-llama")
    sessions_before = len(receiver.servicer.sessions)
    with BackgroundRelay(receiver.target, lambda: link_from_options("1gbit"), corrupt=flip_byte_at(120_000)) as relay, \
            Client(relay.target) as client:
        result = Sender(tiny_llama, client, attempts=3).transfer(prepared.kv, parse_profile("raw"))
        reply = client.generate(result.session_id, token_ids=prepared.tail_ids, max_new_tokens=8)
    assert result.attempts == 2
    rejected = receiver.servicer.metrics.rejected_frames.labels("DATA_LOSS")._value.get()
    assert rejected >= 1
    assert len(receiver.servicer.sessions) == sessions_before + 1  # the damaged attempt stored nothing
    assert list(reply.token_ids) == reference_generate(tiny_llama.model, prepared.prompt.ids, 8)


def test_retry_of_a_finished_transfer_is_idempotent(start_receiver, tiny_llama, prepared):
    receiver = start_receiver("tiny-llama")
    frames = list(wire.encode(prepared.kv, parse_profile("int8"), tiny_llama.fingerprint, transfer_id="same-id"))
    with Client(receiver.target) as client:
        first = client.send_frames(frames)
        again = client.send_frames(frames)
    assert first.session_id == again.session_id


def test_stall_longer_than_the_deadline(start_receiver, tiny_llama, prepared):
    """The link stalls mid-transfer: both sides see DEADLINE_EXCEEDED and the receiver frees the partial cache."""
    receiver = start_receiver("tiny-llama")
    servicer = receiver.servicer
    # 1 MB/s with retransmission-timeout stalls of 5 s, about 50 per second of sending (seeded).
    stalling = lambda: Link(Trace.constant(8e6), stall_rate=50.0, stall_s=5.0, seed=0)  # noqa: E731
    with BackgroundRelay(receiver.target, stalling) as relay, Client(relay.target, timeout_s=1.0) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            Sender(tiny_llama, client, attempts=3).transfer(prepared.kv, parse_profile("raw"))
        assert time.monotonic() - start < 3
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not retried: the deadline is the caller's
        deadline = time.monotonic() + 10
        while servicer.metrics.transfers.labels("deadline_exceeded")._value.get() < 1:
            assert time.monotonic() < deadline, "the receiver never saw its deadline pass"
            time.sleep(0.1)
    assert servicer.metrics.inflight._value.get() == 0 and servicer.inflight_bytes == 0  # resources freed
    assert all(s.kv.seq_len != prepared.kv.seq_len or s.profile != "raw" for s in servicer.sessions.values())
