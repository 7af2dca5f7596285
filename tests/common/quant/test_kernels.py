"""The Triton codec kernels against their torch twins: the same payload bytes and the same decoded
values, bit for bit (DESIGN invariant 9).

CI has no GPU, so the kernels run in Triton's interpreter on CPU tensors. TRITON_INTERPRET must be
set before triton is imported, so the comparisons run in one subprocess (this file run as a
script), which no other test shares; each case reports back under its own name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from common.quant import kernels  # noqa: E402
from common.quant.base import QuantError  # noqa: E402
from common.quant.cast import Cast  # noqa: E402
from common.quant.kv import CHANNEL, TOKEN, KVCodec  # noqa: E402
from common.quant.lowrank import LowRank  # noqa: E402
from common.quant.nf4 import NF4  # noqa: E402
from common.quant.uniform import Uniform  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- the comparisons, run in the subprocess ----

def path(name: str):
    """Run the quantizers' public methods on one path: "torch" or "triton"."""
    return kernels.forced(name)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits; NaNs (only a decoded garbage payload has them) match any NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    both_nan = a.isnan() & b.isnan()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(bits) == b.view(bits)) | both_nan).all())


def compare_matrix(q, x: torch.Tensor, out_dtypes=None) -> None:
    with path("torch"):
        expected = q.encode(x)
    with path("triton"):
        payload = q.encode(x)
    assert torch.equal(expected, payload), f"{q} on {tuple(x.shape)} {x.dtype}: bytes differ at " \
        f"{(expected != payload).nonzero().flatten()[:8].tolist()} of {expected.numel()}"
    for dtype in out_dtypes or (x.dtype,):
        with path("torch"):
            want = q.decode(expected, *x.shape, dtype)
        with path("triton"):
            got = q.decode(expected, *x.shape, dtype)
        assert same(want, got), f"{q} on {tuple(x.shape)}: decoded {dtype} differs"


def random_quantizer(gen: torch.Generator, bits: int | None = None):
    group = [1, 2, 3, 4, 5, 7, 8, 16, 24, 32, 33, 64, 100, 128][int(torch.randint(14, (), generator=gen))]
    if bits is None:
        return NF4(group)
    return Uniform(bits, group, bool(torch.randint(2, (), generator=gen)))


def random_matrix(gen: torch.Generator, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    rows, cols = int(torch.randint(1, 7, (), generator=gen)), int(torch.randint(1, 150, (), generator=gen))
    return (torch.randn(rows, cols, generator=gen) * scale).to(dtype)


def case_uniform_random():
    gen = torch.Generator().manual_seed(1)
    for bits in range(1, 9):
        for i in range(4):
            compare_matrix(random_quantizer(gen, bits), random_matrix(gen, DTYPES[(bits + i) % 3]))


def case_nf4_random():
    gen = torch.Generator().manual_seed(2)
    for i in range(8):
        compare_matrix(random_quantizer(gen), random_matrix(gen, DTYPES[i % 3]))


def case_every_bit_width_and_mode():
    """int1..int8, sym and asym, plus nf4, on rows that start mid-byte (37 columns) and on whole bytes."""
    gen = torch.Generator().manual_seed(3)
    for cols in (37, 64):
        x = torch.randn(3, cols, generator=gen)
        for bits in range(1, 9):
            for symmetric in (False, True):
                compare_matrix(Uniform(bits, 16, symmetric), x)
        compare_matrix(NF4(16), x)


def case_subnormal_steps():
    """Steps below fp16's normal range: the scale's fix-up (rounded up one fp16 step) must match."""
    gen = torch.Generator().manual_seed(4)
    fixed_up = 0
    for magnitude in (1e-4, 3e-6, 1e-7, 2e-8, 1e-10):
        x = torch.randn(4, 40, generator=gen) * magnitude
        for q in (Uniform(8, 8), Uniform(4, 16, True), Uniform(2, 8), Uniform(1, 8, True), Uniform(3, 5), NF4(8)):
            compare_matrix(q, x, (torch.float32, torch.float16))
        groups = x.reshape(4, 5, 8)
        scale = (groups.amax(-1) - groups.amin(-1)) / 255
        fixed_up += int(((scale.half().float() < scale) & (scale < 2**-14)).sum())
    assert fixed_up > 0, "no group exercised the subnormal fix-up"


def case_constant_groups():
    rows = [torch.zeros(50), torch.full((50,), 0.1), torch.full((50,), -3.0), torch.full((50,), 1000.3),
            torch.cat([torch.full((25,), 2.0), torch.full((25,), -2.0)])]
    x = torch.stack(rows)
    for q in (Uniform(4, 25), Uniform(4, 32, True), Uniform(1, 32, True), Uniform(1, 10), Uniform(8, 7), NF4(25)):
        compare_matrix(q, x)
        compare_matrix(q, x.to(torch.bfloat16))


def case_rounding_ties():
    """Quotients exactly halfway between levels: torch.round goes to even."""
    levels = torch.arange(0, 16, dtype=torch.float32)
    x = torch.stack([torch.cat([levels, levels + 0.5]), torch.cat([levels - 7.5, levels - 7])])
    for q in (Uniform(4, 32), Uniform(4, 32, True), Uniform(5, 16, True), Uniform(3, 32)):
        compare_matrix(q, x)


def case_extremes():
    """Magnitudes up to fp16's largest: int1 asym's step (max - min) overflows fp16 to inf."""
    x = torch.tensor([[65504.0, -65504.0, 1.0, -1.0, 0.0, 3e-8, -65000.0, 12.5]] * 3)
    x[1] *= 0.5
    for q in (Uniform(1, 8, False), Uniform(8, 8), Uniform(2, 4, True), NF4(8), Uniform(1, 3, True)):
        compare_matrix(q, x, (torch.float32, torch.bfloat16, torch.float16))


def case_dtypes():
    """fp16, bf16, fp32 and fp64 inputs, widened as x.float() does; every decode dtype."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 45, generator=gen, dtype=torch.float64) * 5
    for dtype in DTYPES + (torch.float64,):
        for q in (Uniform(4, 16), Uniform(6, 9, True), NF4(32)):
            compare_matrix(q, x.to(dtype), DTYPES + (torch.float64,))


def case_refuses_non_finite():
    for bad in (float("nan"), float("inf"), -65505.0):
        x = torch.ones(2, 40)
        x[1, 33] = bad
        for q in (Uniform(4, 32), NF4(16)):
            errors = []
            for name in ("torch", "triton"):
                with path(name):
                    try:
                        q.encode(x)
                    except QuantError as error:
                        errors.append(str(error))
            assert len(errors) == 2 and errors[0] == errors[1], errors
    keys, values = torch.ones(1, 1, 16, 8), torch.ones(1, 1, 16, 8)
    for tensor, bad in ((keys, float("nan")), (values, float("-inf"))):
        tensor[0, 0, 9, 3] = bad
        for q in (Uniform(8, 16), Uniform(4, 8, True)):  # keys per channel: the row-per-thread encoder
            errors = []
            for name in ("torch", "triton"):
                with path(name):
                    try:
                        KVCodec(q).encode(keys, values)
                    except QuantError as error:
                        errors.append(str(error))
            assert len(errors) == 2 and errors[0] == errors[1], errors
        tensor[0, 0, 9, 3] = 1.0


def case_random_payloads():
    """Any bytes decode alike, fp16 parameters that are subnormal, inf or NaN included."""
    gen = torch.Generator().manual_seed(6)
    for q in (Uniform(4, 8), Uniform(3, 5, True), Uniform(1, 4, True), Uniform(8, 16), NF4(8)):
        rows, cols = 3, 29
        blob = torch.randint(0, 256, (q.size(rows, cols),), dtype=torch.uint8, generator=gen)
        for dtype in DTYPES:
            with path("torch"):
                want = q.decode(blob, rows, cols, dtype)
            with path("triton"):
                got = q.decode(blob, rows, cols, dtype)
            assert same(want, got), f"{q}: decoded {dtype} differs"


def compare_codec(codec: KVCodec, keys: torch.Tensor, values: torch.Tensor) -> None:
    with path("torch"):
        expected = codec.encode(keys, values)
        want = codec.decode(expected, tuple(keys.shape), keys.dtype)
    with path("triton"):
        payload = codec.encode(keys, values)
        got = codec.decode(expected, tuple(keys.shape), keys.dtype)
    assert torch.equal(expected, payload), f"{codec}: payload bytes differ"
    assert same(want[0], got[0]) and same(want[1], got[1]), f"{codec}: decoded keys or values differ"
    assert got[0].is_contiguous() and got[1].is_contiguous()


def case_kv_codec_strided():
    """Keys and values as the wire encodes them: a token range of a layer, a strided view; keys per
    channel are read in place through strides."""
    gen = torch.Generator().manual_seed(7)
    axes = ((CHANNEL, TOKEN), (TOKEN, CHANNEL), (CHANNEL, CHANNEL))
    quantizers = (Uniform(4, 8), Uniform(2, 32, True), Uniform(3, 5), Uniform(1, 16, True), Uniform(8, 4), NF4(16))
    for i, q in enumerate(quantizers):
        dtype = DTYPES[i % 3]
        cache_k = torch.randn(1, 2, 40, 16, generator=gen).to(dtype)
        cache_v = torch.randn(1, 2, 40, 16, generator=gen).to(dtype)
        keys, values = cache_k[:, :, 3:26], cache_v[:, :, 3:26]  # 23 tokens: rows start mid-byte
        for key_axis, value_axis in (axes[i % 3], axes[(i + 1) % 3]):
            compare_codec(KVCodec(q, key_axis, value_axis), keys, values)


def case_keys_per_channel_every_width():
    """The row-per-thread encoder of keys per channel, at every width and both modes: 37 tokens
    (rows start mid-byte), 32 (they do not) and a single token."""
    gen = torch.Generator().manual_seed(9)
    cache = torch.randn(1, 1, 40, 8, generator=gen).to(torch.bfloat16)
    for bits in range(1, 9):
        for symmetric in (False, True) if bits > 1 else (False,):
            codec = KVCodec(Uniform(bits, 16, symmetric), CHANNEL, TOKEN)
            for start, end in ((1, 38),) + (((0, 32), (5, 6)) if bits in (3, 4) else ()):
                compare_codec(codec, cache[:, :, start:end], cache[:, :, start:end])


@contextlib.contextmanager
def counting(name: str):
    """Count the launches of one kernel of common.quant.triton_kernels."""
    from common.quant import triton_kernels as tk

    kernel, launches = getattr(tk, name), []

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    setattr(tk, name, Counted())
    try:
        yield launches
    finally:
        setattr(tk, name, kernel)


def case_groups_kernels():
    """The fast encoder and decoder (int8/4/2, power-of-two groups, rows on a byte), keys per channel
    (transposed in registers) and values per token: a group cut short at the end of the tokens, tiles
    that fill the contiguous axis and tiles that do not (head_dim 24), every dtype, and NaN refused as
    torch refuses it. They must actually run."""
    gen = torch.Generator().manual_seed(10)
    with counting("encode_groups_kernel") as encodes, counting("decode_groups_kernel") as decodes:
        for i, (bits, symmetric) in enumerate(((8, False), (4, False), (2, False), (4, True), (2, True), (8, True))):
            dtype = DTYPES[i % 3]
            for tokens, group, head_dim in ((40, 16, 16), (64, 32, 16), (4, 8, 16), (37, 8, 24)):
                keys = (torch.randn(1, 2, tokens, head_dim, generator=gen) * 4).to(dtype)
                values = (torch.randn(1, 2, tokens, head_dim, generator=gen) * 4).to(dtype)
                for axes in ((CHANNEL, TOKEN), (TOKEN, CHANNEL)):
                    compare_codec(KVCodec(Uniform(bits, group, symmetric), *axes), keys, values)
        assert len(encodes) >= 48 and len(decodes) >= 48, (len(encodes), len(decodes))
        keys = torch.ones(1, 1, 32, 8)
        keys[0, 0, 17, 5] = float("nan")
        errors = []
        for name in ("torch", "triton"):
            with path(name):
                try:
                    KVCodec(Uniform(4, 16)).encode(keys, torch.ones(1, 1, 32, 8))
                except QuantError as error:
                    errors.append(str(error))
        assert len(errors) == 2 and errors[0] == errors[1], errors


def case_kv_layers_in_one_launch():
    """encode_kv / decode_kv over stacked layers: each row is that layer's KVCodec payload."""
    gen = torch.Generator().manual_seed(8)
    keys = torch.randn(3, 2, 24, 16, generator=gen).to(torch.bfloat16)
    values = torch.randn(3, 2, 24, 16, generator=gen).to(torch.bfloat16)
    for q in (Uniform(4, 32), Uniform(8, 16, True), NF4(64)):
        codec = KVCodec(q)
        with path("torch"):
            expected = torch.stack([codec.encode(keys[i:i + 1], values[i:i + 1]) for i in range(3)])
            want = [codec.decode(expected[i], (1, 2, 24, 16), torch.bfloat16) for i in range(3)]
        payload = kernels.encode_kv(q, keys, values, CHANNEL, TOKEN)
        assert torch.equal(payload, expected), f"{q}: stacked payloads differ"
        got_k, got_v = kernels.decode_kv(q, payload, tuple(keys.shape), torch.bfloat16, CHANNEL, TOKEN)
        assert torch.equal(got_k, torch.cat([k for k, _ in want])) and torch.equal(got_v, torch.cat([v for _, v in want]))


def case_chunks_in_one_launch():
    """KVCodec.encode_chunks: the ranges of a tensor (a shorter last one, a slice of a larger cache)
    in one launch per tensor, each range's payload what encode gives it on torch; Inf in any range
    refused with torch's error, after the copy to the host."""
    gen = torch.Generator().manual_seed(11)
    cache_k = torch.randn(1, 2, 50, 16, generator=gen).to(torch.bfloat16)
    cache_v = torch.randn(1, 2, 50, 16, generator=gen).to(torch.bfloat16)
    keys, values = cache_k[:, :, 3:44], cache_v[:, :, 3:44]  # 41 tokens: ranges of 16, 16 and 9
    for q in (Uniform(4, 8), Uniform(8, 16, True), NF4(16), Uniform(3, 5)):
        codec = KVCodec(q)
        with path("torch"):
            want = [codec.encode(keys[:, :, s:s + 16], values[:, :, s:s + 16]).numpy().tobytes() for s in (0, 16, 32)]
        launches, encode_kv = [], kernels.encode_kv
        kernels.encode_kv = lambda *args, **kw: launches.append(args[1].shape) or encode_kv(*args, **kw)
        try:
            with path("triton"):
                got = list(codec.encode_chunks(keys, values, 16))
        finally:
            kernels.encode_kv = encode_kv
        assert got == want, f"{q}: chunk payloads differ"
        assert launches == [(2, 2, 16, 16), (1, 2, 9, 16)], f"{q}: {launches}"
    bad = keys.clone()
    bad[0, 1, 20, 3] = float("inf")
    errors = []
    for name in ("torch", "triton"):
        with path(name):
            try:
                list(KVCodec(Uniform(4, 8)).encode_chunks(bad, values, 16))
            except QuantError as error:
                errors.append(str(error))
    assert len(errors) == 2 and errors[0] == errors[1], errors


def case_chunks_decode_in_one_launch():
    """KVCodec.decode_chunks: a tier's chunks (a shorter last one) decode to torch's `decode` of each, joined along
    the tokens, the chunks of one length in one copy and one launch per tensor."""
    gen = torch.Generator().manual_seed(12)
    keys = torch.randn(1, 2, 41, 16, generator=gen).to(torch.bfloat16)
    values = torch.randn(1, 2, 41, 16, generator=gen).to(torch.bfloat16)
    tokens = [16, 16, 9]
    for q in (Uniform(4, 8), Uniform(8, 16, True), NF4(16), Uniform(3, 5)):
        codec = KVCodec(q)
        with path("torch"):
            payloads = [codec.encode(keys[:, :, s:s + n], values[:, :, s:s + n]).numpy().tobytes()
                        for s, n in zip((0, 16, 32), tokens)]
            want = [codec.decode(torch.frombuffer(bytearray(p), dtype=torch.uint8), (1, 2, n, 16), torch.bfloat16)
                    for p, n in zip(payloads, tokens)]
        launches, decode_kv = [], kernels.decode_kv
        kernels.decode_kv = lambda *args, **kw: launches.append(args[2]) or decode_kv(*args, **kw)
        try:
            with path("triton"):
                got_k, got_v = codec.decode_chunks(payloads, tokens, 2, 16, torch.bfloat16, torch.device("cpu"))
        finally:
            kernels.decode_kv = decode_kv
        assert same(got_k, torch.cat([k for k, _ in want], dim=2)), f"{q}: keys differ"
        assert same(got_v, torch.cat([v for _, v in want], dim=2)), f"{q}: values differ"
        assert launches == [(2, 2, 16, 16), (1, 2, 9, 16)], f"{q}: {launches}"


def case_chunks_of_a_wrong_size_refused_before_the_copy():
    """decode_chunks refuses chunks of one length that is not the codec's for their tokens before any copy
    to the device (issue 28: a size that disagrees with the header is refused before the device allocates)."""
    import common.quant.kv as kv

    copies, to_device = [], kv.to_device
    kv.to_device = lambda *args: copies.append(args) or to_device(*args)
    try:
        with path("triton"):
            codec = KVCodec(Uniform(4, 8))
            size = codec.payload_size((1, 2, 16, 16), torch.bfloat16)
            try:
                codec.decode_chunks([bytes(size - 1)] * 3, [16, 16, 16], 2, 16, torch.bfloat16, torch.device("cpu"))
            except QuantError as error:
                assert f"payload of {size - 1} bytes" in str(error), error
            else:
                raise AssertionError("a short chunk decoded")
    finally:
        kv.to_device = to_device
    assert copies == [], copies


def case_property():
    """Hypothesis: any quantizer, shape, scale and dtype."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    quantizers = st.one_of(
        st.builds(Uniform, st.integers(1, 8), st.sampled_from([1, 2, 3, 6, 8, 11, 16, 32, 48, 64, 128]), st.booleans()),
        st.builds(NF4, st.sampled_from([1, 5, 16, 64, 96])))

    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(q=quantizers, rows=st.integers(1, 5), cols=st.integers(1, 90), exponent=st.integers(-30, 14),
           dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
    def check(q, rows, cols, exponent, dtype, seed):
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent
        compare_matrix(q, x.clamp(-65504, 65504).to(dtype))

    check()


CASES = [name[len("case_"):] for name in list(globals()) if name.startswith("case_")]


def main(report: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    results = {}
    for name in CASES:
        try:
            globals()["case_" + name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent test, which fails on it
            results[name] = traceback.format_exc()
    Path(report).write_text(json.dumps(results))


# ---- the tests ----

@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, str]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    report = tmp_path_factory.mktemp("kernels") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(kernels.ENV, None)
    done = subprocess.run([sys.executable, __file__, str(report)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and report.exists(), done.stderr[-4000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_torch(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


def test_fp64_step_and_reciprocal_are_exact():
    """The fast encoder's shortcuts for IEEE divisions (triton_kernels._div_odd, _reciprocal), in
    numpy: a group's step x / D as the fp64 product x * (1 / D) rounded to fp32, and 1 / s of a
    stored fp16 step as one fp64 Newton step from a guess a few ulp off. The reciprocal over every
    fp16, the division over every 509th fp32 bit pattern (deploy/experiments/exact_division.py
    checks every one)."""
    s = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    want = np.float32(1) / s
    for off in (-2, -1, 0, 1, 2):
        r = (want.view(np.int32) + off).view(np.float32).astype(np.float64)
        assert np.array_equal((r + r * (1.0 - s.astype(np.float64) * r)).astype(np.float32), want)
    x = np.arange(0, 0x7F800000, 509, dtype=np.uint32).view(np.float32)
    for d in (3, 7, 15, 127, 255):
        assert np.array_equal((x.astype(np.float64) * (np.float64(1) / d)).astype(np.float32), x / np.float32(d)), d


def configure(monkeypatch, value: str | None) -> None:
    """KVWIRE_KERNELS as a fresh process would read it."""
    if value is None:
        monkeypatch.delenv(kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV, value)
    kernels._configured.cache_clear()


def test_dispatch(monkeypatch):
    cpu = torch.ones(2, 8)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    configure(monkeypatch, None)
    assert not kernels.use_kernels(Uniform(4), cpu)  # auto: CPU tensors stay on torch
    configure(monkeypatch, "torch")
    assert not kernels.use_kernels(Uniform(4), cpu)
    configure(monkeypatch, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_kernels(Uniform(4), cpu) and kernels.use_kernels(NF4(), cpu.to(torch.uint8), torch.bfloat16)
    for other in (Cast(), LowRank(4, Uniform(4))):
        assert not kernels.use_kernels(other, cpu)
    assert not kernels.use_kernels(Uniform(4), torch.ones(0, 8))  # empty: torch raises its own errors
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.use_kernels(Uniform(4), cpu)
    configure(monkeypatch, "fast")
    with pytest.raises(ValueError, match="KVWIRE_KERNELS"):
        kernels.use_kernels(Uniform(4), cpu)
    kernels._configured.cache_clear()
    with kernels.forced("torch"):
        assert not kernels.use_kernels(Uniform(4), cpu)
    with pytest.raises(ValueError, match="kernel path"):
        kernels.forced("fast").__enter__()


if __name__ == "__main__":
    main(sys.argv[1])
