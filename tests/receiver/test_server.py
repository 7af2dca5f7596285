"""The receiver's handlers over real gRPC: bounded generation, and a specific status for every failure."""

import gc
import time

import grpc
import pytest
import torch

from common import wire
from common.kvstate import prefill
from common.profile import parse_profile
from common.proto import kvwire_pb2 as pb
from receiver import server as server_module
from sender.client import Client

CONTEXT_IDS = list(range(300, 340))  # a 40-token cache
CONTEXT = 4096  # tiny-llama's max_position_embeddings


@pytest.fixture(scope="module")
def frames(tiny_llama):
    return list(wire.encode(prefill(tiny_llama.model, CONTEXT_IDS), parse_profile("raw"), tiny_llama.fingerprint))


@pytest.fixture
def session(llama_receiver, frames):
    with Client(llama_receiver.target) as client:
        return client.send_frames(frames).session_id


def generate_error(receiver, session_id, **request) -> grpc.RpcError:
    with Client(receiver.target, timeout_s=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate(session_id, **request)
    return info.value


def test_a_full_collection_does_not_walk_the_loaded_model(llama_receiver):
    """A full garbage collection holds the GIL while it walks every tracked object, in whichever thread
    allocates: the event loop that answers health checks stops meanwhile (0.2-1.5 s over the ~400,000
    objects torch, transformers and a model leave). The receiver freezes what its start left alive."""
    frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
    assert frozen > 100_000
    assert walked < frozen / 4


def test_max_new_tokens_is_bounded_by_the_setting(llama_receiver, session):
    error = generate_error(llama_receiver, session, token_ids=[1], max_new_tokens=513)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens 513 exceeds the limit of 512 (KVWIRE_MAX_NEW_TOKENS)" in error.details()


def test_the_setting_changes_the_bound(start_receiver, frames):
    receiver = start_receiver("tiny-llama", max_new_tokens=8)
    with Client(receiver.target) as client:
        session_id = client.send_frames(frames).session_id
        assert len(client.generate(session_id, token_ids=[1], max_new_tokens=8).token_ids) <= 8
    error = generate_error(receiver, session_id, token_ids=[1], max_new_tokens=9)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 8" in error.details()


def test_three_hundred_thousand_ids_are_refused(llama_receiver, session):
    error = generate_error(llama_receiver, session, token_ids=[5] * 300_000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == ("40 cached + 300000 prompt + 64 new tokens exceed the context of tiny-llama "
                               "(max_position_embeddings), 4096 tokens")


def test_the_context_bound_is_exact(llama_receiver, session):
    """seq_len + prompt + new tokens may reach the model's context, never pass it."""
    fits = CONTEXT - len(CONTEXT_IDS) - 1
    with Client(llama_receiver.target) as client:
        assert len(client.generate(session, token_ids=[5] * fits, max_new_tokens=1).token_ids) == 1
    error = generate_error(llama_receiver, session, token_ids=[5] * (fits + 1), max_new_tokens=1)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "4096 tokens" in error.details()


def test_the_receiver_token_limit_bounds_the_context_too(start_receiver, frames):
    receiver = start_receiver("tiny-llama", max_tokens=100)
    with Client(receiver.target) as client:
        session_id = client.send_frames(frames).session_id
    error = generate_error(receiver, session_id, token_ids=[5] * 50, max_new_tokens=11)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceed the receiver's max_tokens (KVWIRE_MAX_TOKENS), 100 tokens" in error.details()


def test_refusals_do_not_wait_for_the_model_lock(llama_receiver, session):
    """The bounds are checked before the lock: a refused request is answered while another decode holds it."""
    lock = llama_receiver.servicer._model_lock
    llama_receiver.call(lock.acquire())
    try:
        start = time.perf_counter()
        for request in ({"token_ids": [5] * 300_000}, {"token_ids": [1], "max_new_tokens": 100_000}):
            assert generate_error(llama_receiver, session, **request).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert time.perf_counter() - start < 10
    finally:
        llama_receiver.loop.call_soon_threadsafe(lock.release)


@pytest.mark.parametrize("exc,code", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError("decoding needs at least one token"), grpc.StatusCode.INVALID_ARGUMENT),
    (KeyError("surprise"), grpc.StatusCode.INTERNAL),
], ids=["cuda-oom", "cpu-oom", "value-error", "bug"])
def test_generate_failures_get_a_specific_status(llama_receiver, session, monkeypatch, exc, code):
    def failing_decode(*args, **kwargs):
        raise exc

    monkeypatch.setattr(server_module, "greedy_decode", failing_decode)
    error = generate_error(llama_receiver, session, token_ids=[1], max_new_tokens=4)
    assert error.code() == code != grpc.StatusCode.UNKNOWN
    assert str(exc).strip("'") in error.details()
    if code == grpc.StatusCode.INTERNAL:
        assert "internal error (KeyError)" in error.details()
    assert not llama_receiver.servicer._model_lock.locked()


def with_fresh_id(frames: list[pb.Frame]) -> list[pb.Frame]:
    """A copy under a new transfer id: a repeated id is answered from the finished transfer."""
    frames = [pb.Frame.FromString(f.SerializeToString()) for f in frames]
    for frame in frames:
        if frame.WhichOneof("kind") == "header":
            frame.header.transfer_id = f"test-{time.perf_counter_ns()}"
    return frames


def send_error(receiver, frames) -> grpc.RpcError:
    with Client(receiver.target, timeout_s=30) as client, pytest.raises(grpc.RpcError) as info:
        client.send_frames(with_fresh_id(frames))
    return info.value


@pytest.mark.parametrize("exc,code", [
    (torch.OutOfMemoryError("CUDA out of memory"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MemoryError("cache exceeds the session budget"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError("keys and values differ"), grpc.StatusCode.INVALID_ARGUMENT),
    (AttributeError("surprise"), grpc.StatusCode.INTERNAL),
], ids=["cuda-oom", "memory-error", "value-error", "bug"])
def test_transfer_failures_get_a_specific_status_and_free_the_reservation(llama_receiver, frames, monkeypatch, exc, code):
    servicer = llama_receiver.servicer
    sessions_before = len(servicer.sessions)

    def failing_put(*args):
        raise exc

    monkeypatch.setattr(servicer.sessions, "put", failing_put)
    error = send_error(llama_receiver, frames)
    assert error.code() == code != grpc.StatusCode.UNKNOWN and str(exc) in error.details()
    assert servicer.inflight_bytes == 0  # the header's reservation is given back
    assert len(servicer.sessions) == sessions_before  # nothing injected


def test_a_text_segment_that_cannot_be_prefilled_is_invalid_argument(llama_receiver, tiny_llama, monkeypatch):
    def refusing_prefill(model, kv, token_ids):
        raise ValueError("layers hold different numbers of tokens; prefill on top needs them equal")

    monkeypatch.setattr(wire, "prefill_on_top", refusing_prefill)
    encoder = wire.Encoder(tiny_llama.fingerprint)
    frames = [encoder.header(4), encoder.text_segment([5, 6, 7, 8], 0), encoder.trailer()]
    with Client(llama_receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        list(client.stream_segments(iter(frames)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layers hold different" in info.value.details()


def test_an_unexpected_negotiation_failure_is_internal(llama_receiver, tiny_llama, monkeypatch):
    def broken_parse(spec):
        raise TypeError("unexpected")

    monkeypatch.setattr(server_module, "parse_profile", broken_parse)
    with Client(llama_receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        client.negotiate(tiny_llama.fingerprint, ["int8"])
    assert info.value.code() == grpc.StatusCode.INTERNAL and "internal error (TypeError): unexpected" in info.value.details()


def test_a_group_past_the_cap_is_refused_before_allocating(llama_receiver, frames):
    """int4:g268435456 and a payload of the size it implies: INVALID_ARGUMENT from the header, not UNKNOWN."""

    import zstandard

    header = pb.Frame.FromString(frames[0].SerializeToString())
    header.header.profile = "int4:g268435456"
    payload = zstandard.ZstdCompressor().compress(bytes(1728))  # 40 tokens, 2 heads x 16: int4 with one group a row
    chunk = pb.Frame(chunk=pb.Chunk(layer=0, token_start=0, token_end=40, raw_size=1728, crc32c=wire.checksum(payload),
                                    payload=payload))
    error = send_error(llama_receiver, [header, chunk])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4096" in error.details()
    assert llama_receiver.servicer.inflight_bytes == 0


def test_no_status_is_unknown_for_fuzzed_inputs_over_grpc(llama_receiver, tiny_llama):
    """A few hundred fuzz inputs through the real handlers: every outcome is OK or a specific status."""
    from common import fuzz

    kv = prefill(tiny_llama.model, CONTEXT_IDS)
    seeds = fuzz.seed_transfers(kv, tiny_llama.fingerprint)

    def send(client, frames):
        frames = with_fresh_id(frames)
        try:
            if fuzz.is_segmented(frames):
                list(client.stream_segments(iter(frames)))
            else:
                client.send_frames(frames)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    with Client(llama_receiver.target, timeout_s=30) as client:
        report = fuzz.run(tiny_llama.fingerprint, seeds, structured=150, random_bytes=50, seed=7, grammar=150, kv=kv,
                          send=lambda frames: send(client, frames))
    assert report.unknown == report.internal == 0
    assert report.accepted > 10 and report.rejected["INVALID_ARGUMENT"] > 50



def test_a_stream_is_read_ahead_of_its_decoding():
    """While one frame is being decoded the next ones keep arriving, up to KVWIRE_READ_AHEAD_BYTES; the stream's
    own failure reaches the transfer after the frames that came before it."""
    import asyncio

    from common.settings import Settings

    pulled = []

    async def stream():  # as sized_frame deserializes them: (frame, its bytes, a chunk's payload)
        for i in range(100):
            pulled.append(i)
            yield i, 1, None
        raise ConnectionError("the client went away")

    async def scenario():
        batches = server_module.KVWireServicer(Settings(read_ahead_bytes=32))._frames(stream())
        first = [frame for frame, _, _ in await anext(batches)]  # each frame with its size
        assert first[0] == 0
        await asyncio.sleep(0.05)  # the first batch "decodes"
        assert len(pulled) == len(first) + 32 + 1  # taken, 32 bytes queued, one waiting for room
        rest = []
        with pytest.raises(ConnectionError):
            async for batch in batches:
                assert 0 < len(batch) <= server_module.FRAMES_PER_HOP
                rest += [frame for frame, _, _ in batch]
        assert first + rest == list(range(100))

    asyncio.run(scenario())


def test_the_receiver_registers_every_method_of_the_service_and_sizes_frames_by_their_message():
    class Server:
        def add_generic_rpc_handlers(self, handlers):
            self.generic = handlers

        def add_registered_method_handlers(self, service, handlers):
            self.service, self.handlers = service, handlers

    from common.settings import Settings

    server = Server()
    server_module.add_servicer(server_module.KVWireServicer(Settings()), server)
    methods = pb.DESCRIPTOR.services_by_name["KVWire"].methods
    assert server.service == server_module.SERVICE_NAME and set(server.handlers) == {m.name for m in methods}
    frame = pb.Frame(chunk=pb.Chunk(layer=2, token_start=5, token_end=9, raw_size=7, crc32c=3, payload=b"x" * 300))
    message = frame.SerializeToString()
    for name in ("Transfer", "TransferSegments"):
        parsed, size, payload = server.handlers[name].request_deserializer(message)
        parsed.chunk.payload = bytes(payload)  # a view of the message: not copied
        assert parsed == frame and size == wire.wire_bytes(frame)


def test_an_error_of_the_senders_frames_reaches_the_sender_as_itself(llama_receiver, frames):
    """A frame source that fails mid-stream (a profile this cache cannot take) raises its own error at the
    sender, not gRPC's UNKNOWN "Exception iterating requests!", and the receiver keeps nothing."""
    def failing():
        yield with_fresh_id(frames)[0]
        raise ValueError("layer 0: pca:...:e:iG needs the question's attention")

    before = len(llama_receiver.servicer.sessions)
    with Client(llama_receiver.target) as client, pytest.raises(ValueError, match="question's attention"):
        client.send_frames(failing())
    assert len(llama_receiver.servicer.sessions) == before
