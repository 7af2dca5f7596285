"""A container health probe: one call to the receiver's standard gRPC health service.

    python -m receiver.probe [HOST:PORT] [--timeout SECONDS]

Exit 0 when the service answers SERVING, 1 otherwise (with the reason on stderr). It imports
grpc, the health stubs and the settings, never torch or transformers, so a probe answers in a
fraction of a second where `kvwire receiver health` (which loads the CLI) takes seconds: a
healthcheck's timeout is then the receiver's, not the probe's start-up. TLS follows the settings
(KVWIRE_TLS_CA, else KVWIRE_TLS_CERT); the health service takes no bearer token.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.settings import get_settings


def check(target: str, timeout_s: float) -> str:
    """The health service's status name at `target` (e.g. "SERVING"); raises grpc.RpcError."""
    settings = get_settings()
    ca = settings.tls_ca or settings.tls_cert
    if ca:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m receiver.probe", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="the receiver (or relay), host:port")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        status = check(args.target, args.timeout)
    except grpc.RpcError as error:
        print(f"{args.target}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(f"{args.target} {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
