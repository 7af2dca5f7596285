"""Real gRPC over loopback sockets against an in-process receiver."""

import asyncio
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import wire
from common.kvstate import reference_generate
from common.profile import parse_profile
from common.proto import kvwire_pb2 as pb
from common.proto import kvwire_pb2_grpc as pb_grpc
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt, select_tokens
from common.plan import kv_codec

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders from Denmark, Iceland and Norway.")
QUESTION = "Where is Normandy?"


def ask(client, loaded, query_aware, profile="raw", max_new_tokens=12):
    asked = Sender(loaded, client).ask(CONTEXT, QUESTION, parse_profile(profile), query_aware, max_new_tokens)
    return asked.prefilled, asked, asked.token_ids


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("query_aware", [True, False], ids=["query-aware", "query-agnostic"])
def test_lossless_transfer_reproduces_generate(model, query_aware, request):
    loaded = request.getfixturevalue(model)
    receiver = request.getfixturevalue(model.replace("tiny_", "") + "_receiver")
    with Client(receiver.target) as client:
        assert client.negotiate(loaded.fingerprint, ["raw"]).profile == "raw"
        pre, sent, tokens = ask(client, loaded, query_aware)
    assert tokens == reference_generate(loaded.model, pre.prompt.ids, 12)
    assert sent.bytes_sent > 0


def test_health_and_reflection(llama_receiver):
    channel = grpc.insecure_channel(llama_receiver.target)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kvwire.v1.KVWire")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "kvwire.v1.KVWire" in names
    channel.close()


def test_not_serving_until_model_loaded(monkeypatch):
    """While the model loads, health says NOT_SERVING and KVWire calls get UNAVAILABLE."""
    from channel.nodes import free_port
    from common.settings import Settings
    from receiver import server as server_module

    port = free_port()
    loading = threading.Event()
    original = server_module.load_model

    def slow_load(*args):
        loading.wait(timeout=60)
        return original(*args)

    monkeypatch.setattr(server_module, "load_model", slow_load)

    async def check():
        task = asyncio.create_task(server_module.start_server("127.0.0.1", port, "tiny-llama", Settings()))
        await asyncio.sleep(0.5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.KVWireStub(channel).Negotiate(pb.NegotiateRequest())
        loading.set()
        server, _, _ = await task
        await server.stop(None)
        return status, info.value.code()

    status, code = asyncio.run(check())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE


def send_and_expect(receiver, frames, code, match):
    sessions_before = len(receiver.servicer.sessions)
    with Client(receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        client.send_frames(frames)
    assert info.value.code() == code
    assert match in info.value.details()
    assert len(receiver.servicer.sessions) == sessions_before  # nothing injected


@pytest.fixture(scope="module")
def frames(tiny_llama):
    pre = prefill_prompt(tiny_llama, CONTEXT, QUESTION)
    return list(wire.encode(pre.kv, parse_profile("raw"), tiny_llama.fingerprint))


def test_corrupted_chunk_over_grpc(llama_receiver, frames):
    bad = [pb.Frame.FromString(f.SerializeToString()) for f in frames]
    bad[2].chunk.payload = bad[2].chunk.payload[:-1] + bytes([bad[2].chunk.payload[-1] ^ 1])
    send_and_expect(llama_receiver, bad, grpc.StatusCode.DATA_LOSS, "checksum mismatch")


def test_truncated_stream_over_grpc(llama_receiver, frames):
    send_and_expect(llama_receiver, frames[:-1], grpc.StatusCode.DATA_LOSS, "before the trailer")


def test_wrong_dimensions_over_grpc(llama_receiver, frames):
    header = pb.Frame.FromString(frames[0].SerializeToString())
    header.header.batch = 2
    send_and_expect(llama_receiver, [header] + frames[1:], grpc.StatusCode.INVALID_ARGUMENT, "batch must be 1")


def test_mismatched_fingerprint_over_grpc(llama_receiver, tiny_gemma3, tiny_llama):
    with Client(llama_receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        client.negotiate(tiny_gemma3.fingerprint, ["raw"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    pre = prefill_prompt(tiny_gemma3, CONTEXT, QUESTION)
    send_and_expect(llama_receiver, list(wire.encode(pre.kv, parse_profile("raw"), tiny_gemma3.fingerprint)),
                    grpc.StatusCode.FAILED_PRECONDITION, "fingerprint mismatch")


def test_unknown_session_and_bad_requests(llama_receiver, tiny_llama):
    with Client(llama_receiver.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate("no-such-session", token_ids=[1])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        _, sent, _ = ask(client, tiny_llama, True)
        with pytest.raises(grpc.RpcError) as info:
            client.generate(sent.session_id)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            client.generate(sent.session_id, token_ids=[10**9])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            client.negotiate(tiny_llama.fingerprint, ["int17"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_session_answers_many_questions(llama_receiver, tiny_llama):
    """One transferred context serves several questions, each decoded from a fresh copy of the cache."""
    with Client(llama_receiver.target) as client:
        pre = prefill_prompt(tiny_llama, CONTEXT, QUESTION, query_aware=False)
        sent = Sender(tiny_llama, client).transfer(pre.kv, parse_profile("raw"))
        first = list(client.generate(sent.session_id, question=QUESTION, max_new_tokens=8).token_ids)
        client.generate(sent.session_id, question="Who were the Normans?", max_new_tokens=8)
        again = list(client.generate(sent.session_id, question=QUESTION, max_new_tokens=8).token_ids)
    assert first == again
    stored = llama_receiver.servicer.sessions.get(sent.session_id).kv
    assert all(torch.equal(a, b) for a, b in zip(stored.keys, pre.kv.keys))


@pytest.mark.parametrize("profile", ["fp16", "bf16", "int8", "int4:g32", "int3", "int2", "int1", "nf4",
                                     "svd:r4", "svd:r32+int8", "int2+int8@0-1"])
def test_every_profile_through_the_receiver(llama_receiver, tiny_llama, profile):
    """The receiver stores exactly what the codec reconstructs, and decodes an answer from it."""
    from common.profile import parse_profile

    with Client(llama_receiver.target) as client:
        agreed = client.negotiate(tiny_llama.fingerprint, [profile]).profile
        assert agreed == str(parse_profile(profile))
        pre, sent, tokens = ask(client, tiny_llama, True, profile=agreed)
    assert 0 < len(tokens) <= 12
    stored = llama_receiver.servicer.sessions.get(sent.session_id).kv
    for layer in range(stored.num_layers):
        codec = kv_codec(parse_profile(profile), layer)
        k, v = codec.decode(codec.encode(pre.kv.keys[layer], pre.kv.values[layer]), tuple(pre.kv.keys[layer].shape),
                            torch.float32)
        assert torch.equal(stored.keys[layer], k) and torch.equal(stored.values[layer], v)


@pytest.mark.parametrize("method", ["q2c", "q2c-last", "snapkv", "h2o", "sink", "window", "random", "knorm", "capkv"])
def test_every_method_at_keep_one_is_lossless(llama_receiver, tiny_llama, method):
    with Client(llama_receiver.target) as client:
        pre, _, tokens = ask(client, tiny_llama, True, profile=f"{method}:1.0")
    assert tokens == reference_generate(tiny_llama.model, pre.prompt.ids, 12)


def test_selected_cache_decodes_from_original_positions(llama_receiver, tiny_llama):
    """A q2c-selected, int4-quantized cache travels with its positions; decoding continues at seq_len."""
    with Client(llama_receiver.target) as client:
        pre, sent, _ = ask(client, tiny_llama, True, profile="q2c:0.5+int4:g32")
    stored = llama_receiver.servicer.sessions.get(sent.session_id).kv
    assert stored.seq_len == pre.kv.seq_len
    assert stored.kept_tokens(0) < pre.kv.seq_len
    assert torch.equal(stored.positions[0], select_tokens(tiny_llama, pre, parse_profile("q2c:0.5")).positions[0])


def test_sender_ask_cli(llama_receiver, tmp_path):
    import os
    import subprocess
    import sys

    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    result = subprocess.run(
        [sys.executable, "-m", "channel.cli", "sender", "ask", "--question", QUESTION, "--context-file", str(context),
         "--target", llama_receiver.target, "--profile", "q2c:0.5+int4", "--model", "tiny-llama",
         "--max-new-tokens", "4", "--zstd-level", "9"],
        capture_output=True, text=True, timeout=300, env={**os.environ}, check=False)
    assert result.returncode == 0, result.stderr
    assert "bytes in" in result.stdout and "frames for" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "channel.cli", "sender", "ask", "--question", "q", "--context", "c",
                          "--profile", "int17", "--target", llama_receiver.target, "--model", "tiny-llama"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0 and "int17" in (bad.stdout + bad.stderr)


def test_a_sliding_layer_off_the_tail_is_refused_over_grpc(gemma3_receiver, tiny_gemma3):
    """The receiver checks Gemma-3's sliding layers against its own cache: the last tokens, nowhere else."""
    pre = prefill_prompt(tiny_gemma3, CONTEXT, QUESTION)
    frames = list(wire.encode(pre.kv, parse_profile("raw"), tiny_gemma3.fingerprint))
    header = pb.Frame.FromString(frames[0].SerializeToString())
    window = pre.kv.kept_tokens(0)
    assert 0 in tiny_gemma3.sliding_layers and window < pre.kv.seq_len
    header.header.layers[0].positions = wire.encode_positions(torch.arange(window).expand(tiny_gemma3.fingerprint.kv_heads, -1))
    send_and_expect(gemma3_receiver, [header] + frames[1:], grpc.StatusCode.INVALID_ARGUMENT,
                    f"positions must be [{pre.kv.seq_len - window}, {pre.kv.seq_len})")


def test_text_parts_travel_as_ids_and_the_receiver_prefills_them(llama_receiver, tiny_llama):
    with Client(llama_receiver.target) as client:
        _, whole, _ = ask(client, tiny_llama, True)
        pre, sent, tokens = ask(client, tiny_llama, True, "raw+text")
        _, selected, _ = ask(client, tiny_llama, True, "q2c:0.5+int8+text:q")
    assert tokens == reference_generate(tiny_llama.model, pre.prompt.ids, 12)
    assert sent.bytes_sent < whole.bytes_sent * (len(pre.prompt.context_ids) - pre.prompt.head_len) / pre.kv.seq_len + 1000
    assert len(selected.token_ids) > 0 and selected.kept_tokens < len(pre.prompt.context_ids)


def test_a_text_head_on_a_sliding_window_model_is_refused(gemma3_receiver, tiny_gemma3):
    with Client(gemma3_receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        ask(client, tiny_gemma3, True, "int8+text:h")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "sliding-window" in info.value.details()
