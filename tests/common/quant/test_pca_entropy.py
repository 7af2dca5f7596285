"""Entropy-coded transform coding (pca:bB:w:e): the rate model, the range coder, the wire."""

import math

import numpy as np
import pytest
import torch

from common import wire
from common.profile import ProfileError, parse_profile
from common.quant.pca_entropy import ROUNDING, EntropyPCACodec, entropy_plan, expected_bits, table
from common.quant.transform import CodecContext
from tests.common.quant.test_transforms import round_trip, setup, weighted  # noqa: F401 (a fixture)


def laplace_indices(scale: float, count: int, seed: int = 0) -> np.ndarray:
    """Indices of `count` Laplace coordinates of `scale` steps, quantized as the codec does."""
    x = np.random.default_rng(seed).laplace(0.0, scale, count)
    return (np.sign(x) * np.floor(np.abs(x) + ROUNDING)).astype(np.int64)


@pytest.mark.parametrize("scale", [0.1, 0.5, 2.0, 20.0])
def test_expected_bits_is_the_entropy_of_the_indices(scale):
    q = laplace_indices(scale, 400_000)
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    empirical = float(-(p * np.log2(p)).sum())
    assert float(expected_bits(torch.tensor(scale, dtype=torch.float64))) == pytest.approx(empirical, rel=0.02, abs=2e-3)


def test_the_range_coder_reaches_the_model_rate_and_round_trips():
    """Indices of the table's own distribution code to its entropy, and decode to what was sent."""
    index = 10  # scale 2^(10/8) steps
    scale = 2.0 ** (index / 8)
    q = laplace_indices(scale, 200_000, seed=1)
    _, top = table(index)
    codec = EntropyPCACodec(None, None, torch.ones(1), torch.tensor([index]))
    raw = q.clip(-top, top).astype("<i2").tobytes()
    blob = codec.compress(raw)
    assert codec.decompress(blob, len(raw)) == raw
    bits = 8 * len(blob) / q.size
    assert bits == pytest.approx(float(expected_bits(torch.tensor(scale, dtype=torch.float64))), rel=0.02)
    with pytest.raises(ValueError, match="does not fit"):
        codec.decompress(blob[:-1], len(raw))


def test_tables_are_rebuilt_identically():
    model, top = table(-5)
    table.cache_clear()
    again, top_again = table(-5)
    q = laplace_indices(2.0 ** (-5 / 8), 10_000)
    codec = EntropyPCACodec(None, None, torch.ones(1), torch.tensor([-5]))
    raw = q.clip(-top, top).astype("<i2").tobytes()
    assert top == top_again and codec.compress(raw) == codec.compress(raw)


def test_the_plan_spends_the_expected_bits_and_follows_the_weights(setup, tmp_path):
    loaded, context, kv = setup
    layers = context.basis.num_layers
    heavy = weighted(context.basis, tmp_path / "w.safetensors", [[100.0, 100.0] if i == 1 else [1.0, 1.0] for i in range(layers)])
    pool = tuple(range(layers))
    for bits in (0.25, 1.0, 3.0):
        plan = entropy_plan(heavy, pool, bits)
        std, weight = heavy.pooled_weights(pool)
        steps = torch.cat([plan[i][0] for i in pool]).double()
        rate = expected_bits(std * weight.sqrt() / math.sqrt(2) / (steps * weight.sqrt())).mean()
        assert float(rate) == pytest.approx(bits, rel=1e-6)
        # one step in the weighted metric: layer 1 (weight 100) is stepped 10 times finer
        assert torch.allclose(plan[1][0], plan[0][0] / 10)
    assert float(entropy_plan(heavy, pool, 3.0)[0][0][0]) < float(entropy_plan(heavy, pool, 1.0)[0][0][0])


def test_wire_round_trip(setup, tmp_path):
    """Each chunk declares its raw size and carries the range code; more bits, less error, smaller steps."""
    loaded, context, kv = setup
    layers = context.basis.num_layers
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * layers)
    ctx = CodecContext(context.rope, basis)
    errors, sizes = [], []
    for bits in (0.5, 2.0, 6.0):
        spec = f"pca:b{bits:g}:w:e"
        frames, back = round_trip(loaded, ctx, kv, spec)
        profile = parse_profile(frames[0].header.profile)
        assert str(profile).startswith(f"pca:b{bits:g}:w:e:h{basis.digest}")
        chunks = [f.chunk for f in frames if f.WhichOneof("kind") == "chunk"]
        codecs = [profile.layer_codec(i, ctx) for i in range(layers)]
        assert all(c.entropy_coded for c in codecs)
        shapes = [tuple(k.shape) for k in kv.keys]  # a sliding-window layer keeps its last tokens only
        assert sum(c.raw_size for c in chunks) == sum(c.payload_size(s, kv.dtype) for c, s in zip(codecs, shapes))
        sizes.append(sum(len(c.payload) for c in chunks))
        # what the receiver decoded is the codec's own round trip of the sender's cache
        for i, codec in enumerate(codecs):
            raw = codec.encode(kv.keys[i], kv.values[i], kv.positions[i])
            keys, values = codec.decode(raw, shapes[i], kv.positions[i], kv.dtype)
            assert torch.equal(keys, back.keys[i]) and torch.equal(values, back.values[i])
        errors.append(sum(float((a - b).square().mean()) for a, b in zip(kv.keys + kv.values, back.keys + back.values)))
        elements = 2 * sum(k.numel() for k in kv.keys)
        assert 8 * sizes[-1] / elements < 2 * bits + 0.1  # the data follow the calibrated rate, roughly
    assert errors == sorted(errors, reverse=True) and sizes == sorted(sizes)


def test_a_layer_weighed_to_nothing_codes_to_nothing(setup, tmp_path):
    loaded, context, kv = setup
    layers = context.basis.num_layers
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1e-12, 1e-12] if i == 0 else [1.0, 1.0] for i in range(layers)])
    ctx = CodecContext(context.rope, basis)
    frames, back = round_trip(loaded, ctx, kv, "pca:b1:w:e")
    assert parse_profile(frames[0].header.profile).layer_codec(0, ctx).codec.coded.numel() == 0
    assert all(len(f.chunk.payload) == 0 for f in frames if f.WhichOneof("kind") == "chunk" and f.chunk.layer == 0)
    assert torch.isfinite(back.keys[0]).all()


def test_a_corrupt_range_code_is_data_loss(setup, tmp_path):
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    frames = list(wire.encode(kv, parse_profile("pca:b2:w:e"), loaded.fingerprint, context=ctx))
    chunk = next(f.chunk for f in frames if f.WhichOneof("kind") == "chunk")
    chunk.payload = chunk.payload[:-1]
    chunk.crc32 = __import__("zlib").crc32(chunk.payload)
    with pytest.raises(wire.WireError, match="does not decompress"):
        wire.decode(frames, loaded.fingerprint, context=ctx)


@pytest.mark.parametrize("spec,message", [("pca:b1:e", "add w"), ("pca:b1:w:e:e", "repeated"), ("pca:b1:k1:w:e", "drop k")])
def test_bad_entropy_stages_are_refused(spec, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec)


def test_a_profile_says_whether_it_is_range_coded():
    assert parse_profile("pca:b1:w:e+text").entropy_coded
    assert parse_profile("pca:b1:w+pca:b2:w:e@1").entropy_coded
    assert not parse_profile("pca:b1:w+text").entropy_coded and not parse_profile("int4").entropy_coded
