"""gRPC client for a kvwire receiver."""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import framing, wire
from common.proto import kvwire_pb2 as pb
from common.proto import kvwire_pb2_grpc as pb_grpc
from common.settings import get_settings
from sender.bandwidth import BandwidthEstimator

# pick_first over a shuffled address list: behind a headless Service each client lands on
# one random receiver and stays there, so its sessions are found by its Generate calls.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]})
log = logging.getLogger("kvwire.sender")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20),
                   ("grpc.service_config", SERVICE_CONFIG)]


def read_ahead(frames, max_bytes: int | None = None, size=wire.wire_bytes,
               clock: dict[str, float] | None = None) -> Iterator[tuple[object, int]]:
    """(frame, size) of `frames`, pulled on a thread of their own up to `max_bytes` (by `size`; default
    KVWIRE_READ_AHEAD_BYTES; a larger frame goes alone) ahead of the consumer, so the next chunks are coded while
    gRPC writes the last ones: gRPC pulls a request iterator's next message only once the last one is written, so
    without read-ahead coding and sending take turns. An exception of `frames` reaches the consumer in its place; a consumer that stops
    early (the stream failed) stops the thread at its next frame, which closes `frames` there.

    `clock`, if given, gets the seconds the thread spent making frames ("code"), waiting for room because the
    consumer was behind ("full"), and the consumer's seconds waiting for a frame because the thread was ("starved")."""
    max_bytes = max_bytes or get_settings().read_ahead_bytes
    ready: queue.SimpleQueue = queue.SimpleQueue()
    room = threading.Condition()
    held = [0]  # bytes queued and not yet taken
    stop = threading.Event()
    end = object()
    seconds = {"code": 0.0, "full": 0.0, "starved": 0.0}

    def put(item, nbytes: int) -> bool:
        waited = time.perf_counter()
        with room:
            while not stop.is_set() and held[0] and held[0] + nbytes > max_bytes:
                room.wait(0.1)
            if stop.is_set():
                return False
            held[0] += nbytes
        seconds["full"] += time.perf_counter() - waited
        ready.put((item, nbytes))
        return True

    def produce() -> None:
        source = iter(frames)
        try:
            while True:
                started = time.perf_counter()
                frame = next(source, end)
                nbytes = size(frame) if frame is not end else 0
                seconds["code"] += time.perf_counter() - started
                if frame is end:
                    break
                if not put(frame, nbytes):
                    return
            put(end, 0)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc, 0)
        finally:
            getattr(source, "close", lambda: None)()

    threading.Thread(target=produce, name="kvwire-read-ahead", daemon=True).start()
    try:
        while True:
            waited = time.perf_counter()
            item, nbytes = ready.get()
            seconds["starved"] += time.perf_counter() - waited
            with room:
                held[0] -= nbytes
                room.notify()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, nbytes
    finally:
        stop.set()
        if clock is not None:
            clock.update(seconds)


@dataclass
class TransferResult:
    session_id: str
    bytes_sent: int  # serialized frames plus gRPC message prefixes
    frames: int
    seconds: float
    attempts: int = 1
    assemble_s: float = 0.0  # the receiver's work on the frames (TransferReply.assemble_seconds)
    stream_s: dict[str, float] | None = None  # read_ahead's clock: making frames, waiting for gRPC, gRPC waiting


def retryable(error: grpc.RpcError) -> bool:
    """Worth sending again: the receiver was away, the bytes were damaged, or it asked us to back off."""
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.ABORTED):
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (error.details() or "").startswith("receiver busy")


class Client:
    """A receiver's gRPC API. `token` goes out as a bearer token; `tls_ca` (PEM) turns TLS on."""

    def __init__(self, target: str, timeout_s: float = 120.0, token: str | None = None, tls_ca: Path | None = None,
                 tls_server_name: str | None = None, attempts: int = 6):
        self.target = target
        self.attempts = attempts  # the default of call_with_retry and send_with_retry
        self.timeout_s = timeout_s
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        if tls_ca is not None:
            options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else [])
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options)
        else:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.KVWireStub(self.channel)
        # The frame streams' messages serialized by framing.serialize: a frame the encoder serialized goes as it is.
        self.transfer_stream = self.channel.stream_unary(f"/{wire.SERVICE_NAME}/Transfer",
                                                         request_serializer=framing.serialize,
                                                         response_deserializer=pb.TransferReply.FromString)
        self.segment_stream = self.channel.stream_stream(f"/{wire.SERVICE_NAME}/TransferSegments",
                                                         request_serializer=framing.serialize,
                                                         response_deserializer=pb.SegmentAck.FromString)
        self.bandwidth = BandwidthEstimator()
        self.retries = 0  # calls sent again after a retryable failure, over this client's life

    @classmethod
    def from_settings(cls, settings, target: str | None = None, timeout_s: float = 120.0) -> Client:
        ca = settings.tls_ca or settings.tls_cert
        return cls(target or settings.receiver_target, timeout_s, settings.token, ca, attempts=settings.send_attempts)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_until_serving(self, timeout_s: float = 300.0) -> None:
        """Block until the receiver's health service reports SERVING."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver at {self.target} not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)

    def negotiate(self, fingerprint: pb.Fingerprint, profiles: list[str], policy: str = "fixed",
                  context_tokens: int = 0, bandwidth_bps: float | None = None, deadline_s: float = 0.0,
                  quality_floor: float = 0.0) -> pb.NegotiateReply:
        """Agree on a profile. With policy "auto", the receiver plans for the link; the bandwidth
        defaults to this client's estimate from its earlier transfers."""
        if bandwidth_bps is None:
            bandwidth_bps = self.bandwidth.estimate() or 0.0
        request = pb.NegotiateRequest(fingerprint=fingerprint, profiles=profiles, policy=policy,
                                      context_tokens=context_tokens, bandwidth_bps=bandwidth_bps, deadline_s=deadline_s,
                                      quality_floor=quality_floor)
        return self.stub.Negotiate(request, timeout=self.timeout_s, metadata=self.metadata)

    def send_frames(self, frames) -> TransferResult:
        """Stream frames as they are, once; count the bytes that go onto the wire.

        Senders go through `sender.pipeline.Sender`, which retries; tests call this directly
        to put malformed streams on the wire."""
        counted = {"bytes": 0, "frames": 0}
        pulls: list[tuple[float, int]] = []
        failed: list[Exception] = []
        clock: dict[str, float] = {}

        def counting():
            try:
                for frame, size in read_ahead(frames, clock=clock):  # each frame's size counted once
                    counted["bytes"] += size
                    counted["frames"] += 1
                    pulls.append((time.perf_counter(), size))
                    yield frame
            except Exception as exc:
                failed.append(exc)
                raise

        start = time.perf_counter()
        try:
            reply = self.transfer_stream(counting(), timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError:
            if failed:  # the frames' own error (a profile this cache cannot take), not gRPC's UNKNOWN for it
                raise failed[0] from None
            raise
        self.bandwidth.observe_stream(pulls, time.perf_counter())
        return TransferResult(reply.session_id, counted["bytes"], counted["frames"], time.perf_counter() - start,
                              assemble_s=reply.assemble_seconds, stream_s=clock)

    def send_with_retry(self, make_frames, attempts: int | None = None, backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                        sleep=time.sleep) -> TransferResult:
        """`make_frames()` yields the same transfer (same transfer id) each time it is called."""
        def send(attempt: int) -> TransferResult:
            result = self.send_frames(make_frames())
            result.attempts = attempt
            return result

        return self.call_with_retry(send, attempts, backoff_s, max_backoff_s, sleep)

    def call_with_retry(self, call, attempts: int | None = None, backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                        sleep=time.sleep):
        """`call(attempt)`, again after a retryable failure, with exponential backoff and jitter, at most
        `attempts` times in all (default: this client's, KVWIRE_SEND_ATTEMPTS)."""
        attempts = attempts or self.attempts
        for attempt in range(1, attempts + 1):
            try:
                return call(attempt)
            except grpc.RpcError as error:
                if attempt == attempts or not retryable(error):
                    raise
                log.warning("attempt %d failed (%s: %s); retrying", attempt, error.code().name, error.details())
                self.retries += 1
                sleep(min(max_backoff_s, backoff_s * 2 ** (attempt - 1)) * random.uniform(1.0, 1.2))
        raise AssertionError("unreachable")

    def stream_segments(self, frames) -> Iterator[pb.SegmentAck]:
        """A segmented transfer: frames go out as the caller's generator yields them, acks come back."""
        return self.segment_stream(frames, timeout=self.timeout_s, metadata=self.metadata)

    def generate(self, session_id: str, token_ids: list[int] | None = None, question: str = "",
                 max_new_tokens: int = 64) -> pb.GenerateReply:
        request = pb.GenerateRequest(session_id=session_id, token_ids=token_ids or [], question=question,
                                     max_new_tokens=max_new_tokens)
        return self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
