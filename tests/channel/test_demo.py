from rich.console import Console

from channel.demo import _fitting
from common.profile import parse_profile


def test_profiles_the_model_cannot_take_are_left_out_and_said_so(tiny_gemma3, tiny_llama):
    console = Console(record=True, width=200)
    profiles = [parse_profile(s) for s in ("int8", "pca:b1+protect:s4+pca:b2.5@13-24", "int2+int8@0-1", "int8+text",
                                           "int8+text:q")]
    layers = tiny_gemma3.fingerprint.num_layers
    assert layers < 13 and tiny_gemma3.sliding_layers and not tiny_llama.sliding_layers
    kept = _fitting(profiles, tiny_gemma3, console)
    assert [str(p) for p in kept] == ["int8:g32", "int2:g32+int8:g32@0-1", "int8:g32+text:q"]
    said = console.export_text()
    assert "left out pca:b1" in said and f"beyond the model's {layers}" in said
    assert "left out int8:g32+text:h:q" in said and "sliding-window" in said
    assert _fitting(profiles[2:], tiny_llama, console) == profiles[2:]
