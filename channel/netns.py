"""An independent reference for the relay: Linux `tc tbf` between two network namespaces.

Two namespaces joined by a veth pair; the sender's side shapes with a token bucket.
Needs root and iproute2; `NetnsUnavailable` says why when they are missing.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import uuid

from common.link import parse_rate

SINK = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0
while data := c.recv(1 << 16): n += len(data)
print(n, time.monotonic(), flush=True)
"""
SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(time.monotonic(), flush=True)
block = bytes(1 << 16); left = int(sys.argv[3])
while left > 0:
    c.sendall(block[: min(left, len(block))]); left -= len(block)
c.close()
"""


class NetnsUnavailable(RuntimeError):
    pass


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode:
        raise NetnsUnavailable(f"`{' '.join(args)}` failed: {result.stderr.strip()}")


@contextlib.contextmanager
def veth_pair(rate: str, latency: str = "400ms"):
    """Yield (ns_a, ns_b, addr_b): namespace a sends to addr_b in namespace b through tbf at `rate`."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise NetnsUnavailable("iproute2 (ip, tc) is not installed")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"kvw-a-{tag}", f"kvw-b-{tag}"
    dev_a, dev_b = f"kvwa{tag}", f"kvwb{tag}"
    # Addresses exist only inside these two namespaces, made here and removed after.
    addr_a, addr_b = "10.203.0.1", "10.203.0.2"
    try:
        _run("ip", "netns", "add", ns_a)
        _run("ip", "netns", "add", ns_b)
        _run("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # A bucket of ~5 ms at the rate (at least a few MTUs): a bigger one front-loads slow links.
        burst = max(4096, int(parse_rate(rate) / 8 * 0.005))
        _run("tc", "-n", ns_a, "qdisc", "add", "dev", dev_a, "root", "tbf", "rate", rate, "burst", f"{burst}b", "latency", latency)
        yield ns_a, ns_b, addr_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def tbf_transfer_seconds(rate: str, nbytes: int) -> float:
    """Seconds from the sender's connect until the sink has all `nbytes`, through tc tbf at `rate`."""
    with veth_pair(rate) as (ns_a, ns_b, addr_b):
        sink = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", SINK, addr_b],
                                stdout=subprocess.PIPE, text=True)
        port = sink.stdout.readline().strip()
        source = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c", SOURCE, addr_b, port, str(nbytes)],
                                capture_output=True, text=True, timeout=600, check=True)
        count, end = sink.stdout.readline().split()
        sink.wait(timeout=60)
        if int(count) != nbytes:
            raise RuntimeError(f"sink got {count} of {nbytes} bytes")
        return float(end) - float(source.stdout.split()[0])
