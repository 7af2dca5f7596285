"""The soak's hostile clients (channel/hostile.py), each attack once against a real receiver: every one
gets the specific status issue 31 asks for, and the next honest transfer is served at once."""

import random

import pytest

from channel import hostile
from sender.client import Client

EXPECTED = {
    "unauthenticated": {"UNAUTHENTICATED"},
    "text_past_context": {"INVALID_ARGUMENT"},
    "idle_stream": {"ABORTED"},
    "huge_negotiate": {"INVALID_ARGUMENT"},
    "huge_question": {"INVALID_ARGUMENT"},
    "long_metadata": {"NOT_FOUND"},
    "oversized_chunk": {"INVALID_ARGUMENT"},
    "long_transfer_id": {"INVALID_ARGUMENT"},
    "reused_id": {"OK", "ALREADY_EXISTS", "ABORTED"},
    "non_finite": {"INVALID_ARGUMENT"},
    "derived_plans": {"DATA_LOSS"},
    "never_asked": {"OK"},
}


@pytest.fixture(scope="module")
def attacker(start_receiver, tiny_llama):
    receiver = start_receiver("tiny-llama", token="t0k", stream_idle_s=0.5)
    return receiver, hostile.Attacker(hostile.materials(tiny_llama, receiver.target, "t0k", 0.5), random.Random(0))


@pytest.mark.parametrize("name", hostile.ATTACKS)
def test_each_attack_gets_its_status(attacker, name):
    receiver, client = attacker
    codes = getattr(client, name)()
    assert codes and not {"UNKNOWN", "INTERNAL"} & set(codes), codes
    if name in EXPECTED:
        assert set(codes) <= EXPECTED[name], codes
    if name == "reused_id":
        assert codes[:2] == ["OK", "ALREADY_EXISTS"]
    with Client(receiver.target, token="t0k") as honest:  # served at once after it
        assert honest.send_frames(client.renamed(client.seed)).session_id
    assert receiver.servicer.inflight_bytes == 0 and not receiver.servicer.streaming_ids
