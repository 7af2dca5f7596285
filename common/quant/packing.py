"""Dense bit packing: n codes of b bits occupy exactly ceil(n * b / 8) bytes.

Bits are laid out least-significant first, code after code, with no padding
between codes. Runs on whatever device the codes live on.
"""

from __future__ import annotations

import torch


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 of any shape, each < 2**bits -> flat uint8 tensor of packed bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, no bit splitting
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        grouped = torch.nn.functional.pad(flat, (0, pad)).view(-1, per_byte).to(torch.int32)
        shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.int32)
        return (grouped << shifts).sum(dim=1).to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device, dtype=torch.uint8)
    bit_stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bit_stream.numel()) % 8
    bit_stream = torch.nn.functional.pad(bit_stream, (0, pad)).view(-1, 8).to(torch.int32)
    return (bit_stream << torch.arange(8, device=flat.device, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: the first `count` codes, as uint8."""
    if packed.numel() != packed_size(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {count} codes of {bits} bits")
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed[:count].clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    bit_stream = ((packed.unsqueeze(1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1).reshape(-1)
    bit_stream = bit_stream[: count * bits].view(count, bits).to(torch.int32)
    return (bit_stream << torch.arange(bits, device=packed.device, dtype=torch.int32)).sum(dim=1).to(torch.uint8)
