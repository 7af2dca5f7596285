import asyncio
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hypothesis  # noqa: E402,F401  (imported up front: CPython 3.11.7 can fail to parse it late, after threaded tests)
import pytest  # noqa: E402

from common.models import load_model  # noqa: E402
from common.settings import Settings  # noqa: E402


class RunningReceiver:
    """A receiver served in-process from a background event loop."""

    def __init__(self, model: str, settings: Settings):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from receiver.server import start_server

        self.server, self.servicer, port = self.call(start_server("127.0.0.1", 0, model, settings))
        self.target = f"127.0.0.1:{port}"

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=600)

    def stop(self):
        self.call(self.server.stop(grace=None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def start_receiver():
    """Factory: start_receiver(model, **settings) -> RunningReceiver, all stopped at the end."""
    running = []

    def start(model: str, **overrides) -> RunningReceiver:
        receiver = RunningReceiver(model, Settings(**overrides))
        running.append(receiver)
        return receiver

    yield start
    for receiver in running:
        receiver.stop()


# One receiver per test module and model (modules change sessions and settings of their own).
@pytest.fixture(scope="module")
def llama_receiver(start_receiver):
    return start_receiver("tiny-llama")


@pytest.fixture(scope="module")
def gemma3_receiver(start_receiver):
    return start_receiver("tiny-gemma3")


@pytest.fixture(scope="module")
def smollm2_receiver(start_receiver):
    return start_receiver("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma3():
    return load_model("tiny-gemma3")


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")
