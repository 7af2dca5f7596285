"""KVCodec: keys and values of one token range of one layer <-> one flat uint8 payload.

A matrix quantizer groups along the last axis of a 2-D matrix; the axis options pick
which matrix each tensor becomes:
- per channel: (kv_heads * head_dim, tokens), groups run along tokens (KIVI's choice for keys);
- per token:   (kv_heads * tokens, head_dim), groups run along channels (KIVI's for values).
Low rank always factorizes each head's (tokens, head_dim) matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from common.quant import kernels
from common.quant.base import MatrixQuantizer, QuantError
from common.quant.lowrank import LowRank
from common.quant.rans import to_device, to_host

CHANNEL, TOKEN = "channel", "token"


def payload_tensor(raw: bytes) -> torch.Tensor:
    """A chunk's raw payload as a writable uint8 tensor on the host (empty where a layer codes to nothing)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def _to_matrix(t: torch.Tensor, axis: str) -> torch.Tensor:
    """t: (1, kv_heads, tokens, head_dim) -> 2-D matrix for the quantizer."""
    _, heads, tokens, dim = t.shape
    if axis == CHANNEL:
        return t[0].transpose(1, 2).reshape(heads * dim, tokens)
    return t[0].reshape(heads * tokens, dim)


def _matrix_shape(shape: tuple[int, ...], axis: str) -> tuple[int, int]:
    _, heads, tokens, dim = shape
    return (heads * dim, tokens) if axis == CHANNEL else (heads * tokens, dim)


def _from_matrix(m: torch.Tensor, shape: tuple[int, ...], axis: str) -> torch.Tensor:
    _, heads, tokens, dim = shape
    if axis == CHANNEL:
        return m.reshape(heads, dim, tokens).transpose(1, 2).unsqueeze(0).contiguous()
    return m.reshape(1, heads, tokens, dim)


def each_range(encode, tokens: int, step: int) -> Iterator[bytes]:
    """encode(part) of each range part = [0, step), [step, 2 * step), ... of `tokens`, as host bytes,
    each encoded as it is asked for."""
    for start in range(0, tokens, step):
        yield encode(slice(start, start + step)).cpu().numpy().tobytes()


def _ranges(t: torch.Tensor, count: int, step: int) -> torch.Tensor:
    """(1, heads, tokens, head_dim) -> its first `count` ranges of `step` tokens, a view
    (count, heads, step, head_dim)."""
    return t[0, :, :count * step].unflatten(1, (count, step)).transpose(0, 1)


@dataclass(frozen=True)
class KVCodec:
    quantizer: MatrixQuantizer
    key_axis: str = CHANNEL
    value_axis: str = TOKEN

    def _parts(self, shape: tuple[int, ...]):
        """(axis, rows, cols) for keys and values; low rank factorizes per head."""
        if isinstance(self.quantizer, LowRank):
            _, _, tokens, dim = shape
            return [("head", tokens, dim)] * 2
        return [(axis, *_matrix_shape(shape, axis)) for axis in (self.key_axis, self.value_axis)]

    def payload_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        heads = shape[1] if isinstance(self.quantizer, LowRank) else 1
        return sum(heads * self.quantizer.size(rows, cols, dtype) for _, rows, cols in self._parts(shape))

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """keys, values: (1, kv_heads, tokens, head_dim) -> flat uint8 payload."""
        if keys.shape[0] != 1:
            raise QuantError("codecs take batch 1")
        if kernels.use_kernels(self.quantizer, keys):  # reads per-channel keys in place, no transposed copy
            return kernels.encode_kv(self.quantizer, keys, values, self.key_axis, self.value_axis)[0]
        pieces = []
        for tensor, (axis, _, _) in zip((keys, values), self._parts(tuple(keys.shape))):
            if axis == "head":
                pieces.extend(self.quantizer.encode(tensor[0, h]) for h in range(tensor.shape[1]))
            else:
                pieces.append(self.quantizer.encode(_to_matrix(tensor, axis)))
        return torch.cat(pieces)

    def encode_chunks(self, keys: torch.Tensor, values: torch.Tensor, step: int) -> Iterator[bytes]:
        """The payloads of tokens [0, step), [step, 2 * step), ... of keys and values, as host bytes:
        what `encode` gives each range. With the kernels, the ranges are the payloads of one launch
        per tensor (and one for a shorter last range), and the finite check rides on the one copy
        to the host; without, each range is encoded as it is asked for."""
        tokens = keys.shape[2]
        if not kernels.use_kernels(self.quantizer, keys):
            yield from each_range(lambda part: self.encode(keys[:, :, part], values[:, :, part]), tokens, step)
            return
        whole = tokens // step
        flag = torch.zeros(1, dtype=torch.int32, device=keys.device)
        parts = [kernels.encode_kv(self.quantizer, _ranges(keys, whole, step), _ranges(values, whole, step),
                                   self.key_axis, self.value_axis, flag=flag)] if whole else []
        if tokens % step:
            parts.append(kernels.encode_kv(self.quantizer, keys[:, :, whole * step:], values[:, :, whole * step:],
                                           self.key_axis, self.value_axis, flag=flag))
        host = [to_host(part) for part in parts]  # through pinned memory: a pageable copy ran at 2.6 GB/s on an H100
        kernels.refuse_flagged(flag, [keys, values])
        for part in host:
            for row in part:
                yield row.numpy().tobytes()

    def decodes_chunks(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `decode_chunks` decodes a tier's chunks together (with the kernels) on `device`."""
        return kernels.kernels_on(self.quantizer, torch.device(device), dtype)

    def decode_chunks(self, payloads: list[bytes], tokens: list[int], heads: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of consecutive chunks, payloads[i] holding tokens[i] tokens: `decode` of each,
        joined along the tokens (the inverse of encode_chunks). With the kernels, the chunks of the first
        one's length are one copy to the device and one launch per tensor; the others decode one at a time."""
        def one(payload: bytes, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.decode(payload_tensor(payload).to(device), (1, heads, n, head_dim), dtype)

        step, size = tokens[0], len(payloads[0])
        same = next((i for i, (p, n) in enumerate(zip(payloads, tokens)) if n != step or len(p) != size), len(tokens))
        if same < 2 or not self.decodes_chunks(device, dtype):
            parts = [one(p, n) for p, n in zip(payloads, tokens)]
        else:
            if size != self.payload_size((1, heads, step, head_dim), dtype):  # before the device allocates
                raise QuantError(f"payload of {size} bytes, expected {self.payload_size((1, heads, step, head_dim), dtype)}")
            stacked = to_device([np.frombuffer(p, dtype=np.uint8) for p in payloads[:same]], np.uint8, device)
            keys, values = kernels.decode_kv(self.quantizer, stacked.reshape(same, size), (same, heads, step, head_dim),
                                             dtype, self.key_axis, self.value_axis)
            parts = [tuple(t.transpose(0, 1).reshape(1, heads, same * step, head_dim) for t in (keys, values))]
            parts += [one(p, n) for p, n in zip(payloads[same:], tokens[same:])]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.numel() != self.payload_size(shape, dtype):
            raise QuantError(f"payload of {payload.numel()} bytes, expected {self.payload_size(shape, dtype)}")
        if kernels.use_kernels(self.quantizer, payload, dtype):
            return kernels.decode_kv(self.quantizer, payload.contiguous().reshape(1, -1), shape, dtype, self.key_axis, self.value_axis)
        out, offset = [], 0
        for axis, rows, cols in self._parts(shape):
            size = self.quantizer.size(rows, cols, dtype)
            if axis == "head":
                heads = []
                for _ in range(shape[1]):
                    heads.append(self.quantizer.decode(payload[offset:offset + size], rows, cols, dtype))
                    offset += size
                out.append(torch.stack(heads).unsqueeze(0))
            else:
                out.append(_from_matrix(self.quantizer.decode(payload[offset:offset + size], rows, cols, dtype), shape, axis))
                offset += size
        return out[0], out[1]
