"""The sender's HTTP API: POST /v1/ask prefills, compresses and streams a context, and returns the answer."""

from __future__ import annotations

import asyncio
import json
import contextlib
import time

import grpc
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from common.auth import docs_options, protect_openapi, require_token
from common.link import link_from_options, parse_rate
from common.models import ContextTooLong, load_model
from common.planner import load_table
from common.profile import MAX_PROFILE_CHARS, ProfileError
from common.profile.presets import DEFAULT_PROFILE, resolve
from common.select import SelectionError
from common.settings import Settings
from sender.client import Client
from sender.pipeline import AUTO, AskResult, Sender

# What the receiver's refusals become: the request itself cannot be served (e.g. auto for a model
# without calibration), the deadline passed, or else the receiver failed (502).
RECEIVER_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 422, grpc.StatusCode.FAILED_PRECONDITION: 422,
                   grpc.StatusCode.DEADLINE_EXCEEDED: 504}


def checked_profile(profile: str | dict | list) -> str | dict | list:
    """A profile's text, or its long form, no longer than the receiver takes (its canonical form is
    checked again against the header's cap)."""
    size = len(profile) if isinstance(profile, str) else len(json.dumps(profile))
    if size > 4 * MAX_PROFILE_CHARS:
        raise ValueError(f"profile of {size} characters; at most {4 * MAX_PROFILE_CHARS}")
    return profile


class AskRequest(BaseModel):
    context: str = Field(min_length=1)
    question: str = Field(min_length=1)
    profile: str | dict | list = Field(DEFAULT_PROFILE, description=(
        "A preset (lossless, int8, balanced, compact; auto: the planner picks one for bandwidth and deadline), a "
        "profile such as int4:g32, or its long form {\"stages\": [{\"stage\": \"int\", \"bits\": 4}]}."))
    bandwidth: str | None = Field(None, description="Emulate a link of this rate in process, e.g. 20mbit; "
                                  "with 'auto', the rate the plan assumes (default: what this sender "
                                  "measured on earlier asks, else the receiver's default of 100mbit).")
    deadline: float | None = Field(None, gt=0, description="Seconds allowed; with 'auto' the plan's target (default 2).")
    quality_floor: float = Field(0.0, ge=0, le=1, description="With 'auto': the least calibrated fidelity accepted.")
    max_new_tokens: int = Field(32, ge=1, le=512)
    query_aware: bool = True
    segments: int | None = Field(None, ge=16, le=8192, description="Send in segments of this many tokens, each "
                                 "planned for the deadline (a precision profile, or text the receiver prefills); "
                                 "'profile' is then ignored.")


class SegmentInfo(BaseModel):
    start: int
    end: int
    profile: str
    bytes: int
    planned_bps: float | None  # None: a probe
    budget_s: float
    reason: str


class AskResponse(BaseModel):
    answer: str
    profile: str
    session_id: str
    seq_len: int
    kept_tokens: int
    bytes_sent: int
    ratio_vs_fp16: float
    prefill_s: float
    compress_s: float
    transfer_s: float
    decode_s: float
    plan: str | None = None  # why 'auto' chose this profile
    segments: list[SegmentInfo] | None = None


def create_app(settings: Settings, model: str | None = None) -> FastAPI:
    registry = CollectorRegistry()
    asks = Counter("kvwire_sender_asks", "Asks by outcome", ["outcome"], registry=registry)
    bytes_sent = Counter("kvwire_sender_bytes_sent", "Bytes of frames sent", registry=registry)
    ask_seconds = Histogram("kvwire_sender_ask_seconds", "Time to answer an ask", registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = await asyncio.to_thread(load_model, model or settings.model, settings.device, settings.dtype)
        # One client for the app's life: its bandwidth estimate learns the link across asks.
        with Client.from_settings(settings) as client:
            app.state.sender = Sender(loaded, client)
            yield

    app = FastAPI(title="kvwire sender", lifespan=lifespan, **docs_options(settings.token))
    protect_openapi(app)
    app.state.settings = settings
    app.state.lock = asyncio.Lock()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(require_token)])
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/ask", response_model=AskResponse, dependencies=[Depends(require_token)])
    async def ask(body: AskRequest, request: Request):
        sender: Sender = request.app.state.sender
        try:
            if body.segments and (body.bandwidth or not body.query_aware):
                raise ValueError("segments go over the real link, query-aware: leave out bandwidth (put `kvwire "
                                 "channel` in front of the receiver to emulate a link) and query_aware=false")
            link = link_from_options(body.bandwidth) if body.bandwidth else None
            bandwidth_bps = parse_rate(body.bandwidth) if body.bandwidth else None
            table = load_table(sender.loaded.name) if body.segments else None
            profile = AUTO if body.profile == AUTO else resolve(checked_profile(body.profile), sender.loaded.name)
        except (ProfileError, ValueError, FileNotFoundError) as exc:
            raise HTTPException(422, str(exc)) from None
        start = time.perf_counter()
        async with request.app.state.lock:  # one model pass at a time
            try:
                if body.segments:
                    result = await asyncio.to_thread(sender.ask_segments, body.context, body.question, None,
                                                     body.deadline or 2.0, body.segments, None, body.max_new_tokens,
                                                     table)
                else:
                    sender.client.timeout_s = body.deadline or 120.0
                    result = await asyncio.to_thread(sender.ask, body.context, body.question, profile,
                                                     body.query_aware, body.max_new_tokens, bandwidth_bps,
                                                     body.deadline or 2.0 if profile == AUTO else None,
                                                     body.quality_floor, link)
            except (SelectionError, ContextTooLong, FileNotFoundError) as exc:
                asks.labels("bad_request").inc()
                raise HTTPException(422, str(exc)) from None
            except grpc.RpcError as exc:
                asks.labels(exc.code().name).inc()
                raise HTTPException(RECEIVER_STATUS.get(exc.code(), 502),
                                    f"receiver: {exc.code().name}: {exc.details()}") from None
            finally:
                sender.client.timeout_s = 120.0
        asks.labels("ok").inc()
        bytes_sent.inc(result.bytes_sent)
        ask_seconds.observe(time.perf_counter() - start)
        return _response(result)

    return app


def _response(result: AskResult) -> AskResponse:
    segments = None
    if result.segments is not None:
        segments = [SegmentInfo(start=r.start, end=r.end, profile=r.profile, bytes=r.bytes, planned_bps=r.estimate_bps,
                                budget_s=r.budget_s, reason=r.reason) for r in result.segments]
    return AskResponse(
        answer=result.answer, profile=result.profile, session_id=result.session_id, seq_len=result.seq_len,
        kept_tokens=result.kept_tokens, bytes_sent=result.bytes_sent, ratio_vs_fp16=result.ratio_vs_fp16,
        prefill_s=result.prefill_s, compress_s=result.encode_s, transfer_s=result.transfer_s,
        decode_s=result.inject_s + result.decode_s, plan=result.plan, segments=segments)
