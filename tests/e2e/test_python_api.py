"""The Python entry point (`sender.connect`) over real gRPC: a profile as a preset, text, long form or Profile."""

import pytest

import receiver.server as server_module
from common.profile import ProfileError, parse_profile
from common.profile.presets import DEFAULT_PROFILE, resolve
from sender import connect

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders from Denmark, Iceland and Norway.")
QUESTION = "Where is Normandy?"


def test_every_form_of_a_profile_sends_the_same_cache(llama_receiver, tiny_llama):
    long_form = {"stages": [{"stage": "int", "bits": 8}]}
    with connect(llama_receiver.target, model=tiny_llama) as session:
        asked = {name: session.ask(CONTEXT, QUESTION, profile, max_new_tokens=6)
                 for name, profile in [("preset", "int8"), ("text", "int8:g32"), ("long", long_form),
                                       ("json", '{"stages": [{"stage": "int", "bits": 8}]}'),
                                       ("object", parse_profile("int8"))]}
        lossless = session.ask(CONTEXT, QUESTION, "lossless", max_new_tokens=6)
    assert {a.profile for a in asked.values()} == {"int8:g32"}
    assert len({a.bytes_sent for a in asked.values()}) == 1
    assert len({tuple(a.token_ids) for a in asked.values()}) == 1 and len(asked["preset"].token_ids) == 6
    assert lossless.profile == "raw" and lossless.bytes_sent > 2 * asked["preset"].bytes_sent


def test_the_default_is_balanced_which_falls_back_without_a_basis(llama_receiver, tiny_llama):
    assert DEFAULT_PROFILE == "balanced"
    with connect(llama_receiver.target, model=tiny_llama) as session:
        asked = session.ask(CONTEXT, QUESTION, max_new_tokens=4)
    assert asked.profile == "int4:g32"  # tiny-llama ships no PCA basis
    assert str(resolve("balanced", "smollm2-135m")) == "pca:b3.05:w:e:j:i1:f3+text:h:q"
    assert str(resolve("compact", "gemma3-270m")) == "pca:b0.65:w:e:j:i1+protect:s4:r0+text:q"
    assert str(resolve("compact", "qwen2.5-coder-1.5b")) == "pca:b1.3:w:e:j:i1:f3+text:h:q"  # its basis ships


@pytest.mark.parametrize("profile,message", [
    ({"stages": [{"stage": "int", "bits": 9}]}, "1 to 8 bits"),
    ({"stages": [{"stage": "int", "bits": 4, "grup": 32}]}, "no field 'grup'"),
    ({"stages": [{"stage": "pca", "bits": "two"}]}, "bits per element \\(bits\\) 'two' is not a number"),
    ("int9", "1 to 8 bits"),
    ("balancd", "unknown stage 'balancd'"),
])
def test_a_bad_profile_is_refused_before_anything_is_sent(llama_receiver, tiny_llama, profile, message):
    with connect(llama_receiver.target, model=tiny_llama) as session:
        with pytest.raises(ProfileError, match=message):
            session.ask(CONTEXT, QUESTION, profile)


def test_auto_without_a_bandwidth_says_what_it_assumed(llama_receiver, tiny_llama, monkeypatch):
    table = {"version": 1, "model": "tiny-llama", "samples": 1, "prefill_s_per_token": 0.0, "profiles": {
        "int4:g32": {"fidelity": 0.8, "bytes_per_token": 150, "encode_s_per_token": 0, "receiver_s_per_token": 0,
                     "first_token_s": 0.0}}}
    monkeypatch.setattr(server_module, "load_table", lambda model: table)
    with connect(llama_receiver.target, model=tiny_llama) as session:
        asked = session.ask(CONTEXT, QUESTION, "auto", max_new_tokens=2)
        given = session.ask(CONTEXT, QUESTION, "auto", max_new_tokens=2, bandwidth_bps=1e9)
    assert asked.profile == "int4:g32" and "no bandwidth measured or given; planned for 100 Mbit/s" in asked.plan
    assert "no bandwidth measured" not in given.plan
