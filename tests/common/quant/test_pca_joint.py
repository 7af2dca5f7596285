"""The joint transform of keys and values (pca:bB:w:e:j): fitting, the basis file, the grammar, the wire."""

import grpc
import pytest
import torch

from channel.evaluation.basis import fit_joint
from channel.evaluation.squad import Sample
from common import wire
from common.profile import ProfileError, parse_profile
from common.quant.pca import Basis, coordinates
from common.quant.pca_entropy import EntropyPCACodec
from common.quant.transform import CodecContext
from tests.common.quant.test_transforms import prefill, round_trip, setup, weighted  # noqa: F401 (a fixture)
from common.plan import layer_codec, unsupported

SAMPLES = [Sample(f"j{i}", f"The river {name} runs {i * 7} miles past the old mill of {name}ville, "
                  f"where the miller kept {i + 3} goats and a blue cart.", f"How long is the {name}?", ("miles",))
           for i, name in enumerate(["Avon", "Tees", "Wear", "Ouse", "Exe", "Fal"])]


def with_joint(basis: Basis, samples: list[torch.Tensor], path) -> Basis:
    """`basis` (weighted) saved again with a joint transform fitted on per-layer coordinate samples."""
    tensors = basis.tensors()
    tensors.update(basis.fit_joint(samples))
    return Basis.save(tensors, basis.metadata, path)


def kv_coordinates(context, kv) -> list[torch.Tensor]:
    """Per layer, the coordinates (tokens, 2D) of a prefill's keys (RoPE removed) and values in the basis."""
    basis = context.basis
    return [coordinates(context.rope.remove(i, k, p), v, basis.keys[i], basis.values[i])
            for i, (k, v, p) in enumerate(zip(kv.keys, kv.values, kv.positions))]


@pytest.fixture
def joint_context(setup, tmp_path):
    """The setup's basis with layer weights and a joint transform fitted on other tokens than the cache's."""
    loaded, context, kv = setup
    layers = context.basis.num_layers
    heavy = weighted(context.basis, tmp_path / "w.safetensors", [[4.0, 1.0] if i % 2 else [1.0, 9.0] for i in range(layers)])
    ctx = CodecContext(context.rope, heavy)
    fits = [kv_coordinates(ctx, prefill(loaded.model, list(range(start, start + 80)))) for start in (500, 700, 900)]
    basis = with_joint(heavy, [torch.cat(layer) for layer in zip(*fits)], tmp_path / "j.safetensors")
    return loaded, CodecContext(context.rope, basis), kv


def test_the_joint_transform_decorrelates_the_scaled_coordinates():
    """Correlated keys and values: the joint coordinates are uncorrelated, with the fitted spreads, strongest first."""
    generator = torch.Generator().manual_seed(0)
    width = 4  # D per tensor
    hidden = torch.randn(5000, 3, generator=generator, dtype=torch.float64)
    mixing = torch.randn(3, 2 * width, generator=generator, dtype=torch.float64)
    samples = hidden @ mixing + 0.05 * torch.randn(5000, 2 * width, generator=generator, dtype=torch.float64)
    tensors = {f"{n}.0.{t}": v for n in ("keys", "values") for t, v in
               (("mean", torch.zeros(width)), ("directions", torch.eye(width).half()), ("std", torch.ones(width)))}
    tensors.update({"keys.0.weight": torch.tensor([4.0]), "values.0.weight": torch.tensor([0.25])})
    basis = Basis.from_bytes(Basis.serialize(tensors, {}))
    assert basis.scale(0).tolist() == [2.0] * width + [0.5] * width
    joint = Basis.from_bytes(Basis.serialize({**tensors, **basis.fit_joint([samples])}, {})).joint[0]
    mean, analysis, _, std = joint.on(torch.device("cpu"))
    y = (samples.float() * basis.scale(0) - mean) @ analysis
    covariance = torch.cov(y.T)
    assert std.tolist() == sorted(std.tolist(), reverse=True)
    assert torch.allclose(covariance.diagonal().sqrt(), std, rtol=2e-2)
    off = covariance - torch.diag(covariance.diagonal())
    assert off.abs().max() < 1e-2 * covariance.diagonal().max()
    # three hidden directions carry nearly everything: the separate bases would need all eight
    assert float(std[3:].square().sum()) < 1e-2 * float(std.square().sum())


def test_the_basis_file_round_trips_its_tensors(joint_context):
    _, context, _ = joint_context
    basis = context.basis
    again = Basis.from_bytes(Basis.serialize(basis.tensors(), basis.metadata))
    assert torch.equal(again.weights, basis.weights)
    for a, b in zip(again.keys + again.values + again.joint, basis.keys + basis.values + basis.joint):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.directions, b.directions) and torch.equal(a.std, b.std)


def test_joint_wire_round_trip(joint_context):
    """What the receiver decodes is the codec's own round trip; more bits, less error, more bytes."""
    loaded, context, kv = joint_context
    layers = context.basis.num_layers
    errors, sizes = [], []
    for bits in (0.5, 2.0, 5.0):
        frames, back = round_trip(loaded, context, kv, f"pca:b{bits:g}:w:e:j")
        profile = parse_profile(frames[0].header.profile)
        assert str(profile).startswith(f"pca:b{bits:g}:w:e:j:h{context.basis.digest}")
        codecs = [layer_codec(profile, i, context) for i in range(layers)]
        assert all(c.codec.joint is not None for c in codecs)
        shapes = [tuple(k.shape) for k in kv.keys]
        for i, codec in enumerate(codecs):
            keys, values = codec.decode(codec.encode(kv.keys[i], kv.values[i], kv.positions[i]), shapes[i],
                                        kv.positions[i], kv.dtype)
            assert torch.equal(keys, back.keys[i]) and torch.equal(values, back.values[i])
        sizes.append(sum(len(f.chunk.payload) for f in frames if f.WhichOneof("kind") == "chunk"))
        errors.append(sum(float((a - b).square().mean()) for a, b in zip(kv.keys + kv.values, back.keys + back.values)))
    assert errors == sorted(errors, reverse=True) and sizes == sorted(sizes)
    assert errors[-1] < errors[0] / 5


def test_the_joint_plan_spends_the_bits_on_the_joint_components(joint_context):
    """The joint stage's steps come from the joint spreads (weights folded in): one step for all of them."""
    _, context, _ = joint_context
    basis = context.basis
    pool = tuple(range(basis.num_layers))
    separate = EntropyPCACodec.for_layer(basis, 0, 2.0, pool)
    joint = EntropyPCACodec.for_layer(basis, 0, 2.0, pool, joint=True)
    assert joint.joint is basis.joint[0] and separate.joint is None
    assert torch.unique(joint.steps).numel() == 1  # every joint component weighs 1
    assert torch.unique(separate.steps).numel() == 2  # keys and values weigh differently


def test_a_basis_without_the_joint_transform_is_refused(setup, tmp_path):
    """At the sender, with a reason that says how to fit one; at the receiver, before anything is decoded."""
    loaded, context, kv = setup
    plain = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, plain)
    profile = parse_profile("pca:b2:w:e:j").bind(ctx)
    assert "kvwire calibrate --basis --joint" in unsupported(profile, ctx)
    with pytest.raises(ProfileError, match="joint transform"):
        list(wire.encode(kv, profile, loaded.fingerprint, context=ctx))
    joint = with_joint(plain, kv_coordinates(ctx, kv), tmp_path / "j.safetensors")
    frames = list(wire.encode(kv, parse_profile("pca:b2:w:e:j"), loaded.fingerprint, context=CodecContext(context.rope, joint)))
    with pytest.raises(wire.WireError) as caught:  # this receiver's basis is the one without
        wire.decode(frames, loaded.fingerprint, context=ctx)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_the_joint_flag_has_one_canonical_place():
    assert str(parse_profile("pca:b3:w:e:i1:f3:j")) == "pca:b3:w:e:j:i1:f3"
    assert parse_profile("pca:b3:w:e:j:i1+text").pca.joint


@pytest.mark.parametrize("damage", ["a layer short", "no weights", "wrong width"])
def test_a_malformed_joint_transform_is_refused(joint_context, damage):
    _, context, _ = joint_context
    tensors = context.basis.tensors()
    last = context.basis.num_layers - 1
    if damage == "a layer short":
        del tensors[f"joint.{last}.std"]
    elif damage == "no weights":
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".weight")}
    else:
        tensors[f"joint.{last}.directions"] = tensors[f"joint.{last}.directions"][:-1, :-1].contiguous()
    with pytest.raises(ValueError, match="joint transform"):
        Basis.from_bytes(Basis.serialize(tensors, {}))


def test_fit_joint_adds_the_transform_and_keeps_the_basis(tiny_llama, tmp_path):
    """`kvwire calibrate --basis --joint`: the basis's own tensors are kept, bit for bit, and the joint
    transform is the PCA of the prompts' scaled coordinates (but the sink tokens')."""
    from sender.prefill import prefill_prompt
    from tests.common.quant.test_transforms import fitted_basis

    base = fitted_basis(tiny_llama, tmp_path / "b.safetensors")
    base = weighted(base, tmp_path / "w.safetensors", [[2.0, 0.5]] * base.num_layers)
    fitted = fit_joint(tiny_llama, base, SAMPLES, tmp_path / "j.safetensors")
    assert fitted.digest != base.digest and fitted.metadata["joint_samples"] == len(SAMPLES)
    assert torch.equal(fitted.weights, base.weights)
    for a, b in zip(fitted.keys + fitted.values, base.keys + base.values):
        assert torch.equal(a.directions, b.directions) and torch.equal(a.mean, b.mean)
    rope = tiny_llama.codec_context.rope
    rows = []
    for sample in SAMPLES:
        kv = prefill_prompt(tiny_llama, sample.context, sample.question).kv
        kept = kv.positions[0][0] >= 4
        k, v = rope.remove(0, kv.keys[0], kv.positions[0])[:, :, kept], kv.values[0][:, :, kept]
        rows.append(coordinates(k, v, base.keys[0], base.values[0]))
    expected = base.fit_joint([torch.cat(rows)] + [torch.cat(rows)] * (base.num_layers - 1))
    assert torch.allclose(fitted.joint[0].std, expected["joint.0.std"], rtol=1e-4, atol=1e-6)
    assert fitted.metadata["joint_tokens"] == sum(len(r) for r in rows)
