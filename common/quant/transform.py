"""A layer's codec with the transforms that run before it: what `common.wire` encodes with.

Sender: keys lose their RoPE (at their positions), then keys and values may be rotated, then
the codec packs them. Receiver: the codec unpacks, the rotation is undone, RoPE re-applied.
Both nodes build the same `LayerCodec` from the profile and their `CodecContext`: what a node
knows of its model that some stages need (its RoPE, its PCA basis).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.quant import rotation
from common.quant.kv import KVCodec, each_range
from common.quant.pca import Basis, PCACodec
from common.quant.pca_entropy import EntropyPCACodec, code_fitting, refuse_flagged
from common.quant.rope import Rope


@dataclass(frozen=True)
class CodecContext:
    rope: Rope | None = None
    basis: Basis | None = None

    @classmethod
    def for_model(cls, model, basis: Basis | None = None) -> CodecContext:
        return cls(Rope(model), basis)


@dataclass(frozen=True)
class LayerCodec:
    layer: int
    codec: KVCodec | PCACodec | EntropyPCACodec
    rope: Rope | None = None  # remove RoPE from the keys first
    rotation: int | None = None  # the seed of a Hadamard rotation of keys and values

    @property
    def transformed(self) -> bool:
        return self.rope is not None or self.rotation is not None

    def payload_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return self.codec.payload_size(shape, dtype)

    @property
    def entropy_coded(self) -> bool:
        """Whether the codec compresses its raw payload itself (`compress`, `decompress`) instead of zstd."""
        return isinstance(self.codec, EntropyPCACodec)

    @property
    def per_token(self) -> bool:
        """Whether each token's step depends on its share of the question's attention (pca:...:e:iG)."""
        return self.entropy_coded and self.codec.per_token

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               classes: torch.Tensor | None = None, flag: torch.Tensor | None = None) -> torch.Tensor:
        """keys, values (1, kv_heads, tokens, head_dim); positions (kv_heads, tokens); the tokens'
        step classes where `per_token`. `flag`: on the split path, set where the input is not finite, for the caller
        to check (EntropyPCACodec.encode_split)."""
        if self.split_on(keys.device):
            return self.codec.encode_split(keys, values, self.rope_tables(positions, keys.device), classes, flag)
        if self.rope is not None:
            keys = self.rope.remove(self.layer, keys, positions)
        if self.rotation is not None:
            keys, values = rotation.rotate(keys, self.rotation), rotation.rotate(values, self.rotation)
        return self.codec.encode(keys, values, classes) if self.per_token else self.codec.encode(keys, values)

    def encode_chunks(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                      step: int, importance: torch.Tensor | None = None) -> Iterator[bytes]:
        """The payloads of tokens [0, step), [step, 2 * step), ..., as host bytes (KVCodec.encode_chunks).
        `importance`: each position's share of the question's attention, which a `per_token` codec needs."""
        if not self.transformed and isinstance(self.codec, KVCodec):
            yield from self.codec.encode_chunks(keys, values, step)
            return
        classes = self.classes(importance, positions)
        yield from each_range(lambda part: self.encode(keys[:, :, part], values[:, :, part], positions[:, part],
                                                       None if classes is None else classes[part]),
                              keys.shape[2], step)

    def split_on(self, device: torch.device) -> bool:
        """Whether the layer codes on `device` in pca_fused's passes (pca:...:a with its GEMMs on tensor cores)."""
        return self.rotation is None and self.entropy_coded and self.codec.split_on(device)

    def rope_tables(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys' RoPE tables (cos, sin) at `positions`, if RoPE comes off; one head's, expanded, where every head
        is at the same positions by construction (an expanded tensor, as a receiver's cache without selection)."""
        if self.rope is None:
            return None
        positions = positions.to(device)
        heads = positions.shape[0]
        if heads > 1 and positions.stride(0) == 0:
            cos, sin = self.rope.cos_sin(self.layer, positions[:1])
            return cos.expand(-1, heads, -1, -1), sin.expand(-1, heads, -1, -1)
        return self.rope.cos_sin(self.layer, positions)

    @property
    def coded_in_place(self) -> bool:
        """Whether the codec entropy-codes a tier's chunks where the cache is, in one call (pca:...:a)."""
        return self.entropy_coded and self.codec.rans

    def code_chunks(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, step: int,
                    importance: torch.Tensor | None, max_bytes: int,
                    pieces: bool = False) -> list[tuple[int, int, bytes | tuple]]:
        """`coded_in_place`: (tokens, raw size, payload) of tokens [0, step), [step, 2 * step), ...: the indices of
        every token at once where the cache is, then their rANS codes (EntropyPCACodec.code), at a smaller step
        where a payload would pass `max_bytes` (code_fitting; `pieces`: each payload in its parts)."""
        tokens = keys.shape[2]
        flag = torch.zeros(1, dtype=torch.int32, device=keys.device)
        raw = self.encode(keys, values, positions, self.classes(importance, positions), flag)
        step, payloads = code_fitting([(self.codec, raw, tokens, step)], max_bytes, pieces)[0]
        refuse_flagged(flag)
        return sized_chunks(raw, tokens, step, payloads)

    def classes(self, importance: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
        """Each token's step class, where `per_token`, from each position's share of the question's attention."""
        if not self.per_token:
            return None
        if importance is None:
            raise ValueError(f"layer {self.layer}: pca:...:e:iG needs the question's attention, which this "
                             "cache does not carry (prefill it query-aware, with the profile)")
        # over the whole range; a per-head selection keeps other tokens per head: their mean share
        return self.codec.classes(importance.to(positions.device)[positions].mean(0))

    def decodes_chunks(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a tier's chunks decode together on `device` (KVCodec.decode_chunks): a plain KVCodec's, with
        the kernels."""
        return not self.transformed and isinstance(self.codec, KVCodec) and self.codec.decodes_chunks(device, dtype)

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], positions: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.transformed:
            return self.codec.decode(payload, shape, dtype)
        if self.split_on(payload.device):
            return self.codec.decode_split(payload, shape, self.rope_tables(positions, payload.device), dtype)
        keys, values = self.codec.decode(payload, shape, torch.float32)
        if self.rotation is not None:
            keys, values = rotation.unrotate(keys, self.rotation), rotation.unrotate(values, self.rotation)
        if self.rope is not None:
            keys = self.rope.apply(self.layer, keys, positions, dtype)
        return keys.to(dtype), values.to(dtype)


def sized_chunks(raw: torch.Tensor, tokens: int, step: int, payloads: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(tokens, raw size, payload) of each chunk of `step` tokens of a raw payload of `tokens` tokens (a token's raw
    bytes are the same for every token)."""
    per = raw.numel() // tokens if tokens else 0
    return [(min(step, tokens - start), per * min(step, tokens - start), payload)
            for start, payload in zip(range(0, tokens, step), payloads)]
