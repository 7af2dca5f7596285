"""Start live nodes as processes: a receiver on a free loopback port, for the demo, load tests and validation."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

from common.settings import get_settings
from sender.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_receiver_process(model: str, env: dict | None = None, quiet: bool = False,
                           port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `kvwire receiver serve` on `port` (default: a free loopback port); return it and its
    address once SERVING."""
    port = port or free_port()
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen([sys.executable, "-m", "channel.cli", "receiver", "serve", "--port", str(port),
                                "--http-port", "0", "--model", model], env={**os.environ, **(env or {})},
                               stdout=output, stderr=output)
    target = f"127.0.0.1:{port}"
    try:
        with Client.from_settings(get_settings(), target) as client:
            client.wait_until_serving()
    except BaseException:
        process.terminate()
        raise
    return process, target


@contextlib.contextmanager
def local_receiver(model: str, quiet: bool = False):
    """A receiver subprocess for the length of the block; yields its address."""
    process, target = start_receiver_process(model, quiet=quiet)
    try:
        yield target
    finally:
        process.terminate()
        process.wait(timeout=30)
