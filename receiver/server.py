"""The receiver: a grpc.aio server that assembles streamed caches and decodes answers."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import wire
from common.fingerprints import refusal
from common.kvstate import KVState, greedy_decode
from common.models import LoadedModel, load_model
from common.planner import load_table, plan
from common.profile import ProfileError, parse_profile
from common.prompts import question_ids
from common.proto import kvwire_pb2 as pb
from common.proto import kvwire_pb2_grpc as pb_grpc
from common.settings import Settings, get_settings
from receiver.auth import BearerAuthInterceptor
from receiver.metrics import ReceiverMetrics
from receiver.sessions import SessionError, SessionStore

log = logging.getLogger("kvwire.receiver")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVWire"].full_name
DEFAULT_NEW_TOKENS = 64
RECENT = 50


class AbortNegotiation(Exception):
    pass


def log_rejection(rpc: str, code: grpc.StatusCode, message: str, exc: Exception) -> None:
    if code == grpc.StatusCode.INTERNAL:  # a bug of ours: keep the traceback
        log.error("%s failed (INTERNAL): %s", rpc, message, exc_info=exc)
    else:
        log.warning("%s rejected (%s): %s", rpc, code.name, message)


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
            await context.abort(code, message)

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
        # Transfers are idempotent by transfer id: a retry of a finished one gets the same session.
        self.completed: collections.OrderedDict[str, str] = collections.OrderedDict()
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
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{reason} (receiver model {loaded.name})")
        offered, refused = [], []
        for spec in request.profiles:
            try:
                profile = parse_profile(spec)
                profile.check_layers(loaded.fingerprint.num_layers)
            except ProfileError:
                continue
            # raw between different dtypes; a PCA basis this receiver does not hold
            reason = refusal(request.fingerprint, loaded.fingerprint, profile) or profile.unsupported(loaded.codec_context)
            (refused if reason else offered).append(reason or str(profile))
        if request.policy == "auto":
            return self._plan(loaded, request, offered)
        if request.policy not in ("", "fixed"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown policy {request.policy!r}; use fixed or auto")
        if not offered and refused:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused[0])
        if not offered:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"none of the offered profiles is supported: {list(request.profiles)}")
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
        self.metrics.inflight.inc()
        try:
            async for frame in request_iterator:
                began = time.perf_counter()
                assembler.add(frame)
                busy += time.perf_counter() - began
                if reserved == 0 and assembler.header is not None:
                    previous = self.completed.get(assembler.header.transfer_id)
                    if previous is not None and previous in self.sessions:
                        log.info("transfer %s repeated: session %s", assembler.header.transfer_id, previous)
                        yield pb.SegmentAck(done=pb.TransferReply(session_id=previous,
                                                                  bytes_received=assembler.bytes_received))
                        return
                    reserved = self._reserve(assembler.expected_bytes)
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
                    # The stream ended because the caller's deadline passed, not because it was cut short.
                    self.metrics.transfers.labels("deadline_exceeded").inc()
                    log.warning("transfer deadline passed after %d bytes; partial cache dropped", assembler.bytes_received)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"deadline passed after {assembler.bytes_received} bytes; nothing injected")
                raise wire.WireError(grpc.StatusCode.DATA_LOSS,
                                     "stream ended before the trailer: transfer incomplete, nothing injected")
            # A segmented transfer's profile, for the dashboard: tokens per segment profile.
            profile = assembler.header.profile or ", ".join(f"{name} ({tokens} tokens)" for name, tokens in sent_as.items())
            session = self.sessions.put(kv, profile, assembler.bytes_received)
        except grpc.aio.AbortError:  # a status chosen above (deadline passed)
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
            await context.abort(code, message)
        except asyncio.CancelledError:
            # Client gone or deadline passed: the partial cache is dropped, never injected.
            remaining = context.time_remaining()
            outcome = "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
            self.metrics.transfers.labels(outcome).inc()
            log.warning("transfer %s after %d bytes; partial cache dropped", outcome, assembler.bytes_received)
            raise
        finally:
            self.inflight_bytes -= reserved
            self.metrics.inflight.dec()
        self.completed[assembler.header.transfer_id] = session.id
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
        async with self._model_lock:
            return await asyncio.to_thread(wire.place, loaded.model, kv, segment)

    def _reserve(self, nbytes: int) -> int:
        """Hold memory for a transfer in flight; refuse (the client backs off) when the budget is taken."""
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
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        limit = self.settings.max_new_tokens
        max_new = request.max_new_tokens or min(DEFAULT_NEW_TOKENS, limit)
        if max_new > limit:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"max_new_tokens {max_new} exceeds the limit of {limit} (KVWIRE_MAX_NEW_TOKENS)")
        tail = self._tail(loaded, request)
        kv = session.kv
        self._check_context(loaded, kv.seq_len, len(tail), max_new)  # before the lock: a refusal never waits
        session.generations += 1
        async with self._model_lock:
            start = time.perf_counter()
            cache = kv.to_cache(loaded.config)
            injected = time.perf_counter()
            tokens = await asyncio.to_thread(greedy_decode, loaded.model, cache, tail, kv.seq_len, max_new)
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
            return question_ids(loaded.tokenizer, request.question)
        raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT, "give a question or token_ids")

    def _check_context(self, loaded: LoadedModel, seq_len: int, tail: int, max_new: int) -> None:
        """Refuse a generation that would run past the model's context or the receiver's max_tokens."""
        limit, name = self.settings.max_tokens, "the receiver's max_tokens (KVWIRE_MAX_TOKENS)"
        positions = getattr(loaded.config.get_text_config(), "max_position_embeddings", None)
        if positions and positions < limit:
            limit, name = positions, f"the context of {loaded.name} (max_position_embeddings)"
        if seq_len + tail + max_new > limit:
            raise wire.WireError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"{seq_len} cached + {tail} prompt + {max_new} new tokens exceed {name}, {limit} tokens")


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
    pb_grpc.add_KVWireServicer_to_server(servicer, server)
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
        servicer.loaded = await asyncio.to_thread(load_model, model or settings.model, settings.device, settings.dtype)
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
