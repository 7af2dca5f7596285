"""The sender refuses a prompt past the model's positions before any model work."""

import pytest
import torch

from common.models import ContextTooLong, load_model
from sender.prefill import prefill_prompt


def test_a_prompt_past_the_models_positions_is_refused_naming_the_limit():
    loaded = load_model("tiny-llama", "cpu", "float32")
    assert loaded.max_positions == 4096
    with pytest.raises(ContextTooLong, match=r"the prompt is \d+ tokens: .* tiny-llama, 4096 tokens "
                                             r"\(max_position_embeddings\)"):
        prefill_prompt(loaded, "Normandy is in France. " * 1000, "Where is Normandy?")
    fits = prefill_prompt(loaded, "Normandy is in France. " * 500, "Where is Normandy?")
    assert 2000 < len(fits.prompt.ids) <= 4095


def test_each_layers_importance_is_complete_when_the_layer_has_run(tiny_llama):
    """The question is prefilled with the context, so layer l's share of the question's attention is
    known as soon as layer l has run: what the layer-pipelined ask codes with is, bit for bit, what the
    whole prefill ends with (and not the even shares of a layer without statistics)."""
    from common.profile import parse_profile
    from common.prompts import build_prompt
    from sender.prefill import prefill_built

    profile = parse_profile("pca:b2:w:e:i1")
    prompt = build_prompt(tiny_llama.tokenizer, "Paris is the capital of France. " * 6, "What is the capital?")
    seen = []
    pre = prefill_built(tiny_llama, prompt, True, [profile],
                        lambda layer, keys, values, importance: seen.append((layer, keys.clone(), importance.clone())))
    assert [layer for layer, _, _ in seen] == list(range(pre.kv.num_layers))
    whole = prefill_prompt(tiny_llama, "Paris is the capital of France. " * 6, "What is the capital?", True, [profile])
    for layer, keys, importance in seen:
        assert torch.equal(keys, pre.kv.keys[layer]) and torch.equal(keys, whole.kv.keys[layer])
        assert torch.equal(importance, whole.kv.importance[layer])
        assert importance.shape == (pre.kv.seq_len,) and not torch.equal(importance, torch.ones_like(importance))
        # each question row of each query head hands out one unit of attention
        rows = pre.kv.seq_len - pre.context_len
        heads = tiny_llama.config.get_text_config().num_attention_heads
        assert float(importance.sum()) == pytest.approx(rows * heads, rel=1e-4)
