"""The matrix quantizer interface, and helpers its implementations share.

A matrix quantizer turns a 2-D float tensor `(rows, cols)` into a flat uint8 tensor
of exactly `size(rows, cols, dtype)` bytes, and back. Groups run along `cols`.
"""

from __future__ import annotations

from typing import Protocol

import torch

FP16_MAX = 65504.0


class QuantError(ValueError):
    """Input a quantizer cannot represent, or a payload it cannot decode."""


class MatrixQuantizer(Protocol):
    def size(self, rows: int, cols: int, dtype: torch.dtype) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor: ...


def check_finite(x: torch.Tensor, limit: float | None = FP16_MAX) -> None:
    if not torch.isfinite(x).all():
        raise QuantError("input contains NaN or Inf; refusing to quantize it")
    if limit is not None and x.numel() and x.abs().max() > limit:
        raise QuantError(f"input magnitude {float(x.abs().max()):.3g} exceeds {limit:g}, the range of fp16 scales")


def group_view(x: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group), padding the last group by repeating its last column."""
    rows, cols = x.shape
    pad = (-cols) % group
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.reshape(rows, -1, group)


def num_groups(cols: int, group: int) -> int:
    return -(-cols // group)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    # Flatten first: a tensor with a size-1 dimension can be "contiguous" with a last stride != 1.
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(blob: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if blob.storage_offset() % dtype.itemsize:  # a slice at an odd offset cannot be reinterpreted in place
        blob = blob.clone()
    return blob.contiguous().view(dtype).reshape(shape)
