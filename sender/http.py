"""The sender's HTTP API: POST /v1/ask prefills, compresses and streams a context, and returns the answer."""

from __future__ import annotations

import asyncio
import json
import contextlib
import math
import time

import grpc
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from common import wire
from common.auth import docs_options, protect_openapi, require_token
from common.link import link_from_options, parse_rate
from common.models import ContextTooLong, load_model
from common.planner import load_table
from common.profile import MAX_PROFILE_CHARS, ProfileError
from common.profile.presets import DEFAULT_PROFILE, resolve
from common.prompts import build_prompt
from common.select import SelectionError
from common.settings import Settings
from sender.client import Client
from sender.pipeline import AUTO, AskResult, Sender

# What the receiver's refusals become: the request itself cannot be served (e.g. auto for a model
# without calibration), the deadline passed, or else the receiver failed (502).
RECEIVER_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 422, grpc.StatusCode.FAILED_PRECONDITION: 422,
                   grpc.StatusCode.DEADLINE_EXCEEDED: 504}
MAX_TEXT_CHARS = 1 << 20  # a context or question; the model's context bounds it further (below)
MAX_CHARS_PER_TOKEN = 16  # text longer than this per token of the model's context cannot fit it
MIN_RATE_BPS, MAX_RATE_BPS = 1e3, 1e15  # an emulated link: 1 kbit/s to 1 Pbit/s


def checked_profile(profile: str | dict | list) -> str | dict | list:
    """A profile's text, or its long form, no longer than the receiver takes (its canonical form is
    checked again against the header's cap)."""
    size = len(profile) if isinstance(profile, str) else len(json.dumps(profile))
    if size > 4 * MAX_PROFILE_CHARS:
        raise ValueError(f"profile of {size} characters; at most {4 * MAX_PROFILE_CHARS}")
    return profile


class AskRequest(BaseModel):
    context: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    profile: str | dict | list = Field(DEFAULT_PROFILE, description=(
        "A preset (lossless, int8, balanced, compact; auto: the planner picks one for bandwidth and deadline), a "
        "profile such as int4:g32, or its long form {\"stages\": [{\"stage\": \"int\", \"bits\": 4}]}."))
    bandwidth: str | None = Field(None, max_length=64, description="Emulate a link of this rate in process, e.g. "
                                  "20mbit; with 'auto', the rate the plan assumes (default: what this sender "
                                  "measured on earlier asks, else the receiver's default of 100mbit).")
    deadline: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False,
                                   description="Seconds allowed; with 'auto' the plan's target (default 2).")
    quality_floor: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                 description="With 'auto': the least calibrated fidelity accepted.")
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


class DeadlineLink:
    """An emulated link whose deliveries never come later than `deadline_s` after pacing starts: the
    gRPC call ends there anyway, and the thread that paces its frames must end with it (at 1 kbit/s,
    one frame could otherwise keep it asleep for hours after the ask was answered 504)."""

    def __init__(self, link, deadline_s: float):
        self.link, self.deadline_s = link, deadline_s

    def reset(self) -> None:
        self.link.reset()

    def send(self, nbytes: int, now: float) -> float:
        return min(self.link.send(nbytes, now), self.deadline_s)


def checked_rate(text: str) -> float:
    """A link rate from `text`, finite and within MIN_RATE_BPS..MAX_RATE_BPS."""
    rate = parse_rate(text)
    if not (math.isfinite(rate) and MIN_RATE_BPS <= rate <= MAX_RATE_BPS):
        raise ValueError(f"bandwidth {text!r} is outside {MIN_RATE_BPS:g} to {MAX_RATE_BPS:g} bit/s")
    return rate


def check_prompt_fits(loaded, context: str, question: str, max_new_tokens: int) -> None:
    """The prompt and the answer within the model's context, checked before any model work."""
    positions = getattr(loaded.config.get_text_config(), "max_position_embeddings", None)
    if not positions:
        return
    where = f"the context of {loaded.name}, {positions} tokens (max_position_embeddings)"
    if len(context) + len(question) > MAX_CHARS_PER_TOKEN * positions:  # too long to be worth tokenizing
        raise ValueError(f"context and question of {len(context) + len(question)} characters exceed {where}")
    tokens = len(build_prompt(loaded.tokenizer, context, question).ids)
    if tokens + max_new_tokens > positions:
        raise ValueError(f"the prompt is {tokens} tokens: with {max_new_tokens} new tokens it exceeds {where}")


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

    @app.exception_handler(RequestValidationError)
    async def bounded_validation_error(request: Request, exc: RequestValidationError):
        """FastAPI's 422, without the input it echoes (a megabyte context would come back whole)."""
        detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": wire.clip(str(e["msg"]), 200)} for e in exc.errors()[:8]]
        return JSONResponse(status_code=422, content={"detail": detail})

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
            bandwidth_bps = checked_rate(body.bandwidth) if body.bandwidth else None
            deadline_s = body.deadline or 120.0
            link = DeadlineLink(link_from_options(body.bandwidth), deadline_s) if body.bandwidth else None
            table = load_table(sender.loaded.name) if body.segments else None
            profile = AUTO if body.profile == AUTO else resolve(checked_profile(body.profile), sender.loaded.name)
            if profile != AUTO:  # the receiver's cap applies to the form the header carries
                wire.header_profile(profile, sender.loaded.codec_context)
            await asyncio.to_thread(check_prompt_fits, sender.loaded, body.context, body.question, body.max_new_tokens)
        except (ProfileError, ValueError, FileNotFoundError) as exc:
            raise HTTPException(422, wire.clip(str(exc))) from None
        start = time.perf_counter()
        async with request.app.state.lock:  # one model pass at a time
            try:
                if body.segments:
                    result = await asyncio.to_thread(sender.ask_segments, body.context, body.question, None,
                                                     body.deadline or 2.0, body.segments, None, body.max_new_tokens,
                                                     table)
                else:
                    sender.client.timeout_s = deadline_s
                    result = await asyncio.to_thread(sender.ask, body.context, body.question, profile,
                                                     body.query_aware, body.max_new_tokens, bandwidth_bps,
                                                     body.deadline or 2.0 if profile == AUTO else None,
                                                     body.quality_floor, link)
            except (SelectionError, ContextTooLong, FileNotFoundError) as exc:
                asks.labels("bad_request").inc()
                raise HTTPException(422, wire.clip(str(exc))) from None
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
