"""A cache longer than the model's positions is a bad argument at the header, even past KVWIRE_MAX_TOKENS too."""

import grpc
import pytest

from common import wire
from sender.client import Client


def test_a_header_past_the_models_positions_and_max_tokens_is_invalid_argument(start_receiver, tiny_llama):
    receiver = start_receiver("tiny-llama", max_tokens=4096)  # tiny-llama's positions: 4096, as Qwen's 32768 is the default
    encoder = wire.Encoder(tiny_llama.fingerprint, "past-the-context")
    frames = [encoder.header(5000), encoder.text_segment([5] * 5000, 0)]
    with Client(receiver.target, timeout_s=30) as client, pytest.raises(grpc.RpcError) as error:
        list(client.stream_segments(iter(frames)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == ("seq_len 5000 leaves no room for a prompt and an answer within the context of "
                                     "tiny-llama (max_position_embeddings), 4096 tokens")
    assert receiver.servicer.inflight_bytes == 0
