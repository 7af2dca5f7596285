"""Round-trip bounds, exact byte counts and edge cases for every quantizer."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.profile import parse_profile
from common.quant import QUANTIZERS
from common.quant.base import QuantError
from common.quant.cast import Cast
from common.quant.kv import CHANNEL, TOKEN, KVCodec
from common.quant.lowrank import LowRank
from common.quant.nf4 import NF4, NF4_CODE_BOOK
from common.quant.packing import pack, packed_size, unpack
from common.quant.uniform import Uniform
from common.plan import precision_for

FP16_EPS = 2.0**-10  # relative spacing of fp16 parameters


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_round_trip_and_size(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=200))
    tensor = torch.tensor(codes, dtype=torch.uint8)
    packed = pack(tensor, bits)
    assert packed.numel() == packed_size(len(codes), bits) == math.ceil(len(codes) * bits / 8)
    assert unpack(packed, bits, len(codes)).tolist() == codes


def test_pack_layout_is_least_significant_first():
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    # 3-bit codes straddle bytes: 0b101, 0b011, 0b111 -> bits 101 110 111 (LSB first)
    assert pack(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b1]


matrices = arrays("float32", st.tuples(st.integers(1, 6), st.integers(1, 70)),
                  elements=st.floats(-100, 100, width=32))
EXAMPLES = [(cls, spec) for cls in QUANTIZERS for spec in cls.examples]


@pytest.mark.parametrize("cls,spec", EXAMPLES, ids=[spec for _, spec in EXAMPLES])
@settings(max_examples=30, deadline=None)
@given(x=matrices, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_every_registered_quantizer(cls, spec, x, dtype):
    """Each example of each registered quantizer: its spec round-trips, its payload is exactly size()
    bytes, and decoding restores shape and dtype within the quantizer's own error bound."""
    assert str(parse_profile(spec)) == spec
    q = precision_for(parse_profile(spec), 0).quantizer
    assert type(q) is cls and q.spec() == spec
    x = torch.from_numpy(x).to(dtype)
    blob = q.encode(x)
    assert blob.dtype == torch.uint8 and blob.shape == (q.size(*x.shape, dtype),)
    decoded = q.decode(blob, *x.shape, dtype)
    assert decoded.shape == x.shape and decoded.dtype == dtype
    info = torch.finfo(dtype)
    output_rounding = (decoded.float().abs() + info.tiny) * info.eps / 2
    assert ((decoded.float() - x.float()).abs() <= q.max_error(x) + output_rounding).all()


def group_bound(x: torch.Tensor, group: int, levels_per_range: float) -> torch.Tensor:
    """Per element: half a quantization step of its group, plus fp16 rounding of the parameters."""
    rows, cols = x.shape
    pad = (-cols) % group
    padded = torch.cat([x, x[:, -1:].expand(rows, pad)], 1).view(rows, -1, group)
    span = (padded.amax(-1) - padded.amin(-1)) / levels_per_range
    magnitude = padded.abs().amax(-1)
    bound = span / 2 * (1 + 4 * FP16_EPS) + 4 * FP16_EPS * magnitude + 1e-6
    return bound.repeat_interleave(group, 1)[:, :cols]


@settings(max_examples=60, deadline=None)
@given(x=matrices, bits=st.integers(2, 8), group=st.sampled_from([1, 4, 32, 64]))
def test_uniform_asymmetric_within_half_step(x, bits, group):
    x = torch.from_numpy(x)
    q = Uniform(bits, group)
    blob = q.encode(x)
    assert blob.numel() == q.size(*x.shape) == packed_size(x.numel(), bits) + 4 * x.shape[0] * math.ceil(x.shape[1] / group)
    error = (q.decode(blob, *x.shape) - x).abs()
    assert (error <= group_bound(x, group, 2**bits - 1)).all()


@settings(max_examples=60, deadline=None)
@given(x=matrices, bits=st.integers(2, 8), group=st.sampled_from([1, 8, 32]))
def test_uniform_symmetric_within_half_step(x, bits, group):
    x = torch.from_numpy(x)
    q = Uniform(bits, group, symmetric=True)
    blob = q.encode(x)
    assert blob.numel() == packed_size(x.numel(), bits) + 2 * x.shape[0] * math.ceil(x.shape[1] / group)
    # symmetric: the step is absmax / (2^(bits-1) - 1)
    error = (q.decode(blob, *x.shape) - x).abs()
    rows, cols = x.shape
    pad = (-cols) % group
    padded = torch.cat([x, x[:, -1:].expand(rows, pad)], 1).view(rows, -1, group).abs().amax(-1)
    bound = (padded / (2 ** (bits - 1) - 1) / 2 * (1 + 4 * FP16_EPS) + 1e-6).repeat_interleave(group, 1)[:, :cols]
    assert (error <= bound).all()


@settings(max_examples=40, deadline=None)
@given(x=matrices, group=st.sampled_from([4, 32]))
def test_binary_quantizers(x, group):
    x = torch.from_numpy(x)
    asym = Uniform(1, group)
    decoded = asym.decode(asym.encode(x), *x.shape)
    assert ((decoded - x).abs() <= group_bound(x, group, 1)).all()
    sym = Uniform(1, group, symmetric=True)
    blob = sym.encode(x)
    assert blob.numel() == packed_size(x.numel(), 1) + 2 * x.shape[0] * math.ceil(x.shape[1] / group)
    decoded = sym.decode(blob, *x.shape)
    assert (torch.sign(decoded) * torch.sign(x) >= 0).all()  # signs kept (zero maps to +)


@settings(max_examples=60, deadline=None)
@given(x=matrices, group=st.sampled_from([1, 16, 64]))
def test_nf4_picks_the_nearest_code(x, group):
    x = torch.from_numpy(x)
    q = NF4(group)
    blob = q.encode(x)
    assert blob.numel() == packed_size(x.numel(), 4) + 2 * x.shape[0] * math.ceil(x.shape[1] / group)
    decoded = q.decode(blob, *x.shape)
    # Brute force: the nearest of the 16 scaled codes, scale rounded to fp16 as on the wire.
    rows, cols = x.shape
    pad = (-cols) % group
    absmax = torch.cat([x, x[:, -1:].expand(rows, pad)], 1).view(rows, -1, group).abs().amax(-1).half().float()
    scale = absmax.repeat_interleave(group, 1)[:, :cols]
    candidates = NF4_CODE_BOOK.view(1, 1, -1) * scale.unsqueeze(-1)
    best = (candidates - x.unsqueeze(-1)).abs().amin(-1)
    assert torch.allclose((decoded - x).abs(), best, atol=1e-5 + 1e-6 * float(scale.max()))


def test_constant_and_zero_inputs_are_exact():
    for q in (Uniform(4, 8), Uniform(2, 8, symmetric=True), Uniform(1, 8), NF4(8)):
        for value in (0.0, 0.5, -2.0):
            x = torch.full((3, 10), value)
            assert torch.equal(q.decode(q.encode(x), 3, 10), x), (q, value)


def test_tiny_inputs():
    for q in (Uniform(3), NF4(), Cast(torch.float16)):
        x = torch.tensor([[1.25]])
        assert torch.allclose(q.decode(q.encode(x), 1, 1, torch.float32), x, atol=1e-3)


@pytest.mark.parametrize("q", [Uniform(4), Uniform(8, symmetric=True), NF4()])
def test_nan_inf_and_fp16_overflow_are_refused(q):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(QuantError, match="NaN or Inf"):
            q.encode(torch.tensor([[1.0, bad]]))
    with pytest.raises(QuantError, match="fp16"):
        q.encode(torch.tensor([[1.0, 1e6]]))


def test_huge_but_representable_magnitudes():
    x = torch.tensor([[60000.0, -60000.0, 1.0, 0.0]])
    q = Uniform(8, 4)
    assert ((q.decode(q.encode(x), 1, 4) - x).abs() <= 120000 / 255 / 2 * 1.01 + 60).all()


def test_wrong_payload_size_is_refused():
    q = Uniform(4, 32)
    blob = q.encode(torch.randn(2, 40))
    with pytest.raises(QuantError, match="needs"):
        q.decode(blob[:-1], 2, 40)


def test_low_rank_is_exact_at_full_rank_and_optimal_below():
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    full = LowRank(16, Cast())
    assert torch.allclose(full.decode(full.encode(x), 40, 16, torch.float32), x, atol=1e-4)
    r4 = LowRank(4, Cast())
    error = torch.linalg.norm(r4.decode(r4.encode(x), 40, 16, torch.float32) - x)
    singular = torch.linalg.svdvals(x)
    assert error == pytest.approx(float(singular[4:].norm()), rel=1e-4)  # Eckart–Young
    assert r4.size(40, 16, torch.float32) == (40 * 4 + 4 * 16) * 4


def test_low_rank_with_quantized_factors_sizes():
    q = LowRank(8, Uniform(8, 32))
    assert q.size(100, 64, torch.float32) == Uniform(8, 32).size(100, 8) + Uniform(8, 32).size(8, 64)
    x = torch.randn(100, 64)
    assert q.encode(x).numel() == q.size(100, 64, torch.float32)


@pytest.mark.parametrize("key_axis,value_axis", [(CHANNEL, TOKEN), (TOKEN, CHANNEL), (TOKEN, TOKEN)])
def test_kv_codec_axes_round_trip(key_axis, value_axis):
    torch.manual_seed(1)
    keys, values = torch.randn(1, 3, 50, 16), torch.randn(1, 3, 50, 16)
    codec = KVCodec(Uniform(8, 16), key_axis, value_axis)
    payload = codec.encode(keys, values)
    assert payload.numel() == codec.payload_size(tuple(keys.shape), torch.float32)
    k, v = codec.decode(payload, tuple(keys.shape), torch.float32)
    assert (k - keys).abs().max() < 0.05 and (v - values).abs().max() < 0.05


def test_per_channel_keys_follow_outlier_channels():
    """KIVI's point: a key channel with a large offset quantizes well per channel, badly per token."""
    torch.manual_seed(2)
    keys = torch.randn(1, 1, 64, 32)
    keys[..., 5] += 40.0
    values = torch.randn(1, 1, 64, 32)
    errors = {}
    for axis in (CHANNEL, TOKEN):
        codec = KVCodec(Uniform(2, 32), axis, TOKEN)
        k, _ = codec.decode(codec.encode(keys, values), tuple(keys.shape), torch.float32)
        errors[axis] = float((k - keys).norm() / keys.norm())
    assert errors[CHANNEL] < errors[TOKEN] / 2


@pytest.mark.parametrize("codec", [KVCodec(Cast()), KVCodec(Cast(torch.float16)), KVCodec(Uniform(4, 32))])
def test_single_token_single_head_chunks(codec):
    """Found in CI with Gemma-3 (one KV head): a one-token chunk makes size-1 dimensions with odd strides."""
    keys, values = torch.randn(1, 1, 1, 256), torch.randn(1, 1, 1, 256)
    payload = codec.encode(keys, values)
    assert payload.numel() == codec.payload_size((1, 1, 1, 256), torch.float32)
    k, v = codec.decode(payload, (1, 1, 1, 256), torch.float32)
    assert torch.allclose(k, keys, atol=0.2) and torch.allclose(v, values, atol=0.2)


@pytest.mark.parametrize("values, bits", [([0.0, 1.7453432e-06], 6), ([1e-5, 0.0], 8), ([1e-5, 0.0], 7)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_a_step_below_fp16_normal_range_keeps_codes_in_range(values, bits, symmetric):
    """Found by hypothesis: a step of 2.8e-8 rounds to 0 in fp16 (the group collapses), one of 7.9e-8
    rounds down to 6e-8 (codes past the last level are clipped). Both are rounded up now."""
    x = torch.tensor([values])
    q = Uniform(bits, 4, symmetric=symmetric)
    step = max(abs(v) for v in values) / (2 ** (bits - 1) - 1 if symmetric else 2**bits - 1)
    assert (q.decode(q.encode(x), 1, 2) - x).abs().max() <= step / 2 + 2.0**-25


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(0, 4), cols=st.integers(0, 300), group=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_per_column_matches_repeat_interleave(rows, cols, group, seed):
    """The bounded expansion gives exactly what repeat_interleave gave: decoders' results are unchanged."""
    from common.quant.base import num_groups, per_column

    params = torch.randn(rows, num_groups(cols, group), generator=torch.Generator().manual_seed(seed))
    expected = params.repeat_interleave(group, dim=1)[:, :cols]
    assert torch.equal(per_column(params, group, cols), expected)


@pytest.mark.parametrize("quantizer", [Uniform(1, 32), Uniform(4, 32), Uniform(4, 32, symmetric=True), Uniform(8, 32),
                                       NF4(64)], ids=lambda q: q.spec())
def test_decoders_allocate_by_the_matrix_not_the_group(quantizer):
    """A group of 2^40 (past the grammar's cap, as a header once could declare) costs a 3x5 decode no more
    than a group of 5: the old repeat_interleave(group) tried to allocate 3 * 2^40 floats."""
    object.__setattr__(quantizer, "group", 2**40)  # bypass the cap of __post_init__
    blob = torch.randint(0, 256, (quantizer.size(3, 5),), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    decoded = quantizer.decode(blob, 3, 5, torch.float32)
    reference = dataclasses.replace(quantizer, group=5).decode(blob, 3, 5, torch.float32)  # one group per row too
    assert torch.equal(decoded.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("make", [lambda g: Uniform(4, g), lambda g: NF4(g)])
def test_group_sizes_are_capped(make):
    from common.quant.base import MAX_GROUP

    assert make(MAX_GROUP).group == MAX_GROUP
    for group in (0, MAX_GROUP + 1, 2**28):
        with pytest.raises(QuantError, match=f"at most {MAX_GROUP}"):
            make(group)
