"""On a CUDA machine only. CI has no GPU, so these are skipped there; their runs on the GPU machine
are recorded in results/gpu_tests.txt (device, versions, output)."""

import pytest
import torch

from channel.bench_gpu import kernels
from channel.evaluation.metrics import f1
from channel.evaluation.squad import load_squad
from common.kvstate import reference_generate
from common.models import load_model
from common.profile import parse_profile
from sender.client import Client
from sender.pipeline import Sender
from common.plan import kv_codec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders from Denmark, Iceland and Norway.")
QUESTION = "Where is Normandy?"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "smollm2-135m"])
def test_lossless_over_grpc_on_cuda_reproduces_generate(start_receiver, name):
    loaded = load_model(name, "cuda", "float32")
    receiver = start_receiver(name, device="cuda", dtype="float32")
    with Client(receiver.target) as client:
        sender = Sender(loaded, client, attempts=1)
        asked = sender.ask(CONTEXT, QUESTION, parse_profile("raw"), max_new_tokens=16)
        piped = sender.ask_pipelined(CONTEXT, QUESTION, parse_profile("raw"), max_new_tokens=16)
    assert asked.token_ids == reference_generate(loaded.model, asked.prefilled.prompt.ids, 16)
    assert piped.token_ids == asked.token_ids
    assert receiver.servicer.sessions.get(asked.session_id).kv.keys[0].is_cuda


def test_cpu_sender_to_gpu_receiver_int8_keeps_the_answers(start_receiver):
    """A CPU float32 sender and a CUDA bfloat16 receiver of the same weights, int8: the answers match
    CPU to CPU within int8's usual fidelity."""
    cpu = load_model("smollm2-135m", "cpu", "float32")
    gpu_receiver = start_receiver("smollm2-135m", device="cuda", dtype="bfloat16")
    cpu_receiver = start_receiver("smollm2-135m", device="cpu", dtype="float32")
    int8 = parse_profile("int8")
    scores, same = [], 0
    with Client(gpu_receiver.target) as to_gpu, Client(cpu_receiver.target) as to_cpu:
        for sample in load_squad(limit=10):
            pre = Sender(cpu, to_cpu).prefill(sample.context, sample.question, True, [int8])
            on_cpu = Sender(cpu, to_cpu).ask(sample.context, sample.question, int8, max_new_tokens=24, prefilled=pre)
            on_gpu = Sender(cpu, to_gpu).ask(sample.context, sample.question, int8, max_new_tokens=24, prefilled=pre)
            scores.append(f1(on_gpu.answer, on_cpu.answer))
            same += on_gpu.token_ids == on_cpu.token_ids
    print(f"CPU->GPU(bf16) vs CPU->CPU, int8, 10 questions: {same}/10 identical, mean F1 {sum(scores) / 10:.3f}")
    assert sum(scores) / len(scores) >= 0.8


@pytest.mark.parametrize("spec", ["int8", "int4", "int4:g64:sym", "int3", "int2", "int1", "nf4", "int8:k=token:v=channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_are_bit_identical_to_torch_on_cuda(spec, dtype):
    codec = kv_codec(parse_profile(spec), 0)
    generator = torch.Generator("cuda").manual_seed(0)
    for tokens in (1, 77, 1000):
        keys = torch.randn(1, 8, tokens, 128, device="cuda", dtype=dtype, generator=generator)
        values = torch.randn(1, 8, tokens, 128, device="cuda", dtype=dtype, generator=generator)
        with kernels("torch"):
            reference = codec.encode(keys, values)
            back = codec.decode(reference, tuple(keys.shape), dtype)
        with kernels("triton"):
            fused = codec.encode(keys, values)
            fused_back = codec.decode(reference, tuple(keys.shape), dtype)
        assert torch.equal(fused, reference), (spec, dtype, tokens)
        assert all(torch.equal(a, b) for a, b in zip(fused_back, back)), (spec, dtype, tokens)
        with kernels("torch"):
            ranges = [codec.encode(keys[:, :, s:s + 300], values[:, :, s:s + 300]).cpu().numpy().tobytes()
                      for s in range(0, tokens, 300)]
        with kernels("triton"):
            assert list(codec.encode_chunks(keys, values, 300)) == ranges, (spec, dtype, tokens)


@pytest.mark.parametrize("heads, dim", [(2, 16), (8, 128)])
def test_pca_split_kernels_are_bit_identical_to_torch_on_cuda(heads, dim):
    """pca:...:a's split path (common.quant.pca_fused): each pass's kernel against its torch reference on CUDA."""
    from tests.common.quant.test_pca_fused import compare

    results = compare("cuda", heads, dim)
    assert results.pop("flag") == [True, True]
    assert len(results) == 19 and all(results.values()), results


def test_pca_split_corrupt_chunk_is_data_loss_at_the_segment_end_on_cuda(tmp_path):
    """The rANS kernels tell a bad code on the device (rans_triton.decode's `failed`) and the assembler reads the
    verdicts when the segment completes: DATA_LOSS naming the layer, no cache, no device fault."""
    import grpc

    from common import wire
    from common.kvstate import prefill
    from common.quant.transform import CodecContext
    from tests.common.quant.test_transforms import IDS, fitted_basis, weighted

    loaded = load_model("tiny-llama", "cuda", "float32")
    basis = fitted_basis(loaded, tmp_path / "basis.safetensors")
    basis = weighted(basis, tmp_path / "w.safetensors", [[1.0, 1.0]] * basis.num_layers)
    context = CodecContext.for_model(loaded.model, basis)
    frames = list(wire.encode(prefill(loaded.model, IDS), parse_profile("pca:b2:w:e:a"), loaded.fingerprint,
                              context=context))
    chunk = next(f.chunk for f in frames if f.WhichOneof("kind") == "chunk" and f.chunk.payload and f.chunk.layer == 1)
    chunk.payload = chunk.payload[:-2] + b"\x01\x00"  # the same size: only the decode can tell
    chunk.crc32c = wire.checksum(chunk.payload)
    assembler = wire.Assembler(loaded.fingerprint, wire.Limits(), context=context, device="cuda")
    last = max(i for i, f in enumerate(frames) if f.WhichOneof("kind") == "chunk")
    for frame in frames[:last]:
        assembler.add(frame)
    with pytest.raises(wire.WireError, match="layer 1: payload does not decompress") as caught:
        assembler.add(frames[last])
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and not assembler.take_segments()
    torch.cuda.synchronize()  # the device is still sound


FRONTIER = ("pca:b1.7:w:e:j:a:i1:f3+text", "pca:b3.05:w:e:j:a:i1:f3+text")


@pytest.mark.parametrize("spec", FRONTIER)
def test_frontier_answers_match_across_devices(start_receiver, spec):
    """SmolLM2 with its shipped basis, float32 on both devices, 20 SQuAD questions: the rANS-coded frontier
    stage gives CPU->CPU's greedy answer GPU->GPU, GPU->CPU and CPU->GPU for at least 19 of 20 (the
    transform's float rounding may move a coordinate across a bin's edge: docs/gpu.md)."""
    profile = parse_profile(spec)
    models = {device: load_model("smollm2-135m", device, "float32") for device in ("cpu", "cuda")}
    receivers = {device: start_receiver("smollm2-135m", device=device, dtype="float32") for device in ("cpu", "cuda")}
    same = {(a, b): 0 for a in models for b in models if (a, b) != ("cpu", "cpu")}
    scores = {pair: [] for pair in same}
    for sample in load_squad(limit=20):
        answers = {}
        for (a, b) in [("cpu", "cpu"), *same]:
            with Client(receivers[b].target) as client:
                asked = Sender(models[a], client, attempts=1).ask(sample.context, sample.question, profile,
                                                                  max_new_tokens=24)
            answers[a, b] = asked
        for pair in same:
            same[pair] += answers[pair].token_ids == answers["cpu", "cpu"].token_ids
            scores[pair].append(f1(answers[pair].answer, answers["cpu", "cpu"].answer))
    for (a, b), count in same.items():
        print(f"{spec}: {a} sender -> {b} receiver: {count}/20 answers as CPU->CPU, "
              f"F1 against it {sum(scores[a, b]) / 20:.3f}")
    assert all(count >= 19 for count in same.values())
