"""Received caches, held in memory with a TTL and a byte budget (least recently used goes first)."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from common.kvstate import KVState


class SessionError(KeyError):
    pass


@dataclass
class Session:
    id: str
    kv: KVState
    profile: str
    bytes_received: int
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self, ttl_s: float, budget_bytes: int, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        return sum(s.kv.nbytes for s in self._sessions.values())

    def put(self, kv: KVState, profile: str, bytes_received: int) -> Session:
        if kv.nbytes > self.budget_bytes:
            raise MemoryError(f"cache of {kv.nbytes} bytes exceeds the session budget of {self.budget_bytes}")
        self.expire()
        while self._sessions and self.nbytes + kv.nbytes > self.budget_bytes:
            self._sessions.popitem(last=False)
        now = self.clock()
        session = Session(uuid.uuid4().hex, kv, profile, bytes_received, created=now, last_used=now)
        self._sessions[session.id] = session
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

    def expire(self) -> None:
        deadline = self.clock() - self.ttl_s
        for sid in [sid for sid, s in self._sessions.items() if s.last_used < deadline]:
            del self._sessions[sid]
