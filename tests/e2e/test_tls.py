"""TLS on gRPC and HTTP with a generated certificate: a real receiver process."""

import os
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from channel.nodes import free_port
from common import wire
from common.kvstate import greedy_decode
from common.profile import parse_profile
from sender.client import Client
from sender.pipeline import Sender
from sender.prefill import prefill_prompt
from tests.tls import make_certificate


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory):
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    trust = ssl.create_default_context(cafile=str(cert))
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "KVWIRE_TLS_CERT": str(cert), "KVWIRE_TLS_KEY": str(key), "KVWIRE_TOKEN": "t0ken"}
    process = subprocess.Popen([sys.executable, "-m", "channel.cli", "receiver", "serve", "--port", str(grpc_port),
                                "--http-port", str(http_port), "--model", "tiny-llama"], env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"https://127.0.0.1:{http_port}/readyz", verify=trust).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield cert, grpc_port, http_port, trust
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_grpc_over_tls(tls_receiver, tiny_llama):
    cert, grpc_port, _, _ = tls_receiver
    with Client(f"localhost:{grpc_port}", token="t0ken", tls_ca=cert) as client:
        pre = prefill_prompt(tiny_llama, "Paris is in France.", "Where is Paris?")
        int8 = parse_profile("int8")
        sent = Sender(tiny_llama, client, attempts=1).transfer(pre.kv, int8)
        tokens = list(client.generate(sent.session_id, token_ids=pre.tail_ids, max_new_tokens=3).token_ids)
    # Over TLS, the answer is the one the same int8 cache gives in process.
    local = wire.decode(wire.encode(pre.kv, int8, tiny_llama.fingerprint), tiny_llama.fingerprint)
    assert tokens == greedy_decode(tiny_llama.model, local.to_cache(tiny_llama.config), pre.tail_ids, local.seq_len, 3)
    with Client(f"localhost:{grpc_port}", token="t0ken", timeout_s=5) as plaintext, pytest.raises(grpc.RpcError) as info:
        plaintext.negotiate(tiny_llama.fingerprint, ["raw"])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http_over_tls(tls_receiver):
    _, _, http_port, trust = tls_receiver
    url = f"https://127.0.0.1:{http_port}"
    assert httpx.get(f"{url}/v1/sessions", verify=trust).status_code == 401
    assert httpx.get(f"{url}/v1/sessions", verify=trust, headers={"authorization": "Bearer t0ken"}).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5)
