"""Uniform group-wise quantization, 1 to 8 bits, asymmetric (min/scale) or symmetric (absmax).

Stage: intN[:gG][:sym|asym], N in 1..8, groups of G (default 32); asymmetric by default,
except int1, symmetric by default (two levels at a group's min and max lose more than
sign x mean|x| does).

Layout: packed codes, then fp16 parameters per group: (scale, min) when asymmetric,
(scale,) when symmetric. Symmetric 1-bit is sign quantization scaled by mean |x|.
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

FP16_MIN_NORMAL = 2.0**-14
DEFAULT_GROUP = 32


@dataclass(frozen=True)
class Uniform:
    bits: int
    group: int = DEFAULT_GROUP
    symmetric: bool = False

    stage_names: ClassVar[tuple[str, ...]] = ("int1..int8",)
    examples: ClassVar[tuple[str, ...]] = ("int1:g32", "int1:g4:asym", "int2:g32", "int3:g64:sym", "int4:g32",
                                           "int8:g1", "int8:g32:sym")
    grouped: ClassVar[bool] = True

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise QuantError(f"uniform quantization takes 1 to 8 bits, got {self.bits}")
        check_group(self.group)

    def spec(self) -> str:
        text = f"int{self.bits}:g{self.group}"
        if self.symmetric != (self.bits == 1):
            text += ":sym" if self.symmetric else ":asym"
        return text

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def params(self) -> int:
        return 1 if self.symmetric else 2

    def size(self, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> int:
        return packed_size(rows * cols, self.bits) + 2 * self.params * rows * num_groups(cols, self.group)

    def _levels(self, groups: torch.Tensor) -> torch.Tensor:
        """fp16-representable parameters per group: (rows, groups, params).

        Steps divide by a tensor, not a Python number: CUDA divides by a host scalar as a multiply
        by its reciprocal, which rounds differently; a tensor divisor is IEEE division on every
        device, the CPU's result and the Triton kernels'."""
        if self.symmetric:
            if self.bits == 1:
                scale = groups.abs().mean(dim=-1)
            else:
                scale = groups.abs().amax(dim=-1) / groups.new_tensor(2 ** (self.bits - 1) - 1)
            params = scale.unsqueeze(-1).half()
        else:
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
            scale = (high - low) / groups.new_tensor(2**self.bits - 1)
            params = torch.stack([scale, low], dim=-1).half()
        # Below fp16's normal range the step is coarse (multiples of 2**-24): rounded down, it
        # pushes codes past the last level (or collapses the group at 0). Round it up there, to
        # the next fp16 value, so every code stays in range.
        stored = params[..., 0]
        rounded_down = (stored.float() < scale) & (scale < FP16_MIN_NORMAL)
        params[..., 0] = torch.where(rounded_down, (stored.view(torch.int16) + 1).view(torch.float16), stored)
        return params

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) float -> packed codes + fp16 parameters, as uint8."""
        if kernels.use_kernels(self, x):
            return kernels.encode_matrix(self, x)
        check_finite(x)
        rows, cols = x.shape
        groups = group_view(x.float(), self.group)
        params = self._levels(groups)
        scale = params[..., 0:1].float()
        # Codes multiply by 1 / step, one IEEE division per group (a tensor divisor: see _levels), not
        # one per element: the GPU kernels do the same; a division per element took about a third of
        # their time (H200, results/gpu/kernel_sweep_recip_h200_session4.txt).
        inverse = torch.ones_like(scale) / torch.where(scale > 0, scale, torch.ones_like(scale))
        if self.symmetric and self.bits == 1:
            codes = (groups >= 0).to(torch.uint8)
        elif self.symmetric:
            half = 2 ** (self.bits - 1) - 1
            codes = (torch.round(groups * inverse).clamp(-half, half) + half).to(torch.uint8)
        else:
            codes = torch.round((groups - params[..., 1:2].float()) * inverse).clamp(0, 2**self.bits - 1).to(torch.uint8)
        codes = codes.reshape(rows, -1)[:, :cols]
        return torch.cat([pack(codes, self.bits), to_bytes(params)])

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if blob.numel() != self.size(rows, cols):
            raise QuantError(f"payload of {blob.numel()} bytes; int{self.bits} ({rows}x{cols}) needs {self.size(rows, cols)}")
        if kernels.use_kernels(self, blob, dtype):
            return kernels.decode_matrix(self, blob, rows, cols, dtype)
        code_bytes = packed_size(rows * cols, self.bits)
        codes = unpack(blob[:code_bytes], self.bits, rows * cols).view(rows, cols).float()
        params = from_bytes(blob[code_bytes:], torch.float16, (rows, num_groups(cols, self.group), self.params)).float()
        scale = per_column(params[..., 0], self.group, cols)
        if self.symmetric and self.bits == 1:
            return ((2 * codes - 1) * scale).to(dtype)
        if self.symmetric:
            return ((codes - (2 ** (self.bits - 1) - 1)) * scale).to(dtype)
        low = per_column(params[..., 1], self.group, cols)
        return (codes * scale + low).to(dtype)

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) -> (rows, cols): half a step of each element's group (for sign x mean|x|,
        the group's largest |x|), plus the fp16 rounding of the group's parameters."""
        groups = group_view(x.float(), self.group)
        magnitude = groups.abs().amax(dim=-1)
        if self.symmetric and self.bits == 1:
            error = magnitude
        elif self.symmetric:
            error = magnitude / (2**self.bits - 2)  # half of the step absmax / (2^(bits-1) - 1)
        else:
            error = (groups.amax(dim=-1) - groups.amin(dim=-1)) / (2 * (2**self.bits - 1))
        bound = error * (1 + 4 * FP16_EPS) + 4 * FP16_EPS * magnitude + 1e-6
        return per_column(bound, self.group, x.shape[1])
