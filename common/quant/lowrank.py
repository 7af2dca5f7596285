"""SVD low rank per head: M (tokens, head_dim) ~= A @ B with A = U_r S_r (tokens, r) and B = V_r^T (r, head_dim).

The factors are sent through a matrix quantizer (fp16 by default; `svd:r32+int8`
quantizes them), so low rank and quantization compose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.quant.base import MatrixQuantizer, QuantError, check_finite


@dataclass(frozen=True)
class LowRank:
    rank: int
    factors: MatrixQuantizer

    code_bits: ClassVar[None] = None  # the payload is two factors, each with its own codes and parameters

    def __post_init__(self):
        if self.rank < 1:
            raise QuantError(f"rank must be positive, got {self.rank}")

    def _rank(self, rows: int, cols: int) -> int:
        return min(self.rank, rows, cols)

    def size(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        r = self._rank(rows, cols)
        return self.factors.size(rows, r, dtype) + self.factors.size(r, cols, dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x, limit=None)
        r = self._rank(*x.shape)
        u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
        a, b = (u[:, :r] * s[:r]).to(x.dtype), vh[:r].to(x.dtype)
        return torch.cat([self.factors.encode(a), self.factors.encode(b)])

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        r = self._rank(rows, cols)
        split = self.factors.size(rows, r, dtype)
        a = self.factors.decode(blob[:split], rows, r, dtype)
        b = self.factors.decode(blob[split:], r, cols, dtype)
        return (a.float() @ b.float()).to(dtype)
