"""pca:...:a's split path (common.quant.pca_fused): the Triton kernels against the torch reference, bit for bit, in
Triton's interpreter, pass by pass and through the wire; the path against the float32 one, on the CPU with its GEMMs
emulated, is tests/common/quant/test_rans.py's."""

import torch

from tests.common.quant.interpreter import run_interpreted


def compare(device: str, heads: int = 2, dim: int = 16) -> dict:
    """Each pass of pca_fused through torch and through the kernels on the same input on `device`: whether they
    agree bit for bit, per case (the kernels on a CPU need Triton's interpreter); "flag": whether each path flagged
    a non-finite coordinate."""
    from common.quant import kernels, pca_fused
    from common.quant.pca_entropy import CLASS_SCALE, CLASS_TABLES, LIMITS, MAX_TABLE, MIN_TABLE, ROUNDING

    g = torch.Generator(device).manual_seed(0)
    scale, limits = CLASS_SCALE.to(device), LIMITS.to(device)
    results = {}

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def both(run):
        with kernels.forced("torch"):
            reference = run()
        with kernels.forced("triton"):
            kernel = run()
        return reference, kernel

    def same(reference, kernel):
        pairs = zip(reference, kernel) if isinstance(reference, tuple) else [(reference, kernel)]
        return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in pairs)

    def rope(tokens, scaling=1.0):
        inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device).float() / dim)
        angles = torch.arange(3, 3 + tokens, device=device).float()[:, None] * inv[None]
        angles = torch.cat([angles, angles], dim=-1)
        return tuple((t * scaling)[None, None].expand(1, heads, tokens, dim) for t in (angles.cos(), angles.sin()))

    for name, dtype, tokens, tables in [("bf16 rope", torch.bfloat16, 70, rope(70)),
                                        ("fp16 scaled rope", torch.float16, 64, rope(64, 1.1)),
                                        ("fp32 no rope", torch.float32, 5, None)]:
        cache = (randn(1, heads, tokens + 9, dim) * 3).to(dtype)
        keys, values = cache[:, :, 4:4 + tokens], randn(1, heads, tokens, dim).to(dtype)
        results["operand " + name] = same(*both(lambda: pca_fused.operand(keys, values, tables)))
        x, mean = randn(tokens, 2 * heads * dim) * 2, randn(2 * heads * dim)
        for out in (torch.bfloat16, torch.float16, torch.float32):
            results[f"reconstruct {name} {out}"] = same(*both(
                lambda: pca_fused.reconstruct(x, mean, tables, heads, dim, out)))

    tokens, coded, top = 70, 150, MAX_TABLE - MIN_TABLE
    coords = randn(tokens, coded) * torch.rand(coded, generator=g, device=device) * 40
    bias, steps = randn(coded), torch.rand(coded, generator=g, device=device) + 0.05
    models = torch.randint(0, top + 1, (coded,), generator=g, device=device)
    classes = torch.randint(-8, 9, (tokens,), generator=g, device=device).to(torch.int8)

    def quantize(c, classes):
        out = torch.empty(tokens, coded, dtype=torch.int16, device=device)
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        pca_fused.quantize(c, bias, steps, classes, models, scale, limits, ROUNDING, CLASS_TABLES, top, out, flag)
        return out, flag

    for name, given in [("classes", classes), ("no classes", None)]:
        (reference, flag_r), (kernel, flag_k) = both(lambda: quantize(coords, given))
        results["quantize " + name] = same(reference, kernel) and not flag_r.item() and not flag_k.item()
        results["quantize " + name + " moves"] = bool((reference != 0).float().mean() > 0.3)
        results["dequantize " + name] = same(*both(lambda: pca_fused.dequantize(reference, given, steps, scale,
                                                                               0.5 - ROUNDING)))
    bad = coords.clone()
    bad[3, 7] = float("nan")
    bad[60, 149] = float("inf")
    (out_r, flag_r), (out_k, flag_k) = both(lambda: quantize(bad, classes))
    results["flag"] = [bool(flag_r.item()), bool(flag_k.item())]
    results["quantize not finite"] = same(out_r, out_k) and out_r[3, 7].item() == 0
    return results


INTERPRETED = """
import json, sys
from tests.common.quant.test_pca_fused import compare
json.dump([compare("cpu"), compare("cpu", 3, 24)], open(sys.argv[1], "w"))
"""


def test_the_kernels_compute_the_reference_bit_for_bit(tmp_path):
    """Each pass of pca_fused in Triton's interpreter and in torch, on the same input: the same values, bit for bit
    (tokens not a multiple of a program's block, a head_dim not a power of two, strided keys, bf16, fp16 and float32 caches, RoPE with and without
    an attention scaling, with and without per-token classes), and a non-finite coordinate flagged by both."""
    for results in run_interpreted(INTERPRETED, tmp_path):  # 2 heads of 16 dims; 3 of 24, not a power of two
        assert results.pop("flag") == [True, True]
        assert len(results) == 19 and all(results.values()), results


THROUGH_THE_WIRE = """
import json, sys, tempfile
from pathlib import Path
import torch
from common import wire
from common.models import load_model
from common.profile import parse_profile
from common.quant import kernels, pca_entropy
from common.quant.transform import CodecContext
from tests.common.quant.test_transforms import IDS, fitted_basis, prefill, weighted

loaded = load_model("tiny-llama")
folder = Path(tempfile.mkdtemp())
basis = fitted_basis(loaded, folder / "basis.safetensors")
basis = weighted(basis, folder / "w.safetensors", [[1.0, 0.5]] * basis.num_layers)
context = CodecContext.for_model(loaded.model, basis)
kv = prefill(loaded.model, IDS)
kv.importance = [torch.rand(kv.seq_len, generator=torch.Generator().manual_seed(i)) for i in range(kv.num_layers)]
pca_entropy.split_here = lambda device: True
pca_entropy.tensor_core_mm = lambda x, y: x.float() @ y.float()
results = {}
for spec in ("pca:b2:w:e:a", "pca:b1.5:w:e:a:i1:f3"):
    profile = parse_profile(spec)
    runs = {}
    for path in ("torch", "triton"):
        with kernels.forced(path):
            frames = list(wire.encode(kv, profile, loaded.fingerprint, context=context))
            runs[path] = ([f.chunk.payload for f in frames if f.HasField("chunk")], wire.decode(frames, loaded.fingerprint, context=context))
    (bytes_t, back_t), (bytes_k, back_k) = runs["torch"], runs["triton"]
    results[spec] = [len(bytes_t) > 0 and bytes_t == bytes_k, all(torch.equal(a, b) for a, b in zip(back_t.keys + back_t.values,
                                                                              back_k.keys + back_k.values))]
json.dump(results, open(sys.argv[1], "w"))
"""


def test_the_kernels_send_the_torch_paths_bytes_through_the_wire(tmp_path):
    """tiny-llama's cache through wire.encode and wire.decode by the split path, the GEMMs emulated on the CPU: with
    the kernels (in Triton's interpreter) the chunks are torch's byte for byte, and so is the decoded cache, with
    and without per-token classes."""
    assert run_interpreted(THROUGH_THE_WIRE, tmp_path) == {"pca:b2:w:e:a": [True, True], "pca:b1.5:w:e:a:i1:f3": [True, True]}
