"""Entropy-coded transform coding (pca:bB:w:e): the rate model, the range coder, the wire."""

import math
from dataclasses import replace

import grpc

import numpy as np
import pytest
import torch

from common import wire
from common.profile import ProfileError, parse_profile
import constriction

from common.quant.pca_entropy import DROPPED, MIN_TABLE, ROUNDING, EntropyPCACodec, entropy_plan, expected_bits, table
from common.quant.transform import CodecContext
from tests.common.quant.test_transforms import round_trip, setup, weighted  # noqa: F401 (a fixture)
from common.plan import layer_codec


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
    with pytest.raises(ValueError, match="whole 32-bit words"):
        codec.decompress(blob[:-1], len(raw))


def test_tables_are_rebuilt_identically():
    """A table built again codes the same symbols to the same bytes (both nodes build their own)."""
    q = laplace_indices(2.0 ** (-5 / 8), 10_000)
    codes = []
    for _ in range(2):
        table.cache_clear()
        model, top = table(-5)
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(q.clip(-top, top).astype(np.int32) + top, model)
        codes.append(encoder.get_compressed().tobytes())
    assert codes[0] == codes[1] and len(codes[0]) > 0


def test_components_below_one_step_still_travel():
    """A component whose scale is under one step (a negative table) is coded, not dropped."""
    codec = EntropyPCACodec(None, None, torch.ones(3), torch.tensor([-20, -1, DROPPED]))
    assert codec.coded.tolist() == [0, 1]
    q = np.stack([laplace_indices(2.0 ** (-20 / 8), 2000), laplace_indices(2.0 ** (-1 / 8), 2000, seed=3)], 1)
    raw = q.astype("<i2").tobytes()
    assert codec.decompress(codec.compress(raw), len(raw)) == raw


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
        # what the codecs send is what the plan expects, within the few components it drops
        sent = sum(float(expected_bits(s[c] / plan[i][0].double()[c]).sum())
                   for i, s in ((i, heavy.pooled_weights((i,))[0] * heavy.pooled_weights((i,))[1].sqrt() / math.sqrt(2)
                                 / heavy.pooled_weights((i,))[1].sqrt()) for i in pool)
                   for c in [EntropyPCACodec.for_layer(heavy, i, bits, pool).coded])
        assert sent / std.numel() == pytest.approx(bits, rel=0.02)
        # one step in the weighted metric: layer 1 (weight 100) is stepped 10 times finer
        assert torch.allclose(plan[1][0], plan[0][0] / 10)
    assert float(entropy_plan(heavy, pool, 3.0)[0][0][0]) < float(entropy_plan(heavy, pool, 1.0)[0][0][0])


def test_stages_of_the_same_components_keep_their_own_steps_and_models(setup, tmp_path):
    """The tensors a stage moves to a device (EntropyPCACodec.on) are its own: two stages that code the same
    components at different rates step and model them differently (a cache keyed on the components alone gave the
    second stage the first one's steps: the wrong rate, and a receiver decoding under other models)."""
    loaded, context, kv = setup
    layers = context.basis.num_layers
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * layers)
    pool = tuple(range(layers))
    first, second = (EntropyPCACodec.for_layer(basis, 0, bits, pool, rans=True) for bits in (5.0, 6.0))
    assert torch.equal(first.coded, second.coded)  # the case: every component travels at both rates
    device = torch.device("cpu")
    for codec in (first, second, first):
        steps, models = codec.on(device)
        assert torch.equal(steps, codec.steps[codec.coded]) and torch.equal(models, codec.tables[codec.coded] - MIN_TABLE)
        assert torch.equal(codec.models_of(None, 3, device)[0].long(), models)
    assert not torch.equal(first.on(device)[0], second.on(device)[0])


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
        codecs = [layer_codec(profile, i, ctx) for i in range(layers)]
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
    assert layer_codec(parse_profile(frames[0].header.profile), 0, ctx).codec.coded.numel() == 0
    assert all(len(f.chunk.payload) == 0 for f in frames if f.WhichOneof("kind") == "chunk" and f.chunk.layer == 0)
    assert torch.isfinite(back.keys[0]).all()


@pytest.mark.parametrize("damage", ["cut a byte", "cut a word", "all ones", "empty"])
def test_a_corrupt_range_code_is_data_loss(setup, tmp_path, damage):
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    frames = list(wire.encode(kv, parse_profile("pca:b2:w:e"), loaded.fingerprint, context=ctx))
    chunk = next(f.chunk for f in frames if f.WhichOneof("kind") == "chunk")
    chunk.payload = {"cut a byte": chunk.payload[:-1], "cut a word": chunk.payload[:-4],
                     "all ones": b"\xff" * len(chunk.payload), "empty": b""}[damage]
    chunk.crc32c = wire.checksum(chunk.payload)
    with pytest.raises(wire.WireError) as caught:  # the range code's own checks, or the trailer's count
        wire.decode(frames, loaded.fingerprint, context=ctx)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize("spec,message", [("pca:b1:e", "add w"), ("pca:b1:w:e:e", "repeated"), ("pca:b1:k1:w:e", "drop k"),
                                          ("pca:b2:w:j", "add e"), ("pca:b2:j", "add e"), ("pca:b2:w:e:j:j", "repeated")])
def test_bad_entropy_stages_are_refused(spec, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec)


def test_a_profile_says_whether_it_is_range_coded():
    assert parse_profile("pca:b1:w:e+text").entropy_coded
    assert parse_profile("pca:b1:w+pca:b2:w:e@1").entropy_coded
    assert not parse_profile("pca:b1:w+text").entropy_coded and not parse_profile("int4").entropy_coded


def test_token_classes_follow_the_question_attention():
    codec = EntropyPCACodec(None, None, torch.ones(1), torch.tensor([0]), strength=1.0)
    assert codec.classes(torch.ones(5)).tolist() == [0] * 5
    classes = codec.classes(torch.tensor([16.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    assert classes[0] > 0 > classes[1] and classes[1] == classes[2] and classes[5] == -8  # no attention: the coarsest
    assert EntropyPCACodec(None, None, torch.ones(1), torch.tensor([0]), strength=2.0).classes(
        torch.tensor([16.0, 1.0, 1.0, 1.0, 1.0, 0.0]))[0] > classes[0]
    floored = EntropyPCACodec(None, None, torch.ones(1), torch.tensor([0]), strength=1.0, floor=2).classes(
        torch.tensor([16.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    assert floored[0] == classes[0] and floored[5] == -2 and floored.tolist()[1:5] == [max(-2, int(c)) for c in classes[1:5]]


def test_a_floored_stage_codes_its_classes_end_to_end(tiny_llama, tmp_path):
    """f bounds how coarse a token may go: its classes stay within -F..8 and the wire decodes them exactly."""
    from sender.prefill import prefill_prompt, select_tokens
    from tests.common.quant.test_transforms import fitted_basis

    basis = fitted_basis(tiny_llama, tmp_path / "b.safetensors")
    basis = weighted(basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * basis.num_layers)
    ctx = CodecContext.for_model(tiny_llama.model, basis)
    floored, free = (parse_profile(f"pca:b2:w:e:i2{f}+text:q").bind(ctx) for f in (":f1", ""))
    pre = prefill_prompt(tiny_llama, "Paris is the capital of France. " * 6, "What is the capital?", True, [floored])
    kv = select_tokens(tiny_llama, pre, floored)
    kv = replace(kv, importance=[torch.logspace(-3, 1, pre.kv.seq_len)] * kv.num_layers)
    shares = kv.importance[0][kv.positions[0][0]]
    low, high = (layer_codec(p, 0, ctx).codec.classes(shares) for p in (floored, free))
    assert int(low.min()) == -1 and int(high.min()) < -1 and torch.equal(low, high.clamp(min=-1))
    sizes = []
    for profile in (floored, free):
        frames = list(wire.encode(kv, profile, tiny_llama.fingerprint, context=ctx))
        back = wire.decode(frames, tiny_llama.fingerprint, context=ctx)
        codec = layer_codec(profile, 0, ctx)
        keys, values = codec.decode(codec.encode(kv.keys[0], kv.values[0], kv.positions[0], codec.codec.classes(shares)),
                                    tuple(kv.keys[0].shape), kv.positions[0], kv.dtype)
        assert torch.equal(keys, back.keys[0]) and torch.equal(values, back.values[0])
        sizes.append(sum(len(f.SerializeToString()) for f in frames))
    assert sizes[0] > sizes[1]  # the floor spends bits on the tokens the question barely reads


def test_per_token_steps_end_to_end(tiny_llama, tmp_path):
    """The sender's prefill measures the question's attention; the tokens with the larger shares are
    coded finer, their classes travel in the payload, and the receiver decodes what the codec encoded."""
    from sender.prefill import prefill_prompt, select_tokens
    from tests.common.quant.test_transforms import fitted_basis

    basis = fitted_basis(tiny_llama, tmp_path / "b.safetensors")
    basis = weighted(basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * basis.num_layers)
    ctx = CodecContext.for_model(tiny_llama.model, basis)
    profile = parse_profile("pca:b2:w:e:i1+text:q").bind(ctx)
    pre = prefill_prompt(tiny_llama, "Paris is the capital of France. " * 6, "What is the capital?", True, [profile])
    kv = select_tokens(tiny_llama, pre, profile)
    assert kv.importance is not None and len(kv.importance) == kv.num_layers
    assert kv.importance[0].shape == (pre.kv.seq_len,) and float(kv.importance[0].sum()) > 0
    # a random tiny model attends almost evenly; give the tokens shares a real model's question would
    kv = replace(kv, importance=[torch.logspace(-2, 1, pre.kv.seq_len)] * kv.num_layers)
    frames = list(wire.encode(kv, profile, tiny_llama.fingerprint, context=ctx))
    back = wire.decode(frames, tiny_llama.fingerprint, context=ctx)
    codec = layer_codec(profile, 0, ctx)
    assert codec.per_token
    shape = tuple(kv.keys[0].shape)
    assert codec.payload_size(shape, kv.dtype) == shape[2] * (2 * codec.codec.coded.numel() + 1)
    classes = codec.codec.classes(kv.importance[0][kv.positions[0][0]])
    assert len(set(classes.tolist())) > 4
    raw = codec.encode(kv.keys[0], kv.values[0], kv.positions[0], classes)
    keys, values = codec.decode(raw, shape, kv.positions[0], kv.dtype)
    assert torch.equal(keys, back.keys[0]) and torch.equal(values, back.values[0])
    # finer classes, smaller errors: the top-class tokens against the bottom-class ones
    error = (kv.values[0] - back.values[0]).square().mean(dim=(0, 1, 3))
    top, bottom = classes == classes.max(), classes == classes.min()
    assert float(error[top].mean()) < float(error[bottom].mean())
    # a cache without the attention is refused with its reason, before anything is sent
    with pytest.raises(ValueError, match="question's attention"):
        list(wire.encode(replace(kv, importance=None), profile, tiny_llama.fingerprint, context=ctx))


@pytest.mark.parametrize("spec,message", [("pca:b1:w:i1", "needs e"), ("pca:b1:w:e:i0", "positive"),
                                          ("pca:b1:w:e:i5", "importance strength"), ("pca:b1:w:e:f2", "add i"),
                                          ("pca:b1:w:e:i1:f9", "lowest step class"),
                                          ("pca:b1:w:e:i1:f1.5", "not a number"),
                                          ("pca:b1:w:e:i1:f1:f2", "repeated")])
def test_bad_importance_is_refused(spec, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec)
    assert str(parse_profile("pca:b1:w:e:i0.5+text")) == "pca:b1:w:e:i0.5+text:h:q"
    assert str(parse_profile("pca:b1:w:e:i2:f0")) == "pca:b1:w:e:i2:f0"
    assert parse_profile("pca:b1:w:e:i0.5").needs_importance and not parse_profile("pca:b1:w:e").needs_importance


def test_sliding_window_layers_share_one_step(tiny_gemma3):
    """The attention statistics skip Gemma-3's sliding-window layers: their tokens get even shares."""
    from sender.prefill import prefill_prompt

    profile = parse_profile("pca:b1:w:e:i1+protect:s4+text:q")
    pre = prefill_prompt(tiny_gemma3, "Paris is the capital of France. " * 6, "What is the capital?", True, [profile])
    for layer, share in enumerate(pre.kv.importance):
        assert share.shape == (pre.kv.seq_len,)
        assert torch.equal(share, torch.ones_like(share)) == (layer in tiny_gemma3.sliding_layers)


@pytest.mark.parametrize("cls", [-6, -2, 0, 3, 8])
def test_a_token_class_moves_the_model_with_the_step(cls):
    """A class c token is stepped 2^(-c/2) finer, so its indices spread 2^(c/2) wider: coded under the
    table CLASS_TABLES * c up, they cost that table's entropy and none is clipped."""
    index = 8
    half_octave = 4  # tables are 8 per octave: written out, so that a wrong CLASS_TABLES fails here
    codec = EntropyPCACodec(None, None, torch.ones(1), torch.tensor([index]), strength=1.0)
    scale = 2.0 ** ((index + half_octave * cls) / 8)
    q = laplace_indices(scale, 100_000, seed=cls + 10)
    _, top = table(index + half_octave * cls)
    assert np.abs(q).max() <= top
    raw = q.astype("<i2").tobytes() + np.full(q.size, cls, dtype=np.int8).tobytes()
    blob = codec.compress(raw)
    assert codec.decompress(blob, len(raw)) == raw
    bits = 8 * len(blob) / q.size - math.log2(17)  # one component per token: its class costs log2(17) bits
    assert bits == pytest.approx(float(expected_bits(torch.tensor(scale, dtype=torch.float64))), rel=0.03, abs=0.03)


def test_the_split_gemm_is_near_float32_and_far_better_than_one_bf16_product():
    """pca:...:a's GEMMs on a GPU (pca_fused: an operand's bf16 parts side by side against the weights stacked in
    theirs, one bf16 GEMM of float32 output): here with the same arithmetic on the CPU, against float64."""
    from common.quant.pca_fused import parts, stacked

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 2048, generator=generator), torch.randn(2048, 96, generator=generator)
    exact = a.double() @ b.double()

    def error(result, reference=exact):
        return float((result.double() - reference).abs().max() / reference.abs().max())

    high, _, low = parts(a)
    assert torch.equal(high, a.bfloat16()) and float((high.double() + low.double() - a.double()).abs().max()) < 1e-4
    split = torch.cat(parts(a), dim=1).float() @ stacked(b, False).float()
    # split: about 4e-6 of the largest element here, float32's own GEMM 3e-7, one bf16 product 2e-3
    assert error(split) < 2e-5 and error(a.bfloat16().float() @ b.bfloat16().float()) > 1e-3
    # a bf16 operand (the cache's values on a GPU) is one part, twice: exact for that operand
    one_part = a.bfloat16()
    assert len(parts(one_part)) == 2
    split = torch.cat(parts(one_part), dim=1).float() @ stacked(b, True).float()
    assert error(split, one_part.double() @ b.double()) < 1e-4
