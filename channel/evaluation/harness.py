"""`kvwire eval`: prefill once per sample, apply every profile, and measure what each byte buys.

Model work runs in process; every profile's bytes are the serialized frames that
`common.wire` produces for it, decoded back through the receiver's own assembler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from channel.evaluation.metrics import best_em, best_f1, f1, summarize_groups
from channel.evaluation.squad import Sample
from common import wire
from common.kvstate import KVState, greedy_decode
from common.models import LoadedModel
from common.profile import Profile
from common.proto import kvwire_pb2 as pb
from sender.prefill import prefill_prompt, select_tokens


@dataclass
class EvalRow:
    sample_id: str
    profile: str
    answer: str
    full_answer: str
    f1_gold: float
    em_gold: float
    fidelity_f1: float
    token_match: bool
    kl_first: float
    top1_agree: bool
    bytes: int
    fp16_bytes: int
    seq_len: int
    kept_tokens: int  # mean over layers
    prefill_s: float
    select_s: float
    encode_s: float
    assemble_s: float
    inject_s: float
    first_token_s: float  # tail prefill + first answer token on the receiver
    decode_s: float
    frame_bytes: list[int]  # each frame on the wire, for the link model
    text_bytes: int  # the text baseline: the prompt as UTF-8 in one gRPC message
    text_prefill_s: float  # the receiver's prefill of the whole prompt + first token
    # Mean per-token KL(full || received) along the full-cache answer, teacher-forced (see
    # teacher_forced_logits); last, with a default, so that positional constructions keep working.
    kl_tf: float = float("nan")


def text_baseline(loaded: LoadedModel, pre) -> tuple[int, float]:
    """Bytes and receiver time when the prompt travels as text and the receiver prefills it."""
    text = loaded.tokenizer.decode(pre.prompt.ids)
    timings: dict = {}
    greedy_decode(loaded.model, DynamicCache(config=loaded.config), pre.prompt.ids, 0, 1, timings=timings)
    return len(text.encode()) + wire.GRPC_MESSAGE_PREFIX + 8, timings["first_token_s"]


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || other) of the next-token distributions, in nats."""
    p = reference_logits.log_softmax(-1)
    q = logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


@torch.inference_mode()
def teacher_forced_logits(model, cache, tail_ids: list[int], start_position: int, answer: list[int]) -> torch.Tensor:
    """Next-token logits at each step of `answer` fed after `tail_ids` on top of `cache`: (len(answer), vocab).

    Row j is the distribution the receiver predicts after the tail and answer[:j], i.e. at
    answer step j (row 0 is the first answer token's). Layers holding different numbers of
    tokens (per-layer budgets) take the tokens one at a time, as greedy_decode does.
    """
    ids = tail_ids + answer[:-1]
    device = model.device
    if len({layer.get_seq_length() for layer in cache.layers if not layer.is_sliding}) > 1:
        rows = []
        for offset, token in enumerate(ids):
            out = model(input_ids=torch.tensor([[token]], device=device), cache=cache,
                        position_ids=torch.tensor([[start_position + offset]], device=device), use_cache=True)
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows[len(tail_ids) - 1:])
    position_ids = torch.arange(start_position, start_position + len(ids), device=device).unsqueeze(0)
    logits = model(input_ids=torch.tensor([ids], device=device), cache=cache, position_ids=position_ids,
                   use_cache=True).logits
    return logits[0, len(tail_ids) - 1:].float()


def receive(loaded: LoadedModel, frames: list[pb.Frame]) -> KVState:
    """The cache a receiver builds from `frames`: a whole cache, or segments (text prefilled on top)."""
    assembler = wire.Assembler(loaded.fingerprint, wire.Limits(), segmented=None, device=loaded.device,
                               context=loaded.codec_context)
    for frame in frames:
        assembler.add(frame)
    kv = None
    for segment in assembler.take_segments():
        kv = wire.place(loaded.model, kv, segment)
    return kv


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(reference || other), in nats: (steps, vocab) each."""
    p = reference_logits.log_softmax(-1)
    q = logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def evaluate(loaded: LoadedModel, samples: list[Sample], profiles: list[Profile], max_new_tokens: int = 24,
             query_aware: bool = True, progress: Callable[[], None] | None = None) -> list[EvalRow]:
    prefill_prompt(loaded, "warm up", "?")  # first-call overheads stay out of the timings
    rows = []
    for sample in samples:
        pre = prefill_prompt(loaded, sample.context, sample.question, query_aware, profiles)
        reference_logits: list = []
        full = greedy_decode(loaded.model, pre.kv.to_cache(loaded.config), pre.tail_ids, pre.kv.seq_len,
                             max_new_tokens, reference_logits)
        full_answer = loaded.tokenizer.decode(full, skip_special_tokens=True)
        reference_tf = teacher_forced_logits(loaded.model, pre.kv.to_cache(loaded.config), pre.tail_ids,
                                             pre.kv.seq_len, full)
        text_bytes, text_prefill_s = text_baseline(loaded, pre)
        for profile in profiles:
            start = time.perf_counter()
            kv = select_tokens(loaded, pre, profile)
            selected = time.perf_counter()
            frames = list(wire.encode(kv, profile, loaded.fingerprint, context=loaded.codec_context,
                                      head_ids=pre.head_ids))
            encoded = time.perf_counter()
            received = receive(loaded, frames)
            assembled = time.perf_counter()
            cache = received.to_cache(loaded.config)
            injected = time.perf_counter()
            logits: list = []
            timings: dict = {}
            tail = pre.tail_after(received.seq_len)
            tokens = greedy_decode(loaded.model, cache, tail, received.seq_len, max_new_tokens, logits, timings=timings)
            decoded = time.perf_counter()
            answer = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
            forced = teacher_forced_logits(loaded.model, received.to_cache(loaded.config), tail, received.seq_len, full)
            # The question as token ids (text:q) travels in the Generate request: its bytes count too.
            text_q = pb.GenerateRequest(token_ids=tail).ByteSize() if profile.text_question else 0
            rows.append(EvalRow(
                sample_id=sample.id, profile=str(profile), answer=answer, full_answer=full_answer,
                f1_gold=best_f1(answer, sample.answers), em_gold=best_em(answer, sample.answers),
                fidelity_f1=f1(answer, full_answer), token_match=tokens == full,
                kl_first=kl_divergence(reference_logits[0], logits[0]), kl_tf=mean_kl(reference_tf, forced),
                top1_agree=int(logits[0].argmax()) == int(reference_logits[0].argmax()),
                bytes=sum(map(wire.wire_bytes, frames)) + text_q, fp16_bytes=pre.kv.fp16_nbytes, seq_len=pre.kv.seq_len,
                kept_tokens=round(sum(kv.kept_tokens(i) for i in range(kv.num_layers)) / kv.num_layers),
                prefill_s=pre.seconds, select_s=selected - start, encode_s=encoded - selected,
                assemble_s=assembled - encoded, inject_s=injected - assembled,
                first_token_s=timings["first_token_s"], decode_s=decoded - injected,
                frame_bytes=[wire.wire_bytes(f) for f in frames], text_bytes=text_bytes, text_prefill_s=text_prefill_s,
            ))
            if progress:
                progress()
    return rows


SUMMARY_STATS = (
    *((key, "mean_ci", key) for key in ("f1_gold", "em_gold", "fidelity_f1", "kl_first", "kl_tf")),
    ("top1_agree", "mean", "top1_agree"), ("token_match_rate", "mean", "token_match"), ("bytes_mean", "mean", "bytes"),
    ("ratio_vs_fp16", "ratio", ("bytes", "fp16_bytes")), ("kept_fraction", "ratio", ("kept_tokens", "seq_len")),
    ("seq_len_mean", "mean", "seq_len"),
    *((key, "mean", key) for key in ("prefill_s", "select_s", "encode_s", "assemble_s", "inject_s", "first_token_s",
                                     "decode_s")),
)


def aggregate(rows: list[EvalRow]) -> list[dict]:
    """Per profile, in first-seen order: means with 95% confidence half-widths."""
    return summarize_groups(rows, ["profile"], SUMMARY_STATS)


def rows_as_dicts(rows: list[EvalRow]) -> list[dict]:
    return [asdict(r) for r in rows]
