import pytest
import torch

from common.kvstate import KVState
from receiver.sessions import ReceiverBusy, SessionError, SessionStore


def state(tokens: int) -> KVState:
    k = torch.zeros(1, 1, tokens, 4)  # 16 bytes per token per tensor
    return KVState([k], [k.clone()], [torch.arange(tokens).view(1, -1)], tokens)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lru_eviction_under_the_byte_budget():
    clock = Clock()
    store = SessionStore(ttl_s=100, budget_bytes=3 * 320, clock=clock, overhead_bytes=0)  # room for three 10-token caches
    a, b, c = (store.put(state(10), "raw", 1) for _ in range(3))
    for session in (a, b, c):
        session.generations = 1  # asked once: evictable for room
    clock.t = 1
    store.get(a.id)  # a is now the most recently used; b is the least
    d = store.put(state(10), "raw", 1)
    assert {s.id for s in store.values()} == {a.id, c.id, d.id}
    with pytest.raises(SessionError, match="unknown or expired"):
        store.get(b.id)
    assert store.nbytes <= store.budget_bytes
    d.generations = 1
    big = store.put(state(25), "raw", 1)  # needs the space of three: evicts the three oldest
    assert [s.id for s in store.values()] == [big.id]
    assert store.peak_bytes <= store.budget_bytes


def test_ttl_expiry_and_delete():
    clock = Clock()
    store = SessionStore(ttl_s=10, budget_bytes=10_000, clock=clock)
    s = store.put(state(4), "raw", 1)
    clock.t = 9
    store.get(s.id)  # touching refreshes the TTL
    clock.t = 18
    assert store.peek(s.id).id == s.id
    clock.t = 30
    with pytest.raises(SessionError):
        store.get(s.id)
    t = store.put(state(4), "raw", 1)
    store.delete(t.id)
    with pytest.raises(SessionError):
        store.delete(t.id)


def test_a_cache_larger_than_the_budget_is_refused():
    store = SessionStore(ttl_s=10, budget_bytes=100)
    with pytest.raises(MemoryError, match="exceeds the session budget"):
        store.put(state(10), "raw", 1)
    assert len(store) == 0


def test_sessions_not_yet_asked_are_never_evicted_for_room():
    store = SessionStore(ttl_s=100, budget_bytes=2 * 320, overhead_bytes=0)
    first = store.put(state(10), "raw", 1)
    store.put(state(10), "raw", 1)
    with pytest.raises(ReceiverBusy, match="receiver busy"):
        store.put(state(10), "raw", 1)
    first.generations = 1
    store.put(state(10), "raw", 1)  # now the asked one makes room
    assert first.id not in store


def _store_past_its_ttl() -> SessionStore:
    """A store of one session whose clock has passed its time to live."""
    clock = Clock()
    store = SessionStore(ttl_s=10, budget_bytes=10_000, clock=clock)
    store.put(state(4), "raw", 1)
    clock.t = 30
    return store


def test_expiry_gives_memory_back_off_the_callers_thread(monkeypatch):
    """Trimming a large heap takes long: the store runs on the event loop, so it trims in a thread of its own."""
    import threading
    import time

    from receiver import sessions

    trimmed = []
    monkeypatch.setattr(sessions, "release_freed_memory", lambda: trimmed.append(threading.current_thread()))
    store = _store_past_its_ttl()
    store.expire()
    deadline = time.monotonic() + 5
    while not trimmed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert threading.current_thread() not in trimmed


def test_expiry_frees_what_reference_cycles_hold(monkeypatch):
    """A call grpc.aio ends with an abort leaves its handler's frames (its request, its tensors) in a
    reference cycle. With automatic collection off (a full one may not come for minutes), expiry alone
    must free them."""
    import gc
    import weakref

    from receiver import sessions

    trims = []
    monkeypatch.setattr(sessions, "release_freed_memory_soon", lambda: trims.append(sessions.release_freed_memory()))
    store = _store_past_its_ttl()
    gc.disable()
    try:
        cycle = {"tensor": torch.zeros(1000)}
        cycle["self"] = cycle
        held = weakref.ref(cycle["tensor"])
        del cycle
        assert held() is not None
        store.expire()
        assert trims and held() is None
    finally:
        gc.enable()
