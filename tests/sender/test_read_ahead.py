"""The sender's read-ahead: frames are coded on a thread of their own while gRPC writes the last ones."""

import threading
import time

import pytest

from sender.client import read_ahead

ONE = lambda _: 1  # noqa: E731 - every item a byte


def items(frames):
    return [item for item, _ in frames]


def test_yields_every_item_in_order_with_its_size():
    assert list(read_ahead(iter(range(1000)), max_bytes=4, size=ONE)) == [(i, 1) for i in range(1000)]


def test_codes_ahead_of_the_consumer_up_to_its_bytes():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    frames = read_ahead(source(), max_bytes=8, size=ONE)
    assert next(frames) == (0, 1)
    deadline = time.monotonic() + 5
    while len(pulled) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    # the one taken, the 8 queued and the one waiting for room: never the whole source
    assert len(pulled) == 10
    assert items(frames) == list(range(1, 100))


def test_an_error_of_the_source_reaches_the_consumer_after_what_came_before():
    def source():
        yield 1
        yield 2
        raise ValueError("layer 3 does not encode")

    frames = read_ahead(source(), size=ONE)
    assert next(frames) == (1, 1) and next(frames) == (2, 1)
    with pytest.raises(ValueError, match="layer 3"):
        next(frames)


def test_a_consumer_that_stops_early_closes_the_source_on_its_thread():
    closed = threading.Event()

    def source():
        try:
            for i in range(10_000):
                yield i
        finally:
            closed.set()

    frames = read_ahead(source(), max_bytes=2, size=ONE)
    assert next(frames) == (0, 1)
    frames.close()  # gRPC gave up on the stream
    assert closed.wait(5)


def test_a_frame_larger_than_the_budget_goes_alone():
    sizes = {0: 1, 1: 50, 2: 1, 3: 1}
    pulled = []

    def source():
        for i in range(4):
            pulled.append(i)
            yield i

    frames = read_ahead(source(), max_bytes=10, size=sizes.get)
    assert next(frames) == (0, 1)
    deadline = time.monotonic() + 5
    while len(pulled) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(pulled) == 3  # 1 (50 bytes) queued alone; 2 waits for it to be taken
    assert items(frames) == [1, 2, 3]


def test_the_clock_says_which_side_was_behind():
    """A slow source starves the consumer; a slow consumer keeps the source waiting for room."""
    def slow_source():
        for i in range(5):
            time.sleep(0.02)
            yield i

    clock = {}
    assert items(read_ahead(slow_source(), max_bytes=2, size=ONE, clock=clock)) == list(range(5))
    assert clock["code"] >= 0.09 and clock["starved"] >= 0.05 and clock["starved"] > clock["full"]

    clock = {}
    for _ in read_ahead(iter(range(5)), max_bytes=1, size=ONE, clock=clock):
        time.sleep(0.02)
    assert clock["full"] >= 0.05 and clock["full"] > clock["starved"] and clock["full"] > clock["code"]
