"""A bad profile, in the long form or the compact text, gets the same specific message naming the field
at every edge: ProfileError in Python, HTTP 422 from the sender's API, exit 2 from the CLI, and
INVALID_ARGUMENT from the receiver (a header's profile)."""

import json
import time

import grpc
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from channel.cli import app
from common import wire
from common.profile import ProfileError, parse_profile
from common.settings import Settings
from sender.client import Client
from sender.http import create_app

# (long form, the same mistake in compact text, what both messages say)
CASES = [
    ({"stages": [{"stage": "int", "bits": 9}]}, "int9", "uniform quantization takes 1 to 8 bits, got 9"),
    ({"stages": [{"stage": "nf4", "group": 0}]}, "nf4:g0", "group size must be positive and at most 4096, got 0"),
    ({"stages": [{"stage": "pca", "bits": "1.2.3"}]}, "pca:b1.2.3", "bits per element (bits) '1.2.3' is not a number"),
    ({"stages": [{"stage": "pca", "bits": 2, "importance": 1}]}, "pca:b2:i1", "i (per-token steps by the question's "
                                                                            "attention) needs e"),
    ({"stages": [{"stage": "pca", "bits": 2}, {"stage": "int", "bits": 4}]}, "pca:b2+int4",
     "pca allocates its own bits over RoPE-free, decorrelated components"),
    ({"stages": [{"stage": "selection", "method": "q2c", "keep": 0.5}, {"stage": "int", "bits": 8},
                 {"stage": "text", "head": True}]}, "q2c:0.5+int8+text:h", "segments carry no selection"),
    ({"stages": [{"stage": "int", "bits": 4, "layers": [3, 1]}]}, "int4@3-1", "layer range 3-1 is empty"),
    ({"stages": [{"stage": "rot", "seed": 2**32}, {"stage": "int", "bits": 4}]}, "int4+rot:seed4294967296",
     "rotation seed must lie in [0, 4294967295], got 4294967296"),
]
# Mistakes only the long form can make: an unknown field or stage, a value of the wrong JSON type.
LONG_ONLY = [
    ({"stages": [{"stage": "int", "bits": 4, "grup": 32}]}, "int has no field 'grup'; fields: bits, group"),
    ({"stages": [{"stage": "pca", "bits": True}]}, "bits (bits per element) takes a number, got True"),
    ({"stages": [{"stage": "int", "bits": 4.5}]}, "bits (bits) takes an integer, got 4.5"),
    ({"stages": [{"stage": "pca", "bits": 2, "mode": "fast"}]}, "mode (mode) is one of plain, weighted, entropy, joint"),
    ({"stages": [{"stage": "zip"}]}, "unknown stage 'zip'"),
    ({"stages": [{"bits": 4}]}, "a \"stage\" name"),
    ({"stage": "int"}, "no field 'stage'"),
    ({"stages": [{"stage": "tier", "fraction": 0.1, "precision": {"stage": "tier"}}]},
     "precision takes a precision stage, not 'tier'"),
]


@pytest.mark.parametrize("text,message", [("[" * 2000, "nested too deeply"), ('{"stages": [', "not JSON"),
                                          ("{" + " " * 3000 + "}", "at most 2048")])
def test_hostile_json_text_is_a_profile_error(text, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(text)


@pytest.mark.parametrize("long_form,text,message", CASES, ids=[c[1] for c in CASES])
def test_both_forms_name_the_same_problem(long_form, text, message):
    for spec in (long_form, text, json.dumps(long_form)):
        with pytest.raises(ProfileError) as error:
            parse_profile(spec)
        assert message in str(error.value), spec


@pytest.mark.parametrize("long_form,message", LONG_ONLY, ids=[m[:20] for _, m in LONG_ONLY])
def test_long_form_mistakes_name_the_field(long_form, message):
    with pytest.raises(ProfileError, match="stage 1|profile long form") as error:
        parse_profile(long_form)
    assert message in str(error.value)


@pytest.fixture(scope="module")
def http(llama_receiver):
    with TestClient(create_app(Settings(receiver_target=llama_receiver.target), "tiny-llama")) as client:
        yield client


@pytest.mark.parametrize("profile,message", [(c[0], c[2]) for c in CASES[:4]] + [(c[1], c[2]) for c in CASES[:4]]
                         + LONG_ONLY[:2])
def test_the_http_api_answers_422(http, profile, message):
    reply = http.post("/v1/ask", json={"context": "Normandy is in France.", "question": "Where?", "profile": profile})
    assert reply.status_code == 422 and message in reply.json()["detail"], reply.text


def test_the_http_api_takes_the_long_form(http):
    body = {"context": "Normandy is in France.", "question": "Where?", "max_new_tokens": 2,
            "profile": {"stages": [{"stage": "int", "bits": 4, "group": 64}]}}
    reply = http.post("/v1/ask", json=body)
    assert reply.status_code == 200 and reply.json()["profile"] == "int4:g64"


@pytest.mark.parametrize("long_form,message", [(c[0], c[2]) for c in CASES[:3]] + LONG_ONLY[:1])
def test_the_cli_exits_2(tmp_path, long_form, message):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(long_form))
    result = CliRunner().invoke(app, ["sender", "ask", "--question", "q", "--context", "c", "--profile-file", str(path),
                                      "--model", "tiny-llama"])
    assert result.exit_code == 2 and "--profile-file" in result.output
    assert " ".join(message.split()) in " ".join(result.output.replace("│", " ").split())


def test_the_cli_names_the_option_it_read():
    result = CliRunner().invoke(app, ["sender", "ask", "--question", "q", "--context", "c", "--profile", "zip",
                                      "--model", "tiny-llama"])
    flat = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--profile:" in flat and "--profiles" not in flat
    assert all(stage in flat for stage in ("pca", "prerope", "rot", "protect", "tier", "text", "balanced"))


@pytest.mark.parametrize("long_form,message", [(c[0], c[2]) for c in CASES[:3]] + LONG_ONLY[:2])
def test_the_receiver_answers_invalid_argument(llama_receiver, tiny_llama, long_form, message):
    """A header whose profile is the long form (JSON text) is read as such, and refused the same way."""
    positions = [torch.arange(8).expand(2, -1) for _ in range(tiny_llama.fingerprint.num_layers)]
    header = wire.Encoder(tiny_llama.fingerprint, f"bad-{time.perf_counter_ns()}").header(8, positions)
    header.header.profile = json.dumps(long_form)
    with Client(llama_receiver.target) as client, pytest.raises(grpc.RpcError) as error:
        client.send_frames([header])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
