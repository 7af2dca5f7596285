"""NF4: the 4-bit NormalFloat code book (Dettmers et al., QLoRA, 2023), absmax-scaled per group.

Stage: nf4[:gG], groups of G (default 64); symmetric by construction (sym is accepted, asym refused).
Layout: packed 4-bit codes, then one fp16 absmax per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.quant.base import (
    FP16_EPS,
    QuantError,
    check_finite,
    check_group,
    from_bytes,
    group_view,
    num_groups,
    per_column,
    to_bytes,
)
from common.quant import kernels
from common.quant.packing import pack, packed_size, unpack

DEFAULT_GROUP = 64

# Quantiles of N(0, 1), normalized to [-1, 1], with an exact zero (QLoRA, Appendix E).
NF4_CODE_BOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230432987213, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


@dataclass(frozen=True)
class NF4:
    group: int = DEFAULT_GROUP

    code_bits: ClassVar[int] = 4
    stage_names: ClassVar[tuple[str, ...]] = ("nf4",)
    examples: ClassVar[tuple[str, ...]] = ("nf4:g64", "nf4:g1", "nf4:g16")
    grouped: ClassVar[bool] = True

    def __post_init__(self):
        check_group(self.group)

    def spec(self) -> str:
        return f"nf4:g{self.group}"

    def size(self, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> int:
        return packed_size(rows * cols, 4) + 2 * rows * num_groups(cols, self.group)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_kernels(self, x):
            return kernels.encode_matrix(self, x)
        check_finite(x)
        rows, cols = x.shape
        groups = group_view(x.float(), self.group)
        absmax = groups.abs().amax(dim=-1, keepdim=True).half()
        safe = torch.where(absmax > 0, absmax.float(), torch.ones_like(absmax, dtype=torch.float32))
        book = NF4_CODE_BOOK.to(x.device)
        midpoints = (book[1:] + book[:-1]) / 2
        codes = torch.bucketize((groups / safe).clamp(-1, 1), midpoints).to(torch.uint8)
        return torch.cat([pack(codes.reshape(rows, -1)[:, :cols], 4), to_bytes(absmax)])

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if blob.numel() != self.size(rows, cols):
            raise QuantError(f"payload of {blob.numel()} bytes; nf4 ({rows}x{cols}) needs {self.size(rows, cols)}")
        if kernels.use_kernels(self, blob, dtype):
            return kernels.decode_matrix(self, blob, rows, cols, dtype)
        code_bytes = packed_size(rows * cols, 4)
        codes = unpack(blob[:code_bytes], 4, rows * cols).view(rows, cols).long()
        absmax = from_bytes(blob[code_bytes:], torch.float16, (rows, num_groups(cols, self.group))).float()
        scale = per_column(absmax, self.group, cols)
        return (NF4_CODE_BOOK.to(blob.device)[codes] * scale).to(dtype)

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) -> (rows, cols): half the widest gap of the code book, scaled by the
        group's absmax, plus the fp16 rounding of that absmax."""
        absmax = group_view(x.float(), self.group).abs().amax(dim=-1)
        half_gap = float((NF4_CODE_BOOK[1:] - NF4_CODE_BOOK[:-1]).max()) / 2
        bound = absmax * (half_gap + 2 * FP16_EPS) + 1e-6
        return per_column(bound, self.group, x.shape[1])
