"""Layer-pipelined streaming: layer l goes out while later layers prefill; the answer is unchanged."""

import pytest

from common.kvstate import reference_generate
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


def test_pipelined_refuses_selection(llama_receiver, tiny_llama):
    with Client(llama_receiver.target) as client, pytest.raises(ValueError, match="no selection"):
        Sender(tiny_llama, client).ask_pipelined(CONTEXT, QUESTION, parse_profile("q2c:0.5+int8"))
