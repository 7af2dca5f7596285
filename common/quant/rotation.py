"""A seeded randomized Hadamard rotation of each head's vectors, applied before quantization.

x -> (x * s) H / sqrt(d), with H the d x d Sylvester Hadamard matrix and s a vector of random
signs drawn from the seed. The rotation is orthonormal, so its inverse is its transpose; it
spreads a few outlier channels over all of them (QuaRot, RotateKV, TurboQuant), which lets a
scalar quantizer's groups see values of similar size.
"""

from __future__ import annotations

import functools

import torch

MAX_SEED = 2**32 - 1


def supports(head_dim: int) -> bool:
    return head_dim >= 1 and head_dim & (head_dim - 1) == 0


@functools.lru_cache(maxsize=16)
def _matrix(head_dim: int, seed: int) -> torch.Tensor:
    """The (head_dim, head_dim) float64 rotation diag(s) H / sqrt(d), on the CPU."""
    if not supports(head_dim):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, not {head_dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs.to(torch.float64).unsqueeze(1) * h / head_dim**0.5


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """(..., head_dim) -> rotated, float32."""
    return x.float() @ _matrix(x.shape[-1], seed).to(device=x.device, dtype=torch.float32)


def unrotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Inverse of `rotate`, float32."""
    return x.float() @ _matrix(x.shape[-1], seed).T.to(device=x.device, dtype=torch.float32)
