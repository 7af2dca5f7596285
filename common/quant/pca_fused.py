"""pca:...:a on a GPU: a layer in three passes and one GEMM each way.

Where the folded GEMMs run on bf16 tensor cores (`pca_entropy.split_here`), a layer is coded in

- `operand`: one pass over the cache: RoPE taken off the keys, each tensor laid out token by token (the folded
  transform's rows) in bf16 parts side by side: [x, x] for a bf16 tensor, [high, high, low] for any other (a float32
  x = high + low to about 16 bits);
- one GEMM of float32 output against the folded analysis stacked in the matching parts ([A_high; A_low] or [A_high;
  A_low; A_high]): the parts' products summed in the GEMM's float32 accumulator;
- `quantize`: one pass over the coordinates: the bias off, each token's step, the rounding, the table's clip, int16.

and decoded in `dequantize` (one pass: each index's bin middle times its step, in [high, high, low] parts), one GEMM
against the folded synthesis ([S_high; S_low; S_high]), and `reconstruct` (one pass: the mean, RoPE put back, the
cache's dtype and layout). The torch code here is the reference and the path without the kernels; the Triton kernels
(`common.quant.pca_triton`) compute the same values bit for bit (IEEE division, no fused multiply-adds):
tests/common/quant/test_pca_fused.py checks them in Triton's interpreter, tests/gpu/test_cuda.py on a GPU.
"""

from __future__ import annotations

import torch

from common.quant import kernels
from common.quant.rope import rotate, unrotate

BLOCK_TOKENS = 64  # tokens a program of `operand` and `reconstruct` takes (one head's head_dim of each)
BLOCK = (64, 128)  # (tokens, components) a program of `quantize` and `dequantize` takes


def on_kernels(device: torch.device) -> bool:
    """Whether the passes run as Triton kernels on `device`: on CUDA unless KVWIRE_KERNELS=torch; anywhere with
    KVWIRE_KERNELS=triton (a CPU tensor in Triton's interpreter)."""
    chosen = kernels.mode()
    if chosen == "torch" or not kernels.triton_available():
        return False
    return device.type == "cuda" or chosen == "triton"


def exact(t: torch.Tensor) -> bool:
    """Whether `t` is one bf16 part (bf16 already); any other tensor travels in two."""
    return t.dtype == torch.bfloat16


def parts(flat: torch.Tensor) -> list[torch.Tensor]:
    """A (rows, cols) tensor as the operand's bf16 parts: [x, x] if bf16, else [high, high, low]."""
    if exact(flat):
        return [flat, flat]
    high = flat.to(torch.bfloat16)
    return [high, high, (flat.float() - high.float()).to(torch.bfloat16)]


def stacked(weights: torch.Tensor, operand_exact: bool) -> torch.Tensor:
    """float32 weights (rows, cols) stacked in the parts that pair with an operand's: [W_high; W_low] for a bf16 one,
    [W_high; W_low; W_high] for a split one (so the sum of products is x W to about 16 bits)."""
    high = weights.to(torch.bfloat16)
    low = (weights - high.float()).to(torch.bfloat16)
    return torch.cat([high, low] if operand_exact else [high, low, high])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(1, heads, tokens, head_dim) -> (tokens, heads * head_dim)."""
    _, heads, tokens, dim = t.shape
    return t[0].transpose(0, 1).reshape(tokens, heads * dim)


def operand(keys: torch.Tensor, values: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """keys, values (1, kv_heads, tokens, head_dim), rope: the keys' tables cos, sin (1, kv_heads, tokens, head_dim)
    float32, or None -> (tokens, width) bf16: the pre-RoPE keys' parts, then the values'."""
    split_keys = rope is not None or not exact(keys)
    _, heads, tokens, dim = keys.shape
    width = heads * dim
    out = torch.empty(tokens, width * ((3 if split_keys else 2) + (2 if exact(values) else 3)), dtype=torch.bfloat16,
                      device=keys.device)
    if tokens and on_kernels(keys.device):
        from common.quant import pca_triton
        pca_triton.operand(keys, values, rope, out, split_keys)
        return out
    flat_keys = _flat(keys if rope is None else unrotate(keys.float(), *rope))
    torch.cat([*parts(flat_keys), *parts(_flat(values))], dim=1, out=out)
    return out


def quantize(coords: torch.Tensor, bias: torch.Tensor, steps: torch.Tensor, classes: torch.Tensor | None,
             models: torch.Tensor, class_scale: torch.Tensor, limits: torch.Tensor, rounding: float,
             class_tables: int, top: int, out: torch.Tensor, flag: torch.Tensor) -> None:
    """The int16 indices (tokens, coded) of the coordinates `coords` (float32, before `bias`) into `out`:
    sign(c) floor(|c| / step + rounding), clipped to the table's range, where a token's step is the component's
    `steps` times `class_scale[class + max class]`, and its table the component's `models` (from 0) moved by
    `class_tables` per class, within 0 .. top; `limits` is each table's largest index (float32). `flag` (int32, one
    element) becomes nonzero if a coordinate is not finite (an input was not); a NaN's index is 0, so that the
    indices stay in their tables' ranges until the caller checks the flag."""
    if coords.numel() and on_kernels(coords.device):
        from common.quant import pca_triton
        pca_triton.quantize(coords, bias, steps, classes, models, class_scale, limits, rounding, class_tables, top,
                            out, flag)
        return
    x = coords - bias
    step = token_steps(steps, classes, class_scale)
    if classes is not None:
        models = (models[None, :] + class_tables * classes.long()[:, None]).clamp(0, top)
    scaled = x / step
    indices = torch.sign(scaled) * torch.floor(scaled.abs() + rounding)
    limit = limits[models]
    flag.add_((~torch.isfinite(x)).any().int())
    clipped = torch.maximum(torch.minimum(indices, limit), -limit)
    out.copy_(torch.where(scaled.isnan(), 0.0, clipped).to(torch.int16))  # NaN (flagged) codes as 0, in range


def dequantize(indices: torch.Tensor, classes: torch.Tensor | None, steps: torch.Tensor, class_scale: torch.Tensor,
               half_bin: float) -> torch.Tensor:
    """int16 indices (tokens, coded) -> their coordinates, each index's bin middle (index + sign(index) half_bin)
    times its token's step, as the (tokens, 3 coded) bf16 parts [high, high, low]."""
    tokens, coded = indices.shape
    if indices.numel() and on_kernels(indices.device):
        from common.quant import pca_triton
        out = torch.empty(tokens, 3 * coded, dtype=torch.bfloat16, device=indices.device)
        pca_triton.dequantize(indices, classes, steps, class_scale, half_bin, out)
        return out
    return torch.cat(parts(bin_middles(indices, classes, steps, class_scale, half_bin)), dim=1)


def bin_middles(indices: torch.Tensor, classes: torch.Tensor | None, steps: torch.Tensor, class_scale: torch.Tensor,
                half_bin: float) -> torch.Tensor:
    """int16 indices (tokens, coded) -> float32 coordinates: each index's bin middle, index + sign(index) half_bin,
    times its token's step (the component's `steps`, times `class_scale[class + max class]` with classes)."""
    q = indices.float()
    return (q + torch.sign(q) * half_bin) * token_steps(steps, classes, class_scale)


def token_steps(steps: torch.Tensor, classes: torch.Tensor | None, class_scale: torch.Tensor) -> torch.Tensor:
    """Each token's step of each component: the component's `steps`, times `class_scale[class + max class]` where
    tokens have classes ((tokens, coded)), else `steps` itself."""
    if classes is None:
        return steps
    return steps * class_scale[classes.long() + (len(class_scale) - 1) // 2][:, None]


def reconstruct(x: torch.Tensor, mean: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, heads: int,
                dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthesis (tokens, 2 heads dim) float32, before its `mean` -> keys, values (1, heads, tokens, dim) in
    `dtype`, RoPE put back on the keys with the tables `rope` (cos, sin), if any."""
    tokens = x.shape[0]
    if tokens and on_kernels(x.device):
        from common.quant import pca_triton
        keys = torch.empty(1, heads, tokens, dim, dtype=dtype, device=x.device)
        values = torch.empty_like(keys)
        pca_triton.reconstruct(x, mean, rope, keys, values)
        return keys, values
    whole = x + mean
    keys, values = (part.reshape(tokens, heads, dim).transpose(0, 1).unsqueeze(0)
                    for part in (whole[:, :heads * dim], whole[:, heads * dim:]))
    if rope is not None:
        keys = rotate(keys, *rope)
    return keys.to(dtype).contiguous(), values.to(dtype).contiguous()
