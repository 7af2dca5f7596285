"""Layer-pipelined streaming: layer l goes out while later layers prefill; the answer is unchanged."""

import pytest

from channel.relay import BackgroundRelay
from common.kvstate import reference_generate
from common.link import link_from_options
from common.profile import parse_profile
from sender.client import Client
from sender.pipeline import Sender

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
    with Client(llama_receiver.target) as client, pytest.raises(ValueError, match="no selection"):
        Sender(tiny_llama, client).ask_pipelined(CONTEXT, QUESTION, parse_profile("q2c:0.5+int8"))
