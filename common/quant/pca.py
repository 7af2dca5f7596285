"""Transform coding (KVTC): a per-model PCA basis, bits per component under a budget, uniform codes.

Each token's keys (RoPE removed) and values of one layer, all KV heads side by side, are a
vector x of D = kv_heads * head_dim numbers. The basis, fitted once on calibration data
(`kvwire calibrate --basis`), holds per layer and tensor the mean m, the principal directions
U (D x D, strongest first) and each component's standard deviation s. A token is coded as

    c = (x - m) U^-T         its coordinates in the basis (U^-T: the fp16-rounded U is not quite
                             orthogonal, and this makes the reconstruction exact at full precision)
    code_j = clamp(floor(c_j / step_j) + 2^(b_j - 1), 0, 2^b_j - 1)      for b_j > 0 bits
    x^ = m + U c^,  c^_j = (code_j - 2^(b_j - 1) + 1/2) step_j           (0 where b_j = 0)

with step_j = STEP[b_j] * s_j, the step of the optimal uniform quantizer of a Gaussian (Max,
1960). The bits b_j of a layer's D key components, and apart of its D value components (the two
have different scales), are allocated once, from the calibrated variances, to minimize the
expected squared error for a budget of bits per element: greedy on the gain s_j^2 (d(b) - d(b + 1)),
optimal because the gains fall with b.
A basis may also hold a weight per layer and tensor: the teacher-forced KL one unit of its
coordinate error costs the answer (`kvwire calibrate --basis --weights`). A weighted stage
(`pca:bB:w`) then allocates its bits over all the layers it codes at once, on the gains
weight * s_j^2 (d(b) - d(b + 1)): the layers and the tensor that move the answer most get more.
Components with zero bits are dropped. No parameters travel: both nodes derive the allocation
from the same basis, which the profile names by hash.

A weighted basis may also hold a joint transform per layer (`kvwire calibrate --basis --joint`): the
PCA of the layer's keys' and values' coordinates side by side, each scaled by the square root of its
layer weight, so that one unit of error in any joint coordinate costs the answer the same. Keys and
values are projections of the same hidden state and correlate; the separate bases cannot use that,
the joint one can (`pca:bB:w:e:j`, `common.quant.pca_entropy`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from common.quant import packing
from common.quant.base import QuantError, check_finite

MAX_BITS = 8
# The optimal uniform quantizer of a unit Gaussian with 2^b levels: its step and its mean squared error.
STEP = (0.0, 1.596, 0.9957, 0.5860, 0.3352, 0.1881, 0.1041, 0.0569, 0.0308)
DISTORTION = (1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.003490, 0.001035, 0.0003027, 0.0000876)
HASH_CHARS = 16


@dataclass(frozen=True)
class TensorBasis:
    """One layer's keys or values: mean (D,), directions (D, D) as columns, std (D,); float32."""

    mean: torch.Tensor
    directions: torch.Tensor
    std: torch.Tensor
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @functools.cached_property
    def analysis(self) -> torch.Tensor:
        """U^-T: coordinates of x - m in the basis are (x - m) @ analysis."""
        return torch.linalg.inv(self.directions.double()).T.float()

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, analysis, directions, std) on `device`, copied there once: codecs run per chunk."""
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(t.to(device) for t in (self.mean, self.analysis, self.directions, self.std))
        return self._on[key]


# What a basis keeps of the plans derived from it (bit allocations, entropy models), least recently
# used dropped first: a header may name any bits value, and each new one derives a new plan.
DERIVED_CACHE_BYTES = 16 << 20


def derived_nbytes(value) -> int:
    """The tensor bytes a derived plan holds (tensors inside dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(derived_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(derived_nbytes(v) for v in value)
    return 0


class Basis:
    """A model's PCA basis, per layer, for keys (RoPE removed) and values."""

    def __init__(self, keys: list[TensorBasis], values: list[TensorBasis], digest: str, metadata: dict,
                 weights: torch.Tensor | None = None, joint: list[TensorBasis] | None = None):
        self.keys, self.values, self.digest, self.metadata = keys, values, digest, metadata
        self.weights = weights  # (layers, 2): the KL per unit of coordinate error of keys and values, or None
        self.joint = joint  # per layer, over the weighted coordinates of keys and values side by side, or None
        self._derived: OrderedDict = OrderedDict()  # key -> (plan, its bytes), least recently used first
        self._derived_bytes = 0
        self._derived_lock = threading.Lock()  # the receiver derives plans in worker threads

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @staticmethod
    def fit(keys: list[torch.Tensor], values: list[torch.Tensor], key_metrics: list[torch.Tensor] | None = None,
            value_metrics: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per layer, (tokens, D) samples of keys and values -> the tensors `save` writes.

        Metrics (per layer, D x D, positive definite; default the identity) weigh the error: the basis
        then minimizes (x - x^)^T M (x - x^) instead of the squared error. With S = M^(1/2) it is the
        PCA of (x - m) S, whose directions V map back as U = S^-1 V; the codec's analysis, U^-T = S V,
        takes a token straight to its coordinates.
        """
        tensors = {}
        for name, samples, metrics in (("keys", keys, key_metrics), ("values", values, value_metrics)):
            for layer, x in enumerate(samples):
                x = x.double()
                mean = x.mean(0)
                centred = x - mean
                inverse = None
                if metrics is not None:
                    w, q = torch.linalg.eigh(metrics[layer].double())
                    if not (w > 0).all():
                        raise ValueError(f"{name} metric of layer {layer} is not positive definite")
                    centred = centred @ ((q * w.sqrt()) @ q.T)  # (x - m) S
                    inverse = (q / w.sqrt()) @ q.T  # S^-1
                vectors, std = principal(centred)
                tensors[f"{name}.{layer}.mean"] = mean.float()
                tensors[f"{name}.{layer}.directions"] = (vectors if inverse is None else inverse @ vectors).to(torch.float16)
                tensors[f"{name}.{layer}.std"] = std
        return tensors

    def scale(self, layer: int) -> torch.Tensor:
        """(2D,) float32: the square root of `layer`'s weights, over its keys' coordinates, then its values'."""
        width = self.keys[layer].std.numel()
        return self.weights[layer].sqrt().float().repeat_interleave(width)

    def fit_joint(self, coordinates: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per layer, (tokens, 2D) samples of the coordinates in this basis -> the joint transform's tensors
        (`save` adds them to the basis's own): the PCA of the coordinates scaled by `scale`."""
        if self.weights is None:
            raise ValueError(f"basis {self.digest} holds no layer weights, which the joint transform is scaled by")
        tensors = {}
        for layer, c in enumerate(coordinates):
            x = c.double() * self.scale(layer).double()
            mean = x.mean(0)
            vectors, std = principal(x - mean)
            tensors[f"joint.{layer}.mean"] = mean.float()
            tensors[f"joint.{layer}.directions"] = vectors.to(torch.float16)
            tensors[f"joint.{layer}.std"] = std
        return tensors

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of this basis as `save` writes them (to add a joint transform to it)."""
        out = {}
        for name, parts in (("keys", self.keys), ("values", self.values), ("joint", self.joint or [])):
            for layer, part in enumerate(parts):
                out[f"{name}.{layer}.mean"] = part.mean
                out[f"{name}.{layer}.directions"] = part.directions.to(torch.float16)
                out[f"{name}.{layer}.std"] = part.std
        if self.weights is not None:
            for layer, (key_weight, value_weight) in enumerate(self.weights.tolist()):
                out[f"keys.{layer}.weight"] = torch.tensor([key_weight])
                out[f"values.{layer}.weight"] = torch.tensor([value_weight])
        return out

    @staticmethod
    def serialize(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
        """The file's bytes: the fitted tensors, and the metadata as JSON strings."""
        return save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: json.dumps(v) for k, v in metadata.items()})

    @staticmethod
    def save(tensors: dict[str, torch.Tensor], metadata: dict, path: Path) -> Basis:
        """Write the fitted tensors (and metadata) to `path`; the basis as a node will load it."""
        raw = Basis.serialize(tensors, metadata)
        Path(path).write_bytes(raw)
        return Basis.from_bytes(raw, str(path))

    @classmethod
    def load(cls, path: Path) -> Basis:
        return cls.from_bytes(Path(path).read_bytes(), str(path))

    @classmethod
    def from_bytes(cls, raw: bytes, name: str = "basis") -> Basis:
        """The basis in a safetensors file's bytes (`name` for errors); its digest is theirs."""
        digest = hashlib.sha256(raw).hexdigest()[:HASH_CHARS]
        tensors = load_bytes(raw)
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # safetensors: u64 length, JSON header
        metadata = {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
        layers = len({k.split(".")[1] for k in tensors if k.startswith("keys.")})

        def part(name: str, layer: int) -> TensorBasis:
            return TensorBasis(tensors[f"{name}.{layer}.mean"].float(), tensors[f"{name}.{layer}.directions"].float(),
                               tensors[f"{name}.{layer}.std"].float())

        weights = None
        names = [f"{name}.{layer}.weight" for layer in range(layers) for name in ("keys", "values")]
        if any(n in tensors for n in names):
            if not all(n in tensors and tensors[n].numel() == 1 for n in names):
                raise ValueError(f"{name}: layer weights must be one number per layer for keys and for values")
            weights = torch.cat([tensors[n].double().flatten() for n in names]).view(layers, 2)
            if not (torch.isfinite(weights).all() and (weights > 0).all()):
                raise ValueError(f"{name}: layer weights must be positive and finite")
        joint = None
        if any(k.startswith("joint.") for k in tensors):
            if weights is None:
                raise ValueError(f"{name}: a joint transform needs the layer weights it is scaled by")
            width = 2 * tensors["keys.0.std"].numel()
            if not all(f"joint.{i}.{t}" in tensors for i in range(layers) for t in ("mean", "directions", "std")):
                raise ValueError(f"{name}: the joint transform must have a mean, directions and std for every layer")
            joint = [part("joint", i) for i in range(layers)]
            if any(j.directions.shape != (width, width) or j.mean.shape != (width,) or j.std.shape != (width,) for j in joint):
                raise ValueError(f"{name}: a joint transform's directions must be {width} x {width}, its mean and std {width} long")
        return cls([part("keys", i) for i in range(layers)], [part("values", i) for i in range(layers)], digest,
                   metadata, weights, joint)

    def cached(self, key, compute, limit_bytes: int | None = None):
        """compute(), kept per `key`: what both nodes derive from the basis (allocations, entropy models).
        At most `limit_bytes` (default DERIVED_CACHE_BYTES) are kept, least recently used dropped first."""
        limit_bytes = DERIVED_CACHE_BYTES if limit_bytes is None else limit_bytes
        with self._derived_lock:
            if key in self._derived:
                self._derived.move_to_end(key)
                return self._derived[key][0]
        value = compute()
        size = derived_nbytes(value)
        with self._derived_lock:
            if key not in self._derived:
                self._derived[key] = (value, size)
                self._derived_bytes += size
            while self._derived_bytes > limit_bytes and len(self._derived) > 1:
                _, (_, dropped) = self._derived.popitem(last=False)
                self._derived_bytes -= dropped
        return value

    def pooled_weights(self, layers: tuple[int, ...], joint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The std and the layer weight of every component of `layers`, keys' then values' per layer, float64;
        `joint`: of the joint transform's components, whose weights are 1 (they are scaled by them)."""
        if self.weights is None:
            raise ValueError(f"basis {self.digest} holds no layer weights (fit them with kvwire calibrate --basis --weights)")
        if joint:
            if self.joint is None:
                raise ValueError(f"basis {self.digest} holds no joint transform (fit one with kvwire calibrate --basis --joint)")
            std = torch.cat([self.joint[i].std for i in layers]).double()
            return std, torch.ones_like(std)
        std = torch.cat([torch.cat([self.keys[i].std, self.values[i].std]) for i in layers]).double()
        width = std.numel() // len(layers) // 2
        weight = torch.cat([self.weights[i].repeat_interleave(width) for i in layers])
        return std, weight

    def pooled_bits(self, layers: tuple[int, ...], bits_per_element: float) -> dict[int, torch.Tensor]:
        """Per layer of `layers`, the bits of its 2D components (keys', then values'), allocated over all of
        them at once on the weighted gains, `bits_per_element` on average; computed once per (layers, bits)."""
        def compute():
            std, weight = self.pooled_weights(layers)
            return dict(zip(layers, allocate(std, bits_per_element, weight).view(len(layers), -1)))
        return self.cached(("bits", layers, bits_per_element), compute)

def principal(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred samples (tokens, D), float64 -> the principal directions as columns, strongest first
    (float64), and each one's standard deviation (float32)."""
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / max(1, centred.shape[0] - 1))
    order = eigenvalues.argsort(descending=True)
    return vectors[:, order], eigenvalues[order].clamp(min=0).sqrt().float()


def allocate(std: torch.Tensor, bits_per_element: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bits per component (int64, each 0..MAX_BITS) for components of standard deviation `std`,
    `bits_per_element` on average, minimizing the expected squared error (each component's weighted
    by `weight`, if given)."""
    std = std.double().cpu()
    gains = torch.tensor([DISTORTION[b] - DISTORTION[b + 1] for b in range(MAX_BITS)], dtype=torch.float64)
    variance = std.square() if weight is None else std.square() * weight.double().cpu()
    table = variance.unsqueeze(1) * gains  # (components, MAX_BITS): the gain of each next bit
    total = min(int(bits_per_element * std.numel()), MAX_BITS * std.numel())
    # Gains fall with b for every component, so the best `total` bits are the `total` largest gains;
    # a stable sort breaks ties by index, the same on every machine.
    order = torch.sort(-table.reshape(-1), stable=True).indices[:total]
    return torch.bincount(order // MAX_BITS, minlength=std.numel())


@dataclass(frozen=True)
class PCACodec:
    """One layer's keys and values (1, kv_heads, tokens, head_dim) <-> codes in the basis."""

    keys: TensorBasis
    values: TensorBasis
    bits: torch.Tensor  # (2D,) bits per component: the keys' D, then the values'

    @classmethod
    def for_layer(cls, basis: Basis, layer: int, bits_per_element: float, key_bits: float | None = None,
                  pool: tuple[int, ...] | None = None) -> PCACodec:
        """`bits_per_element` on average over keys and values; the keys get `key_bits` of it
        (default: the same), the values the rest. Keys and values have their own scales, so
        each tensor's bits are allocated over its own components. With a `pool` of layers
        (weighted), the bits are allocated over all of the pool's components, by their weights."""
        keys, values = basis.keys[layer], basis.values[layer]
        if pool is not None:
            return cls(keys, values, basis.pooled_bits(pool, bits_per_element)[layer])
        key_bits = bits_per_element if key_bits is None else key_bits
        return cls(keys, values, torch.cat([allocate(keys.std, key_bits), allocate(values.std, 2 * bits_per_element - key_bits)]))

    def widths(self) -> list[tuple[int, torch.Tensor]]:
        """(bits, component indices) for each width in use, keys' and values' components together."""
        return [(b, (self.bits == b).nonzero().flatten()) for b in range(1, MAX_BITS + 1) if (self.bits == b).any()]

    def payload_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        tokens = shape[2]
        return sum(packing.packed_size(tokens * idx.numel(), b) for b, idx in self.widths())

    def _steps(self, device) -> torch.Tensor:
        std = torch.cat([self.keys.on(device)[3], self.values.on(device)[3]])
        return torch.tensor(STEP, device=device)[self.bits.to(device)] * std

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        coords = coordinates(keys, values, self.keys, self.values)  # (tokens, 2D)
        steps = self._steps(keys.device)
        pieces = []
        for b, idx in self.widths():
            idx = idx.to(keys.device)
            codes = torch.floor(coords[:, idx] / steps[idx]) + 2 ** (b - 1)
            pieces.append(packing.pack(codes.clamp(0, 2**b - 1).to(torch.uint8), b))
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8, device=keys.device)

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.numel() != self.payload_size(shape, dtype):
            raise QuantError(f"payload of {payload.numel()} bytes, expected {self.payload_size(shape, dtype)}")
        tokens = shape[2]
        device = payload.device
        steps = self._steps(device)
        coords = torch.zeros(tokens, self.bits.numel(), device=device)
        offset = 0
        for b, idx in self.widths():
            size = packing.packed_size(tokens * idx.numel(), b)
            codes = packing.unpack(payload[offset:offset + size], b, tokens * idx.numel()).view(tokens, idx.numel())
            idx = idx.to(device)
            coords[:, idx] = (codes.float() - 2 ** (b - 1) + 0.5) * steps[idx]
            offset += size
        return synthesize(coords, self.keys, self.values, shape, dtype)


def coordinates(keys: torch.Tensor, values: torch.Tensor, key_basis: TensorBasis, value_basis: TensorBasis) -> torch.Tensor:
    """keys, values (1, kv_heads, tokens, head_dim) -> each token's coordinates (tokens, 2D), keys' then values'."""
    _, heads, tokens, dim = keys.shape
    check_finite(keys, limit=None)
    check_finite(values, limit=None)
    coords = []
    for part, basis in ((keys, key_basis), (values, value_basis)):
        mean, analysis, _, _ = basis.on(keys.device)
        coords.append((part[0].float().transpose(0, 1).reshape(tokens, heads * dim) - mean) @ analysis)
    return torch.cat(coords, dim=1)


def synthesize(coords: torch.Tensor, key_basis: TensorBasis, value_basis: TensorBasis, shape: tuple[int, ...],
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (tokens, 2D) -> keys, values of `shape` (1, kv_heads, tokens, head_dim) in `dtype`."""
    _, heads, tokens, dim = shape
    width = heads * dim
    out = []
    for part, basis in ((coords[:, :width], key_basis), (coords[:, width:], value_basis)):
        mean, _, directions, _ = basis.on(coords.device)
        x = mean + part @ directions.T
        out.append(x.reshape(tokens, heads, dim).transpose(0, 1).unsqueeze(0).to(dtype))
    return out[0], out[1]
