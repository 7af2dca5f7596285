"""A hostile or careless client against a real receiver (issue 31): every refusal is a specific,
bounded status, and no client can stall or exhaust the receiver for the next honest one."""

import logging
import math
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import wire
from common.kvstate import prefill
from common.profile import parse_profile
from common.proto import kvwire_pb2 as pb
from sender.client import Client
from common.plan import CodecPlan

CONTEXT_IDS = list(range(300, 340))  # a 40-token cache


@pytest.fixture(scope="module")
def frames(tiny_llama):
    return list(wire.encode(prefill(tiny_llama.model, CONTEXT_IDS), parse_profile("raw"), tiny_llama.fingerprint))


def renamed(frames: list[pb.Frame], transfer_id: str) -> list[pb.Frame]:
    frames = [pb.Frame.FromString(f.SerializeToString()) for f in frames]
    frames[0].header.transfer_id = transfer_id
    return frames


def fresh(frames: list[pb.Frame]) -> list[pb.Frame]:
    return renamed(frames, f"hostile-{time.perf_counter_ns()}")


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- 9: UNAUTHENTICATED on every kind of RPC, without a traceback in the log -------------------------

@pytest.fixture(scope="module")
def token_receiver(start_receiver):
    return start_receiver("tiny-llama", token="s3cret")


def test_every_rpc_kind_without_the_token_is_unauthenticated_and_logs_no_error(token_receiver, frames, tiny_llama,
                                                                                caplog):
    caplog.set_level(logging.WARNING)
    with Client(token_receiver.target, timeout_s=10) as client:
        calls = {
            "unary": lambda: client.generate("x", token_ids=[1]),
            "client-streaming": lambda: client.send_frames(fresh(frames)),
            "bidi": lambda: list(client.stream_segments(iter(fresh(frames)))),
            "reflection": lambda: list(reflection_pb2_grpc.ServerReflectionStub(client.channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)),
        }
        for kind, call in calls.items():
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (kind, error.details())
            assert error.details() == "missing or wrong bearer token"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    with Client(token_receiver.target, token="s3cret") as client:  # and the next honest call is served
        session = client.send_frames(fresh(frames)).session_id
        assert len(client.generate(session, token_ids=[1], max_new_tokens=2).token_ids) == 2


# --- 2: expired sessions never keep the receiver busy -------------------------------------------------

def test_expired_sessions_free_the_budget_for_the_next_transfer(start_receiver, frames):
    """Budget for one 40-token cache, TTL 1 s: a session nobody asks expires, and the next transfer
    (with nothing else touching the store) is accepted."""
    receiver = start_receiver("tiny-llama", session_budget_bytes=60_000, session_ttl_s=1.0)
    with Client(receiver.target, timeout_s=10) as client:
        client.send_frames(fresh(frames))  # never asked: pinned until its TTL
        busy = rpc_error(lambda: client.send_frames(fresh(frames)))
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.details().startswith("receiver busy")
        time.sleep(1.5)
        assert client.send_frames(fresh(frames)).session_id


# --- 6: every session costs a fixed overhead; transfer ids are bounded ------------------------------

def test_empty_sessions_cost_an_overhead_so_their_number_is_bounded():
    import torch

    from common.kvstate import KVState
    from receiver.sessions import SESSION_OVERHEAD_BYTES, ReceiverBusy, SessionStore

    empty = KVState([torch.zeros(1, 1, 0, 4)], [torch.zeros(1, 1, 0, 4)], [torch.zeros(1, 0, dtype=torch.long)], 5)
    store = SessionStore(ttl_s=100, budget_bytes=3 * SESSION_OVERHEAD_BYTES)
    for _ in range(3):
        store.put(empty, "window:0", 1)
    with pytest.raises(ReceiverBusy):
        store.put(empty, "window:0", 1)
    assert store.nbytes == 3 * SESSION_OVERHEAD_BYTES


def test_a_transfer_id_past_the_limit_is_refused_with_a_bounded_message(llama_receiver, frames):
    with Client(llama_receiver.target, timeout_s=30) as client:
        error = rpc_error(lambda: client.send_frames(renamed(frames, "x" * (4 << 20))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"transfer id of {4 << 20} characters; at most {wire.MAX_TRANSFER_ID_CHARS}" in error.details()
        assert len(error.details()) < 200
        assert client.send_frames(renamed(frames, "y" * wire.MAX_TRANSFER_ID_CHARS)).session_id
    assert llama_receiver.servicer.inflight_bytes == 0
    assert all(len(key) <= wire.MAX_TRANSFER_ID_CHARS for key in llama_receiver.servicer.completed)


# --- 10: refusals never echo unbounded client input --------------------------------------------------

def test_refusals_are_bounded_whatever_the_input(llama_receiver, tiny_llama):
    with Client(llama_receiver.target, timeout_s=30) as client:
        negotiate = rpc_error(lambda: client.negotiate(tiny_llama.fingerprint, ["zz" * 1000] * 60))
        assert negotiate.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "none of the 60 offered profiles is supported" in negotiate.details()
        too_many = rpc_error(lambda: client.negotiate(tiny_llama.fingerprint, ["int8"] * (wire.MAX_OFFERED_PROFILES + 1)))
        assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in too_many.details()
        missing = rpc_error(lambda: client.generate("s" * 100_000, token_ids=[1]))
        assert missing.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED "Stream removed"
        for error in (negotiate, too_many, missing):
            assert len(error.details()) <= wire.MAX_MESSAGE_CHARS


# --- 13: non-finite and negative numbers are INVALID_ARGUMENT -----------------------------------------

@pytest.mark.parametrize("field,value", [("bandwidth_bps", math.nan), ("deadline_s", math.nan),
                                         ("quality_floor", math.nan), ("bandwidth_bps", math.inf),
                                         ("bandwidth_bps", -1.0), ("deadline_s", -2.0), ("quality_floor", -0.5),
                                         ("quality_floor", 1.5), ("deadline_s", 1e300)])
def test_negotiation_numbers_must_be_finite_and_in_range(llama_receiver, tiny_llama, field, value):
    with Client(llama_receiver.target, timeout_s=30) as client:
        numbers = {"bandwidth_bps": 1e6, "deadline_s": 1.0, "quality_floor": 0.0, field: value}
        error = rpc_error(lambda: client.negotiate(tiny_llama.fingerprint, [], "auto", 100, **numbers))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


# --- 11: transfer-id idempotency compares the header and is atomic -----------------------------------

def test_a_different_cache_under_a_used_id_is_refused(llama_receiver, tiny_llama, frames):
    other = list(wire.encode(prefill(tiny_llama.model, CONTEXT_IDS[:20]), parse_profile("raw"), tiny_llama.fingerprint))
    with Client(llama_receiver.target, timeout_s=30) as client:
        first = client.send_frames(renamed(frames, "reused-id")).session_id
        assert client.send_frames(renamed(frames, "reused-id")).session_id == first  # a retry: same session
        error = rpc_error(lambda: client.send_frames(renamed(other, "reused-id")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "transfer id 'reused-id' was used for a different header" in error.details()


def test_concurrent_sends_of_one_id_make_one_session(llama_receiver, tiny_llama):
    import concurrent.futures

    from sender.pipeline import Sender

    big = list(wire.encode(prefill(tiny_llama.model, list(range(100, 1100))), parse_profile("raw"),
                           tiny_llama.fingerprint, transfer_id="concurrent-id"))
    before = len(llama_receiver.servicer.sessions)
    with Client(llama_receiver.target, timeout_s=60) as client:
        sender = Sender(tiny_llama, client)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(lambda _: sender.send(big).session_id, range(4)))
    assert len(set(ids)) == 1
    assert len(llama_receiver.servicer.sessions) == before + 1


# --- 1: text segments bounded by the model's context, their prefill in the budget, cancel waits for it ---

def segmented(tiny_llama, seq_len: int, token_ids: list[int]) -> list[pb.Frame]:
    encoder = wire.Encoder(tiny_llama.fingerprint, f"text-{time.perf_counter_ns()}")
    return [encoder.header(seq_len), encoder.text_segment(token_ids, 0)]


def test_a_text_segment_past_the_models_context_is_refused_at_the_header(llama_receiver, tiny_llama, monkeypatch):
    prefills = []
    monkeypatch.setattr(wire, "prefill_on_top", lambda *args: prefills.append(args))
    frames = segmented(tiny_llama, 5000, [5] * 5000)  # tiny-llama's context is 4096
    with Client(llama_receiver.target, timeout_s=30) as client:
        error = rpc_error(lambda: list(client.stream_segments(iter(frames))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == ("seq_len 5000 leaves no room for a prompt and an answer within the context of "
                               "tiny-llama (max_position_embeddings), 4096 tokens")
    assert prefills == [] and llama_receiver.servicer.inflight_bytes == 0


def test_a_prefill_on_top_holds_its_working_memory_in_the_budget(llama_receiver, tiny_llama, monkeypatch):
    from receiver.server import prefill_working_bytes
    from receiver.sessions import SESSION_OVERHEAD_BYTES

    servicer = llama_receiver.servicer
    held = []

    def recording_prefill(model, kv, token_ids):
        held.append(servicer.inflight_bytes)
        raise ValueError("stop here")

    monkeypatch.setattr(wire, "prefill_on_top", recording_prefill)
    with Client(llama_receiver.target, timeout_s=30) as client:
        error = rpc_error(lambda: list(client.stream_segments(iter(segmented(tiny_llama, 240, [5] * 200)))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop here" in error.details()
    cache = 2 * 4 * 2 * 240 * 16 * 4  # the header's reservation: 240 tokens of tiny-llama at float32
    assert held == [cache + SESSION_OVERHEAD_BYTES + prefill_working_bytes(tiny_llama.config, 0, 200)]
    assert servicer.inflight_bytes == 0


def test_a_prefill_that_does_not_fit_the_budget_is_refused(start_receiver, tiny_llama):
    receiver = start_receiver("tiny-llama", session_budget_bytes=500_000)
    with Client(receiver.target, timeout_s=30) as client:
        error = rpc_error(lambda: list(client.stream_segments(iter(segmented(tiny_llama, 240, [5] * 200)))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert receiver.servicer.inflight_bytes == 0


def test_a_cancelled_transfer_keeps_the_model_lock_until_its_prefill_ends(llama_receiver, tiny_llama, monkeypatch):
    lock = llama_receiver.servicer._model_lock
    seen = {}

    def slow_prefill(model, kv, token_ids):
        time.sleep(1.5)
        seen["locked_at_end"] = lock.locked()
        raise ValueError("done")

    monkeypatch.setattr(wire, "prefill_on_top", slow_prefill)
    with Client(llama_receiver.target, timeout_s=0.5) as client:
        error = rpc_error(lambda: list(client.stream_segments(iter(segmented(tiny_llama, 8, [5] * 8)))))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while "locked_at_end" not in seen:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert seen["locked_at_end"]  # nothing else ran on the model beside the prefill
    while lock.locked():
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- 4: a stream that sends nothing is dropped, its reservation freed ---------------------------------

def test_an_idle_stream_is_dropped_and_frees_its_reservation(start_receiver, frames):
    import threading

    receiver = start_receiver("tiny-llama", stream_idle_s=0.5)
    release = threading.Event()

    def header_then_silence():
        yield fresh(frames)[0]
        release.wait(10)

    try:
        with Client(receiver.target, timeout_s=20) as client:
            start = time.monotonic()
            error = rpc_error(lambda: client.send_frames(header_then_silence()))
            assert time.monotonic() - start < 5
    finally:
        release.set()
    assert error.code() == grpc.StatusCode.ABORTED
    assert "no frame for 0.5 s (KVWIRE_STREAM_IDLE_S)" in error.details()
    assert receiver.servicer.inflight_bytes == 0


# --- 7: the chunk caps, checked by the receiver from the chunk's declared range ----------------------

@pytest.mark.parametrize("spec, cap, refusal", [
    # tokens: at most MAX_CHUNK_SPAN_BYTES of them (here 512 KiB of float32: 2,048 tokens)
    ("int4", "MAX_CHUNK_SPAN_BYTES", "layer 0: chunk of 4090 tokens; at most 2048 (0.5 MiB of float32)"),
    # a raw payload the host decompresses: at most MAX_CHUNK_BYTES (here 512 KiB)
    ("raw", "MAX_CHUNK_BYTES", "layer 0: chunk of 1047040 raw bytes; at most 524288"),
])
def test_a_chunk_past_a_cap_is_refused_before_it_is_decoded(spec, cap, refusal, llama_receiver, tiny_llama,
                                                            monkeypatch):

    import torch
    import zstandard

    monkeypatch.setattr(wire, cap, 512 << 10)  # tiny-llama's 4,096 positions are less than the caps
    seq_len = 4090
    profile = parse_profile(spec)
    positions = [torch.arange(seq_len).expand(2, -1) for _ in range(4)]
    header = wire.Encoder(tiny_llama.fingerprint, f"big-{time.perf_counter_ns()}").header(seq_len, positions, profile)
    codec = CodecPlan.build(profile, None, 4).tiers(0, seq_len)[0][2]
    size = codec.payload_size((1, 2, seq_len, 16), torch.float32)
    payload = zstandard.ZstdCompressor().compress(bytes(size))
    chunk = pb.Frame(chunk=pb.Chunk(layer=0, token_start=0, token_end=seq_len, raw_size=size,
                                    crc32c=wire.checksum(payload), payload=payload))
    decoded = []
    real = wire.bounded_decompress

    def recording_decompress(blob, expected):
        decoded.append(expected)
        return real(blob, expected)

    monkeypatch.setattr(wire, "bounded_decompress", recording_decompress)
    with Client(llama_receiver.target, timeout_s=30) as client:
        error = rpc_error(lambda: client.send_frames([header, chunk]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refusal in error.details()
    assert size not in decoded and llama_receiver.servicer.inflight_bytes == 0


# --- 5: heavy work is bounded or off the event loop ---------------------------------------------------

def test_a_question_longer_than_the_context_is_refused_before_tokenizing(llama_receiver, frames, monkeypatch):
    from receiver import server as server_module

    tokenized = []
    monkeypatch.setattr(server_module, "question_ids", lambda *args: tokenized.append(args))
    with Client(llama_receiver.target, timeout_s=30) as client:
        session = client.send_frames(fresh(frames)).session_id
        error = rpc_error(lambda: client.generate(session, question="why? " * 1_600_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "question of 8000000 characters cannot fit the context of tiny-llama " \
                              "(max_position_embeddings), 4096 tokens"
    assert tokenized == []


def test_frames_are_decoded_off_the_event_loop(llama_receiver, frames, monkeypatch):
    import threading

    threads = set()
    add = wire.Assembler.add

    def recording_add(self, *args):
        threads.add(threading.current_thread())
        return add(self, *args)

    monkeypatch.setattr(wire.Assembler, "add", recording_add)
    with Client(llama_receiver.target, timeout_s=30) as client:
        client.send_frames(fresh(frames))
    assert threads and llama_receiver.thread not in threads


# --- 3: the plans derived from a PCA basis are bounded (least recently used dropped, in bytes) ----------

def test_derived_pca_plans_are_bounded_in_bytes():
    import torch

    from common.quant.pca import Basis

    basis = Basis([], [], "digest", {})
    limit = 1 << 20
    computed = []

    def plan(bits):
        def compute():
            computed.append(bits)
            return {0: torch.zeros(64 << 10), 1: (torch.zeros(16), torch.zeros(16))}  # 256 KiB + 128 bytes
        return basis.cached(("bits", (0, 1), bits), compute, limit_bytes=limit)

    for i in range(40):  # a header per new bits value
        plan(1 + i / 100)
    assert basis._derived_bytes <= limit and len(basis._derived) == 3
    plan(1.39)  # the most recent ones are kept
    assert computed.count(1.39) == 1
    plan(1.0)  # the oldest was dropped: derived again
    assert computed.count(1.0) == 2
