"""A float32 sender and a bfloat16 receiver of the same weights: casts and quantized profiles cross,
raw is refused at negotiation and at the header, with a reason that names both dtypes."""

import grpc
import pytest

from common import wire
from common.kvstate import greedy_decode
from common.models import load_model
from common.profile import parse_profile
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt

CONTEXT = "The Normans gave their name to Normandy, a region in France, in the 10th and 11th centuries."
QUESTION = "Where is Normandy?"


@pytest.fixture(scope="module")
def bf16_receiver(start_receiver):
    return start_receiver("tiny-llama", dtype="bfloat16")


def test_cast_and_quantized_profiles_cross_dtypes(bf16_receiver, tiny_llama):
    receiver_model = load_model("tiny-llama", "cpu", "bfloat16")
    assert receiver_model.fingerprint.weights_sha256 == tiny_llama.fingerprint.weights_sha256
    with Client(bf16_receiver.target) as client:
        for spec in ("fp16", "int8", "int4:g32"):
            profile = parse_profile(spec)
            asked = Sender(tiny_llama, client, attempts=1).ask(CONTEXT, QUESTION, profile, max_new_tokens=6)
            stored = bf16_receiver.servicer.sessions.get(asked.session_id).kv
            assert stored.dtype.__str__() == "torch.bfloat16"
            # The receiver decodes in its own dtype and answers as that cache decodes with its model.
            local = wire.decode(wire.encode(asked.prefilled.kv, profile, tiny_llama.fingerprint),
                                receiver_model.fingerprint)
            expected = greedy_decode(receiver_model.model, local.to_cache(receiver_model.config),
                                     asked.prefilled.tail_ids, local.seq_len, 6)
            assert asked.token_ids == expected, spec


def test_raw_between_dtypes_is_refused_with_a_reason(bf16_receiver, tiny_llama):
    with Client(bf16_receiver.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            Sender(tiny_llama, client, attempts=1).ask(CONTEXT, QUESTION, parse_profile("raw"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "float32 bits (raw), but this receiver computes in bfloat16" in info.value.details()
        # The same refusal at the header, for a sender that skips negotiation; nothing is stored.
        before = len(bf16_receiver.servicer.sessions)
        pre = prefill_prompt(tiny_llama, CONTEXT, QUESTION)
        with pytest.raises(grpc.RpcError) as info:
            client.send_frames(wire.encode(pre.kv, parse_profile("int4+raw@1"), tiny_llama.fingerprint))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "raw" in info.value.details()
        assert len(bf16_receiver.servicer.sessions) == before


def test_other_weights_are_refused(bf16_receiver, tiny_llama):
    other = load_model("tiny-llama-mha").fingerprint
    with Client(bf16_receiver.target) as client, pytest.raises(grpc.RpcError) as info:
        client.negotiate(other, ["int8"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint mismatch" in info.value.details()
