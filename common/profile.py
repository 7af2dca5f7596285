"""Compression profiles: how a KVState becomes chunk payloads and back.

A profile encodes the keys and values of one token range of one layer into bytes
and decodes them again. The wire layer adds zstd, checksums and framing on top.

    raw    bit-exact copy in the model's dtype (lossless; alias: lossless)
    fp16   cast to float16
    bf16   cast to bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ProfileError(ValueError):
    """A profile spec that cannot be parsed or applied."""


@dataclass(frozen=True)
class CastProfile:
    """Send tensors as raw little-endian buffers of `wire_dtype` (None: the model's dtype)."""

    name: str
    wire_dtype: torch.dtype | None = None

    def _dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return self.wire_dtype or model_dtype

    def payload_size(self, shape: tuple[int, ...], model_dtype: torch.dtype) -> int:
        """Exact size of `encode`'s output for keys (and values) of `shape`."""
        return 2 * torch.Size(shape).numel() * self._dtype(model_dtype).itemsize

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> bytes:
        """keys, values: (batch, kv_heads, tokens, head_dim) -> bytes."""
        dtype = self._dtype(keys.dtype)
        return b"".join(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes() for t in (keys, values))

    def decode(self, payload: bytes, shape: tuple[int, ...], model_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self._dtype(model_dtype)
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype)
        keys, values = flat.view(2, *shape).to(model_dtype).unbind(0)
        return keys, values


PROFILES = {
    "raw": CastProfile("raw"),
    "lossless": CastProfile("raw"),
    "fp16": CastProfile("fp16", torch.float16),
    "bf16": CastProfile("bf16", torch.bfloat16),
}


def parse_profile(spec: str) -> CastProfile:
    try:
        return PROFILES[spec.strip().lower()]
    except KeyError:
        raise ProfileError(f"unknown profile {spec!r}; known: {', '.join(sorted(PROFILES))}") from None
