"""Entropy-coded transform coding (`pca:bB:w:e`): one quantizer step for every component, range-coded.

The fixed-rate pca stage gives each component a whole number of bits and a Gaussian's optimal
levels. With an entropy coder the better rule is simpler (entropy-coded scalar quantization): one
uniform step for every component of the stage, measured where the error costs the answer, so
Delta_j = Delta / sqrt(weight_j) with the basis's layer weights, and an index per coordinate

    q_j = sign(c_j) floor(|c_j| / Delta_j + ROUNDING),     c^_j = sign(q_j) (|q_j| + 1/2 - ROUNDING) Delta_j

(ROUNDING < 1/2 widens the zero bin: small coordinates cost almost nothing), decoded at the middle
of each bin. The answer's KL, unlike the squared error, punishes shrinking coordinates toward the
mean (attention flattens), so the bins' middles beat their lower edges; ROUNDING 0.2 matched or
beat 0.35 and 0.5 on SmolLM2's tuning questions (results/frontier/round6_dropbug_scan_*, measured
while components under one step were wrongly dropped). A component of small spread then costs a
fraction of a bit, which a whole-bit allocation cannot give it, and a strong one gets as many levels
as it needs (clipped only beyond +-30,720 steps: B above about 5 in the joint transform, where a
high-class token's step is finer still; on 6 SmolLM2 prompts none of 17M indices clipped at
`pca:b3.05:w:e:j:i1:f3`, 81 at `pca:b5.5:w:e:j:i1`).

Per-token steps (`pca:bB:w:e:iG`): the question's attention says which tokens the answer reads. The
sender's prefill measures each position's share a of it per layer (`KVState.importance`); a token
of class c = round(G log2(a / mean a)) (-F .. MAX_CLASS, F from `:fF`, default MAX_CLASS) is stepped
2^(-c/2) finer, its indices coded under the model half an octave wider per class, and the classes
travel after the indices. Classes are taken against the mean share, so most are negative: B no
longer predicts the rate (a `pca:b1.75:w:e:i1:f3+text` transfer is about 1 bit per element, 6% of
fp16); the planner's table has the bytes. The floor exists because the later answer tokens read
context the question barely did: coarsening it without bound costs them (README, round 7).

Joint keys and values (`pca:bB:w:e:j`): the components are the basis's joint transform's (PCA of a
layer's key and value coordinates side by side, each scaled by the square root of its layer weight;
`common.quant.pca`), whose weights are then all 1; everything else is the same. Keys and values are
two projections of one hidden state, and the separate bases leave their correlation to be paid twice.

The indices are range-coded (`constriction`) under a static model both nodes derive from the
basis: a Laplace distribution of the component's calibrated spread, quantized into the same
bins. Its scale in steps, s_j = std_j sqrt(weight_j) / (sqrt(2) Delta), is rounded to a grid
(TABLE_STEPS per octave) and each grid point has its own frequency table; a component whose
scale falls below the grid is dropped (its index would be 0 nearly always). Delta is chosen once,
from the basis alone, so that the model's expected rate over the stage's components is B bits
per element; the actual rate follows the data.

On the wire a chunk's raw payload is its indices, int16, (tokens, coded components) row-major, then
the tokens' classes (int8) with `iG`; the range coder, not zstd, compresses it (`compress`,
`decompress`), and the receiver checks the decoded size like any other. A code no encoder could
write is a ValueError (DATA_LOSS on the wire); one cut short may decode to wrong indices, which the
trailer's byte count then catches. Data far off the model could code to more than the raw size; a
chunk over MAX_CHUNK_BYTES is refused at the sender.

Both nodes derive the steps and tables from the basis in float64 on the CPU; a table index is a
rounded log2, so two machines whose exp/log2 differ in the last bit could disagree only for a scale
within one ulp of a rounding boundary. Nothing checks for that.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from common.quant import pca_fused, rans
from common.quant.base import NOT_FINITE, QuantError, check_finite
from common.quant.pca import Basis, TensorBasis, coordinates, synthesize
from common.settings import get_settings

ROUNDING = 0.2  # |c| / Delta in [i - 0.2, i + 0.8) codes as i: the zero bin spans +-0.8 steps
TABLE_STEPS = 8  # model scales per octave
MIN_TABLE, MAX_TABLE = -32, 80  # scales 2^(-4) .. 2^10 steps; below: dropped; above: the top table
DROPPED = MIN_TABLE - 1  # the table of a component that does not travel
TAIL = 30  # a table spans +-ceil(TAIL * scale) indices (Laplace tail e^-30), the int16 range at most
INDEX_MAX = 2**15 - 1
FREQUENCY_BITS = 24  # probabilities are rounded to multiples of 2^-24 before the coder quantizes them
MAX_STRENGTH = 4.0  # pca:...:e:iG, G at most 4
MAX_CLASS = 8  # a token's step class c in -8 .. 8: its step is 2^(-c/2) times the component's
CLASS_TABLES = TABLE_STEPS // 2  # half a bit finer: the model of a scale half an octave larger
FOLDED_KEPT = 4  # pca:...:a: folded transforms kept per layer and device (EntropyPCACodec.folded)
FOLDED_LOCK = threading.Lock()
# pca:...:a on a GPU: the split path (common.quant.pca_fused: fused passes, the GEMMs on bf16 tensor cores with each
# float32 operand in bf16 parts; on an H100 a 32K-token cache's stage takes 136 ms of GPU time to encode and 168 ms to
# decode, against 403 and 340 ms with torch's float32 GEMM and elementwise passes, docs/gpu.md): the setting
# split_gemm (KVWIRE_SPLIT_GEMM, on by default), unless SPLIT_GEMM overrides it (deploy/gpu/profile_wire.py compares
# the two in one process).
SPLIT_GEMM: bool | None = None
# a token's step is its component's times 2^(-c/2), c its class: from float64, so every device has the same factors
CLASS_SCALE = torch.tensor([2.0 ** (-c / 2) for c in range(-MAX_CLASS, MAX_CLASS + 1)], dtype=torch.float32)


@functools.cache
def split_gemm(device: torch.device) -> bool:
    """Whether `device` runs bf16 GEMMs of float32 output (CUDA, torch with mm's out_dtype)."""
    if device.type != "cuda":
        return False
    try:
        ones = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        torch.mm(ones, ones, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def tensor_core_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y of bf16 operands, float32 output (the split path's GEMM on a GPU)."""
    return torch.mm(x, y, out_dtype=torch.float32)


def split_here(device: torch.device) -> bool:
    """Whether pca:...:a takes the split path on `device` (pca_fused): SPLIT_GEMM (else the setting split_gemm),
    where split_gemm. Elsewhere torch's float32 GEMM."""
    wanted = split_setting() if SPLIT_GEMM is None else SPLIT_GEMM
    return wanted and split_gemm(device)


@functools.cache
def split_setting() -> bool:
    """The setting split_gemm (KVWIRE_SPLIT_GEMM), read once."""
    return get_settings().split_gemm


@functools.cache
def class_scale_on(device: torch.device) -> torch.Tensor:
    return CLASS_SCALE.to(device)


def expected_bits(scale: torch.Tensor) -> torch.Tensor:
    """The entropy of the index of a Laplace coordinate of `scale` steps, in bits (float64)."""
    zero = -torch.expm1(-(1 - ROUNDING) / scale)  # P(q = 0)
    ratio = torch.exp(-1 / scale)  # P(|q| > i | |q| >= i), i >= 1: the magnitude is geometric

    def binary(p):
        return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2)

    return binary(zero) + (1 - zero) * (1 + binary(ratio) / (1 - ratio))


def laplace(index: int) -> tuple[np.ndarray, int]:
    """The probabilities of the indices -K .. K under table `index` (scale 2^(index / TABLE_STEPS)
    steps), and K: from two exponentials and exact IEEE products, so that both nodes build the same."""
    scale = 2.0 ** (index // TABLE_STEPS) * 2.0 ** ((index % TABLE_STEPS) / TABLE_STEPS)
    top = min(INDEX_MAX, max(2, math.ceil(TAIL * scale)))
    zero = -math.expm1(-(1 - ROUNDING) / scale)
    ratio = math.exp(-1 / scale)
    magnitude = np.empty(top)  # P(|q| = i), i = 1 .. top
    magnitude[0] = (1 - zero) * (1 - ratio)
    magnitude[1:] = magnitude[0] * np.cumprod(np.full(top - 1, ratio))
    return np.concatenate([magnitude[::-1] / 2, [zero], magnitude / 2]), top


@functools.cache
def table(index: int) -> tuple[constriction.stream.model.Categorical, int]:
    """The range coder's model for table `index`, rounded to 2^-FREQUENCY_BITS, and its largest index K
    (symbols are q + K)."""
    probabilities, top = laplace(index)
    frequencies = np.floor(probabilities * 2.0**FREQUENCY_BITS) + 1
    return constriction.stream.model.Categorical(frequencies / frequencies.sum(), perfect=False), top


LIMITS = torch.tensor([float(table(index)[1]) for index in range(MIN_TABLE, MAX_TABLE + 1)])  # K of each table


@functools.cache
def limits_on(device: torch.device) -> torch.Tensor:
    return LIMITS.to(device)


@functools.cache
def rans_models(device: torch.device) -> rans.Models:
    """Every table's quantized rANS model (pca:...:a), on `device` (built once per process)."""
    if device.type != "cpu":
        return rans_models(torch.device("cpu")).to(device)
    return rans.Models.build([laplace(index) for index in range(MIN_TABLE, MAX_TABLE + 1)])


def rans_coder(device: torch.device):
    """The rANS implementation for tensors on `device`: the kernels on CUDA (unless KVWIRE_KERNELS=torch),
    the torch reference elsewhere."""
    from common.quant import kernels

    if device.type == "cuda" and kernels.mode() != "torch" and kernels.triton_available():
        from common.quant import rans_triton
        return rans_triton
    return rans
CLASS_MODEL = constriction.stream.model.Categorical(np.full(2 * MAX_CLASS + 1, 1 / (2 * MAX_CLASS + 1)), perfect=False)


def entropy_plan(basis: Basis, layers: tuple[int, ...], bits_per_element: float,
                 joint: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer of `layers`: each of its 2D components' step (float32) and table (int64, DROPPED if it does not travel),
    for `bits_per_element` expected over all of them (`joint`: the joint transform's components); derived once per
    (layers, bits, joint) from the basis."""
    def compute():
        std, weight = basis.pooled_weights(layers, joint)
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
        tables = torch.where(index < MIN_TABLE, DROPPED, index.clamp(max=MAX_TABLE))
        steps = (delta / weight.sqrt()).float()
        width = std.numel() // len(layers)
        return {layer: (steps[i * width:(i + 1) * width], tables[i * width:(i + 1) * width])
                for i, layer in enumerate(layers)}
    return basis.cached(("entropy", layers, bits_per_element, joint), compute)


@dataclass(frozen=True)
class EntropyPCACodec:
    """One layer's keys and values (1, kv_heads, tokens, head_dim) <-> range-coded indices in the basis.

    With an importance `strength` G > 0 each token has its own step: its class c = round(G log2(a /
    mean a)) from its share a of the question's attention (an int8 that travels after the indices)
    makes it 2^(-c/2) times the component's.
    """

    keys: TensorBasis
    values: TensorBasis
    steps: torch.Tensor  # (2D,) float32: each component's step
    tables: torch.Tensor  # (2D,) int64: each component's model, DROPPED if it does not travel
    strength: float = 0.0  # G: how far the question's attention moves a token's step (0: not at all)
    floor: int = MAX_CLASS  # F: the lowest class, -F (no token's step is more than 2^(F/2) times the component's)
    joint: TensorBasis | None = None  # the layer's joint transform (pca:...:j): steps and tables are its components'
    scale: torch.Tensor | None = None  # (2D,) with joint: the square roots of the layer weights it is scaled by
    rans: bool = False  # pca:...:a: coded by common.quant.rans where the indices are, not by the range coder

    @classmethod
    def for_layer(cls, basis: Basis, layer: int, bits_per_element: float, pool: tuple[int, ...],
                  strength: float = 0.0, floor: int = MAX_CLASS, joint: bool = False,
                  rans: bool = False) -> EntropyPCACodec:
        steps, tables = entropy_plan(basis, pool, bits_per_element, joint)[layer]
        if joint:
            return cls(basis.keys[layer], basis.values[layer], steps, tables, strength, floor, basis.joint[layer],
                       basis.scale(layer), rans)
        return cls(basis.keys[layer], basis.values[layer], steps, tables, strength, floor, rans=rans)

    def _analyse(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Each token's coordinates (tokens, 2D): in the basis, or with `joint` in the joint transform."""
        coords = coordinates(keys, values, self.keys, self.values)
        if self.joint is None:
            return coords
        mean, analysis, _, _ = self.joint.on(keys.device)
        return (coords * self.scale.to(keys.device) - mean) @ analysis

    def _synthesize(self, coords: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.joint is not None:
            mean, _, directions, _ = self.joint.on(coords.device)
            coords = (mean + coords @ directions.T) / self.scale.to(coords.device)
        return synthesize(coords, self.keys, self.values, shape, dtype)

    @functools.cached_property
    def coded(self) -> torch.Tensor:
        """The indices of the components that travel."""
        return (self.tables != DROPPED).nonzero().flatten()

    @property
    def per_token(self) -> bool:
        """Whether tokens carry their own step class (and the payload ends with them)."""
        return self.strength > 0 and self.coded.numel() > 0

    @functools.cached_property
    def expected_token_bytes(self) -> float:
        """A token's payload in bytes as the tables expect it at class 0 (the model's rate, and its class byte)."""
        scales = torch.exp2(self.tables[self.coded].double() / TABLE_STEPS)
        return float(expected_bits(scales).sum()) / 8 + self.per_token

    def classes(self, importance: torch.Tensor) -> torch.Tensor:
        """Each token's step class (int8) from its share of the question's attention (tokens,)."""
        share = importance.double().clamp(min=0)
        share = share.clamp(min=1e-6 * share.mean() + 1e-30)  # a tensor bound: no wait for the device
        extra = self.strength / 2 * torch.log2(share / share.mean())
        return (2 * extra).round().clamp(-self.floor, MAX_CLASS).to(torch.int8)

    @functools.cached_property
    def models(self) -> torch.Tensor:
        """(coded,) int64: each coded component's table, counted from MIN_TABLE (the rANS coder's model)."""
        return self.tables[self.coded] - MIN_TABLE

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(steps, models) of the coded components on `device`, float32 and int64: kept with the layer's basis under
        their values (two stages of the same components step differently), so that a transfer finds the last one's,
        and copied without waiting for the device's queued work."""
        steps, models = self._coded_steps
        return self._kept(("on", str(device), self._steps_digest),
                          lambda: (rans.to_device([steps], np.float32, device), rans.to_device([models], np.int64, device)))

    @functools.cached_property
    def _coded_steps(self) -> tuple[np.ndarray, np.ndarray]:
        return self.steps[self.coded].numpy(), self.models.numpy()

    @functools.cached_property
    def _steps_digest(self) -> tuple[int, int]:
        return tuple(hash(a.tobytes()) for a in self._coded_steps)

    @functools.cached_property
    def _coded_digest(self) -> int:
        return hash(self.coded.numpy().tobytes())

    def models_of(self, classes: torch.Tensor | None, tokens: int, device: torch.device) -> torch.Tensor:
        """(tokens, coded) int16 on `device`: the model of each index (its table from MIN_TABLE), the component's
        moved by the token's class."""
        base = self.on(device)[1].to(torch.int16)
        if classes is None:
            return base.expand(tokens, -1)
        moved = (CLASS_TABLES * classes.to(device=device, dtype=torch.int16))[:, None] + base[None, :]
        return moved.clamp_(0, MAX_TABLE - MIN_TABLE)

    def _tables(self, classes: np.ndarray) -> np.ndarray:
        """(tokens, coded) the model of each index: the component's, moved by the token's class."""
        return np.clip(self.tables[self.coded].numpy()[None, :] + CLASS_TABLES * classes[:, None].astype(np.int64),
                       MIN_TABLE, MAX_TABLE)

    def payload_size(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return shape[2] * (2 * self.coded.numel() + self.per_token)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """The raw payload: the int16 indices (tokens, coded components), then the tokens' classes
        (int8, with a strength), as bytes."""
        if self.per_token and classes is None:
            raise QuantError("this stage steps each token by the question's attention, and none was given")
        device = keys.device
        coords = self._folded_analysis(keys, values) if self.rans else self._analyse(keys, values)[:, self.coded.to(device)]
        zero = torch.zeros(coords.shape[1], device=device)  # the coordinates are centred already
        return self._indices(coords, zero, classes, torch.zeros(1, dtype=torch.int32, device=device))  # checked above

    def _indices(self, coords: torch.Tensor, bias: torch.Tensor, classes: torch.Tensor | None,
                 flag: torch.Tensor) -> torch.Tensor:
        """The raw payload of the coordinates `coords` (tokens, coded) less `bias`: their int16 indices
        (pca_fused.quantize), then the tokens' classes (int8) where `per_token`."""
        device = coords.device
        tokens, coded = coords.shape[0], self.coded.numel()
        raw = torch.empty(tokens * (2 * coded + self.per_token), dtype=torch.uint8, device=device)
        if self.per_token:
            classes = classes.to(device=device, dtype=torch.int8)
            raw[2 * coded * tokens:] = classes.view(torch.uint8)
        steps, models = self.on(device)
        pca_fused.quantize(coords, bias, steps, classes if self.per_token else None, models, class_scale_on(device),
                           limits_on(device), ROUNDING, CLASS_TABLES, MAX_TABLE - MIN_TABLE,
                           raw[:2 * coded * tokens].view(torch.int16).view(tokens, coded), flag)
        return raw

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if payload.numel() != self.payload_size(shape, dtype):
            raise QuantError(f"payload of {payload.numel()} bytes, expected {self.payload_size(shape, dtype)}")
        device = payload.device
        tokens = shape[2]
        classes = None
        if self.per_token:
            classes = payload[-tokens:].view(torch.int8)
            if (classes.int().abs() > MAX_CLASS).any():
                raise QuantError(f"a token class outside +-{MAX_CLASS}")
            payload = payload[:-tokens]
        indices = payload.view(torch.int16).view(tokens, self.coded.numel())
        middles = pca_fused.bin_middles(indices, classes, self.on(device)[0], class_scale_on(device), 0.5 - ROUNDING)
        if self.rans:
            return self._folded_synthesis(middles, shape, dtype)
        coords = torch.zeros(tokens, self.tables.numel(), device=device)
        coords[:, self.coded.to(device)] = middles
        return self._synthesize(coords, shape, dtype)

    def folded(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """pca:...:a: the transforms as one matrix each way, over the coded components only, on `device`:
        (analysis (2D, coded), bias (coded,), synthesis (coded, 2D), mean (2D,)), so that a token's coded
        coordinates are x @ analysis - bias and its reconstruction c @ synthesis + mean, x its keys' then
        values' elements. The maps of `_analyse` and `_synthesize` in fewer products (float64 on `device`,
        rounded to float32): the reconstruction matches theirs to float32 rounding, not bit for bit.
        Kept with the layer's key basis, FOLDED_KEPT of them per layer (a header may name any bits)."""
        def fold():
            def on(t):
                return t.to(device=device, dtype=torch.float64)

            analysis = torch.block_diag(on(self.keys.analysis), on(self.values.analysis))
            directions = torch.block_diag(on(self.keys.directions), on(self.values.directions)).T
            mean = torch.cat([on(self.keys.mean), on(self.values.mean)])
            bias = mean @ analysis
            if self.joint is not None:
                scale, joint_mean = on(self.scale), on(self.joint.mean)
                joint_analysis = on(self.joint.analysis)
                analysis = (analysis * scale) @ joint_analysis
                bias = (bias * scale + joint_mean) @ joint_analysis
                mean = mean + (joint_mean / scale) @ directions
                directions = (on(self.joint.directions).T / scale) @ directions
            coded = self.coded.to(device)
            return (analysis[:, coded].float().contiguous(), bias[coded].float(),
                    directions[coded].float().contiguous(), mean.float())
        return self._kept(("folded", str(device)), fold)

    def split_analysis(self, device: torch.device, keys_exact: bool, values_exact: bool) -> torch.Tensor:
        """The split path's analysis (pca_fused): the folded one stacked in the bf16 parts that pair with the
        operand's, keys then values (`*_exact`: that tensor is one bf16 part)."""
        def stack():
            analysis = self.folded(device)[0]
            width = analysis.shape[0] // 2
            return torch.cat([pca_fused.stacked(analysis[:width], keys_exact),
                              pca_fused.stacked(analysis[width:], values_exact)])
        return self._kept(("analysis", str(device), keys_exact, values_exact), stack)

    def split_synthesis(self, device: torch.device) -> torch.Tensor:
        """The split path's synthesis: the folded one stacked to pair with dequantize's [high, high, low]."""
        return self._kept(("synthesis", str(device)), lambda: pca_fused.stacked(self.folded(device)[2], False))

    def _kept(self, key: tuple, compute):
        """compute(), kept with the layer's key basis under (kind, ...) = `key`, FOLDED_KEPT of a kind per layer (a
        header may name any bits) and coded components."""
        key = (key[0], self.joint is not None, self._coded_digest, *key[1:])
        kept = self.keys._on
        with FOLDED_LOCK:
            if key in kept:
                kept[key] = kept.pop(key)  # most recently used last
                return kept[key]
        value = compute()
        with FOLDED_LOCK:
            kept[key] = value
            mine = [k for k in kept if isinstance(k, tuple) and k[0] == key[0]]
            for old in mine[:-FOLDED_KEPT]:
                del kept[old]
        return value

    def _folded_analysis(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        _, heads, tokens, dim = keys.shape
        check_finite(keys, limit=None)
        check_finite(values, limit=None)
        analysis, bias, _, _ = self.folded(keys.device)
        width = heads * dim
        flat = [part[0].transpose(0, 1).reshape(tokens, width).float() for part in (keys, values)]
        return torch.addmm(flat[1] @ analysis[width:], flat[0], analysis[:width]) - bias

    def _folded_synthesis(self, coords: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype):
        _, heads, tokens, dim = shape
        _, _, synthesis, mean = self.folded(coords.device)
        x = torch.addmm(mean, coords, synthesis)
        return tuple(part.reshape(tokens, heads, dim).transpose(0, 1).unsqueeze(0).to(dtype)
                     for part in (x[:, :heads * dim], x[:, heads * dim:]))

    def split_on(self, device: torch.device) -> bool:
        """Whether this stage codes on `device` by the split path (pca_fused): pca:...:a where its GEMMs run on bf16
        tensor cores."""
        return self.rans and split_here(device)

    def encode_split(self, keys: torch.Tensor, values: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                     classes: torch.Tensor | None = None, flag: torch.Tensor | None = None) -> torch.Tensor:
        """`encode` by the split path: keys with RoPE on, taken off with its tables `rope` (cos, sin) if given.
        `flag` (int32, one element, on the device): set where the input is not finite, for the caller to check
        (`refuse_flagged`) when it next waits for the device; without it, checked here (a wait for the device)."""
        if self.per_token and classes is None:
            raise QuantError("this stage steps each token by the question's attention, and none was given")
        device = keys.device
        _, heads, tokens, dim = keys.shape
        coded = self.coded.numel()
        if not coded or not tokens:
            check_finite(keys, limit=None)
            check_finite(values, limit=None)
            return torch.empty(tokens * self.per_token, dtype=torch.uint8, device=device)
        operand = pca_fused.operand(keys, values, rope)
        analysis = self.split_analysis(device, rope is None and pca_fused.exact(keys), pca_fused.exact(values))
        own = flag is None
        flag = torch.zeros(1, dtype=torch.int32, device=device) if own else flag
        raw = self._indices(tensor_core_mm(operand, analysis), self.folded(device)[1], classes, flag)
        if own:
            refuse_flagged(flag)
        return raw

    def decode_split(self, payload: torch.Tensor, shape: tuple[int, ...], rope: tuple[torch.Tensor, torch.Tensor] | None,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` by the split path, RoPE put back on the keys with its tables `rope` if given. The classes are
        the wire's, checked where they were decoded (uncode_many)."""
        if payload.numel() != self.payload_size(shape, dtype):
            raise QuantError(f"payload of {payload.numel()} bytes, expected {self.payload_size(shape, dtype)}")
        device = payload.device
        _, heads, tokens, dim = shape
        coded = self.coded.numel()
        if not coded or not tokens:
            x = torch.zeros(tokens, 2 * heads * dim, device=device)
        else:
            classes = payload[2 * coded * tokens:].view(torch.int8) if self.per_token else None
            steps, _ = self.on(device)
            parts = pca_fused.dequantize(payload[:2 * coded * tokens].view(torch.int16).view(tokens, coded), classes,
                                         steps, class_scale_on(device), 0.5 - ROUNDING)
            x = tensor_core_mm(parts, self.split_synthesis(device))
        return pca_fused.reconstruct(x, self.folded(device)[3], rope, heads, dim, dtype)

    def _split(self, raw_size: int) -> tuple[int, int]:
        """(tokens, classes' bytes) of a raw payload of `raw_size` bytes (ValueError if none fits)."""
        per = 2 * self.coded.numel() + self.per_token
        if raw_size % per:
            raise ValueError(f"{raw_size} raw bytes are not whole tokens of {per} bytes")
        tokens = raw_size // per
        return tokens, tokens * self.per_token

    def code(self, raw: torch.Tensor, tokens: int, step: int) -> list[bytes]:
        """pca:...:a: the payloads of tokens [0, step), [step, 2 step), ... of the raw payload of `tokens` tokens
        that `encode` gave (uint8, on its device), each its tokens' classes (int8, with a strength) then the
        rANS code of its indices, coded in one call where the raw payload is."""
        return code_many([(self, raw, tokens, step)])[0]

    def uncode(self, payloads: list[bytes], tokens: list[int], device: torch.device) -> list[torch.Tensor]:
        """pca:...:a: the raw payload (uint8, on `device`) of each chunk of `tokens[i]` tokens, decoded from
        `payloads` in one call on `device` (ValueError for a payload this stage cannot have written)."""
        return uncode_many([(self, payloads, tokens)], device)[0]

    def join(self, raws: list[torch.Tensor], tokens: list[int]) -> torch.Tensor:
        """The raw payload of consecutive chunks' tokens at once (their indices, then their classes), from
        each chunk's (`uncode`'s)."""
        if not self.per_token:
            return torch.cat(raws)
        split = [2 * self.coded.numel() * n for n in tokens]
        return torch.cat([raw[:at] for raw, at in zip(raws, split)] + [raw[at:] for raw, at in zip(raws, split)])

    def compress(self, raw: bytes) -> bytes:
        """The range code of a raw payload (its indices within their tables' ranges, as `encode` leaves them);
        with rANS (pca:...:a), `code`'s payload of it."""
        if not self.coded.numel():
            return b""
        tokens, tail = self._split(len(raw))
        if self.rans:
            return self.code(torch.frombuffer(bytearray(raw), dtype=torch.uint8), tokens, max(tokens, 1))[0]
        encoder = constriction.stream.queue.RangeEncoder()
        classes = np.zeros(tokens, dtype=np.int8)
        if tail:  # the classes first: the decoder needs them to know the indices' models
            classes = np.frombuffer(raw[len(raw) - tail:], dtype=np.int8)
            encoder.encode(classes.astype(np.int32) + MAX_CLASS, CLASS_MODEL)
        indices = np.frombuffer(raw[:len(raw) - tail], dtype="<i2")
        for index, picked in _groups(self._tables(classes)):
            model, top = table(index)
            encoder.encode(indices[picked].astype(np.int32) + top, model)
        return encoder.get_compressed().astype("<u4").tobytes()

    def decompress(self, blob: bytes, size: int) -> bytes:
        """The raw payload of `size` bytes a range code holds (ValueError if it cannot)."""
        if not self.coded.numel():
            if blob or size:
                raise ValueError(f"this layer codes no component, and the chunk holds {len(blob)} bytes for {size}")
            return b""
        tokens, tail = self._split(size)
        if self.rans:
            return self.uncode([blob], [tokens], torch.device("cpu"))[0].numpy().tobytes()
        if len(blob) % 4 or (size and not blob):
            raise ValueError(f"a range code of {len(blob)} bytes is not whole 32-bit words")
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(blob, dtype="<u4").astype(np.uint32))
        classes = np.zeros(tokens, dtype=np.int8)
        indices = np.zeros(tokens * self.coded.numel(), dtype="<i2")
        try:  # constriction asserts on a code no encoder could have written
            if tail:
                classes = (decoder.decode(CLASS_MODEL, tokens) - MAX_CLASS).astype(np.int8)
            for index, picked in _groups(self._tables(classes)):
                model, top = table(index)
                indices[picked] = decoder.decode(model, picked.size) - top
        except AssertionError as exc:
            raise ValueError(f"not a range code of this stage: {exc}") from None
        if not decoder.maybe_exhausted():
            raise ValueError("the range code does not end where its indices do")
        return indices.tobytes() + (classes.tobytes() if tail else b"")


def refuse_flagged(flag: torch.Tensor) -> None:
    """check_finite's error if `encode_split` set `flag` (one wait for the device)."""
    if flag.item():
        raise QuantError(NOT_FINITE)


def code_many(parts: list[tuple[EntropyPCACodec, torch.Tensor, int, int]], pieces: bool = False) -> list[list]:
    """`EntropyPCACodec.code` of several (codec, raw payload, tokens, step), in one call of the coder. `pieces`:
    each payload as the tuple of its parts, not joined (rans.encode)."""
    if not parts:
        return []
    device = parts[0][1].device
    symbols, models, counts, heads = [], [], [], []
    for codec, raw, tokens, step in parts:
        coded = codec.coded.numel()
        split = tokens * 2 * coded
        classes = raw[split:].view(torch.int8) if codec.per_token else None
        symbols.append(raw[:split].view(torch.int16))
        models.append(codec.models_of(classes, tokens, device).flatten())
        counts.append([min(step, tokens - start) * coded for start in range(0, tokens, step)])
        heads.append(classes.cpu().numpy().tobytes() if classes is not None else None)
    codes = rans_coder(device).encode(torch.cat(symbols), torch.cat(models), rans_models(device),
                                      [n for c in counts for n in c], pieces)
    out, at = [], 0
    for (_, _, tokens, step), chunk_counts, head in zip(parts, counts, heads):
        mine, at = codes[at:at + len(chunk_counts)], at + len(chunk_counts)
        if head is not None:  # each chunk's classes before its code
            mine = [(head[s:s + step], *c) if pieces else head[s:s + step] + c
                    for s, c in zip(range(0, tokens, step), mine)]
        out.append(mine)
    return out


def payload_bytes(payload: bytes | tuple) -> int:
    """The size of a payload, whole or in pieces (code_many)."""
    return len(payload) if isinstance(payload, bytes) else sum(map(len, payload))


def code_fitting(parts: list[tuple[EntropyPCACodec, torch.Tensor, int, int]], max_bytes: int,
                 pieces: bool = False) -> list[tuple[int, list]]:
    """(step, payloads) of each (codec, raw payload, tokens, step) of `code_many`, every payload at most `max_bytes`:
    a part with a larger one is coded again at half its step (the sender sizes chunks by the expected rate, and
    the data may code larger)."""
    out = [(step, payloads) for (_, _, _, step), payloads in zip(parts, code_many(parts, pieces))]
    for i, (codec, raw, tokens, _) in enumerate(parts):
        step, payloads = out[i]
        while step > 1 and max(map(payload_bytes, payloads), default=0) > max_bytes:
            step = (step + 1) // 2
            payloads = code_many([(codec, raw, tokens, step)], pieces)[0]
        out[i] = step, payloads
    return out


def uncode_many(parts: list[tuple[EntropyPCACodec, list[bytes], list[int]]], device: torch.device,
                failed: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """`EntropyPCACodec.uncode` of several (codec, payloads, tokens), in one call of the coder: the torch
    reference steps through every lane at once, so one call for many layers costs about what one layer's does.
    `failed`: where the kernels decode, the codes' verdict is OR-ed into it instead of raised (rans_triton.decode);
    what the host can check (the classes, the codes' layout) still raises at once."""
    models, codes, counts, classes_of = [], [], [], []
    for codec, payloads, tokens in parts:
        coded = codec.coded.numel()
        heads = []
        for payload, count in zip(payloads, tokens):
            head = count if codec.per_token else 0
            if len(payload) < head:
                raise ValueError(f"a payload of {len(payload)} bytes for the classes of {count} tokens")
            heads.append(np.frombuffer(payload, dtype=np.int8, count=head))
            codes.append(memoryview(payload)[head:])  # no copy of the code
        classes = None
        if codec.per_token:
            flat = np.concatenate(heads)
            if flat.size and np.abs(flat.astype(np.int64)).max() > MAX_CLASS:
                raise ValueError(f"a token class outside +-{MAX_CLASS}")
            classes = rans.to_device([flat], np.int8, device)
        classes_of.append(classes)
        models.append(codec.models_of(classes, sum(tokens), device).flatten())
        counts += [n * coded for n in tokens]
    symbols = rans_coder(device).decode(codes, torch.cat(models), rans_models(device), counts, failed)
    out, at = [], 0
    for (codec, _, tokens), classes in zip(parts, classes_of):
        coded, token, mine = codec.coded.numel(), 0, []
        for count in tokens:
            part = [symbols[at:at + count * coded].to(torch.int16).view(torch.uint8)]
            if classes is not None:
                part.append(classes[token:token + count].view(torch.uint8))
            mine.append(torch.cat(part))
            at, token = at + count * coded, token + count
        out.append(mine)
    return out


def _groups(tables: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(table, flat positions in row-major order) of each model in use, in table order: the order
    in which both nodes code the indices."""
    flat = tables.reshape(-1)
    order = np.argsort(flat, kind="stable")
    used, starts = np.unique(flat[order], return_index=True)
    return [(int(index), order[lo:hi]) for index, lo, hi in zip(used, starts, [*starts[1:], flat.size])]
