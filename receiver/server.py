"""The receiver: a grpc.aio server that assembles streamed caches and decodes answers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import hashlib
import logging
import math
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import framing, wire
from common.fingerprints import refusal
from common.kvstate import KVState, greedy_decode
from common.models import LoadedModel, load_model
from common.plan import unsupported
from common.planner import load_table, plan
from common.profile import ProfileError, parse_profile
from common.prompts import question_ids
from common.proto import kvwire_pb2 as pb
from common.proto import kvwire_pb2_grpc as pb_grpc
from common.settings import Settings, get_settings
from receiver.auth import BearerAuthInterceptor
from receiver.metrics import ReceiverMetrics
from receiver.sessions import SESSION_OVERHEAD_BYTES, SessionError, SessionStore

log = logging.getLogger("kvwire.receiver")
SERVICE_NAME = wire.SERVICE_NAME
DEFAULT_NEW_TOKENS = 64
RECENT = 50
# Negotiate's numbers: 0 asks for the default; anything else must be finite and at most these.
NEGOTIATION_BOUNDS = {"bandwidth_bps": 1e15, "deadline_s": 86_400.0, "quality_floor": 1.0}
# A question longer than this many characters per token of context cannot fit it: refused before
# it is tokenized (tokenizing megabytes takes seconds).
MAX_QUESTION_CHARS_PER_TOKEN = 16
# Frames decoded in one hop off the event loop (a thread switch and a wake of the loop each): a 32K-token
# frontier cache of the 8B shape is about 4,000 frames.
FRAMES_PER_HOP = 64


def sized_frame(message: bytes) -> tuple[pb.Frame, int, memoryview | None]:
    """A frame stream's message: the frame, its bytes on the wire from the message's length (counting a parsed
    chunk would read its payload field, a copy of it), and a chunk's payload as a view of the message
    (`framing.received`)."""
    frame, payload = framing.received(message)
    return frame, wire.wire_bytes(message), payload


def add_servicer(servicer, server) -> None:
    """The generated add_KVWireServicer_to_server's handlers, but the frame streams' messages deserialized by
    sized_frame."""
    handlers = {
        "Negotiate": grpc.unary_unary_rpc_method_handler(
            servicer.Negotiate, request_deserializer=pb.NegotiateRequest.FromString,
            response_serializer=pb.NegotiateReply.SerializeToString),
        "Transfer": grpc.stream_unary_rpc_method_handler(
            servicer.Transfer, request_deserializer=sized_frame, response_serializer=pb.TransferReply.SerializeToString),
        "TransferSegments": grpc.stream_stream_rpc_method_handler(
            servicer.TransferSegments, request_deserializer=sized_frame, response_serializer=pb.SegmentAck.SerializeToString),
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def add_frames(assembler: wire.Assembler, frames: list[tuple[pb.Frame, int, memoryview | None]]) -> None:
    for frame, size, payload in frames:
        assembler.add(frame, size, payload)


class AbortNegotiation(Exception):
    pass


async def finish_in_thread(function, *args):
    """function(*args) in a worker thread, awaited to its end even if the caller is cancelled (client
    gone, deadline passed): a model pass cannot be interrupted, and the model lock its caller holds
    must stay held until the pass is over. The cancellation is raised once it is."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([work])
        raise


def prefill_working_bytes(config, cached: int, new: int) -> int:
    """The memory a prefill of `new` tokens on top of `cached` ones takes beyond the cache it adds:
    the attention mask and one layer's scores, (new, cached + new) float32 each, and the activations
    of the new tokens (float32). An estimate; its n^2 term is what must not escape the budget."""
    text = config.get_text_config()
    scores = 4 * new * (cached + new) * (1 + getattr(text, "num_attention_heads", 1))
    activations = 4 * new * (4 * text.hidden_size + 2 * getattr(text, "intermediate_size", 4 * text.hidden_size))
    return scores + activations


def header_digest(header: pb.Header) -> bytes:
    return hashlib.sha256(header.SerializeToString(deterministic=True)).digest()


def log_rejection(rpc: str, code: grpc.StatusCode, message: str, exc: Exception) -> None:
    if code == grpc.StatusCode.INTERNAL:  # a bug of ours: keep the traceback
        log.error("%s failed (INTERNAL): %s", rpc, message, exc_info=exc)
    else:
        log.warning("%s rejected (%s): %s", rpc, code.name, message)


async def abort(context, code: grpc.StatusCode, message: str) -> None:
    """End the call with a status. If the call is over already (its deadline passed, the client left),
    nobody can hear one: grpc refuses to send it, and the handler ends as cancelled instead."""
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # noqa: BLE001 - grpc's ExecuteBatchError or UsageError: the call has ended
        raise asyncio.CancelledError from None


def answers_with_status(handler):
    """A unary handler whose every exception becomes a specific status (wire.status_for), never UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:  # the handler chose its status already
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, INTERNAL for the unexpected
            code, message = wire.status_for(exc)
            log_rejection(handler.__name__, code, message, exc)
            await abort(context, code, message)

    return wrapper


class KVWireServicer(pb_grpc.KVWireServicer):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = wire.Limits(settings.max_frame_bytes, settings.max_transfer_bytes, settings.max_tokens)
        self.sessions = SessionStore(settings.session_ttl_s, settings.session_budget_bytes)
        self.metrics = ReceiverMetrics()
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)  # for the dashboard
        self.loaded: LoadedModel | None = None
        self._model_lock = asyncio.Lock()  # one decode at a time: the CPU has few cores to share
        # Transfers are idempotent by transfer id: a retry of a finished one (the same header) gets the
        # same session. transfer id -> (session id, digest of its header); ids are bounded in length.
        self.completed: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()
        self.streaming_ids: set[str] = set()  # transfer ids of streams in flight: one stream per id
        self.inflight_bytes = 0  # reserved by headers of transfers still streaming

    async def _model(self, context) -> LoadedModel:
        if self.loaded is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the receiver is still loading its model")
        return self.loaded

    @answers_with_status
    async def Negotiate(self, request: pb.NegotiateRequest, context) -> pb.NegotiateReply:
        try:
            return await self._negotiate(request, context)
        except AbortNegotiation as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot plan: {exc}")

    async def _negotiate(self, request: pb.NegotiateRequest, context) -> pb.NegotiateReply:
        loaded = await self._model(context)
        reason = refusal(request.fingerprint, loaded.fingerprint, None)
        if reason:
            raise wire.WireError(grpc.StatusCode.FAILED_PRECONDITION, f"{reason} (receiver model {loaded.name})")
        check_negotiation_numbers(request)
        if request.policy not in ("", "fixed", "auto"):
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"unknown policy {wire.clip(repr(request.policy), 80)}; use fixed or auto")
        if len(request.profiles) > wire.MAX_OFFERED_PROFILES:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.profiles)} profiles offered; "
                                 f"at most {wire.MAX_OFFERED_PROFILES}")
        # Parsing the offers (and planning) derives codec plans: off the event loop, which serves health checks.
        return await asyncio.to_thread(self._choose, loaded, request)

    def _choose(self, loaded: LoadedModel, request: pb.NegotiateRequest) -> pb.NegotiateReply:
        offered, refused = [], []
        for spec in request.profiles:
            try:
                profile = parse_profile(spec)
                profile.check_layers(loaded.fingerprint.num_layers)
            except ProfileError:
                continue
            # raw between different dtypes; a PCA basis this receiver does not hold
            reason = refusal(request.fingerprint, loaded.fingerprint, profile) or unsupported(profile, loaded.codec_context)
            (refused if reason else offered).append(reason or str(profile))
        if request.policy == "auto":
            return self._plan(loaded, request, offered)
        if not offered and refused:
            raise wire.WireError(grpc.StatusCode.FAILED_PRECONDITION, refused[0])
        if not offered:
            first = wire.clip(repr(request.profiles[0]), 100) if request.profiles else "none"
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT, f"none of the {len(request.profiles)} offered "
                                 f"profiles is supported (the first: {first})")
        return pb.NegotiateReply(fingerprint=loaded.fingerprint, profile=offered[0], limits=self.limits.to_proto(),
                                 reason="fixed: the first offered profile this receiver decodes")

    def _plan(self, loaded: LoadedModel, request: pb.NegotiateRequest, offered: list[str]) -> pb.NegotiateReply:
        """Policy auto: the planner's pick among the offered (or all calibrated) profiles."""
        try:
            table = load_table(loaded.name)
            # Only what this sender can send here: raw cannot cross between different dtypes.
            allowed = [p for p in (offered or table["profiles"]) if p in table["profiles"]
                       and not refusal(request.fingerprint, loaded.fingerprint, parse_profile(p))]
            chosen = plan(table, max(1, request.context_tokens), request.bandwidth_bps or 100e6,
                          request.deadline_s or 2.0, request.quality_floor, allowed)
        except (FileNotFoundError, ValueError) as exc:
            raise AbortNegotiation(str(exc)) from None
        log.info("negotiated %s for %d tokens at %.1f Mbit/s, deadline %.2f s: %s", chosen.profile,
                 request.context_tokens, (request.bandwidth_bps or 100e6) / 1e6, request.deadline_s or 2.0, chosen.reason)
        return pb.NegotiateReply(fingerprint=loaded.fingerprint, profile=chosen.profile, limits=self.limits.to_proto(),
                                 reason=chosen.reason, expected_seconds=chosen.expected_seconds,
                                 expected_fidelity=chosen.expected_fidelity, capabilities=sorted(table["profiles"]))

    async def Transfer(self, request_iterator, context) -> pb.TransferReply:
        reply = None
        # Either kind: a whole cache, or segments (a profile's text:h sends the template's head as text).
        async for ack in self._receive(request_iterator, context, segmented=None):
            reply = ack.done
        return reply

    async def TransferSegments(self, request_iterator, context):
        async for ack in self._receive(request_iterator, context, segmented=True):
            yield ack

    async def _frames(self, request_iterator):
        """The stream's frames in batches of those already read (at most FRAMES_PER_HOP), read up to
        KVWIRE_READ_AHEAD_BYTES ahead of their decoding (a larger frame alone); a stream idle for
        KVWIRE_STREAM_IDLE_S is dropped, freeing its reservation. Without read-ahead gRPC reads the next
        message only when asked, and the link idles while a chunk decodes (a pca:...:a tier decodes when its
        last chunk is in: at 32K tokens of the 8B shape, 12 MB at 6.25% of fp16)."""
        idle_s, limit = self.settings.stream_idle_s, self.settings.read_ahead_bytes
        ready: asyncio.Queue = asyncio.Queue()
        room = asyncio.Condition()
        held = 0  # bytes read and not yet decoded

        async def read() -> None:
            nonlocal held
            try:
                async for item in request_iterator:  # sized_frame's
                    nbytes = item[1]
                    async with room:
                        await room.wait_for(lambda: not held or held + nbytes <= limit)
                        held += nbytes
                    ready.put_nowait(item)
                ready.put_nowait((None, 0, None))
            except Exception as exc:  # noqa: BLE001 - handed to the reader below, raised there
                ready.put_nowait((exc, 0, None))

        reader = asyncio.create_task(read())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(ready.get(), idle_s)
                except TimeoutError:
                    raise wire.WireError(grpc.StatusCode.ABORTED, f"no frame for {idle_s:g} s (KVWIRE_STREAM_IDLE_S): "
                                         "transfer dropped, nothing injected") from None
                batch = []
                while True:
                    frame, nbytes, _ = item
                    async with room:
                        held -= nbytes
                        room.notify_all()
                    if frame is None or isinstance(frame, Exception):
                        if batch:
                            yield batch
                        if frame is None:
                            return
                        raise frame
                    batch.append(item)
                    if len(batch) == FRAMES_PER_HOP or ready.empty():
                        break
                    item = ready.get_nowait()
                yield batch
        finally:
            reader.cancel()

    def _repeated(self, header: pb.Header, digest: bytes) -> str | None:
        """The session of a finished transfer this header repeats; refuses another header under a used id,
        and a second stream of an id still in flight (the sender retries once the first has ended)."""
        transfer_id = header.transfer_id
        if transfer_id in self.streaming_ids:
            raise wire.WireError(grpc.StatusCode.ABORTED, f"transfer {transfer_id!r} is in flight on another "
                                 "stream; retry once it has ended")
        previous = self.completed.get(transfer_id)
        if previous is None or previous[0] not in self.sessions:
            return None
        if previous[1] != digest:
            raise wire.WireError(grpc.StatusCode.ALREADY_EXISTS, f"transfer id {transfer_id!r} was used for a "
                                 "different header; a new cache needs a new transfer id")
        return previous[0]

    def _check_seq_len(self, loaded: LoadedModel, seq_len: int) -> None:
        """A cache must leave room for a prompt token and an answer token within the model's context:
        checked at the header, before any chunk is decoded or text prefilled."""
        limit, name = self._context_limit(loaded)
        if seq_len + 2 > limit:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT, f"seq_len {seq_len} leaves no room for a prompt "
                                 f"and an answer within {name}, {limit} tokens")

    async def _receive(self, request_iterator, context, segmented: bool | None):
        """Assemble one transfer (segmented: True or False to require that kind, None for either);
        yield an ack per segment in place (TransferSegments), then one carrying the reply."""
        loaded = await self._model(context)
        assembler = wire.Assembler(loaded.fingerprint, self.limits, segmented, wire.sliding_windows(loaded.config),
                                   loaded.device, loaded.codec_context)
        start = time.perf_counter()
        busy = 0.0  # the receiver's own work: decompress, decode and place chunks (prefill text segments)
        reserved = 0
        kv = None
        acked = 0
        sent_as: collections.Counter[str] = collections.Counter()
        claimed = None  # this stream's transfer id, once its header is in
        self.metrics.inflight.inc()
        try:
            async for batch in self._frames(request_iterator):
                while batch:
                    if claimed is None:  # until the header is in and its bytes reserved, a frame at a time
                        frames, batch = batch[:1], batch[1:]
                        first = frames[0][0]
                        if first.WhichOneof("kind") == "header":  # before the limits: past the model's context
                            self._check_seq_len(loaded, first.header.seq_len)  # is a bad argument
                    else:
                        frames, batch = batch, []
                    began = time.perf_counter()
                    # Decoding chunks (or deriving a header's codec plan) is heavy: off the event loop, in one hop.
                    await asyncio.to_thread(add_frames, assembler, frames)
                    busy += time.perf_counter() - began
                    if claimed is None and assembler.header is not None:
                        header = assembler.header
                        digest = await asyncio.to_thread(header_digest, header)
                        previous = self._repeated(header, digest)
                        if previous is not None:
                            log.info("transfer %s repeated: session %s", header.transfer_id, previous)
                            yield pb.SegmentAck(done=pb.TransferReply(session_id=previous,
                                                                      bytes_received=assembler.bytes_received))
                            return
                        claimed = header.transfer_id
                        self.streaming_ids.add(claimed)
                        reserved = self._reserve(assembler.expected_bytes + SESSION_OVERHEAD_BYTES)
                    for segment in assembler.take_segments():
                        began = time.perf_counter()
                        kv = await self._place(loaded, kv, segment)
                        busy += time.perf_counter() - began
                        sent_as[segment.profile] += segment.end - segment.start
                        if segmented:
                            yield pb.SegmentAck(segment=acked, bytes_received=assembler.bytes_received)
                        acked += 1
            if not assembler.done:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    # The stream ended because the caller's deadline passed, not because it was cut short:
                    # the caller has its DEADLINE_EXCEEDED already (counted and logged below).
                    raise asyncio.CancelledError
                raise wire.WireError(grpc.StatusCode.DATA_LOSS,
                                     "stream ended before the trailer: transfer incomplete, nothing injected")
            # A segmented transfer's profile, for the dashboard: tokens per segment profile.
            profile = assembler.header.profile or ", ".join(f"{name} ({tokens} tokens)" for name, tokens in sent_as.items())
            session = self.sessions.put(kv, profile, assembler.bytes_received)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure gets a specific status (wire.status_for)
            # Free the reservation before the client hears: a retry must not find the receiver busy with it.
            self.inflight_bytes -= reserved
            reserved = 0
            code, message = wire.status_for(exc)
            log_rejection("transfer", code, message, exc)
            self.metrics.rejected_frames.labels(code.name).inc()
            self.metrics.transfers.labels("rejected").inc()
            self.metrics.bytes_received.inc(assembler.bytes_received)
            await abort(context, code, message)
        except asyncio.CancelledError:
            # Client gone or deadline passed: the partial cache is dropped, never injected.
            remaining = context.time_remaining()
            outcome = "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
            self.metrics.transfers.labels(outcome).inc()
            log.warning("transfer %s after %d bytes; partial cache dropped", outcome, assembler.bytes_received)
            raise
        finally:
            self.inflight_bytes -= reserved
            self.streaming_ids.discard(claimed)
            self.metrics.inflight.dec()
        self.completed[assembler.header.transfer_id] = (session.id, digest)
        while len(self.completed) > 10_000:
            self.completed.popitem(last=False)
        seconds = time.perf_counter() - start
        self.metrics.transfers.labels("ok").inc()
        self.metrics.bytes_received.inc(assembler.bytes_received)
        self.metrics.transfer_seconds.observe(seconds)
        self.metrics.active_sessions.set(len(self.sessions))
        self.recent.appendleft({"session": session.id, "profile": session.profile, "bytes": assembler.bytes_received,
                                "tokens": kv.seq_len, "transfer_s": seconds, "answer": None, "decode_s": None,
                                "at": time.time()})
        log.info("session %s: %d bytes, profile %s", session.id, assembler.bytes_received, session.profile)
        yield pb.SegmentAck(bytes_received=assembler.bytes_received, done=pb.TransferReply(
            session_id=session.id, bytes_received=assembler.bytes_received, assemble_seconds=busy))

    async def _place(self, loaded: LoadedModel, kv: KVState | None, segment: wire.Segment) -> KVState:
        """Append a received segment to the cache assembled so far; text segments are prefilled on top of it."""
        if segment.kv is not None:
            return wire.place(loaded.model, kv, segment)
        vocab = loaded.model.get_input_embeddings().num_embeddings
        if max(segment.token_ids) >= vocab:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"text segment [{segment.start}, {segment.end}): token id {max(segment.token_ids)} "
                                 f"is outside the vocabulary of {vocab}")
        if loaded.sliding_layers:
            raise wire.WireError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"{loaded.name} has sliding-window layers, which keep only their window: "
                                 "a text segment cannot be prefilled on top of received ones")
        # The prefill's own working memory (its mask grows with n^2) is held in the budget while it runs.
        working = self._reserve(prefill_working_bytes(loaded.config, kv.seq_len if kv else 0, len(segment.token_ids)))
        try:
            async with self._model_lock:
                return await finish_in_thread(wire.place, loaded.model, kv, segment)
        finally:
            self.inflight_bytes -= working

    def _reserve(self, nbytes: int) -> int:
        """Hold memory for a transfer in flight; refuse (the client backs off) when the budget is taken."""
        self.sessions.expire()  # sessions past their TTL hold nothing
        if nbytes > self.settings.session_budget_bytes:
            raise wire.WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"cache of {nbytes} bytes exceeds the session budget of {self.settings.session_budget_bytes}")
        if self.inflight_bytes + self.sessions.pinned_bytes + nbytes > self.settings.session_budget_bytes:
            raise wire.WireError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"receiver busy: {self.inflight_bytes} bytes in flight, "
                                 f"{self.sessions.pinned_bytes} held for sessions not yet asked; retry later")
        self.inflight_bytes += nbytes
        return nbytes

    @answers_with_status
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateReply:
        loaded = await self._model(context)
        try:
            session = self.sessions.get(request.session_id)
        except SessionError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, wire.clip(exc.args[0]))
        limit = self.settings.max_new_tokens
        max_new = request.max_new_tokens or min(DEFAULT_NEW_TOKENS, limit)
        if max_new > limit:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"max_new_tokens {max_new} exceeds the limit of {limit} (KVWIRE_MAX_NEW_TOKENS)")
        tail = await asyncio.to_thread(self._tail, loaded, request)  # tokenizing is heavy: off the event loop
        kv = session.kv
        self._check_context(loaded, kv.seq_len, len(tail), max_new)  # before the lock: a refusal never waits
        session.generations += 1
        async with self._model_lock:
            start = time.perf_counter()
            cache = kv.to_cache(loaded.config)
            injected = time.perf_counter()
            tokens = await finish_in_thread(greedy_decode, loaded.model, cache, tail, kv.seq_len, max_new)
            done = time.perf_counter()
        text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        self.metrics.decode_seconds.observe(done - start)
        for entry in self.recent:
            if entry["session"] == session.id:
                entry.update(answer=text, decode_s=done - start)
                break
        return pb.GenerateReply(text=text, token_ids=tokens, inject_seconds=injected - start, decode_seconds=done - injected)

    def _tail(self, loaded: LoadedModel, request: pb.GenerateRequest) -> list[int]:
        """The tokens to prefill on top of the cache: the request's ids, or its question in the chat template."""
        if request.token_ids:
            tail = list(request.token_ids)
            vocab = loaded.model.get_input_embeddings().num_embeddings
            if max(tail) >= vocab:
                raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"token id {max(tail)} is outside the vocabulary of {vocab}")
            return tail
        if request.question:
            limit, name = self._context_limit(loaded)
            if len(request.question) > MAX_QUESTION_CHARS_PER_TOKEN * limit:
                raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT, f"question of {len(request.question)} characters "
                                     f"cannot fit {name}, {limit} tokens")
            return question_ids(loaded.tokenizer, request.question)
        raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT, "give a question or token_ids")

    def _context_limit(self, loaded: LoadedModel) -> tuple[int, str]:
        """The most positions a session may reach, and what sets it: the model's context or max_tokens."""
        limit, name = self.settings.max_tokens, "the receiver's max_tokens (KVWIRE_MAX_TOKENS)"
        positions = getattr(loaded.config.get_text_config(), "max_position_embeddings", None)
        if positions and positions <= limit:  # at a tie the model's context is what the sender can act on
            limit, name = positions, f"the context of {loaded.name} (max_position_embeddings)"
        return limit, name

    def _check_context(self, loaded: LoadedModel, seq_len: int, tail: int, max_new: int) -> None:
        """Refuse a generation that would run past the model's context or the receiver's max_tokens."""
        limit, name = self._context_limit(loaded)
        if seq_len + tail + max_new > limit:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"{seq_len} cached + {tail} prompt + {max_new} new tokens exceed {name}, {limit} tokens")


def check_negotiation_numbers(request: pb.NegotiateRequest) -> None:
    """Bandwidth, deadline and quality floor: 0 (the default) or finite, positive and bounded."""
    for name, high in NEGOTIATION_BOUNDS.items():
        value = getattr(request, name)
        if not (math.isfinite(value) and 0 <= value <= high):
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"{name} must be a finite number from 0 (the default) to {high:g}, got {value!r}")


def load_model_frozen(name: str, device, dtype) -> LoadedModel:
    """load_model, then the objects alive now (torch, transformers, the model: about 400,000) moved out
    of the garbage collector's reach: they live as long as the process. Otherwise every full collection
    walks all of them, 0.2-1.5 s with the GIL held on a busy 2-core machine, and whichever thread
    allocates runs it: the event loop stops answering health checks meanwhile."""
    loaded = load_model(name, device, dtype)
    gc.collect()  # once, before SERVING: what is garbage now is not frozen with the rest
    gc.freeze()
    return loaded


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.max_frame_bytes + 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


async def start_server(
    host: str = "127.0.0.1", port: int = 50051, model: str | None = None, settings: Settings | None = None,
    wait_loaded: bool = True,
) -> tuple[grpc.aio.Server, KVWireServicer, int]:
    """Start serving at once (health NOT_SERVING), load the model, then report SERVING.

    With wait_loaded=False the model loads in the background and this returns at once.
    """
    settings = settings or get_settings()
    servicer = KVWireServicer(settings)
    health_servicer = health.aio.HealthServicer()
    interceptors = [BearerAuthInterceptor(settings.token)] if settings.token else []
    server = grpc.aio.server(options=grpc_options(settings), interceptors=interceptors)
    add_servicer(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if settings.tls_cert:
        credentials = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("receiver listening on %s:%d (%s), loading model", host, bound, "TLS" if settings.tls_cert else "plaintext")

    async def load() -> None:
        servicer.loaded = await asyncio.to_thread(load_model_frozen, model or settings.model, settings.device,
                                                  settings.dtype)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("model %s loaded in %.1f s; SERVING", servicer.loaded.name, servicer.loaded.load_seconds)

    servicer.loading = asyncio.create_task(load())
    if wait_loaded:
        await servicer.loading
    return server, servicer, bound


async def serve(host: str = "127.0.0.1", port: int = 50051, model: str | None = None) -> None:
    server, _, _ = await start_server(host, port, model)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=5)
