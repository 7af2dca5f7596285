"""Entropy-coded transform coding (`pca:bB:w:e`): one quantizer step for every component, range-coded.

The fixed-rate pca stage gives each component a whole number of bits and a Gaussian's optimal
levels. With an entropy coder the better rule is simpler (entropy-coded scalar quantization): one
uniform step for every component of the stage, measured where the error costs the answer, so
Delta_j = Delta / sqrt(weight_j) with the basis's layer weights, and an index per coordinate

    q_j = sign(c_j) floor(|c_j| / Delta_j + ROUNDING),     c^_j = sign(q_j) (|q_j| + 1/2 - ROUNDING) Delta_j

(ROUNDING < 1/2 widens the zero bin: small coordinates cost almost nothing), decoded at the middle
of each bin. The answer's KL, unlike the squared error, punishes shrinking coordinates toward the
mean (attention flattens), so the bins' middles beat their centroids; on SmolLM2's tuning
questions ROUNDING 0.2 beat 0.35 and 0.5 at every rate (results/frontier/round6_*). A component of
small spread then costs a fraction of a bit, which a whole-bit allocation cannot give it, and a
strong one gets as many levels as it needs, with no clipping range to overflow.

The indices are range-coded (`constriction`) under a static model both nodes derive from the
basis: a Laplace distribution of the component's calibrated spread, quantized into the same
bins. Its scale in steps, s_j = std_j sqrt(weight_j) / (sqrt(2) Delta), is rounded to a grid
(TABLE_STEPS per octave) and each grid point has its own frequency table; a component whose
scale falls below the grid is dropped (its index would be 0 nearly always). Delta is chosen once,
from the basis alone, so that the model's expected rate over the stage's components is B bits
per element; the actual rate follows the data.

On the wire a chunk's raw payload is its indices, int16, (tokens, coded components) row-major;
the range coder, not zstd, compresses it (`compress`, `decompress`), and the receiver checks the
decoded size like any other.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from common.quant.base import QuantError
from common.quant.pca import Basis, TensorBasis, coordinates, synthesize

ROUNDING = 0.2  # |c| / Delta in [i - 0.2, i + 0.8) codes as i: the zero bin spans +-0.8 steps
TABLE_STEPS = 8  # model scales per octave
MIN_TABLE, MAX_TABLE = -32, 80  # scales 2^(-4) .. 2^10 steps; below: dropped; above: the top table
TAIL = 30  # a table spans +-ceil(TAIL * scale) indices (Laplace tail e^-30), the int16 range at most
INDEX_MAX = 2**15 - 1
FREQUENCY_BITS = 24  # probabilities are rounded to multiples of 2^-24 before the coder quantizes them


def expected_bits(scale: torch.Tensor) -> torch.Tensor:
    """The entropy of the index of a Laplace coordinate of `scale` steps, in bits (float64)."""
    zero = -torch.expm1(-(1 - ROUNDING) / scale)  # P(q = 0)
    ratio = torch.exp(-1 / scale)  # P(|q| > i | |q| >= i), i >= 1: the magnitude is geometric

    def binary(p):
        return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2)

    return binary(zero) + (1 - zero) * (1 + binary(ratio) / (1 - ratio))


@functools.cache
def table(index: int) -> tuple[constriction.stream.model.Categorical, int]:
    """The coder's model for scale 2^(index / TABLE_STEPS), and its largest index K (symbols are q + K).

    Built from two exponentials and exact IEEE products, rounded to 2^-FREQUENCY_BITS, so that
    both nodes build the same table.
    """
    scale = 2.0 ** (index // TABLE_STEPS) * 2.0 ** ((index % TABLE_STEPS) / TABLE_STEPS)
    top = min(INDEX_MAX, max(2, math.ceil(TAIL * scale)))
    zero = -math.expm1(-(1 - ROUNDING) / scale)
    ratio = math.exp(-1 / scale)
    magnitude = np.empty(top)  # P(|q| = i), i = 1 .. top
    magnitude[0] = (1 - zero) * (1 - ratio)
    magnitude[1:] = magnitude[0] * np.cumprod(np.full(top - 1, ratio))
    probabilities = np.concatenate([magnitude[::-1] / 2, [zero], magnitude / 2])
    frequencies = np.floor(probabilities * 2.0**FREQUENCY_BITS) + 1
    return constriction.stream.model.Categorical(frequencies / frequencies.sum(), perfect=False), top


def entropy_plan(basis: Basis, layers: tuple[int, ...], bits_per_element: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of `layers`: each of its 2D components' step (float32) and table (int64, -1 dropped),
    for `bits_per_element` expected over all of them; derived once per (layers, bits) from the basis."""
    def compute():
        std, weight = basis.pooled_weights(layers)
        spread = std * weight.sqrt() / math.sqrt(2)  # scale = spread / Delta
        spread = spread.clamp(min=1e-300)

        def rate(delta: float) -> float:
            return float(expected_bits(spread / delta).mean())

        low, high = 1e-30, float(spread.max()) * 1e3  # rate(low) is huge, rate(high) about 0
        for _ in range(200):  # bisection in log space, to float64's resolution
            middle = math.sqrt(low * high)
            low, high = (middle, high) if rate(middle) > bits_per_element else (low, middle)
            if high / low < 1 + 1e-12:
                break
        delta = high
        index = torch.round(torch.log2(spread / delta) * TABLE_STEPS).long()
        tables = torch.where(index < MIN_TABLE, -1, index.clamp(max=MAX_TABLE))
        steps = (delta / weight.sqrt()).float()
        width = std.numel() // len(layers)
        return {layer: (steps[i * width:(i + 1) * width], tables[i * width:(i + 1) * width])
                for i, layer in enumerate(layers)}
    return basis.cached(("entropy", layers, bits_per_element), compute)


@dataclass(frozen=True)
class EntropyPCACodec:
    """One layer's keys and values (1, kv_heads, tokens, head_dim) <-> range-coded indices in the basis."""

    keys: TensorBasis
    values: TensorBasis
    steps: torch.Tensor  # (2D,) float32: each component's step
    tables: torch.Tensor  # (2D,) int64: each component's model, -1 if dropped

    @classmethod
    def for_layer(cls, basis: Basis, layer: int, bits_per_element: float, pool: tuple[int, ...]) -> EntropyPCACodec:
        steps, tables = entropy_plan(basis, pool, bits_per_element)[layer]
        return cls(basis.keys[layer], basis.values[layer], steps, tables)

    @functools.cached_property
    def coded(self) -> torch.Tensor:
        """The indices of the components that travel."""
        return (self.tables >= 0).nonzero().flatten()

    @functools.cached_property
    def groups(self) -> list[tuple[int, np.ndarray]]:
        """(table, positions among the coded components) for each table in use, in table order."""
        used = self.tables[self.coded]
        return [(int(t), (used == t).nonzero().flatten().numpy()) for t in torch.unique(used)]

    @functools.cached_property
    def limits(self) -> torch.Tensor:
        """The largest index each coded component's table holds (float32)."""
        return torch.tensor([float(table(int(t))[1]) for t in self.tables[self.coded]])

    def payload_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return 2 * shape[2] * self.coded.numel()

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The raw payload: int16 indices, (tokens, coded components), as bytes."""
        device = keys.device
        coords = coordinates(keys, values, self.keys, self.values)[:, self.coded.to(device)]
        scaled = coords / self.steps[self.coded].to(device)
        indices = torch.sign(scaled) * torch.floor(scaled.abs() + ROUNDING)
        limits = self.limits.to(device)
        return torch.maximum(torch.minimum(indices, limits), -limits).to(torch.int16).view(torch.uint8).flatten()

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.numel() != self.payload_size(shape, dtype):
            raise QuantError(f"payload of {payload.numel()} bytes, expected {self.payload_size(shape, dtype)}")
        device = payload.device
        tokens = shape[2]
        indices = payload.view(torch.int16).view(tokens, self.coded.numel()).float()
        coords = torch.zeros(tokens, self.tables.numel(), device=device)
        values = indices + torch.sign(indices) * (0.5 - ROUNDING)  # each bin's midpoint
        coords[:, self.coded.to(device)] = values * self.steps[self.coded].to(device)
        return synthesize(coords, self.keys, self.values, shape, dtype)

    def compress(self, raw: bytes) -> bytes:
        """The range code of a raw payload (its indices within their tables' ranges, as `encode` leaves them)."""
        if not self.coded.numel():
            return b""
        indices = np.frombuffer(raw, dtype="<i2").reshape(-1, self.coded.numel())
        encoder = constriction.stream.queue.RangeEncoder()
        for index, positions in self.groups:
            model, top = table(index)
            symbols = indices[:, positions].astype(np.int32) + top
            encoder.encode(symbols.reshape(-1), model)
        return encoder.get_compressed().astype("<u4").tobytes()

    def decompress(self, blob: bytes, size: int) -> bytes:
        """The raw payload of `size` bytes a range code holds (ValueError if it cannot)."""
        width = self.coded.numel()
        if not width:
            if blob or size:
                raise ValueError(f"this layer codes no component, and the chunk holds {len(blob)} bytes for {size}")
            return b""
        if len(blob) % 4 or size % (2 * width):
            raise ValueError(f"a range code of {len(blob)} bytes for {size} raw bytes does not fit this stage")
        tokens = size // 2 // width
        indices = np.zeros((tokens, width), dtype="<i2")
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(blob, dtype="<u4").astype(np.uint32))
        for index, positions in self.groups:
            model, top = table(index)
            symbols = decoder.decode(model, tokens * positions.size).reshape(tokens, positions.size)
            indices[:, positions] = symbols - top
        return indices.tobytes()
