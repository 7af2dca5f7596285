"""The one ask pipeline: negotiate, prefill, select, encode, stream with retries, generate.

Every entry point that asks a receiver about a context goes through `Sender`: the CLI, the
sender's HTTP API, the demo, the load test, the sweep's validation and the segment trials.
Frames leave the sender from one place, `Sender.transfer` (whole caches, retried under a
stable transfer id) or `Sender.transfer_segments` (segmented streams), both through the
client. Profiles arrive here parsed (`Profile`); a profile the receiver picks is parsed once,
where its reply enters.

`Sender.ask_pipelined` is the same ask with the prefill overlapping the stream: each layer is coded
and sent as soon as it has run, in the frames `ask` would send. The frontier profiles
(pca:...:e:j:iG+text:h:q) pipeline too: the template's head travels first as text, and a layer's
per-token step classes come from its own share of the question's attention, which is complete when
that layer has run, because the question is prefilled with the context (no first pass; the bytes
and the answer are those of `ask`). Only a selection cannot pipeline: it ranks the whole cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import time
import uuid
from dataclasses import dataclass, field

import grpc
import torch

from common import wire
from common.kvstate import KVState
from common.link import Link, pace
from common.models import LoadedModel
from common.plan import CodecPlan
from common.profile import Profile, parse_profile
from common.profile.presets import AUTO, DEFAULT_PROFILE, resolve
from common.prompts import build_prompt
from common.proto import kvwire_pb2 as pb
from sender.adaptive import (
    DEFAULT_SEGMENT_TOKENS,
    AdaptiveResult,
    SegmentPlanner,
    SegmentRecord,
    send_segments,
)
from sender.client import Client, TransferResult, retryable
from sender.prefill import Prefilled, needs_question, prefill_built, prefill_prompt, select_tokens

# AUTO ("auto") lets the receiver's planner pick the profile for the link and deadline.
ASSUMED_BANDWIDTH_BPS = 100e6  # what `auto` plans for when nothing was measured or given (the receiver's default too)
log = logging.getLogger("kvwire.sender")


def with_transfer_id(header: pb.Frame, transfer_id: str) -> pb.Frame:
    """A copy of a header frame under another transfer id."""
    copy = pb.Frame()
    copy.CopyFrom(header)
    copy.header.transfer_id = transfer_id
    return copy


@dataclass
class AskResult:
    answer: str
    token_ids: list[int]
    profile: str  # the canonical profile the receiver agreed to, or "segments"
    session_id: str
    seq_len: int
    kept_tokens: int  # mean over layers
    bytes_sent: int  # serialized frames plus gRPC prefixes, of the attempt that got through
    frames: int
    attempts: int  # transfer attempts (1: no retry), the cache sent again after a lost session included
    fp16_bytes: int  # the full cache at fp16: the reference for ratios
    prefill_s: float
    encode_s: float  # selection and encoding
    transfer_s: float
    inject_s: float
    decode_s: float
    assemble_s: float = 0.0  # the receiver's work on the frames, inside transfer_s
    resends: int = 0  # times the cache was sent again because the receiver lost the session
    plan: str | None = None  # the receiver's reason, when it chose the profile
    segments: list[SegmentRecord] | None = None
    # ask_pipelined: seconds its stream waited for the prefill's layers ("layers"), coded them ("code") and waited
    # for gRPC to take its frames ("send"), in the stream's thread (from sender.client.read_ahead's clock)
    stream_s: dict[str, float] | None = None
    prefilled: Prefilled | None = field(default=None, repr=False)  # the sender's prefill, for comparisons

    @property
    def ratio_vs_fp16(self) -> float:
        return self.bytes_sent / self.fp16_bytes


def _is_auto(profile) -> bool:
    return isinstance(profile, str) and profile.strip().lower() == AUTO


def _result(reply, sent, pre: Prefilled, profile: str, **stages) -> AskResult:
    """An ask's result: what every way of asking fills alike, and its own `stages`."""
    return AskResult(answer=reply.text, token_ids=list(reply.token_ids), profile=profile, session_id=sent.session_id,
                     seq_len=pre.kv.seq_len, bytes_sent=sent.bytes_sent, frames=sent.frames, fp16_bytes=pre.kv.fp16_nbytes,
                     assemble_s=sent.assemble_s, inject_s=reply.inject_seconds, decode_s=reply.decode_seconds, prefilled=pre, **stages)


class Sender:
    """Asks one receiver (through `client`) about contexts prefilled with `loaded`."""

    def __init__(self, loaded: LoadedModel, client: Client, zstd_level: int = 3, attempts: int | None = None):
        self.loaded = loaded
        self.client = client
        self.zstd_level = zstd_level
        self.attempts = attempts or client.attempts  # default: KVWIRE_SEND_ATTEMPTS, through the client

    def negotiate(self, profile: Profile | str | dict, context_tokens: int = 0, query_aware: bool = True,
                  bandwidth_bps: float | None = None, deadline_s: float | None = None,
                  quality_floor: float = 0.0) -> tuple[Profile, str | None]:
        """The profile both sides use, and the receiver's reason when it planned one (`AUTO`).

        For `AUTO` the receiver plans among its calibrated profiles, at `bandwidth_bps` or this
        client's estimate of the link; query-agnostic asks offer only profiles that work
        without the question in the cache.
        """
        if not _is_auto(profile):
            profile = resolve(profile, self.loaded.name).bind(self.loaded.codec_context)  # a pca profile names the basis it is coded in
            agreed = self._retrying(lambda: self.client.negotiate(self.loaded.fingerprint, [str(profile)])).profile
            return (profile if agreed == str(profile) else parse_profile(agreed)), None
        offered = [] if query_aware else self._query_agnostic_profiles()
        assumed = None
        if bandwidth_bps is None and self.client.bandwidth.estimate() is None:
            bandwidth_bps = ASSUMED_BANDWIDTH_BPS
            assumed = (f"auto: no bandwidth measured or given; planned for {ASSUMED_BANDWIDTH_BPS / 1e6:g} Mbit/s "
                       "(pass --bandwidth, or bandwidth_bps, for your link)")
            log.warning(assumed)
        reply = self._retrying(lambda: self.client.negotiate(self.loaded.fingerprint, offered, "auto", context_tokens,
                                                             bandwidth_bps, deadline_s or 0.0, quality_floor))
        return parse_profile(reply.profile), (f"{assumed}; {reply.reason}" if assumed else reply.reason)

    def _retrying(self, call):
        """A unary call, again while the receiver is away or busy (see client.retryable)."""
        return self.client.call_with_retry(lambda attempt: call(), self.attempts)

    def _query_agnostic_profiles(self) -> list[str]:
        from common.planner import load_table

        table = load_table(self.loaded.name)
        return [name for name in table["profiles"] if not needs_question(parse_profile(name))]

    def prefill(self, context: str, question: str, query_aware: bool = True,
                profiles: list[Profile] = ()) -> Prefilled:
        return prefill_prompt(self.loaded, context, question, query_aware, profiles)

    def transfer(self, kv: KVState, profile: Profile, link: Link | None = None,
                 attempts: int | None = None) -> TransferResult:
        """Encode `kv` and stream it, retrying retryable failures under one transfer id."""
        frames = list(wire.encode(kv, profile, self.loaded.fingerprint, uuid.uuid4().hex, self.zstd_level,
                                   self.loaded.codec_context, serialized=True))
        return self.send(frames, link, attempts)

    def encode(self, pre: Prefilled, profile: Profile) -> tuple[KVState, list[pb.Frame | bytes]]:
        """The cache that travels (after the profile's selection and text stages) and its frames, its chunks
        serialized for the stream (wire.Encoder)."""
        kv = select_tokens(self.loaded, pre, profile)
        return kv, list(wire.encode(kv, profile, self.loaded.fingerprint, uuid.uuid4().hex, self.zstd_level,
                                    self.loaded.codec_context, pre.head_ids, serialized=True))

    def send(self, frames: list[pb.Frame | bytes], link: Link | None = None,
             attempts: int | None = None) -> TransferResult:
        """Stream encoded frames (one transfer id), retrying retryable failures; `link` paces them in process."""
        make = (lambda: pace(frames, link, wire.wire_bytes)) if link else (lambda: iter(frames))
        return self.client.send_with_retry(make, attempts or self.attempts)

    def transfer_segments(self, pre: Prefilled, planner: SegmentPlanner | None, deadline_s: float,
                          segment_tokens: int = DEFAULT_SEGMENT_TOKENS, initial_bps: float | None = None,
                          schedule: list[str] | None = None, started: float | None = None,
                          records: list[SegmentRecord] | None = None) -> AdaptiveResult:
        """Stream the prefilled cache in segments, each planned for the deadline (see sender.adaptive)."""
        return send_segments(self.client, pre.kv, pre.cache_ids, self.loaded.fingerprint, planner, deadline_s,
                             segment_tokens, initial_bps, schedule, self.zstd_level, started, records)

    def generate(self, session_id: str, pre: Prefilled, question: str, query_aware: bool,
                 max_new_tokens: int, seq_len: int | None = None) -> pb.GenerateReply:
        """Decode from a session whose cache ends at `seq_len` (default: the prefill's): the prompt's
        tokens after it (query-aware) or the question as text follow the cache."""
        if query_aware:
            return self.client.generate(session_id, token_ids=pre.tail_after(seq_len or pre.kv.seq_len),
                                        max_new_tokens=max_new_tokens)
        return self.client.generate(session_id, question=question, max_new_tokens=max_new_tokens)

    def ask(self, context: str, question: str, profile: Profile | str | dict = DEFAULT_PROFILE, query_aware: bool = True,
            max_new_tokens: int = 64, bandwidth_bps: float | None = None, deadline_s: float | None = None,
            quality_floor: float = 0.0, link: Link | None = None, prefilled: Prefilled | None = None) -> AskResult:
        """Answer `question` about `context` at the receiver, sending the context's cache under `profile`.

        `profile`: a preset name (lossless, int8, balanced, compact, auto), compact text
        (`int4:g32`), the long form ({"stages": [...]}) or a `Profile`; a preset resolves here, for
        this sender's model. `prefilled`: a prefill of this context and question made earlier (its
        attention statistics must cover the profile's selection). `link`: emulate a link in process.
        """
        tokens = 0
        if _is_auto(profile):
            tokens = prefilled.kv.seq_len if prefilled else len(build_prompt(self.loaded.tokenizer, context, question).ids)
        agreed, reason = self.negotiate(profile, tokens, query_aware, bandwidth_bps, deadline_s, quality_floor)
        pre = prefilled or self.prefill(context, question, query_aware, [agreed])
        start = time.perf_counter()
        kv, frames = self.encode(pre, agreed)
        encode_s = time.perf_counter() - start
        attempts = 0  # transfer attempts, over every time the cache was sent
        for attempt in range(1, self.attempts + 1):
            sent = self.send(frames, link)
            attempts += sent.attempts
            try:
                reply = self._retrying(lambda: self.generate(sent.session_id, pre, question, query_aware,
                                                             max_new_tokens, kv.seq_len))
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or attempt == self.attempts:
                    raise
                # The receiver lost the session (it restarted, or the session expired): send the
                # cache again, as a new transfer.
                log.warning("session %s is gone (%s); sending the cache again", sent.session_id, error.details())
                frames = [with_transfer_id(frames[0], uuid.uuid4().hex)] + frames[1:]
        return _result(reply, sent, pre, str(agreed),
                       kept_tokens=round(sum(kv.kept_tokens(i) for i in range(kv.num_layers)) / kv.num_layers),
                       attempts=attempts, prefill_s=pre.seconds, encode_s=encode_s, transfer_s=sent.seconds,
                       resends=attempt - 1, plan=reason)

    def ask_pipelined(self, context: str, question: str, profile: Profile | str | dict,
                      max_new_tokens: int = 64) -> AskResult:
        """Like `ask` (query-aware), but layer l streams while later layers are still being prefilled.

        The frames are those `ask` sends for the same profile, byte for byte: the header goes out
        before the prefill starts (every layer's positions are known from the prompt's length), and
        under text:h the template's head travels first, as a text segment the receiver prefills while
        the layers stream; under text:q the question follows as the generate call's tokens, as in
        `ask`. Per-token steps (pca:...:e:iG) read layer l's share of the question's attention, which
        is complete once layer l has run (the question is prefilled with the context): no first pass.
        A selection ranks tokens over the whole cache, so it is refused. If the stream fails, the
        finished cache is sent again the ordinary way, with retries.
        """
        if _is_auto(profile):
            raise ValueError("auto: the receiver may plan a selection, which pipelined streaming cannot send; "
                             "name a profile")
        agreed, _ = self.negotiate(profile)
        if agreed.selection is not None:
            raise ValueError(f"{agreed}: pipelined streaming sends a layer before the later ones exist, so no "
                             "selection stage (it ranks tokens over the whole cache); use ask")
        prompt = build_prompt(self.loaded.tokenizer, context, question)
        self.loaded.check_prompt(len(prompt.ids))  # before the header leaves
        seq_len = len(prompt.ids) - 1  # the receiver feeds the last prompt token
        end = len(prompt.context_ids) if agreed.text_question else seq_len  # the cache that travels: [0, end)
        head_ids = prompt.ids[:prompt.head_len]
        encoder = wire.Encoder(self.loaded.fingerprint, uuid.uuid4().hex, self.zstd_level, self.loaded.codec_context,
                               serialized=True)
        plan = CodecPlan.build(agreed.as_cache, self.loaded.codec_context, self.loaded.fingerprint.num_layers)  # once
        positions = wire.prefill_positions(self.loaded.config, seq_len, self.loaded.device)
        sent_positions = [p[:, wire.span(p, 0, end)] for p in positions]
        opening = encoder.opening(agreed, end, sent_positions, head_ids)  # a bad text:h fails here, not mid-stream
        start_token = wire.cache_start(agreed, end, head_ids)
        spans = [wire.span(p, start_token, end) for p in positions]
        ready: queue.Queue = queue.Queue()
        side = torch.cuda.Stream(self.loaded.device) if self.loaded.device.type == "cuda" else None

        def on_layer(layer: int, keys: torch.Tensor, values: torch.Tensor, importance: torch.Tensor | None) -> None:
            event = None
            if side is not None:  # encode on a side stream once the layer (and its importance) is computed
                event = torch.cuda.Event()
                event.record()
            ready.put((layer, keys, values, importance, event))

        waiting = [0.0]  # seconds the stream waited for the prefill's layers

        def frames():
            yield from opening
            for _ in range(len(positions)):
                waited = time.perf_counter()
                layer, keys, values, importance, event = ready.get()
                waiting[0] += time.perf_counter() - waited
                if layer is None:  # the prefill failed: end the stream short (the receiver refuses it)
                    return
                kept = spans[layer]
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    if event is not None:
                        side.wait_event(event)
                    yield from encoder.layer_chunks(layer, keys[:, :, kept], values[:, :, kept],
                                                    positions[layer][:, kept], plan, importance)
            yield encoder.trailer()

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(self.client.send_frames, frames())
            try:
                pre = prefill_built(self.loaded, prompt, True, [agreed], on_layer)
            except BaseException:
                ready.put((None, None, None, None, None))
                raise
            prefill_s = time.perf_counter() - start
            try:
                sent = streaming.result()
            except grpc.RpcError as error:
                if not retryable(error):
                    raise
                log.warning("pipelined stream failed (%s); sending the cache again", error.code().name)
                sent = self.send(self.encode(pre, agreed)[1])
        reply = self._retrying(lambda: self.generate(sent.session_id, pre, question, True, max_new_tokens, end))
        kept_tokens = round(sum(p.shape[1] for p in sent_positions) / len(sent_positions))
        return _result(reply, sent, pre, str(agreed), kept_tokens=kept_tokens, attempts=sent.attempts,
                       prefill_s=prefill_s, encode_s=0.0,  # inside the stream
                       transfer_s=time.perf_counter() - start,
                       stream_s={"layers": waiting[0], "code": sent.stream_s["code"] - waiting[0],
                                 "send": sent.stream_s["full"]})

    def ask_segments(self, context: str, question: str, planner: SegmentPlanner | None = None,
                     deadline_s: float = 2.0, segment_tokens: int = DEFAULT_SEGMENT_TOKENS,
                     initial_bps: float | None = None, max_new_tokens: int = 64,
                     table: dict | None = None) -> AskResult:
        """Answer `question`, the cache travelling in segments planned for `deadline_s` (query-aware).

        Without a planner, one is made from `table` (default: the model's calibration table),
        pricing text segments at this sender's own prefill rate.
        """
        pre = self.prefill(context, question)
        if planner is None:
            from common.planner import load_table

            planner = SegmentPlanner(table or load_table(self.loaded.name), text_s_per_token=pre.seconds_per_token)
        # The receiver must know this model and these codecs before anything streams.
        self.client.negotiate(self.loaded.fingerprint, planner.ladder)
        sent = self.transfer_segments(pre, planner, deadline_s, segment_tokens, initial_bps)
        reply = self.generate(sent.session_id, pre, question, True, max_new_tokens)
        return _result(reply, sent, pre, "segments", kept_tokens=pre.kv.seq_len, attempts=1, prefill_s=pre.seconds,
                       encode_s=0.0,  # segments encode as they stream
                       transfer_s=sent.seconds, segments=sent.segments)
