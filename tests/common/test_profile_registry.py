"""The registry's grammar against the parser it replaced: every spec the repository stores parses to the
same canonical text, and codes to the same bytes on the wire (tests/common/data/profile_golden.json was
written by the old parser, before the registry; its wire hashes were rewritten once since, when payloads that zstd
shrinks by under 10% began to travel stored, after checking that with zstd forced on every chunk each spec still
gave the old bytes); the long form reads back to the same profile."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import wire
from common.kvstate import prefill
from common.profile import ProfileError, parse_profile
from common.profile.registry import STAGES
from common.select import METHODS
from tests.common.profile_specs import stored_specs

GOLDEN = json.loads((Path(__file__).parent / "data" / "profile_golden.json").read_text())
VALID = sorted(spec for spec, entry in GOLDEN.items() if "canonical" in entry)


def test_every_stored_spec_is_in_the_golden_file():
    """A spec stored in results/ later than the golden file still parses (and prints canonically)."""
    for spec in stored_specs():
        if spec in GOLDEN:
            continue
        try:
            profile = parse_profile(spec)
        except ProfileError:
            continue
        assert str(parse_profile(str(profile))) == str(profile)
    assert len(VALID) >= 190


@pytest.mark.parametrize("spec", sorted(GOLDEN))
def test_canonical_text_is_unchanged(spec):
    entry = GOLDEN[spec]
    if "error" in entry:
        with pytest.raises(ProfileError):
            parse_profile(spec)
        return
    profile = parse_profile(spec)
    assert str(profile) == entry["canonical"]
    assert parse_profile(entry["canonical"]) == profile


@pytest.mark.parametrize("spec", VALID)
def test_long_form_reads_back_to_the_same_profile(spec):
    profile = parse_profile(spec)
    long_form = json.loads(json.dumps(profile.long_form()))
    reparsed = parse_profile(long_form)
    assert reparsed.long_form() == long_form and parse_profile(json.dumps(long_form)) == reparsed
    if "w016" not in spec:  # JSON numbers drop a leading zero the compact form keeps
        assert reparsed == profile


@pytest.fixture(scope="module")
def llama_cache(tiny_llama):
    return prefill(tiny_llama.model, list(range(300, 340)))


def _digest(frames) -> str:
    return hashlib.sha256(b"".join(f.SerializeToString() for f in frames)).hexdigest()


@pytest.mark.parametrize("spec", [s for s in VALID if "wire_sha256" in GOLDEN[s] or "wire_error" in GOLDEN[s]])
def test_same_bytes_on_the_wire(spec, tiny_llama, llama_cache):
    """tiny-llama, the frames of a 40-token cache with a fixed transfer id: byte for byte the old ones."""
    entry = GOLDEN[spec]
    frames = wire.encode(llama_cache, parse_profile(spec), tiny_llama.fingerprint, transfer_id="golden",
                         head_ids=list(range(300, 304)))
    if "wire_error" in entry:
        with pytest.raises(ProfileError):
            list(frames)
        return
    assert _digest(frames) == entry["wire_sha256"]


PCA_SPECS = ["pca:b2", "pca:b2.8:w+text", "pca:b1:k0.5", "pca:b0.5+pca:b2@13-24"]


def test_same_pca_bytes_on_the_wire(smollm2):
    """smollm2-135m and its shipped basis (pca stages need one): a few of the golden file's pca specs."""
    kv = prefill(smollm2.model, list(range(300, 340)))
    checked = 0
    for spec in PCA_SPECS:
        entry = GOLDEN.get(spec) or {}
        if "smollm2_wire_sha256" not in entry:
            continue
        frames = wire.encode(kv, parse_profile(spec), smollm2.fingerprint, transfer_id="golden",
                             context=smollm2.codec_context, head_ids=list(range(300, 304)))
        assert _digest(frames) == entry["smollm2_wire_sha256"], spec
        checked += 1
    assert checked >= 2


def test_the_method_names_are_the_selectors():
    from common.profile.stages.selection import METHOD_NAMES

    assert METHOD_NAMES == tuple(METHODS)


def test_every_stage_is_registered_and_documented():
    from common.profile.stage import options_of

    for stage in STAGES:
        assert stage.summary and stage.examples, stage.name
        for example in stage.examples:
            assert str(parse_profile(str(parse_profile(example)))) == str(parse_profile(example))
        for name, option, _ in options_of(stage):
            assert option.doc, f"{stage.name}.{name}"


def test_the_parser_imports_without_torch():
    code = "import sys, common.profile; common.profile.parse_profile('pca:b1.7:w:e:j:i1+text'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_fuzzer_draws_every_stage_and_every_option():
    """common.fuzz's generator comes from the registry: over a few thousand profiles it writes every
    stage kind, and every option of each (letters, words, flags, k=/v=, pca's w, e, j)."""
    import random

    from common import fuzz
    from common.profile.registry import stage_for
    from common.profile.stage import options_of
    from common.profile.stages.pca import PCA

    rng = random.Random(0)
    seen: dict[type, set[str]] = {}
    for _ in range(4000):
        for stage_text in fuzz.random_profile(rng).split("+"):
            name, *options = stage_text.split("@")[0].split(":")
            try:
                cls = stage_for(name)
            except ProfileError:
                continue
            seen.setdefault(cls, set()).update(options)
    assert set(seen) == set(STAGES)
    for cls, tokens in seen.items():
        for field_name, option, _ in options_of(cls):
            if option.in_name or option.positional or field_name in ("layers", "options"):
                continue
            if option.words:
                assert set(option.words) <= tokens, (cls.name, field_name)
            elif option.flag:
                assert option.flag in tokens, (cls.name, field_name)
            elif option.assign:
                assert any(t.startswith(option.assign + "=") for t in tokens), (cls.name, field_name)
            elif option.letter:
                assert any(t.startswith(option.letter) and t[len(option.letter):][:1].isdigit() for t in tokens), \
                    (cls.name, field_name)
    assert {"w", "e", "j"} <= seen[PCA]
    selection_tokens = seen[stage_for("q2c")]
    for method in METHODS.values():
        assert all(any(t.startswith(k) for t in selection_tokens) for k in method.grammar_options), method
