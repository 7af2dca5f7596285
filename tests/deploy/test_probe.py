"""receiver.probe, the containers' health check: its answers and exit codes, and that it stays clear of
the model stack (which would make each probe take seconds)."""

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from channel.nodes import free_port
from receiver import probe


@pytest.fixture
def health_server():
    """A gRPC server with only the standard health service; yields (target, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_serving_exits_0(health_server, capsys):
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main([target]) == 0
    assert capsys.readouterr().out.strip() == f"{target} SERVING"


def test_not_serving_exits_1(health_server, capsys):
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe.main([target]) == 1
    assert capsys.readouterr().out.strip() == f"{target} NOT_SERVING"


def test_nothing_listening_exits_1_with_the_reason(capsys):
    target = f"127.0.0.1:{free_port()}"
    assert probe.main([target, "--timeout", "0.5"]) == 1
    assert capsys.readouterr().err.startswith(f"{target}: UNAVAILABLE")


def test_the_probe_imports_neither_torch_nor_transformers():
    loaded = subprocess.run([sys.executable, "-c", "import sys, receiver.probe; "
                             "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
