"""Rotary position embedding, removed from keys on the sender and re-applied on the receiver.

A cached key is R(p) k: the pre-RoPE key k rotated by angles proportional to its position p.
Pre-RoPE keys share one distribution across positions (KVQuant, KVTC), so they quantize and
project better. Positions travel with every kept token, so the receiver can rotate them back.

The tables come from the model's own rotary module (its theta, scaling and, for Gemma-3, a
separate base per layer type), so both nodes compute the same angles as the model did.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float32 keys x (..., head_dim) with RoPE's rotation of tables cos, sin taken off."""
    scale = (cos.square() + sin.square())  # the module's attention scaling, squared (1 for plain RoPE)
    return (x * cos - _rotate_half(x) * sin) / scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float32 pre-RoPE keys x (..., head_dim) rotated by tables cos, sin (float32)."""
    return x * cos + _rotate_half(x) * sin


class Rope:
    """The key rotation of each layer of a loaded model."""

    def __init__(self, model):
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.rotary = inner.rotary_emb
        text = model.config.get_text_config()
        self.layer_types = getattr(text, "layer_types", None)
        # a layer type names one of several rotations (Gemma 3's); a model of one (Qwen2's layer_types are all
        # "full_attention") takes none
        self.takes_layer_type = ("layer_type" in self.rotary.forward.__code__.co_varnames
                                 and isinstance(getattr(self.rotary, "rope_type", None), dict))

    def cos_sin(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (kv_heads, tokens) -> cos, sin (1, kv_heads, tokens, head_dim), float32."""
        probe = torch.empty(0, device=positions.device, dtype=torch.float32)
        args = (self.layer_types[layer],) if self.takes_layer_type and self.layer_types else ()
        with torch.no_grad():
            cos, sin = self.rotary(probe, positions.to(torch.long), *args)
        return cos.float().unsqueeze(0), sin.float().unsqueeze(0)

    def remove(self, layer: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cached keys (1, kv_heads, tokens, head_dim) at `positions` -> pre-RoPE keys, float32."""
        return unrotate(keys.float(), *self.cos_sin(layer, positions.to(keys.device)))

    def apply(self, layer: int, keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pre-RoPE keys -> keys as the model caches them, in `dtype`."""
        return rotate(keys.float(), *self.cos_sin(layer, positions.to(keys.device))).to(dtype)
