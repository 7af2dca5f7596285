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
