"""Segment-level adaptation, as CacheGen does: the cache travels in token segments, each at
the profile that fits what is left of the deadline under the bandwidth measured so far.

Each segment is planned when the previous one has been acknowledged (stop and wait), so
its plan uses the goodput of the segment before it. A segment's share of the remaining
time is proportional to its tokens. Among the precision profiles of the calibration table
(the ladder), the one with the best calibrated fidelity whose expected time fits the share
is sent; where none fits, the segment goes as text, which the receiver prefills on top of
the segments before it, unless the smallest cache is expected to be in place sooner. Selection stages do not apply per segment: a segment's tokens all
travel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from common import wire
from common.kvstate import KVState
from common.plan import kv_codec
from common.profile import Profile, ProfileError, parse_profile
from common.proto import kvwire_pb2 as pb

DEFAULT_SEGMENT_TOKENS = 512
TEXT = "text"
ACK_POLL_S = 0.05


@dataclass(frozen=True)
class Choice:
    profile: str  # a ladder profile, or "text"
    expected_s: float
    reason: str


@dataclass
class SegmentPlanner:
    """Chooses a segment's profile from a calibration table (common.planner's format)."""

    table: dict
    ladder: list[str] | None = None  # default: every profile of the table a segment can carry
    # The receiver's prefill time per token of a text segment (default: the table's). Longer
    # contexts cost more per token than the calibration's short prompts, so the sender passes
    # the rate of its own prefill of this context when it has one.
    text_s_per_token: float | None = None

    def __post_init__(self):
        profiles = self.table["profiles"]
        if self.text_s_per_token is None:
            self.text_s_per_token = self.table["prefill_s_per_token"]
        parsed = {name: parse_profile(name) for name in profiles}  # the table's names, read once
        if self.ladder is None:
            self.ladder = [name for name in profiles if _segment_profile(parsed[name])]
        for name in self.ladder:
            if name not in profiles:
                raise ProfileError(f"{name} is not in the calibration table ({', '.join(profiles)})")
            if not _segment_profile(parsed[name]):
                raise ProfileError(f"{name}: a segment profile has precision stages only: no selection, and none "
                                   "of the stages that need the model or rank tokens (prerope, pca, protect, tier), "
                                   "and no text stage")
        self.parsed = {name: parsed[name] for name in self.ladder}
        if not self.ladder:
            raise ProfileError("the ladder has no precision-only profile")

    @property
    def first_token_s(self) -> float:
        """What the receiver needs after the cache is in place: the slowest calibrated first token."""
        return max(self.table["profiles"][name]["first_token_s"] for name in self.ladder)

    def expected_seconds(self, profile: str, tokens: int, nbytes: int, bandwidth_bps: float) -> float:
        link = nbytes * 8 / bandwidth_bps
        if profile == TEXT:
            return link + self.text_s_per_token * tokens  # the receiver prefills it
        row = self.table["profiles"][profile]
        return link + (row["encode_s_per_token"] + row["receiver_s_per_token"]) * tokens

    def choose(self, tokens: int, kv_bytes: dict[str, int], text_bytes: int, bandwidth_bps: float,
               budget_s: float) -> Choice:
        """kv_bytes: the segment's payload size under each ladder profile.

        The best calibrated fidelity among the profiles that fit the budget; when none fits,
        whatever is expected to be in place soonest: text, or the smallest cache when the
        receiver's prefill would take longer than sending it.
        """
        options = {name: self.expected_seconds(name, tokens, kv_bytes[name], bandwidth_bps) for name in self.ladder}
        fits = [(self.table["profiles"][name]["fidelity"], -kv_bytes[name], name) for name, seconds in options.items()
                if seconds <= budget_s]
        if fits:
            fidelity, _, name = max(fits)
            return Choice(name, options[name], f"best fidelity ({fidelity:.2f}) of {len(fits)} that fit "
                                               f"{budget_s:.2f} s at {bandwidth_bps / 1e6:.1f} Mbit/s")
        options[TEXT] = self.expected_seconds(TEXT, tokens, text_bytes, bandwidth_bps)
        name = min(options, key=options.get)
        return Choice(name, options[name], f"nothing fits {budget_s:.2f} s at {bandwidth_bps / 1e6:.1f} Mbit/s: "
                                           f"{name} is expected soonest ({options[name]:.2f} s)")

    def probe(self, kv_bytes: dict[str, int]) -> Choice:
        """Before anything is known of the link: the smallest cache, whose acknowledgement measures it
        (text would measure nothing, and a sender that starts on text could never leave it)."""
        name = min(self.ladder, key=lambda n: kv_bytes[n])
        return Choice(name, 0.0, "probe: nothing measured yet, the smallest cache measures the link")


@dataclass
class SegmentRecord:
    start: int
    end: int
    profile: str
    bytes: int  # frames on the wire, prefixes included
    estimate_bps: float | None  # the bandwidth it was planned with (None: a probe)
    budget_s: float
    expected_s: float
    reason: str
    sent_s: float = 0.0  # since the stream began: first frame handed to gRPC
    acked_s: float = 0.0  # the receiver acknowledged it in place


@dataclass
class AdaptiveResult:
    session_id: str
    bytes_sent: int
    seconds: float
    segments: list[SegmentRecord] = field(default_factory=list)
    frames: int = 0
    assemble_s: float = 0.0  # the receiver's work on the frames

    @property
    def profiles(self) -> list[str]:
        return [s.profile for s in self.segments]


def _segment_profile(profile: Profile) -> bool:
    """Whether segments carry `profile`: precision stages (and rot) only."""
    return (profile.selection is None and not profile.needs_context and profile.protect is None
            and not (profile.text_head or profile.text_question))


def segment_bounds(seq_len: int, segment_tokens: int) -> list[tuple[int, int]]:
    if segment_tokens < 1:
        raise ValueError("segment_tokens must be at least 1")
    return [(start, min(start + segment_tokens, seq_len)) for start in range(0, seq_len, segment_tokens)]


def payload_bytes(kv: KVState, profile: Profile) -> int:
    """Payload of `kv` under `profile` before zstd: an upper bound on what the link carries."""
    return sum(kv_codec(profile, i).payload_size(tuple(k.shape), kv.dtype) for i, k in enumerate(kv.keys))


def send_segments(
    client, kv: KVState, token_ids: list[int], fingerprint: pb.Fingerprint, planner: SegmentPlanner | None,
    deadline_s: float, segment_tokens: int = DEFAULT_SEGMENT_TOKENS, initial_bps: float | None = None,
    schedule: list[str] | None = None, zstd_level: int = 3, started: float | None = None,
    records: list[SegmentRecord] | None = None,
) -> AdaptiveResult:
    """Stream `kv` (the cache of `token_ids`) in segments over TransferSegments.

    `deadline_s` counts from `started` (default: now) to the cache being in place, less the
    calibrated first-token time. The first segment is planned with the client's bandwidth
    estimate, or `initial_bps` before it has one, or else sent as a probe (the smallest
    cache); later ones with what the acknowledgements measured (a drop is believed at once,
    see BandwidthEstimator.cautious_estimate). `schedule` fixes each segment's profile
    instead of planning (profiles or "text"). `records`, if given, is filled as segments are
    planned, so the caller sees them after a failure too.
    """
    if len(token_ids) != kv.seq_len:
        raise ValueError(f"{len(token_ids)} token ids for a cache of {kv.seq_len} tokens")
    bounds = segment_bounds(kv.seq_len, segment_tokens)
    if schedule is not None and len(schedule) != len(bounds):
        raise ValueError(f"a schedule of {len(schedule)} profiles for {len(bounds)} segments")
    if schedule is None and planner is None:
        raise ValueError("give a planner or a schedule")
    # A schedule's names come from the caller: parsed here, once.
    parsed = {**(planner.parsed if planner else {}),
              **{name: parse_profile(name) for name in schedule or [] if name != TEXT}}
    for name, profile in parsed.items():
        if profile.selection is not None:
            raise ProfileError(f"{name}: a segment profile has precision stages only, no selection")
    started = time.perf_counter() if started is None else started
    tail_s = planner.first_token_s if planner else 0.0
    records = [] if records is None else records
    acked = threading.Semaphore(0)
    finished = threading.Event()
    counted = {"bytes": 0, "frames": 0}
    failures: list[Exception] = []

    def plan(index: int, start: int, end: int) -> SegmentRecord:
        estimate = client.bandwidth.cautious_estimate() or initial_bps
        budget = (deadline_s - tail_s - (time.perf_counter() - started)) * (end - start) / (kv.seq_len - start)
        if schedule is not None:
            return SegmentRecord(start, end, schedule[index], 0, estimate, budget, 0.0, "fixed schedule")
        part = kv.token_range(start, end)
        sizes = {name: payload_bytes(part, parsed[name]) for name in planner.ladder}
        if estimate is None:
            choice = planner.probe(sizes)
        else:
            choice = planner.choose(end - start, sizes, 4 * (end - start), estimate, budget)
        return SegmentRecord(start, end, choice.profile, 0, estimate, budget, choice.expected_s, choice.reason)

    def frames() -> Iterator[pb.Frame | bytes]:
        try:
            yield from segment_frames()
        except Exception as exc:  # gRPC would report it as UNKNOWN: hand it to the caller instead
            failures.append(exc)
            raise

    def segment_frames() -> Iterator[pb.Frame | bytes]:
        encoder = wire.Encoder(fingerprint, zstd_level=zstd_level, serialized=True)
        for index, (start, end) in enumerate(bounds):
            if index == 0:
                header = encoder.header(kv.seq_len)
                counted["bytes"] += wire.wire_bytes(header)
                counted["frames"] += 1
                yield header
            else:
                while not acked.acquire(timeout=ACK_POLL_S):  # stop and wait: plan on the newest goodput
                    if finished.is_set():
                        return
            record = plan(index, start, end)
            records.append(record)
            record.sent_s = time.perf_counter() - started
            segment = ([encoder.text_segment(token_ids[start:end], start)] if record.profile == TEXT
                       else encoder.kv_segment(kv, start, end, parsed[record.profile]))
            for frame in segment:
                size = wire.wire_bytes(frame)
                record.bytes += size
                counted["bytes"] += size
                counted["frames"] += 1
                yield frame
        trailer = encoder.trailer()
        counted["bytes"] += wire.wire_bytes(trailer)
        counted["frames"] += 1
        yield trailer

    reply = None
    try:
        for ack in client.stream_segments(frames()):
            if ack.HasField("done"):
                reply = ack.done
                break
            record = records[ack.segment]
            record.acked_s = time.perf_counter() - started
            client.bandwidth.update(record.bytes, record.acked_s - record.sent_s)
            acked.release()
    except grpc.RpcError:
        if failures:
            raise failures[0] from None
        raise
    finally:
        finished.set()
    return AdaptiveResult(reply.session_id, counted["bytes"], time.perf_counter() - started, records, counted["frames"],
                          reply.assemble_seconds)
