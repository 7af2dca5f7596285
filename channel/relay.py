"""`kvwire channel`: a TCP relay that shapes the real bytes of a connection with a `Link`.

Each accepted connection is piped to the upstream address. Both directions go through
their own link (same parameters): bytes are read in segments of at most ~10 ms of link
time (and 1 MiB), each segment is released when the link would deliver it, in order. A bounded
queue between reading and writing gives TCP back-pressure, so the sender feels the
shaped rate. Per-connection byte counts and times are kept in `stats` and logged.

`RelayProcess` runs a relay in a process of its own (`python -m channel.relay`), for benchmarks whose
sender would otherwise share its interpreter lock with the relay's loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.link import Link, link_from_options

log = logging.getLogger("kvwire.channel")
MAX_SEGMENT = 1 << 20  # 0.8 ms at 10 Gbit/s; a slower link's ~10 ms segments are smaller
QUEUE_SEGMENTS = 16


@dataclass
class ConnectionStats:
    peer: str
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0
    started: float = field(default_factory=time.monotonic)
    first_byte: float | None = None
    last_byte: float | None = None

    @property
    def seconds(self) -> float:
        return (self.last_byte or self.started) - (self.first_byte or self.started)


def flip_byte_at(offset: int) -> Callable[[bytes], bytes]:
    """A corrupter that flips one bit of the byte at stream `offset`, once (fault injection)."""
    seen = {"bytes": 0, "done": False}

    def corrupt(data: bytes) -> bytes:
        start = seen["bytes"]
        seen["bytes"] += len(data)
        if seen["done"] or not start <= offset < seen["bytes"]:
            return data
        seen["done"] = True
        damaged = bytearray(data)
        damaged[offset - start] ^= 0x10
        return bytes(damaged)

    return corrupt


def random_flips(per_mb: float, seed: int = 0) -> Callable[[bytes], bytes]:
    """A corrupter that flips bits at random, on average `per_mb` times per MB."""
    import random

    rng = random.Random(seed)

    def corrupt(data: bytes) -> bytes:
        if rng.random() >= per_mb * len(data) / 1e6:
            return data
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(damaged)

    return corrupt


class Relay:
    def __init__(self, listen_host: str, listen_port: int, upstream_host: str, upstream_port: int,
                 make_link: Callable[[], Link], corrupt: Callable[[bytes], bytes] | None = None):
        self.listen = (listen_host, listen_port)
        self.upstream = (upstream_host, upstream_port)
        self.make_link = make_link
        self.corrupt = corrupt  # applied to client -> upstream segments (fault injection)
        self.stats: list[ConnectionStats] = []
        self.server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.resets = 0

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, *self.listen, limit=MAX_SEGMENT)
        log.info("relay %s:%d -> %s:%d", self.listen[0], self.port, *self.upstream)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self.server:
            await self.server.wait_closed()

    async def reset(self) -> int:
        """Fault injection: abort every open connection at once (a TCP reset mid-stream); returns how many."""
        aborted = [writer for writer in self._writers if not writer.is_closing()]
        for writer in aborted:
            writer.transport.abort()
        self.resets += len(aborted)
        return len(aborted)

    async def _handle(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve(client_reader, client_writer)
        except asyncio.CancelledError:
            pass  # the relay is stopping: end this connection quietly
        finally:
            self._connections.discard(task)

    async def _serve(self, client_reader, client_writer) -> None:
        peer = "%s:%d" % client_writer.get_extra_info("peername")[:2]
        stats = ConnectionStats(peer)
        self.stats.append(stats)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream, limit=MAX_SEGMENT)
        except OSError as exc:
            log.warning("upstream %s:%d unreachable: %s", *self.upstream, exc)
            client_writer.close()
            return
        self._writers |= {client_writer, upstream_writer}
        up = self._pipe(client_reader, upstream_writer, self.make_link(), stats, "bytes_up", self.corrupt)
        down = self._pipe(upstream_reader, client_writer, self.make_link(), stats, "bytes_down", None)
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._writers -= {client_writer, upstream_writer}
        log.info("connection %s: %d bytes up, %d down, %.3f s", peer, stats.bytes_up, stats.bytes_down, stats.seconds)

    async def _pipe(self, reader, writer, link: Link, stats: ConnectionStats, counter: str, corrupt) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SEGMENTS)
        origin = loop.time()
        segment = max(512, min(MAX_SEGMENT, int(link.trace.rates[0] / 8 * 0.01)))

        async def read() -> None:
            # The end marker follows the last byte, or a peer that went away. A cancelled or
            # closed reader puts nothing: the writer is being torn down with it.
            try:
                while data := await reader.read(segment):
                    if corrupt:
                        data = corrupt(data)
                    await queue.put((link.send(len(data), loop.time() - origin), data))
            except OSError:
                pass
            await queue.put((None, b""))

        async def write() -> None:
            try:
                while True:
                    arrival, data = await queue.get()
                    if arrival is None:
                        break
                    delay = arrival - (loop.time() - origin)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
                    now = time.monotonic()
                    stats.first_byte = stats.first_byte or now
                    stats.last_byte = now
                    setattr(stats, counter, getattr(stats, counter) + len(data))
            finally:
                writer.close()

        await asyncio.gather(read(), write())


async def run_relay(listen: str, upstream: str, make_link: Callable[[], Link], corrupt_per_mb: float = 0.0) -> None:
    listen_host, listen_port = listen.rsplit(":", 1)
    upstream_host, upstream_port = upstream.rsplit(":", 1)
    corrupt = random_flips(corrupt_per_mb) if corrupt_per_mb > 0 else None
    relay = Relay(listen_host, int(listen_port), upstream_host, int(upstream_port), make_link, corrupt)
    await relay.start()
    async with relay.server:
        await relay.server.serve_forever()


async def _sink_server(host: str = "127.0.0.1"):
    """A TCP server that counts bytes and records when the last one arrived."""
    received = {"bytes": 0, "last": None}

    async def sink(reader, writer):
        while data := await reader.read(MAX_SEGMENT):
            received["bytes"] += len(data)
            received["last"] = time.monotonic()
        writer.close()

    server = await asyncio.start_server(sink, host, 0)
    return server, received


async def measure_goodput(link: Link | dict, nbytes: int) -> float:
    """Send `nbytes` through a relay to a sink; goodput (bit/s) as the sink saw it. `link`: a Link, for a relay on
    this event loop; `link_from_options`' arguments, for a relay in a process of its own (RelayProcess)."""
    server, received = await _sink_server()
    sink_port = server.sockets[0].getsockname()[1]
    if isinstance(link, Link):
        relay = Relay("127.0.0.1", 0, "127.0.0.1", sink_port, lambda: link)
        await relay.start()
        port, stop = relay.port, relay.stop
    else:
        process = RelayProcess(f"127.0.0.1:{sink_port}", **link)
        port = int(process.target.rsplit(":", 1)[1])

        async def stop() -> None:
            process.close()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        block = memoryview(b"\0" * MAX_SEGMENT)
        for offset in range(0, nbytes, MAX_SEGMENT):
            writer.write(block[: min(MAX_SEGMENT, nbytes - offset)])
            await writer.drain()
        writer.close()
        while received["bytes"] < nbytes:
            await asyncio.sleep(0.005)
    finally:
        await stop()
        server.close()
    return nbytes * 8 / (received["last"] - start)


class BackgroundRelay:
    """A relay on its own event loop in a daemon thread, for code that is not async."""

    def __init__(self, upstream: str, make_link: Callable[[], Link], corrupt: Callable[[bytes], bytes] | None = None):
        import threading

        host, port = upstream.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.relay = Relay("127.0.0.1", 0, host, int(port), make_link, corrupt)
        asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(timeout=10)
        self.target = f"127.0.0.1:{self.relay.port}"

    def reset(self) -> int:
        """Abort every connection through the relay now (see Relay.reset)."""
        return asyncio.run_coroutine_threadsafe(self.relay.reset(), self.loop).result(timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RelayProcess:
    """A relay in a process of its own (`python -m channel.relay`) to `upstream`, its links built by
    `link_from_options(**options)`; `target` is its address. The process ends with `close`, or when this one
    goes (it reads its standard input until the end)."""

    def __init__(self, upstream: str, **options):
        self.process = subprocess.Popen([sys.executable, "-m", "channel.relay", upstream, json.dumps(options)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.target = self.process.stdout.readline().strip()
        if not self.target:
            self.close()
            raise RuntimeError(f"the relay process ended (exit status {self.process.returncode}) before it listened")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdin.close()
        self.process.stdout.close()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _serve_process(upstream: str, options: str) -> None:
    import os
    import threading

    host, port = upstream.rsplit(":", 1)
    link = json.loads(options)
    link_from_options(**link)  # bad options end the process here, before it listens
    relay = Relay("127.0.0.1", 0, host, int(port), lambda: link_from_options(**link))
    await relay.start()
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    print(f"127.0.0.1:{relay.port}", flush=True)
    async with relay.server:
        await relay.server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve_process(*sys.argv[1:]))
