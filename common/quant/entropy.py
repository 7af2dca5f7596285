"""Empirical entropy of quantization codes: the bound an ideal entropy coder would reach."""

from __future__ import annotations

import torch

from common.quant.kv import KVCodec, _matrix_shape
from common.quant.packing import packed_size, unpack


def entropy_bits(symbols: torch.Tensor, alphabet: int) -> float:
    """Shannon entropy, in bits per symbol, of the empirical distribution of `symbols`."""
    counts = torch.bincount(symbols.reshape(-1).long(), minlength=alphabet).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def code_symbols(codec: KVCodec, payload: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, int] | None:
    """The code symbols inside the payload of a codec of a code quantizer, with their bit width; None for others.

    shape: (1, kv_heads, tokens, head_dim) of keys and values -> (symbols,) uint8, bits. Each of the
    key and value payloads starts with its codes (see `common.quant.base`).
    """
    quantizer = codec.quantizer
    bits = quantizer.code_bits
    if bits is None:
        return None
    symbols, offset = [], 0
    for axis in (codec.key_axis, codec.value_axis):
        rows, cols = _matrix_shape(shape, axis)
        symbols.append(unpack(payload[offset:offset + packed_size(rows * cols, bits)], bits, rows * cols))
        offset += quantizer.size(rows, cols)
    return torch.cat(symbols), bits
