"""Are the fast encoder's fp64 shortcuts exact? A check of the proofs in common/quant/triton_kernels.py
(`_div_odd`, `_reciprocal`) over every input they can meet, not a test (CI samples the same
formulas: tests/common/quant/test_kernels.py::test_fp64_step_and_reciprocal_are_exact):

- a group's step, x / D for D in 3, 7, 15, 127, 255 (2**bits - 1 and 2**(bits-1) - 1): the fp64
  product x * (1 / D) rounded to fp32, against numpy's IEEE fp32 division, for every positive
  finite fp32 x (2**31 values each; x is a difference or a maximum of magnitudes, never negative);
- the reciprocal of a stored step, 1 / s for every positive finite fp16 s (and 1.0): an fp32 first
  guess off by up to 3 units in the last place (the GPU's approximate division is within 2), one
  Newton step in fp64, rounded to fp32, against IEEE.

    .venv/bin/python deploy/experiments/exact_division.py     # about 2 minutes
"""

from __future__ import annotations

import numpy as np

FINITE = 0x7F800000  # the bit patterns of +0 .. the largest finite fp32


def reciprocal_mismatches() -> int:
    s = np.concatenate([np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32), [np.float32(1)]])
    want = np.float32(1) / s
    bad = 0
    for off in range(-3, 4):
        r = (want.view(np.int32) + off).view(np.float32).astype(np.float64)
        got = (r + r * (1.0 - s.astype(np.float64) * r)).astype(np.float32)
        bad += int((got != want).sum())
    return bad


def division_mismatches(d: int, step: int = 1 << 26) -> int:
    inverse = np.float64(1) / d
    bad = 0
    for start in range(0, FINITE, step):
        x = np.arange(start, min(start + step, FINITE), dtype=np.uint32).view(np.float32)
        bad += int(((x.astype(np.float64) * inverse).astype(np.float32) != x / np.float32(d)).sum())
    return bad


if __name__ == "__main__":
    print("reciprocal of every positive fp16, guesses within 3 ulp: mismatches", reciprocal_mismatches(), flush=True)
    for d in (3, 7, 15, 127, 255):
        print(f"x / {d} for every positive finite fp32: mismatches", division_mismatches(d), flush=True)
