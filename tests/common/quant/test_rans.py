"""The rANS coder of pca:...:a (common.quant.rans): round trips, rate, the kernels bit for bit, bad codes."""

from dataclasses import replace

import constriction
import grpc
import numpy as np
import pytest
import torch

from common import framing, wire
from common.plan import layer_codec
from common.profile import ProfileError, parse_profile
from common.quant import pca_entropy, rans
from common.quant.pca_entropy import MAX_TABLE, MIN_TABLE, laplace, rans_models, table
from common.quant.transform import CodecContext
from tests.common.quant.interpreter import run_interpreted
from tests.common.quant.test_transforms import round_trip, setup, weighted  # noqa: F401 (a fixture)


def sample(models: np.ndarray, seed: int = 0) -> np.ndarray:
    """One index per entry of `models` (table numbers from 0), drawn from that table's distribution."""
    g = np.random.default_rng(seed)
    out = np.zeros(models.size, dtype=np.int64)
    for m in np.unique(models):
        p, top = laplace(int(m) + MIN_TABLE)
        picked = models == m
        out[picked] = g.choice(np.arange(-top, top + 1), size=int(picked.sum()), p=p / p.sum())
    return out


def case(counts, low=0, high=MAX_TABLE - MIN_TABLE + 1, seed=0):
    models = np.random.default_rng(seed + 1).integers(low, high, sum(counts))
    return torch.from_numpy(sample(models, seed)), torch.from_numpy(models)


@pytest.mark.parametrize("counts", [[1], [7, 0, 3], [rans.LANE + 1, 5000, 0, 1], [3 * rans.LANE]])
def test_round_trip(counts):
    symbols, models = case(counts)
    codes = rans.encode(symbols, models, rans_models(torch.device("cpu")), counts)
    assert [len(c) >= rans.code_bytes_min(n) for c, n in zip(codes, counts)] == [True] * len(counts)
    assert torch.equal(rans.decode(codes, models, rans_models(torch.device("cpu")), counts), symbols)
    # each chunk is a code of its own: decoding one alone gives its symbols
    start = sum(counts[:-1])
    alone = rans.decode(codes[-1:], models[start:], rans_models(torch.device("cpu")), counts[-1:])
    assert torch.equal(alone, symbols[start:])


def test_every_model_reaches_its_extremes():
    """The largest and smallest index of every table (split tables included) round trip."""
    tops = [laplace(m + MIN_TABLE)[1] for m in range(MAX_TABLE - MIN_TABLE + 1)]
    symbols = torch.tensor([s for top in tops for s in (-top, top, 0, -1)], dtype=torch.int64)
    models = torch.tensor([m for m in range(len(tops)) for _ in range(4)])
    models_cpu = rans_models(torch.device("cpu"))
    codes = rans.encode(symbols, models, models_cpu, [symbols.numel()])
    assert torch.equal(rans.decode(codes, models, models_cpu, [symbols.numel()]), symbols)


@pytest.mark.parametrize("low,high", [(0, 113), (20, 60), (28, 40)])
def test_the_rate_is_within_two_percent_of_the_range_coder(low, high):
    """Against the range coder of the same tables (pca_entropy.table) on a chunk of 200,000 indices,
    low-scale tables included, where the lanes' states weigh most."""
    counts = [200_000]
    symbols, models = case(counts, low, high, seed=3)
    codes = rans.encode(symbols, models, rans_models(torch.device("cpu")), counts)
    encoder = constriction.stream.queue.RangeEncoder()
    s, m = symbols.numpy(), models.numpy()
    for index in np.unique(m):
        model, top = table(int(index) + MIN_TABLE)
        encoder.encode((s[m == index] + top).astype(np.int32), model)
    range_bits = 32 * encoder.get_compressed().size
    assert 8 * len(codes[0]) < 1.02 * range_bits


def test_models_are_rebuilt_identically():
    built = [rans.Models.build([laplace(i) for i in range(MIN_TABLE, MAX_TABLE + 1)]) for _ in range(2)]
    for a, b in zip(vars(built[0]).values(), vars(built[1]).values()):
        assert torch.equal(a, b)
    assert bool((built[0].freq.sum(1) == rans.TOTAL).all()) and bool((built[0].freq[built[0].freq > 0] >= 1).all())


@pytest.mark.parametrize("groups", [1, 3])
def test_groups_decode_alone(monkeypatch, groups):
    """A chunk of several groups: each group's words lie together, after the lanes' states and the groups'
    word counts, so the code has the same size whatever the grouping."""
    monkeypatch.setattr(rans, "GROUP", -(-rans.lanes_of(5 * rans.LANE + 7) // groups))
    counts = [5 * rans.LANE + 7]
    symbols, models = case(counts, 20, 60)
    models_cpu = rans_models(torch.device("cpu"))
    code = rans.encode(symbols, models, models_cpu, counts)[0]
    assert rans.Layout(tuple(counts)).groups == [groups]
    assert torch.equal(rans.decode([code], models, models_cpu, counts), symbols)
    lanes = rans.lanes_of(counts[0])
    sizes = np.frombuffer(code, dtype="<u4", offset=4 * lanes, count=groups)
    assert 2 * int(sizes.sum()) == len(code) - 4 * (lanes + groups)


@pytest.mark.parametrize("damage", ["cut a word", "extra word", "low state", "empty", "bytes for nothing",
                                    "a word moved between groups"])
def test_a_bad_code_is_a_value_error(monkeypatch, damage):
    monkeypatch.setattr(rans, "GROUP", 1)  # two lanes, two groups
    counts = [3000, 0]
    symbols, models = case(counts, 20, 60)
    models_cpu = rans_models(torch.device("cpu"))
    codes = rans.encode(symbols, models, models_cpu, counts)
    code = codes[0]
    if damage == "cut a word":
        codes = [code[:-2], b""]
    elif damage == "extra word":
        codes = [code + b"\0\0", b""]
    elif damage == "low state":
        codes = [b"\1\0\0\0" + code[4:], b""]
    elif damage == "empty":
        codes = [b"", b""]
    elif damage == "a word moved between groups":
        sizes = np.frombuffer(code, dtype="<u4", offset=8, count=2).astype(np.int64) + [1, -1]
        codes = [code[:8] + sizes.astype("<u4").tobytes() + code[16:], b""]
    else:
        codes = [code, b"\0\0"]
    with pytest.raises(ValueError):
        rans.decode(codes, models, models_cpu, counts)


def test_flipped_bits_mostly_fail_the_end_state_check():
    """The lanes must end at the state they began in: a flipped bit of the words is caught nearly always
    (the chunk's CRC32 guards the transport; this guards the decoder's own bounds)."""
    counts = [3000]
    symbols, models = case(counts, 20, 60)
    models_cpu = rans_models(torch.device("cpu"))
    code = rans.encode(symbols, models, models_cpu, counts)[0]
    caught = 0
    for at in range(8, 108):
        try:
            rans.decode([code[:at] + bytes([code[at] ^ 0x10]) + code[at + 1:]], models, models_cpu, counts)
        except ValueError:
            caught += 1
    assert caught >= 90


INTERPRETED = """
import json, os, sys
import numpy as np, torch
from common.quant import rans, rans_triton
from common.quant.pca_entropy import rans_models
from tests.common.quant.test_rans import case
rans.LANE, rans.GROUP = 16, 4  # many lanes and groups per chunk, few steps: the interpreter is slow
results = {}
models = rans_models(torch.device("cpu"))
for counts in ([1], [40, 0, 17], [100, 33, 64]):
    symbols, m = case(counts, 0, 113, seed=len(counts))
    ref = rans.encode(symbols, m, models, counts)
    ker = rans_triton.encode(symbols, m, models, counts)
    back = rans_triton.decode(ref, m, models, counts)
    results[str(counts)] = [ref == ker, back.dtype == torch.int16 and bool(torch.equal(back.long(), symbols))]
symbols, m = case([100], 20, 60)
code = rans.encode(symbols, m, models, [100])[0]
try:
    rans_triton.decode([code[:-2]], m, models, [100])
    results["cut"] = False
except ValueError:
    results["cut"] = True
verdicts = []
for given in (code, code[:-2] + b"\\x01\\x00", code):  # told, not raised; OR-ed: a bad code stays told
    failed = torch.zeros((), dtype=torch.int8) if given is not code or not verdicts else failed
    rans_triton.decode([given], m, models, [100], failed)
    verdicts.append(int(failed))
results["told"] = verdicts
json.dump(results, open(sys.argv[1], "w"))
"""


def test_the_kernels_write_and_read_the_reference_bytes(tmp_path):
    """common.quant.rans_triton in Triton's interpreter, against the torch reference, bit for bit."""
    assert run_interpreted(INTERPRETED, tmp_path) == {"[1]": [True, True], "[40, 0, 17]": [True, True],
                                                      "[100, 33, 64]": [True, True], "cut": True, "told": [0, 1, 1]}


def test_the_a_flag():
    assert str(parse_profile("pca:b1.7:w:e:j:a:i1:f3")) == "pca:b1.7:w:e:j:a:i1:f3"
    assert parse_profile("pca:b2:w:e:a").pca.rans and not parse_profile("pca:b2:w:e").pca.rans
    with pytest.raises(ProfileError, match="add e"):
        parse_profile("pca:b2:w:a")


@pytest.mark.parametrize("spec", ["pca:b2:w:e", "pca:b0.5:w:e", "pca:b2:w:e:i1"])
def test_rans_decodes_what_the_range_coder_decodes(setup, tmp_path, spec):
    """The same indices either way: the receiver's cache is the same, only the bytes differ."""
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    if ":i" in spec:
        kv = replace(kv, importance=[torch.logspace(-2, 1, kv.seq_len)] * kv.num_layers)
    frames, back = round_trip(loaded, ctx, kv, spec)
    frames_a, back_a = round_trip(loaded, ctx, kv, spec.replace(":e", ":e:a"))
    assert parse_profile(frames_a[0].header.profile).pca.rans
    # the same indices but for a coordinate on a bin's edge: rANS's stage folds the transforms into one
    # matrix each way (EntropyPCACodec.folded), whose float32 products round differently
    for a, b in zip(back.keys + back.values, back_a.keys + back_a.values):
        assert float(((a - b).abs() > 1e-3 * (1 + a.abs())).float().mean()) < 1e-3
    chunks = [f.chunk for f in frames if f.WhichOneof("kind") == "chunk"]
    chunks_a = [f.chunk for f in frames_a if f.WhichOneof("kind") == "chunk"]
    assert [c.raw_size for c in chunks] == [c.raw_size for c in chunks_a]
    assert sum(len(c.payload) for c in chunks_a) < 1.1 * sum(len(c.payload) for c in chunks) + 8 * len(chunks)
    codec = layer_codec(parse_profile(frames_a[0].header.profile), 0, ctx)
    assert codec.coded_in_place


@pytest.mark.parametrize("damage", ["cut a word", "all ones", "empty"])
def test_a_corrupt_rans_chunk_is_data_loss(setup, tmp_path, damage):
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    frames = list(wire.encode(kv, parse_profile("pca:b2:w:e:a"), loaded.fingerprint, context=ctx))
    chunk = next(f.chunk for f in frames if f.WhichOneof("kind") == "chunk" and f.chunk.payload)
    chunk.payload = {"cut a word": chunk.payload[:-2], "all ones": b"\xff" * len(chunk.payload), "empty": b""}[damage]
    chunk.crc32c = wire.checksum(chunk.payload)
    with pytest.raises(wire.WireError) as caught:
        wire.decode(frames, loaded.fingerprint, context=ctx)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS


def test_a_corrupt_chunk_told_by_the_device_is_data_loss_when_its_segment_completes(setup, tmp_path, monkeypatch):
    """Where the kernels decode, a code's verdict stays on the device (rans_triton.decode's `failed`) and the
    assembler reads every call's at the segment's end: a bad chunk is DATA_LOSS there, naming its layer, and
    no cache comes out. Emulated: the reference coder telling its verdict as the kernels do."""
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    frames = list(wire.encode(kv, parse_profile("pca:b2:w:e:a"), loaded.fingerprint, context=ctx))
    chunk = next(f.chunk for f in frames if f.WhichOneof("kind") == "chunk" and f.chunk.payload and f.chunk.layer == 1)
    chunk.payload = chunk.payload[:-2] + b"\x01\x00"  # the same size, a word changed: only the decode can tell
    chunk.crc32c = wire.checksum(chunk.payload)

    class Telling:
        @staticmethod
        def decode(codes, models_of, models, counts, failed=None):
            try:
                return rans.decode(codes, models_of, models, counts)
            except ValueError:
                failed.fill_(1)
                return torch.zeros(sum(counts), dtype=torch.int64)

    monkeypatch.setattr(pca_entropy, "rans_coder", lambda device: Telling)
    monkeypatch.setattr(wire, "RANS_DECODE_BATCH", 1)  # a call per tier, as the kernels decode
    assembler = wire.Assembler(loaded.fingerprint, wire.Limits(), context=ctx)
    last = max(i for i, f in enumerate(frames) if f.WhichOneof("kind") == "chunk")
    for frame in frames[:last]:  # every chunk but the last one: the bad one went by without a word
        assembler.add(frame)
    with pytest.raises(wire.WireError, match="layer 1: payload does not decompress") as caught:
        assembler.add(frames[last])
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and not assembler.take_segments()


def test_out_of_memory_while_decoding_is_resource_exhausted(setup, tmp_path, monkeypatch):
    """A device that cannot hold a tier's symbols: the allocation failure surfaces as itself, which the
    receiver answers RESOURCE_EXHAUSTED (and frees the reservation: tests/receiver/test_server.py)."""
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    frames = list(wire.encode(kv, parse_profile("pca:b2:w:e:a"), loaded.fingerprint, context=ctx))

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(rans, "decode", no_memory)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        wire.decode(frames, loaded.fingerprint, context=ctx)
    assert wire.status_for(caught.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_cli_prints_the_a_flag_as_text():
    """Rich turns ":a:" into an emoji unless told not to; the CLI's console is."""
    from channel.cli.app import console

    with console.capture() as captured:
        console.print("pca:b1:w:e:j:a:i1")
    assert "pca:b1:w:e:j:a:i1" in captured.get()


@pytest.mark.parametrize("spec", ["pca:b2:w:e:a", "pca:b2:w:e:a+protect:s2:r3"])
def test_without_the_kernels_tiers_of_several_layers_decode_in_one_call(setup, tmp_path, monkeypatch, spec):
    """The torch coder (a CPU receiver) steps through all its lanes at once, so complete tiers wait and decode
    together: the same cache as tier by tier. A layer's later tier (protect's recent tokens) first decodes what
    waits, so each layer's tiers stay in their order."""
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    frames = list(wire.encode(kv, parse_profile(spec), loaded.fingerprint, context=ctx))
    calls, uncode_many = [], wire.uncode_many
    monkeypatch.setattr(wire, "uncode_many", lambda parts, device, failed: calls.append(len(parts))
                        or uncode_many(parts, device, failed))
    together = wire.decode(frames, loaded.fingerprint, context=ctx)
    assert calls == ([1] * kv.num_layers if "protect" in spec else [kv.num_layers])
    calls.clear()
    monkeypatch.setattr(wire, "RANS_DECODE_BATCH", 0)
    tier_by_tier = wire.decode(frames, loaded.fingerprint, context=ctx)
    assert calls == [1] * kv.num_layers
    for a, b in zip(together.keys + together.values, tier_by_tier.keys + tier_by_tier.values):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_to_device_joins_parts_of_every_dtype_it_is_given(dtype):
    """One code path on every device (a pinned host buffer only on a GPU), so the dtype lookup a GPU
    receiver makes runs here too: uint8 (an int tier's packed bytes) once failed only there."""
    parts = [np.arange(5, dtype=dtype), np.arange(3, dtype=dtype) + 7]
    out = rans.to_device(parts, dtype, torch.device("cpu"))
    assert out.dtype == torch.from_numpy(parts[0]).dtype
    assert out.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]


def test_a_chunk_that_codes_past_the_cap_is_coded_again_in_smaller_chunks(setup, tmp_path, monkeypatch):
    """The sender sizes a chunk coded in place by its tables' expected rate (wire.chunk_tokens); where the data
    codes larger than MAX_CHUNK_BYTES, the layer is coded again at half the step until every chunk fits: the
    frames keep the cap and decode to the same cache."""
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    profile = parse_profile("pca:b2:w:e:a")

    def chunks(frames):
        return [f.chunk for f in frames if f.WhichOneof("kind") == "chunk"]

    frames = list(wire.encode(kv, profile, loaded.fingerprint, context=ctx))
    back = wire.decode(frames, loaded.fingerprint, context=ctx)
    largest = max(len(c.payload) for c in chunks(frames))
    assert len(chunks(frames)) == kv.num_layers  # each layer's tokens in one chunk at the expected rate
    monkeypatch.setattr(wire, "MAX_CHUNK_BYTES", largest // 3)
    smaller = list(wire.encode(kv, profile, loaded.fingerprint, context=ctx))
    assert len(chunks(smaller)) > len(chunks(frames)) and max(len(c.payload) for c in chunks(smaller)) <= largest // 3
    back_smaller = wire.decode(smaller, loaded.fingerprint, context=ctx)
    for a, b in zip(back.keys + back.values, back_smaller.keys + back_smaller.values):
        assert torch.equal(a, b)


def test_the_split_gemms_code_and_decode_as_float32_does(setup, tmp_path, monkeypatch):
    """A GPU's pca:...:a runs its folded GEMMs on bf16 tensor cores (the split path, pca_fused); here the same
    arithmetic on the CPU (bf16 operands, float32 products). The same bytes decode to the same cache, within
    float32's rounding, whichever path synthesizes them (a GPU receiver or a CPU one), coded by either path. Coded
    either way, the cache is as far from the input: the coordinates differ only where one lies on a bin's edge (each
    such flip moves its token's whole tensor a little, so no element-wise bound holds)."""
    from common.quant import pca_entropy

    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    profile = parse_profile("pca:b2:w:e:a")
    emulated = []

    def tensor_core_mm(x, y):
        assert x.dtype == y.dtype == torch.bfloat16
        emulated.append(1)
        return x.float() @ y.float()

    def split(on: bool):
        monkeypatch.setattr(pca_entropy, "split_here", lambda device: on)

    def error(back):  # the squared error against the input, summed over every tensor
        return sum(float((a - b).pow(2).sum()) for a, b in zip(back.keys + back.values, kv.keys + kv.values))

    monkeypatch.setattr(pca_entropy, "tensor_core_mm", tensor_core_mm)
    split(True)
    split_frames = list(wire.encode(kv, profile, loaded.fingerprint, context=ctx))
    split_back = wire.decode(split_frames, loaded.fingerprint, context=ctx)
    assert emulated, "the split path ran"
    split(False)
    float_back = wire.decode(split_frames, loaded.fingerprint, context=ctx)
    for a, b in zip(split_back.keys + split_back.values, float_back.keys + float_back.values):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    float_frames = list(wire.encode(kv, profile, loaded.fingerprint, context=ctx))
    float_coded = wire.decode(float_frames, loaded.fingerprint, context=ctx)
    assert error(split_back) == pytest.approx(error(float_coded), rel=0.01)
    split(True)  # and the reverse: float32-coded bytes (a CPU sender's) through the split path (a GPU receiver's)
    reverse = wire.decode(float_frames, loaded.fingerprint, context=ctx)
    for a, b in zip(reverse.keys + reverse.values, float_coded.keys + float_coded.values):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("split", [False, True])
def test_a_cache_that_is_not_finite_is_refused_on_either_path(setup, tmp_path, monkeypatch, split):
    """pca:...:a refuses NaN or Inf in the cache with check_finite's error, on the float32 path and on the split path
    (pca_fused, here on the CPU with its GEMM emulated), where the quantization flags it and the sender checks the
    flag once per batch of layers."""
    from common.quant import pca_entropy
    from common.quant.base import QuantError

    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    context = CodecContext(context.rope, basis)
    monkeypatch.setattr(pca_entropy, "split_here", lambda device: split)
    monkeypatch.setattr(pca_entropy, "tensor_core_mm", lambda x, y: x.float() @ y.float())
    for bad in (float("nan"), float("inf")):
        keys = [k.clone() for k in kv.keys]
        keys[-1][0, 0, 3, 5] = bad
        broken = type(kv)(keys, kv.values, kv.positions, kv.seq_len, kv.importance)
        with pytest.raises(QuantError, match="NaN or Inf"):
            list(wire.encode(broken, parse_profile("pca:b2:w:e:a"), loaded.fingerprint, context=context))


@pytest.mark.parametrize("spec", ["pca:b2:w:e:a", "pca:b2:w:e:a:i1:f3"])
def test_rans_chunks_serialized_from_their_pieces_are_the_pb_frames_bytes(setup, tmp_path, spec):
    """The sender's frames (Encoder(serialized=True)) take a rANS code's parts as the coder leaves them on the host
    (rans.encode's pieces: states, word counts, words; the classes before them under :i) and copy them once: the
    bytes of the pb.Frame that holds the joined code, and the same cache decoded."""
    loaded, context, kv = setup
    basis = weighted(context.basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * context.basis.num_layers)
    ctx = CodecContext(context.rope, basis)
    kv = replace(kv, importance=[torch.logspace(-2, 1, kv.seq_len)] * kv.num_layers) if ":i" in spec else kv
    profile = parse_profile(spec)
    frames = list(wire.encode(kv, profile, loaded.fingerprint, "t", context=ctx))
    serialized = list(wire.encode(kv, profile, loaded.fingerprint, "t", context=ctx, serialized=True))
    assert sum(isinstance(f, bytes) for f in serialized) == sum(f.WhichOneof("kind") == "chunk" for f in frames) > 0
    assert [framing.serialize(f) for f in serialized] == [f.SerializeToString() for f in frames]
    symbols, models = case([100, 0, 200])
    pieces = rans.encode(symbols, models, rans_models(torch.device("cpu")), [100, 0, 200], pieces=True)
    joined = rans.encode(symbols, models, rans_models(torch.device("cpu")), [100, 0, 200])
    assert [b"".join(p) for p in pieces] == joined
