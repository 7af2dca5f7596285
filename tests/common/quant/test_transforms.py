"""The codec stages that need the model: pre-RoPE keys, Hadamard rotation, PCA transform coding, protected tokens."""

import grpc
import pytest
import torch

from common import wire
from common.kvstate import prefill
from common.profile import ProfileError, parse_profile
from common.quant import rotation
from common.quant.pca import MAX_BITS, Basis, PCACodec, allocate
from common.quant.rope import Rope
from common.quant.transform import CodecContext
from common.plan import layer_codec, tier_sizes, unsupported
from common.plan import CodecPlan

IDS = list(range(300, 372))


def fitted_basis(loaded, path) -> Basis:
    """A basis fitted on a few prefills of the model, other tokens than IDS."""
    rope = Rope(loaded.model)
    keys, values = [], []
    for start in (500, 700, 900):
        kv = prefill(loaded.model, list(range(start, start + 80)))
        keys.append([rope.remove(i, k, p)[0].transpose(0, 1).flatten(1) for i, (k, p) in enumerate(zip(kv.keys, kv.positions))])
        values.append([v[0].transpose(0, 1).flatten(1) for v in kv.values])
    tensors = Basis.fit([torch.cat(x) for x in zip(*keys)], [torch.cat(x) for x in zip(*values)])
    Basis.save(tensors, {"weights_sha256": loaded.fingerprint.weights_sha256}, path)
    return Basis.load(path)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gemma3"])
def setup(request, tmp_path_factory):
    loaded = request.getfixturevalue(request.param)
    basis = fitted_basis(loaded, tmp_path_factory.mktemp("basis") / "basis.safetensors")
    return loaded, CodecContext.for_model(loaded.model, basis), prefill(loaded.model, IDS)


def round_trip(loaded, context, kv, spec):
    profile = parse_profile(spec)
    frames = list(wire.encode(kv, profile, loaded.fingerprint, context=context))
    return frames, wire.decode(frames, loaded.fingerprint, context=context)


def test_removed_rope_is_the_key_projection(setup):
    """Pre-RoPE keys are what the attention's key projection (and Gemma's key norm) produced."""
    loaded, context, _ = setup
    captured = {}
    hooks = []
    for i, layer in enumerate(loaded.model.model.layers):
        module = getattr(layer.self_attn, "k_norm", None) or layer.self_attn.k_proj
        hooks.append(module.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, out)))
    try:
        kv = prefill(loaded.model, IDS)
    finally:
        for hook in hooks:
            hook.remove()
    heads, dim = loaded.fingerprint.kv_heads, loaded.fingerprint.head_dim
    for i, (keys, positions) in enumerate(zip(kv.keys, kv.positions)):
        projected = captured[i].reshape(1, -1, heads, dim).transpose(1, 2)[:, :, -keys.shape[2]:]
        torch.testing.assert_close(context.rope.remove(i, keys, positions), projected.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(context.rope.apply(i, projected, positions, keys.dtype), keys, atol=1e-5, rtol=1e-4)


def test_rope_of_a_model_with_one_rotation_and_layer_types():
    """Qwen2 names every layer's type ("full_attention") but has one rotation: pre-RoPE keys are still the
    key projection's output (the rotary module takes no layer type there)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    assert config.layer_types == ["full_attention"] * 2
    model = Qwen2ForCausalLM(config).eval()
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]
    try:
        kv = prefill(model, [1, 5, 9, 2, 7, 3])
    finally:
        for hook in hooks:
            hook.remove()
    rope = Rope(model)
    for i, (keys, positions) in enumerate(zip(kv.keys, kv.positions)):
        projected = captured[i].reshape(1, -1, 2, 16).transpose(1, 2)
        torch.testing.assert_close(rope.remove(i, keys, positions), projected.float(), atol=1e-5, rtol=1e-4)


def test_rotation_is_orthonormal_and_seeded():
    x = torch.randn(3, 5, 64)
    y = rotation.rotate(x, 7)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotation.unrotate(y, 7), x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotation.rotate(x, 8), y)
    outlier = torch.zeros(64)
    outlier[3] = 10.0
    assert rotation.rotate(outlier, 0).abs().max() == pytest.approx(10.0 / 8)  # spread evenly over 64 channels
    with pytest.raises(ValueError, match="power-of-two"):
        rotation.rotate(torch.randn(2, 48), 0)


def test_allocation_spends_the_budget_on_the_strongest_components():
    std = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1])
    for budget in (0.5, 1, 2, 3.5, 8):
        bits = allocate(std, budget)
        assert int(bits.sum()) == int(budget * 6) and int(bits.max()) <= MAX_BITS
        assert (bits[:-1] >= bits[1:]).all()  # never more bits to a weaker component
    assert allocate(std, 1).tolist() == [3, 2, 1, 0, 0, 0]  # each bit where it removes most error


@pytest.mark.parametrize("spec", ["int4+prerope", "int4+rot", "int3:k=token+prerope+rot:seed9", "pca:b1", "pca:b2:k3",
                                  "pca:b0.5", "pca:b3+protect:s4:r8", "int2+protect:s2:r16", "pca:b1+int8@0",
                                  "pca:b0.5+pca:b4:k3@1"])
def test_round_trip_is_byte_exact_in_size(setup, spec):
    loaded, context, kv = setup
    frames, back = round_trip(loaded, context, kv, spec)
    profile = parse_profile(frames[0].header.profile)
    plan = CodecPlan.build(profile, context, kv.num_layers, bind=False)
    tiers = [plan.tiers(i, kv.kept_tokens(i)) for i in range(kv.num_layers)]
    declared = sum(c.payload_size((1, loaded.fingerprint.kv_heads, b - a, loaded.fingerprint.head_dim), kv.dtype)
                   for layer in tiers for a, b, c in layer)
    assert sum(f.chunk.raw_size for f in frames if f.WhichOneof("kind") == "chunk") == declared
    for a, b in zip(kv.keys + kv.values, back.keys + back.values):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.isfinite(b).all()
        if spec.startswith(("int4", "int3", "pca:b3")):  # a bit or less per element: random tiny models keep little
            assert float((a - b).square().mean()) < 0.5 * float(a.square().mean())


def test_more_bits_less_error(setup):
    loaded, context, kv = setup
    errors = []
    for bits in (0.5, 1, 2, 4, 8):
        _, back = round_trip(loaded, context, kv, f"pca:b{bits}")
        errors.append(sum(float((a - b).square().mean()) for a, b in zip(kv.keys + kv.values, back.keys + back.values)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0]


def test_per_layer_pca_bits(setup):
    """pca:bB@A-B gives layers A..B their own budget; the others keep the profile's."""
    loaded, context, kv = setup
    profile = parse_profile("pca:b0.5+pca:b3:k2@1").bind(context)
    assert str(parse_profile(str(profile))) == str(profile)
    shape = (1, loaded.fingerprint.kv_heads, 16, loaded.fingerprint.head_dim)
    sizes = [layer_codec(profile, i, context).payload_size(shape, kv.dtype) for i in range(3)]
    low = PCACodec.for_layer(context.basis, 0, 0.5).payload_size(shape, kv.dtype)
    high = PCACodec.for_layer(context.basis, 1, 3, 2).payload_size(shape, kv.dtype)
    assert sizes == [low, high, PCACodec.for_layer(context.basis, 2, 0.5).payload_size(shape, kv.dtype)] and high > 4 * low
    _, back = round_trip(loaded, context, kv, "pca:b0.5+pca:b3@1")
    _, plain = round_trip(loaded, context, kv, "pca:b0.5")
    error = [float((a[1] - b[1]).square().mean()) for a, b in ((kv.keys, back.keys), (kv.keys, plain.keys))]
    assert error[0] < 0.5 * error[1]  # layer 1 at 3 bits, not 0.5
    assert torch.equal(back.keys[0], plain.keys[0])  # layer 0 as before


def test_raw_layers_stay_bit_for_bit(setup):
    """Pre-RoPE and rotation never touch a layer sent raw: it arrives bit for bit as post-RoPE keys."""
    loaded, context, kv = setup
    _, back = round_trip(loaded, context, kv, "int4+prerope+rot+raw@0")
    assert torch.equal(back.keys[0], kv.keys[0]) and torch.equal(back.values[0], kv.values[0])
    assert not torch.equal(back.keys[1], kv.keys[1])


def test_protected_tokens_travel_at_fp16(setup):
    loaded, context, kv = setup
    _, back = round_trip(loaded, context, kv, "pca:b1+protect:s4:r8")
    for a, b in zip(kv.keys + kv.values, back.keys + back.values):
        for part in (slice(0, 4), slice(-8, None)):
            assert torch.equal(b[:, :, part], a[:, :, part].half().to(a.dtype))


def test_a_receiver_without_the_basis_refuses_at_the_header(setup):
    loaded, context, kv = setup
    frames, _ = round_trip(loaded, context, kv, "pca:b2")
    for receiver in (CodecContext(context.rope), None):
        with pytest.raises(wire.WireError, match="basis|RoPE") as info:
            wire.decode(frames[:1], loaded.fingerprint, context=receiver)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    unbound = frames[0].__class__()
    unbound.CopyFrom(frames[0])
    unbound.header.profile = "pca:b2:h0123456789abcdef"
    with pytest.raises(wire.WireError, match="0123456789abcdef") as info:
        wire.decode([unbound], loaded.fingerprint, context=context)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_chunk_across_two_tiers_is_refused(setup):
    loaded, context, kv = setup
    frames, _ = round_trip(loaded, context, kv, "int4+protect:s4:r8")
    first = frames[1].chunk
    assert (first.token_start, first.token_end) == (0, 4)
    frames[1].chunk.token_end = 5
    with pytest.raises(wire.WireError, match="coded two ways") as info:
        wire.decode(frames, loaded.fingerprint, context=context)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_sender_without_the_model_cannot_code_pre_rope(tiny_llama):
    kv = prefill(tiny_llama.model, IDS)
    with pytest.raises(ProfileError, match="RoPE"):
        list(wire.encode(kv, parse_profile("int4+prerope"), tiny_llama.fingerprint))
    with pytest.raises(ProfileError, match="basis"):
        list(wire.encode(kv, parse_profile("pca:b2"), tiny_llama.fingerprint, context=CodecContext.for_model(tiny_llama.model)))


@pytest.mark.parametrize("spec,message", [
    ("pca:b2+int4", "no other precision"), ("rot:seed4294967296+int4", "seed"), ("pca:b9", "bits per element"),
    ("pca:b2:h12", "hex digits"), ("rot+rot+int4", "two rot"), ("prerope", "change nothing"), ("protect:s0:r0", "at least one"),
    ("pca:b2@1", "need a pca stage"), ("pca:b1:x3", "unknown"), ("pca:b1+pca:b2@0-1+int4@1", "overlaps"),
    ("pca:b1+pca:b2:h0123456789abcdef@1", "basis hash goes"), ("pca:b1+pca:b2@2-1", "empty"),
])
def test_bad_stages_are_refused(spec, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec)


def test_pca_codec_never_reads_past_its_payload(setup):
    loaded, context, kv = setup
    codec = PCACodec.for_layer(context.basis, 0, 1.0, 0.5)
    assert int(codec.bits.sum()) == 2 * loaded.fingerprint.kv_heads * loaded.fingerprint.head_dim
    shape = tuple(kv.keys[0].shape)
    payload = codec.encode(context.rope.remove(0, kv.keys[0], kv.positions[0]), kv.values[0])
    assert payload.numel() == codec.payload_size(shape, kv.dtype)
    with pytest.raises(ValueError, match="expected"):
        codec.decode(payload[:-1], shape, kv.dtype)


def test_importance_tiers_code_the_top_tokens_finer(tiny_llama):
    """q2c:1+int2+tier:0.25:int8: the question and the best-scored context tokens travel at int8, the rest
    at int2; the receiver puts every layer back in position order."""
    from sender.prefill import prefill_prompt, select_tokens

    profiles = [parse_profile(s) for s in ("q2c:1+int2", "q2c:1+int2+tier:0.25:int8", "q2c:1+int8")]
    pre = prefill_prompt(tiny_llama, "Paris is the capital of France. " * 6, "What is the capital?", True, profiles)
    errors = []
    for profile in profiles:
        kv = select_tokens(tiny_llama, pre, profile)
        frames = list(wire.encode(kv, profile, tiny_llama.fingerprint))
        back = wire.decode(frames, tiny_llama.fingerprint)
        for p, q in zip(back.positions, pre.kv.positions):
            assert torch.equal(p, q)  # every token, in position order again
        errors.append(sum(float((a - b).square().mean()) for a, b in zip(back.values, pre.kv.values)))
        if profile.importance:
            sizes = tier_sizes(profile, pre.kv.seq_len)
            top = kv.positions[0][0, :sizes[0]]
            # the question, then the sink tokens, are in the top tier
            assert set(range(pre.context_len, pre.kv.seq_len)) | set(range(4)) <= set(top.tolist())
            chunks = [f.chunk for f in frames if f.WhichOneof("kind") == "chunk" and f.chunk.layer == 0]
            assert (chunks[0].token_start, chunks[0].token_end) == (0, sizes[0])
    assert errors[2] < errors[1] < errors[0]


TIERED = "q2c:1+int2+tier:0.25:int8"


def tiered_frames(loaded) -> list:
    """The frames of a short prompt's cache under TIERED: each layer's tokens in two tiers."""
    from sender.prefill import prefill_prompt, select_tokens

    profile = parse_profile(TIERED)
    pre = prefill_prompt(loaded, "Paris is the capital of France. " * 6, "What is the capital?", True, [profile])
    return list(wire.encode(select_tokens(loaded, pre, profile), profile, loaded.fingerprint))


def test_tiers_out_of_order_are_refused(tiny_llama):
    frames = tiered_frames(tiny_llama)
    for layer in frames[0].header.layers:
        positions = wire.decode_positions(layer.positions, tiny_llama.fingerprint.kv_heads, layer.kept_tokens)
        layer.positions = wire.encode_positions(positions.flip(1))
    with pytest.raises(wire.WireError, match="within each tier") as info:
        wire.decode(frames, tiny_llama.fingerprint)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_position_in_two_tiers_is_refused(tiny_llama):
    """Each tier's positions increase, but one stands in two tiers: the receiver refuses the header."""
    from common.plan import runs

    frames = tiered_frames(tiny_llama)
    for layer in frames[0].header.layers:
        positions = wire.decode_positions(layer.positions, tiny_llama.fingerprint.kv_heads, layer.kept_tokens)
        (_, second), _ = runs(parse_profile(TIERED), layer.kept_tokens)
        assert bool((positions[:, 0] < positions[:, second + 1]).all())  # the tier still increases
        positions[:, second] = positions[:, 0]
        layer.positions = wire.encode_positions(positions)
    with pytest.raises(wire.WireError, match="increase strictly") as info:
        wire.decode(frames, tiny_llama.fingerprint)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_rotation_on_a_head_dim_that_is_not_a_power_of_two_is_refused_at_the_header(tiny_llama):
    kv = prefill(tiny_llama.model, IDS)
    frames = list(wire.encode(kv, parse_profile("int4+rot"), tiny_llama.fingerprint))
    fingerprint = tiny_llama.fingerprint.__class__()
    fingerprint.CopyFrom(tiny_llama.fingerprint)
    fingerprint.head_dim = 48
    frames[0].header.fingerprint.head_dim = 48
    with pytest.raises(wire.WireError, match="power-of-two") as info:
        wire.decode(frames[:1], fingerprint)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_basis_fitted_under_a_metric_codes_for_that_metric(tmp_path):
    """The metric's basis trades plain squared error for the weighted error it was fitted for."""
    generator = torch.Generator().manual_seed(3)
    heads, dim, tokens = 2, 4, 4000
    mixing = torch.linalg.qr(torch.randn(8, 8, generator=generator))[0]
    x = (torch.randn(tokens, 8, generator=generator) * torch.linspace(3, 0.3, 8)) @ mixing.T
    metric = torch.diag(torch.tensor([0.05, 0.05, 0.05, 0.05, 4.0, 4.0, 4.0, 3.8]))
    kv = x.view(1, tokens, heads, dim).transpose(1, 2)
    errors = {}
    for name, metrics in (("plain", None), ("metric", [metric])):
        basis = Basis.save(Basis.fit([x], [x], metrics, metrics), {}, tmp_path / f"{name}.safetensors")
        codec = PCACodec.for_layer(basis, 0, 1.0)
        keys, _ = codec.decode(codec.encode(kv, kv), kv.shape, torch.float32)
        error = keys[0].transpose(0, 1).reshape(tokens, 8) - x
        errors[name] = (error.square().sum(1).mean(), ((error @ metric) * error).sum(1).mean())
        full = PCACodec.for_layer(basis, 0, MAX_BITS)  # every component at 8 bits: close either way (but the
        keys, _ = full.decode(full.encode(kv, kv), kv.shape, torch.float32)  # few past the codes' range, ~4 sd)
        assert (keys - kv).abs().mean() < 0.02 * kv.abs().mean()
    assert errors["metric"][1] < 0.7 * errors["plain"][1]  # the weighted error it was fitted for
    assert errors["metric"][0] > errors["plain"][0]  # paid for in plain squared error
    with pytest.raises(ValueError, match="not positive definite"):
        Basis.fit([x], [x], [torch.zeros(8, 8)], None)


def test_attention_metrics_weigh_rope_pairs_and_the_output_projection(tiny_llama, tmp_path):
    from channel.evaluation.basis import attention_metrics, fit_basis
    from channel.evaluation.squad import Sample

    samples = [Sample(str(i), f"Paragraph {i} tells of harbours, mills and wire.", "What is told?", ("wire",))
               for i in range(3)]
    basis = fit_basis(tiny_llama, samples, tmp_path / "basis.safetensors", metric=True)
    assert basis.metadata["metric"] == "attention"
    fp = tiny_llama.fingerprint
    energy = [torch.rand(fp.kv_heads * 2, fp.head_dim, dtype=torch.float64) for _ in range(fp.num_layers)]
    keys, values = attention_metrics(tiny_llama, energy)
    half, width = fp.head_dim // 2, fp.kv_heads * fp.head_dim
    for k, v in zip(keys, values):
        weights = k.diagonal().view(fp.kv_heads, fp.head_dim)
        assert torch.equal(k, torch.diag(k.diagonal())) and torch.allclose(weights[:, :half], weights[:, half:])
        assert k.shape == v.shape == (width, width) and torch.allclose(v, v.T)
        assert v[:fp.head_dim, fp.head_dim:].abs().max() == 0  # one block per KV head
        assert torch.linalg.eigvalsh(v).min() > 0 and abs(float(v.diagonal().mean()) - 1) < 1e-3


def test_weights_move_bits_to_the_heavier_component():
    std = torch.ones(2)
    assert allocate(std, 1).tolist() == [1, 1]
    assert allocate(std, 1, torch.tensor([4.0, 1.0])).tolist() == [2, 0]


def weighted(basis: Basis, path, weights) -> Basis:
    """`basis` saved again with layer weights (layers x (keys, values))."""
    tensors = {}
    for name, parts in (("keys", basis.keys), ("values", basis.values)):
        for layer, part in enumerate(parts):
            tensors.update({f"{name}.{layer}.mean": part.mean, f"{name}.{layer}.directions": part.directions.half(),
                            f"{name}.{layer}.std": part.std, f"{name}.{layer}.weight": torch.tensor([0.0])})
    for layer, (k, v) in enumerate(weights):
        tensors[f"keys.{layer}.weight"], tensors[f"values.{layer}.weight"] = torch.tensor([k]), torch.tensor([v])
    return Basis.save(tensors, basis.metadata, path)


def test_weighted_pca_pools_its_layers(setup, tmp_path):
    """pca:bB:w spends B bits per element over all the layers it codes, most where the weights are."""
    loaded, context, kv = setup
    layers = context.basis.num_layers
    heavy = weighted(context.basis, tmp_path / "w.safetensors", [[1000.0, 1000.0] if i == 1 else [1.0, 1.0] for i in range(layers)])
    assert heavy.weights.shape == (layers, 2) and heavy.digest != context.basis.digest
    weighted_context = CodecContext(context.rope, heavy)
    profile = parse_profile("pca:b1:w").bind(weighted_context)
    assert str(parse_profile(str(profile))) == str(profile)
    bits = [layer_codec(profile, i, weighted_context).codec.bits for i in range(layers)]
    assert sum(int(b.sum()) for b in bits) == sum(b.numel() for b in bits)  # 1 bit per element over the pool
    assert int(bits[1].sum()) > 2 * int(bits[0].sum()) and int(bits[1].sum()) > 2 * int(bits[2].sum())
    frames, back = round_trip(loaded, weighted_context, kv, "pca:b1:w")
    _, plain = round_trip(loaded, context, kv, "pca:b1")
    errors = [[float((a[i] - b[i]).square().mean()) for i in range(3)] for a, b in ((kv.keys, back.keys), (kv.keys, plain.keys))]
    assert errors[0][1] < 0.5 * errors[1][1] and errors[0][0] > errors[1][0]  # layer 1 bought with layer 0's bits
    assert sum(map(wire.wire_bytes, frames)) > 0
    # A per-layer stage is a pool of its own: layer 1 at 3 bits, the others share 1 bit per element.
    split = parse_profile("pca:b1:w+pca:b3:w@1").bind(weighted_context)
    bits = [layer_codec(split, i, weighted_context).codec.bits for i in range(layers)]
    assert int(bits[1].sum()) == 3 * bits[1].numel()
    assert sum(int(b.sum()) for i, b in enumerate(bits) if i != 1) == bits[0].numel() * (layers - 1)
    # A basis without weights refuses a weighted stage, with its reason.
    refused = parse_profile("pca:b1:w").bind(context)
    assert "holds none" in unsupported(refused, context)
    with pytest.raises(ProfileError, match="holds none"):
        layer_codec(refused, 0, context)
    for spec, message in (("pca:b1:w:w", "repeated"), ("pca:b1:k1:w", "drop k")):
        with pytest.raises(ProfileError, match=message):
            parse_profile(spec)


def test_layer_weights_are_measured_and_shipped_in_the_basis(tiny_llama, tmp_path):
    from channel.evaluation.basis import fit_basis
    from channel.evaluation.squad import Sample

    samples = [Sample(str(i), f"Paragraph {i} tells of harbours, mills and wire, and of the sea.", "What is told?",
                      ("wire",)) for i in range(3)]
    plain = fit_basis(tiny_llama, samples, tmp_path / "plain.safetensors")
    basis = fit_basis(tiny_llama, samples, tmp_path / "basis.safetensors", weight_samples=2)
    assert plain.weights is None and basis.metadata["weight_samples"] == 2
    assert basis.weights.shape == (tiny_llama.fingerprint.num_layers, 2)
    assert torch.isfinite(basis.weights).all() and (basis.weights > 0).all()
    assert len(set(basis.weights.flatten().tolist())) == basis.weights.numel()  # each measured on its own
    assert Basis.load(tmp_path / "basis.safetensors").weights.tolist() == basis.weights.tolist()
    for layer in range(basis.num_layers):  # the same basis, weights added
        assert torch.equal(basis.keys[layer].directions, plain.keys[layer].directions)


def test_a_channel_no_query_reads_keeps_the_key_metric_positive(tiny_llama):
    """Gemma-3's query norm can zero a channel: its key weight gets a floor, not zero (the fit needs M > 0)."""
    from channel.evaluation.basis import attention_metrics

    fp = tiny_llama.fingerprint
    energy = [torch.rand(fp.kv_heads * 2, fp.head_dim, dtype=torch.float64) for _ in range(fp.num_layers)]
    for e in energy:
        e[:, 0] = e[:, fp.head_dim // 2] = 0  # a RoPE pair no query head reads
    keys, _ = attention_metrics(tiny_llama, energy)
    assert all(float(k.diagonal().min()) > 0 for k in keys)
    assert all(float(k.diagonal()[0]) < 1e-5 for k in keys)


def test_rope_tables_of_positions_shared_by_every_head_are_one_heads_expanded(setup):
    """A receiver's cache without selection has one row of positions, expanded to every head: its RoPE tables are
    computed once and expanded, the same numbers as every head's own."""
    loaded, context, kv = setup
    codec = layer_codec(parse_profile("pca:b2").bind(context), 1, context)
    heads, tokens = kv.positions[1].shape
    shared = torch.arange(5, 5 + tokens).expand(heads, tokens)
    expanded = codec.rope_tables(shared, torch.device("cpu"))
    own = codec.rope_tables(shared.clone(), torch.device("cpu"))
    assert (heads == 1 or expanded[0].stride(1) == 0) and all(torch.equal(a, b) for a, b in zip(expanded, own))
