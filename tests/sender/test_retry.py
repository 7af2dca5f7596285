"""The sender's retries: how many, after which failures, and that the count comes from the settings."""

import grpc
import pytest

from common.settings import Settings
from sender.client import Client


class Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = ""):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def failing(code, details="", succeed_on=None):
    calls = []

    def call(attempt):
        calls.append(attempt)
        if attempt == succeed_on:
            return "answered"
        raise Refusal(code, details)

    return call, calls


def test_attempts_come_from_the_settings_and_back_off():
    waits = []
    with Client.from_settings(Settings(send_attempts=16), "127.0.0.1:1") as client:
        call, calls = failing(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(Refusal):
            client.call_with_retry(call, sleep=waits.append)
    assert calls == list(range(1, 17))
    # 0.2 s doubling up to 5 s, jitter up to +20%: 16 attempts wait about 56 s in all (a receiver's restart)
    assert 56.2 <= sum(waits) <= 56.2 * 1.2
    assert max(waits) <= 5.0 * 1.2


def test_a_receiver_back_within_the_attempts_answers():
    with Client.from_settings(Settings(send_attempts=4), "127.0.0.1:1") as client:
        call, calls = failing(grpc.StatusCode.UNAVAILABLE, succeed_on=4)
        assert client.call_with_retry(call, sleep=lambda s: None) == "answered"
    assert calls == [1, 2, 3, 4] and client.retries == 3


@pytest.mark.parametrize("code, details, tries", [
    (grpc.StatusCode.INVALID_ARGUMENT, "bad profile", 1),  # the same bytes would be refused again
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "transfer too large", 1),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "receiver busy: 2 GiB pinned", 3),
    (grpc.StatusCode.DATA_LOSS, "crc mismatch", 3),
])
def test_only_retryable_failures_are_sent_again(code, details, tries):
    with Client("127.0.0.1:1", attempts=3) as client:
        call, calls = failing(code, details)
        with pytest.raises(Refusal):
            client.call_with_retry(call, sleep=lambda s: None)
    assert len(calls) == tries


def test_send_attempts_out_of_bounds_is_refused():
    with pytest.raises(ValueError, match="send_attempts"):
        Settings(send_attempts=0)
