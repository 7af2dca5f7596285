"""The sender refuses a prompt past the model's positions before any model work."""

import pytest

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
