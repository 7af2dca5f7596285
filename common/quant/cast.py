"""Plain casts: the model's own dtype (bit-exact), fp16 or bf16.

Stages: raw (alias lossless), fp16, bf16; no options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.quant.base import from_bytes, to_bytes

WIRE_DTYPES = {"raw": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Cast:
    wire_dtype: torch.dtype | None = None  # None: the model's dtype, bit for bit

    code_bits: ClassVar[None] = None
    stage_names: ClassVar[tuple[str, ...]] = tuple(WIRE_DTYPES)
    examples: ClassVar[tuple[str, ...]] = tuple(WIRE_DTYPES)
    grouped: ClassVar[bool] = False

    def spec(self) -> str:
        return next(name for name, dtype in WIRE_DTYPES.items() if dtype == self.wire_dtype)

    def _dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.wire_dtype or dtype

    def size(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        return rows * cols * self._dtype(dtype).itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) -> its elements in the wire dtype, as uint8."""
        return to_bytes(x.to(self._dtype(x.dtype)))

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        return from_bytes(blob, self._dtype(dtype), (rows, cols)).to(dtype)

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) -> (rows, cols): 0 for raw, else half a unit in the last place of the wire dtype."""
        if self.wire_dtype is None:
            return torch.zeros_like(x, dtype=torch.float32)
        info = torch.finfo(self.wire_dtype)
        return (x.float().abs() + info.tiny) * info.eps / 2
