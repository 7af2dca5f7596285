import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common.plan import kv_codec
from common.profile import Profile, ProfileError, parse_profile
from common.profile.stages.precision import Int
from common.profile.stages.svd import SVD
from common.quant import QUANTIZERS
from common.quant.lowrank import LowRank
from common.quant.nf4 import NF4
from common.quant.uniform import Uniform
from common.select import METHODS


@pytest.mark.parametrize("spec,canonical", [
    ("raw", "raw"), ("lossless", "raw"), ("fp16", "fp16"), ("bf16", "bf16"),
    ("int8", "int8:g32"), ("int4:g32", "int4:g32"), ("int3", "int3:g32"), ("int2", "int2:g32"),
    ("int1", "int1:g32"), ("int1:asym", "int1:g32:asym"), ("int1:sym", "int1:g32"), ("nf4", "nf4:g64"), ("svd:r32", "svd:r32"), ("svd:r32+int8", "svd:r32+int8:g32"),
    ("int8+svd:r32", "svd:r32+int8:g32"), ("INT4:G64:SYM", "int4:g64:sym"), ("int4:asym", "int4:g32"),
    ("int4:k=token:v=channel", "int4:g32:k=token:v=channel"),
    ("int2+int8@0-3", "int2:g32+int8:g32@0-3"), ("int2+nf4@5+int8@0-1", "int2:g32+int8:g32@0-1+nf4:g64@5"),
    ("text", "raw+text:h:q"), ("text:q:h", "raw+text:h:q"), ("int8+text:q", "int8:g32+text:q"),
    ("pca:b1+pca:b2@13-24+text:h", "pca:b1+text:h+pca:b2@13-24"), ("q2c:1+pca:b1+tier:0.1:int4+text:q",
                                                                  "q2c:1+pca:b1+tier:0.1:int4:g32+text:q"),
])
def test_parse_and_print(spec, canonical):
    profile = parse_profile(spec)
    assert str(profile) == canonical
    assert parse_profile(str(profile)) == profile


@pytest.mark.parametrize("spec,message", [
    ("", "empty"), ("int9", "1 to 8 bits"), ("int0", "1 to 8 bits"), ("int4+int8", "two precision stages"),
    ("svd:r8+svd:r4", "two svd"), ("svd", "positive rank"), ("svd:r0", "positive rank"), ("svd:r8@0", "positive rank"),
    ("int4:g0", "positive"), ("int4:sym:asym", "sym or asym once"), ("nf4:asym", "symmetric by construction"),
    ("int4:x=1", "unknown option"), ("int4:k=chan", "unknown option"), ("fp16:g32", "takes no options"),
    ("fp16:k=token", "takes no k= or v= options"), ("zip", "unknown stage"),
    ("int4+int8@3-1", "empty"), ("int4+int8@0-3+int2@2", "overlaps"), ("int4++int8", "cannot parse"),
    ("int8+text:x", "text takes h"), ("int8+text:q:q", "at most once"), ("int8+text+text:q", "one text stage"),
    ("int8+text:h@0-3", "one text stage"), ("q2c:0.5+int8+text", "segments carry no selection"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec)


def test_codecs_per_layer():
    profile = parse_profile("svd:r16+int4:g32+int8@0")
    assert kv_codec(profile, 0).quantizer == LowRank(16, Uniform(8, 32))
    assert kv_codec(profile, 1).quantizer == LowRank(16, Uniform(4, 32))
    assert kv_codec(parse_profile("nf4:k=token"), 3).key_axis == "token"
    assert kv_codec(parse_profile("nf4"), 0).quantizer == NF4(64)
    with pytest.raises(ProfileError, match="beyond"):
        parse_profile("int4+int8@0-40").check_layers(30)
    assert parse_profile("raw").lossless and not parse_profile("fp16").lossless


@given(bits=st.integers(1, 8), group=st.integers(1, 512), sym=st.booleans(),
       k=st.sampled_from(["channel", "token"]), v=st.sampled_from(["channel", "token"]),
       rank=st.one_of(st.none(), st.integers(1, 256)))
def test_round_trip_property(bits, group, sym, k, v, rank):
    profile = Profile.of([SVD(rank)] * (rank is not None) + [Int(bits, group, sym, k, v)])
    assert profile.precision.quantizer == Uniform(bits, group, sym)
    assert parse_profile(str(profile)) == profile


CANONICAL = ["int4:g32", "int1:g32", "int3:g64:sym", "nf4:g64", "int8:g32:k=token", "svd:r32+int8:g32",
             "q2c:0.5+int4:g32", "snapkv:256t:w16", "h2o:0.25:layer:pyramid", "raw", "fp16", "bf16"]


@pytest.mark.parametrize("canonical", CANONICAL)
def test_canonical_strings_are_stable(canonical):
    """These strings cross the wire and key stored results: they must never change."""
    assert str(parse_profile(canonical)) == canonical


@pytest.mark.parametrize("cls", QUANTIZERS, ids=lambda cls: cls.__name__)
def test_unknown_stage_lists_every_quantizer(cls):
    with pytest.raises(ProfileError, match="unknown stage") as error:
        parse_profile("zip")
    assert all(name in str(error.value) for name in cls.stage_names)


@pytest.mark.parametrize("method", METHODS)
def test_every_selector_option_round_trips(method):
    for name, (_, kind) in METHODS[method].grammar_options.items():
        spec = f"{method}:0.5:{name}" if kind is str else f"{method}:0.5:{name}1"
        assert str(parse_profile(spec)) == spec
    with pytest.raises(ProfileError, match="unknown option 'zz'"):
        parse_profile(f"{method}:0.5:zz")


def test_payload_sizes_are_exact():
    shape = (1, 3, 100, 64)
    codes = 3 * 100 * 64 // 2
    keys = codes + (3 * 64) * 4 * 4  # per channel: 192 rows, ceil(100/32) = 4 groups, fp16 scale + min
    values = codes + (3 * 100) * 2 * 4  # per token: 300 rows, 64/32 = 2 groups
    assert kv_codec(parse_profile("int4:g32"), 0).payload_size(shape, torch.float32) == keys + values
    assert kv_codec(parse_profile("raw"), 0).payload_size(shape, torch.float32) == 2 * 3 * 100 * 64 * 4
    assert kv_codec(parse_profile("fp16"), 0).payload_size(shape, torch.float32) == 2 * 3 * 100 * 64 * 2


@pytest.mark.parametrize("spec,message", [
    ("int4:g268435456", "at most 4096"), ("nf4:g4097", "at most 4096"), ("int4:g" + "9" * 2000, "at most 4096"),
    ("svd:r4097", "at most 4096"), ("svd:r18446744073709551616", "at most 4096"),
    ("int4+int8@" + "9" * 2000, "beyond|characters"), ("int4:" + "x" * 3000, "characters"),
    ("q2c:" + "9" * 4400 + "t", "characters"),  # past int()'s 4300-digit limit: refused before int() sees it
])
def test_extreme_numbers_are_profile_errors(spec, message):
    """Header profiles are untrusted: huge groups, ranks and digit strings are refused as ProfileErrors."""
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec).check_layers(30)


def test_the_largest_group_and_rank_parse():
    assert str(parse_profile("svd:r4096+int4:g4096")) == "svd:r4096+int4:g4096"
    assert parse_profile("nf4:g4096").precision.quantizer == NF4(4096)


def test_an_option_given_twice_is_refused():
    for spec in ("int4:g32:g64", "int2:g18446744073709551616:g1", "nf4:g64:g64"):
        with pytest.raises(ProfileError, match="group size gN once"):
            parse_profile(spec)


def test_the_text_stage_is_left_out_of_what_travels_as_cache():
    profile = parse_profile("pca:b1+text")
    assert profile.text_head and profile.text_question
    assert str(profile.as_cache) == "pca:b1" and not parse_profile("int8+text:q").as_cache.text_question
