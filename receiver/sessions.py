"""Received caches, held in memory with a TTL and a byte budget (least recently used goes first)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from common.kvstate import KVState


# What a session costs beyond its keys and values (its positions, the Python objects around them):
# a session that keeps no tokens still counts, so the budget bounds their number too.
SESSION_OVERHEAD_BYTES = 4096


def session_cost(kv: KVState, overhead_bytes: int = SESSION_OVERHEAD_BYTES) -> int:
    """The bytes a session holding `kv` counts against the budget."""
    return kv.nbytes + overhead_bytes


class SessionError(KeyError):
    pass


class ReceiverBusy(MemoryError):
    """No room now: sessions not yet asked anything are kept; the sender should back off and retry."""


def release_freed_memory() -> None:
    """Give the memory of dropped caches back to the OS. Garbage in reference cycles first: every call
    grpc.aio ends with an abort leaves its handler's frames (the request, up to 8 MiB, and any tensors
    they hold) in a cycle through the AbortError's traceback, freed only by a full collection, which
    otherwise may not come for minutes. Then glibc's freed heap pages: it keeps them for reuse, so
    without a trim a receiver's resident memory stays at its peak after its sessions are gone."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


_trimming = threading.Lock()
_trim_state = {"running": False, "again": False}


def release_freed_memory_soon() -> None:
    """release_freed_memory in a thread of its own: trimming a large heap can take a long while, and
    the store is used on the event loop that also answers health checks. One trim runs at a time;
    a request during it runs one more trim after it."""
    with _trimming:
        if _trim_state["running"]:
            _trim_state["again"] = True
            return
        _trim_state["running"] = True
    threading.Thread(target=_trim_until_done, name="kvwire-trim", daemon=True).start()


def _trim_until_done() -> None:
    while True:
        release_freed_memory()
        with _trimming:
            if not _trim_state["again"]:
                _trim_state["running"] = False
                return
            _trim_state["again"] = False


@dataclass
class Session:
    id: str
    kv: KVState
    profile: str
    bytes_received: int
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    generations: int = 0  # a session nobody has asked yet is never evicted for room (only by its TTL)


class SessionStore:
    def __init__(self, ttl_s: float, budget_bytes: int, clock=time.monotonic,
                 overhead_bytes: int = SESSION_OVERHEAD_BYTES):
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.overhead_bytes = overhead_bytes
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def cost(self, kv: KVState) -> int:
        return session_cost(kv, self.overhead_bytes)

    @property
    def nbytes(self) -> int:
        return sum(self.cost(s.kv) for s in self._sessions.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(self.cost(s.kv) for s in self._sessions.values() if s.generations == 0)

    def put(self, kv: KVState, profile: str, bytes_received: int) -> Session:
        """Store a cache, evicting the least recently used sessions that have been asked at least once."""
        cost = self.cost(kv)
        if cost > self.budget_bytes:
            raise MemoryError(f"cache of {cost} bytes exceeds the session budget of {self.budget_bytes}")
        self.expire()
        evictable = [sid for sid, s in self._sessions.items() if s.generations > 0]  # oldest first
        while self.nbytes + cost > self.budget_bytes:
            if not evictable:
                raise ReceiverBusy(f"receiver busy: {self.pinned_bytes} bytes held by sessions not yet asked")
            del self._sessions[evictable.pop(0)]
        now = self.clock()
        session = Session(uuid.uuid4().hex, kv, profile, bytes_received, created=now, last_used=now)
        self._sessions[session.id] = session
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return session

    def get(self, session_id: str) -> Session:
        self.expire()
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(f"unknown or expired session {session_id!r}")
        session.last_used = self.clock()
        self._sessions.move_to_end(session_id)
        return session

    def values(self) -> list[Session]:
        return list(self._sessions.values())

    def peek(self, session_id: str) -> Session:
        """Look at a session without touching its recency."""
        self.expire()
        if session_id not in self._sessions:
            raise SessionError(f"unknown or expired session {session_id!r}")
        return self._sessions[session_id]

    def delete(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is None:
            raise SessionError(f"unknown or expired session {session_id!r}")
        release_freed_memory_soon()

    def expire(self) -> None:
        deadline = self.clock() - self.ttl_s
        expired = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
        for sid in expired:
            del self._sessions[sid]
        if expired:
            release_freed_memory_soon()
