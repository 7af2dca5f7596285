from rich.console import Console

from channel.demo import _fitting
from common.profile import parse_profile


def test_profiles_naming_layers_the_model_lacks_are_left_out_and_said_so():
    console = Console(record=True, width=200)
    profiles = [parse_profile(s) for s in ("int8", "pca:b1+protect:s4+pca:b2.5@13-24", "int2+int8@0-3")]
    kept = _fitting(profiles, 18, console)
    assert [str(p) for p in kept] == ["int8:g32", "int2:g32+int8:g32@0-3"]
    said = console.export_text()
    assert "left out pca:b1" in said and "beyond the model's 18" in said
    assert _fitting(profiles, 30, console) == profiles
