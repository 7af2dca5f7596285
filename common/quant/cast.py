"""Plain casts: the model's own dtype (bit-exact), fp16 or bf16."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.quant.base import from_bytes, to_bytes


@dataclass(frozen=True)
class Cast:
    wire_dtype: torch.dtype | None = None  # None: the model's dtype, bit for bit

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.wire_dtype or dtype

    def size(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        return rows * cols * self._dtype(dtype).itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return to_bytes(x.to(self._dtype(x.dtype)))

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        return from_bytes(blob, self._dtype(dtype), (rows, cols)).to(dtype)
