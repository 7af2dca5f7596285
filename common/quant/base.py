"""The matrix quantizer interface, and helpers its implementations share.

A matrix quantizer turns a 2-D float tensor `(rows, cols)` into a flat uint8 tensor
of exactly `size(rows, cols, dtype)` bytes, and back. Groups run along `cols`.

A code quantizer (`code_bits` set) lays its payload out as codes first: the first
`packed_size(rows * cols, code_bits)` bytes are the `rows * cols` codes in row-major
order, packed by `common.quant.packing`; its parameters (scales, offsets) follow.

A stage quantizer is one the profile grammar names (`int4:g32`, `nf4`, `fp16`; the grammar's
stages live in common.profile.stages.precision): it prints its own stage, and is listed in
`common.quant.QUANTIZERS`.
"""

from __future__ import annotations

import re
from typing import ClassVar, Protocol

import torch

FP16_MAX = 65504.0
FP16_EPS = 2.0**-10  # relative spacing of fp16 values: the rounding of fp16 group parameters
# The largest group the grammar accepts. A group spans one row of one chunk's matrix: head_dim
# channels (at most 256 in current models), or the chunk's tokens (a chunk is at most 1 MiB, a few
# thousand tokens for the smallest models). A group longer than its row is one group per row, so
# nothing above 4096 is useful, and a larger one only costs the encoder padding (group_view pads
# every row to a whole group): `int4:g268435456` would pad each row to 2^28 columns.
MAX_GROUP = 4096


class QuantError(ValueError):
    """Input a quantizer cannot represent, or a payload it cannot decode."""


class MatrixQuantizer(Protocol):
    code_bits: int | None  # bits per code symbol of a code quantizer (see above); None otherwise

    def size(self, rows: int, cols: int, dtype: torch.dtype) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) -> flat uint8 payload of size(rows, cols, x.dtype) bytes."""
        ...

    def decode(self, blob: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Flat uint8 payload -> (rows, cols) tensor of `dtype`."""
        ...


class StageQuantizer(MatrixQuantizer, Protocol):
    stage_names: ClassVar[tuple[str, ...]]  # the stage names, for the "known stages" message: ("int1..int8",)
    examples: ClassVar[tuple[str, ...]]  # canonical specs, one per variant, for the generic tests
    grouped: ClassVar[bool]  # groups run along cols, so the profile's k=/v= layout options apply

    def spec(self) -> str:
        """The canonical stage text (common.profile parses it back to an equal quantizer)."""
        ...

    def max_error(self, x: torch.Tensor) -> torch.Tensor:
        """x: (rows, cols) -> (rows, cols) bound on |decode(encode(x), ..., torch.float32) - x|."""
        ...


def check_group(group: int) -> None:
    if not 1 <= group <= MAX_GROUP:
        raise QuantError(f"group size must be positive and at most {MAX_GROUP}, got {group}")


NOT_FINITE = "input contains NaN or Inf; refusing to quantize it"


def check_finite(x: torch.Tensor, limit: float | None = FP16_MAX) -> None:
    if not torch.isfinite(x).all():
        raise QuantError(NOT_FINITE)
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


def per_column(params: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """(rows, num_groups(cols, group)) per-group values -> (rows, cols): each column gets its group's value.

    Allocates only the (rows, cols) result, whatever the group size: `repeat_interleave(group)`
    would allocate rows * groups * group elements, 2^28 per row for a header's `g268435456`.
    """
    rows, groups = params.shape
    whole = cols // group  # groups that lie entirely inside the row
    parts = [params[:, :whole].unsqueeze(-1).expand(rows, whole, group).reshape(rows, whole * group)]
    if whole < groups:  # the last group, cut short by the end of the row
        parts.append(params[:, whole:whole + 1].expand(rows, cols - whole * group))
    return torch.cat(parts, dim=1)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    # Flatten first: a tensor with a size-1 dimension can be "contiguous" with a last stride != 1.
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(blob: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if blob.storage_offset() % dtype.itemsize:  # a slice at an odd offset cannot be reinterpreted in place
        blob = blob.clone()
    return blob.contiguous().view(dtype).reshape(shape)
