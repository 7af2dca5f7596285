"""Layer-pipelined streaming: layer l goes out while later layers prefill; the answer is unchanged."""

import os
import subprocess
import sys

import grpc
import pytest
import torch

from channel.relay import BackgroundRelay
from common import framing, wire
from common.kvstate import prefill, reference_generate
from common.link import link_from_options
from common.plan import CodecPlan
from common.profile import parse_profile
from common.proto import kvwire_pb2 as pb
from common.quant.transform import CodecContext
from sender.client import Client
from sender.pipeline import Sender
from tests.common.quant.test_pca_joint import kv_coordinates, with_joint
from tests.common.quant.test_transforms import fitted_basis, weighted

CONTEXT = " ".join(f"Fact {i}: the Normans built castle number {i} in Normandy." for i in range(20))
QUESTION = "Who built the castles?"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_pipelined_lossless_ask_reproduces_generate(model, request):
    loaded = request.getfixturevalue(model)
    receiver = request.getfixturevalue(model.replace("tiny_", "") + "_receiver")
    with Client(receiver.target) as client:
        sender = Sender(loaded, client, attempts=1)
        piped = sender.ask_pipelined(CONTEXT, QUESTION, parse_profile("raw"), max_new_tokens=10)
        plain = sender.ask(CONTEXT, QUESTION, parse_profile("raw"), max_new_tokens=10)
    assert piped.token_ids == reference_generate(loaded.model, piped.prefilled.prompt.ids, 10)
    assert piped.token_ids == plain.token_ids and piped.bytes_sent == plain.bytes_sent
    # the stream's own clock: its parts are the stream thread's time, so together within the transfer's
    assert set(piped.stream_s) == {"layers", "code", "send"} and piped.stream_s["code"] > 0
    assert 0 <= sum(piped.stream_s.values()) <= piped.transfer_s and plain.stream_s is None
    stored = receiver.servicer.sessions.get(piped.session_id).kv
    assert stored.seq_len == plain.seq_len


def test_receiver_reports_its_work_apart_from_the_wait(llama_receiver, tiny_llama):
    """TransferReply.assemble_seconds is the receiver's time decoding and placing chunks, not the
    transfer: through a 2 Mbit/s link the frames take most of a second to arrive."""
    with BackgroundRelay(llama_receiver.target, lambda: link_from_options("2mbit")) as relay, \
            Client(relay.target) as client:
        asked = Sender(tiny_llama, client, attempts=1).ask(CONTEXT, QUESTION, parse_profile("int8"), max_new_tokens=2)
    link_s = asked.bytes_sent * 8 / 2e6
    assert asked.transfer_s >= 0.9 * link_s > 0.2
    assert 0 < asked.assemble_s < 0.25 * link_s


def test_pipelined_refuses_selection(llama_receiver, tiny_llama):
    with Client(llama_receiver.target) as client:
        with pytest.raises(ValueError, match="no selection"):
            Sender(tiny_llama, client).ask_pipelined(CONTEXT, QUESTION, parse_profile("q2c:0.5+int8"))
        with pytest.raises(ValueError, match="auto"):
            Sender(tiny_llama, client).ask_pipelined(CONTEXT, QUESTION, "auto")


@pytest.fixture
def frontier_llama(tiny_llama, tmp_path, monkeypatch):
    """tiny-llama with a basis fitted on its own prefills (other tokens than the asks'), layer weights
    and the joint transform: what the frontier profiles need. The in-process receiver loads the same
    model object, so both nodes hold this basis."""
    rope = tiny_llama.codec_context.rope
    basis = fitted_basis(tiny_llama, tmp_path / "b.safetensors")
    basis = weighted(basis, tmp_path / "w.safetensors", [[4.0, 1.0] if i % 2 else [1.0, 9.0]
                                                         for i in range(basis.num_layers)])
    fits = [kv_coordinates(CodecContext(rope, basis), prefill(tiny_llama.model, list(range(start, start + 80))))
            for start in (500, 700, 900)]
    basis = with_joint(basis, [torch.cat(layer) for layer in zip(*fits)], tmp_path / "j.safetensors")
    monkeypatch.setattr(tiny_llama, "codec_context", CodecContext(rope, basis))
    return tiny_llama


def recording(client: Client) -> list[pb.Frame]:
    """Every frame `client` streams from now on, in order, its transfer id blanked (each transfer has its own)."""
    frames, send = [], client.send_frames

    def send_frames(stream):
        def kept():
            for frame in stream:  # a pb.Frame, or a chunk the sender serialized (framing.chunk_frame)
                copy = pb.Frame.FromString(framing.serialize(frame))
                if copy.HasField("header"):
                    copy.header.transfer_id = ""
                frames.append(copy.SerializeToString())
                yield frame
        return send(kept())

    client.send_frames = send_frames
    return frames


@pytest.mark.parametrize("spec", ["pca:b1.7:w:e:j:i1:f3+text", "pca:b2:w:e:j:i4", "pca:b1:w:e:i4+protect:s4+text:q",
                                  "int4:g32+text:h"])
def test_pipelined_frontier_sends_what_ask_sends(spec, frontier_llama, llama_receiver):
    """A frontier profile pipelines: the head first as text, the question as the generate call's tokens,
    every layer's per-token classes from its own share of the question's attention. The frames are
    ask's, byte for byte (transfer id aside), so the receiver holds the same cache and answers alike."""
    loaded = frontier_llama
    with Client(llama_receiver.target) as client:
        sent = recording(client)
        sender = Sender(loaded, client, attempts=1)
        plain = sender.ask(CONTEXT, QUESTION, parse_profile(spec), max_new_tokens=8)
        asked_frames = list(sent)
        sent.clear()
        piped = sender.ask_pipelined(CONTEXT, QUESTION, parse_profile(spec), max_new_tokens=8)
    assert piped.profile == plain.profile and piped.attempts == 1
    assert sent == asked_frames
    assert piped.bytes_sent == plain.bytes_sent and piped.frames == plain.frames
    assert piped.token_ids == plain.token_ids and piped.kept_tokens == plain.kept_tokens
    first = pb.Frame.FromString(sent[0]).header
    profile = parse_profile(spec)
    assert first.segmented == profile.text_head
    if profile.text_head:  # the template's head travels first, as text
        assert list(pb.Frame.FromString(sent[1]).segment.token_ids) == plain.prefilled.head_ids
    piped_kv, plain_kv = (llama_receiver.servicer.sessions.get(r.session_id).kv for r in (piped, plain))
    assert piped_kv.seq_len == plain_kv.seq_len == (plain.prefilled.context_len if profile.text_question else plain.seq_len)
    assert all(torch.equal(a, b) for a, b in zip(piped_kv.keys + piped_kv.values, plain_kv.keys + plain_kv.values))
    if profile.pca is not None and profile.pca.importance == 4:
        # The random model's question attends almost evenly: at i1 every token is class 0, at i4 the
        # classes differ from token to token, so the attention measured per layer reached the coder.
        plan = CodecPlan.build(profile.as_cache, loaded.codec_context, loaded.fingerprint.num_layers)
        shares = piped.prefilled.kv.importance
        for layer, codec in enumerate(plan.codecs):
            assert len(set(codec.codec.classes(shares[layer][:piped_kv.seq_len]).tolist())) > 1, layer


def test_sender_ask_cli_pipelined(llama_receiver, tmp_path):
    """`kvwire sender ask --pipelined`: the answer and the bytes of the plain ask; flags it cannot
    combine with are usage errors, before the model loads."""
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    base = [sys.executable, "-m", "channel.cli", "sender", "ask", "--question", QUESTION, "--context-file",
            str(context), "--target", llama_receiver.target, "--model", "tiny-llama", "--max-new-tokens", "4"]
    outputs = [subprocess.run(base + ["--profile", "int8+text:h:q"] + extra, capture_output=True, text=True, timeout=300,
                              env={**os.environ}, check=False) for extra in ([], ["--pipelined"])]
    for result in outputs:
        assert result.returncode == 0, result.stderr
    assert "pipelined" in outputs[1].stdout
    assert [line for line in outputs[0].stdout.splitlines() if "bytes in" in line][0].split(" bytes")[0] == \
        [line for line in outputs[1].stdout.splitlines() if "bytes in" in line][0].split(" bytes")[0]
    for extra in (["--profile", "auto"], ["--segments", "64"], ["--query-agnostic"]):
        bad = subprocess.run(base + ["--pipelined"] + extra, capture_output=True, text=True, timeout=300, check=False)
        assert bad.returncode == 2 and "--pipelined" in bad.stdout + bad.stderr, extra


def test_a_failed_pipelined_stream_is_sent_again_as_ask_sends_it(frontier_llama, llama_receiver):
    """The stream breaks after its first frames (UNAVAILABLE): the finished prefill is encoded and sent
    again, ask's frames under a new transfer id, and the answer is ask's."""
    from tests.sender.test_retry import Refusal

    spec = "pca:b1.7:w:e:j:i1:f3+text"
    with Client(llama_receiver.target) as client:
        sender = Sender(frontier_llama, client, attempts=2)
        plain = sender.ask(CONTEXT, QUESTION, parse_profile(spec), max_new_tokens=8)
        sent = recording(client)
        send, broken = client.send_frames, []

        def breaking(stream):
            if not broken:
                broken.append([next(stream) for _ in range(3)])
                raise Refusal(grpc.StatusCode.UNAVAILABLE, "link down")
            return send(stream)

        client.send_frames = breaking
        piped = sender.ask_pipelined(CONTEXT, QUESTION, parse_profile(spec), max_new_tokens=8)
    assert len(broken[0]) == 3 and piped.bytes_sent == plain.bytes_sent and piped.token_ids == plain.token_ids
    assert pb.Frame.FromString(sent[0]).HasField("header") and len(sent) == plain.frames
