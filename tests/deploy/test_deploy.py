"""deploy/ without a Docker engine: the compose file against the Compose Specification schema, every
command and environment variable against the CLI and settings, and the same topology for real.
(tests/deploy/test_compose_demo.py runs it under a real engine.)"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.main import get_command

from channel.cli import app
from channel.nodes import free_port
from common.settings import Settings
from sender.client import Client

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
CLI = get_command(app)


def compose_schema() -> dict:
    """The Compose Specification's JSON schema, as docker-compose 1.29.2 ships it (Debian's package
    docker-compose 1.29.2-3, compose/config/compose_spec.json; Apache-2.0), kept here so that no test
    installs docker-compose (whose command is broken without its dependencies)."""
    return json.loads((Path(__file__).parent / "compose_spec.json").read_text())


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with VAR unset: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def resolve(args: list[str]):
    """Parse `kvwire ARGS` the way the CLI would, without running it; returns the leaf command."""
    command, ctx, args = CLI, None, [interpolate(arg) for arg in args]
    while hasattr(command, "get_command"):  # a group (typer's click classes are its own)
        ctx = type(CLI).context_class(command, info_name=command.name, parent=ctx)
        name, *args = args
        sub = command.get_command(ctx, name)
        assert sub is not None, f"kvwire has no command {name!r}"
        command = sub
    command.make_context(command.name, list(args), parent=ctx)  # raises on unknown options or bad values
    return command


def test_compose_file_follows_the_specification():
    jsonschema.Draft201909Validator(compose_schema()).validate(COMPOSE)  # the schema names draft 2019-09


def test_compose_has_the_three_services_wired_by_health():
    services = COMPOSE["services"]
    assert set(services) == {"receiver", "channel", "sender"}
    assert services["channel"]["depends_on"]["receiver"]["condition"] == "service_healthy"
    assert services["sender"]["depends_on"]["channel"]["condition"] == "service_healthy"
    assert all("healthcheck" in services[name] for name in ("receiver", "channel"))


def test_every_compose_command_and_variable_exists():
    settings_vars = {f"KVWIRE_{name.upper()}" for name in Settings.model_fields}
    for name, service in COMPOSE["services"].items():
        command = resolve(service["command"])
        envvars = {p.envvar for p in command.params if getattr(p, "envvar", None)}
        for variable in service.get("environment", {}):
            assert variable in settings_vars | envvars | {"COLUMNS"}, f"{name}: {variable} is read by nothing"  # rich reads COLUMNS
        test = service.get("healthcheck", {}).get("test")
        if test:  # the fast probe, never the CLI (which imports the model stack: seconds per probe)
            assert test[:4] == ["CMD", "python", "-m", "receiver.probe"] and len(test) == 5


def test_dockerfile_and_manifests_use_real_commands():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["kvwire"]' in dockerfile and "USER kvwire" in dockerfile
    resolve(json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1)))
    resolve(shlex.split(re.search(r"kvwire (prepare[^\\\n]*)", dockerfile).group(1)))
    for document in yaml.safe_load_all((DEPLOY / "k8s" / "receiver.yaml").read_text()):
        if document["kind"] == "Deployment":
            container = document["spec"]["template"]["spec"]["containers"][0]
            resolve(container["args"])
            settings_vars = {f"KVWIRE_{name.upper()}" for name in Settings.model_fields}
            assert {e["name"] for e in container["env"]} <= settings_vars
        else:
            assert document["spec"]["clusterIP"] == "None"  # headless: clients see every pod


def localize(args: list[str], ports: dict[str, int]) -> list[str]:
    """The compose command with service names and ports mapped to loopback."""
    text = json.dumps(args)
    for port_name, port in ports.items():
        text = text.replace(port_name, str(port))
    return json.loads(text.replace("receiver:", "127.0.0.1:").replace("channel:", "127.0.0.1:")
                      .replace("0.0.0.0", "127.0.0.1"))


TEST_TOKEN = "compose-test-token"


def environment(service: dict) -> dict:
    env = dict(os.environ)
    for key, value in service.get("environment", {}).items():
        value = interpolate(str(value))
        env[key] = re.sub(r"\$\{KVWIRE_TOKEN:\?[^}]*\}", TEST_TOKEN, value)  # required: the caller's secret
    return env


def test_compose_ships_no_secret_and_publishes_on_loopback_only():
    services = COMPOSE["services"]
    for name in ("receiver", "sender"):
        token = services[name]["environment"]["KVWIRE_TOKEN"]
        assert token.startswith("${KVWIRE_TOKEN:?"), f"{name}: the token must come from the environment"
    assert all(str(port).startswith("127.0.0.1:") for s in services.values() for port in s.get("ports", []))
    assert "${KVWIRE_DEMO_OUTPUT:-./demo-output}:/out" in services["sender"]["volumes"]
    assert "/out/kvwire-demo.png" in services["sender"]["command"]


@pytest.mark.slow
def test_three_process_topology(tmp_path):
    """receiver, channel and sender run as three processes with the compose file's own commands."""
    services = COMPOSE["services"]
    ports = {"50051": free_port(), "50052": free_port(), "8080": free_port()}
    kvwire = [sys.executable, "-m", "channel.cli"]
    processes = []

    def start(name, extra=()):
        args = localize(services[name]["command"], ports) + list(extra)
        process = subprocess.Popen(kvwire + args, env=environment(services[name]), cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        return process

    def healthy(name, timeout=120):
        probe = [sys.executable] + localize(services[name]["healthcheck"]["test"][2:], ports)
        deadline = time.monotonic() + timeout
        while subprocess.run(probe, env=environment(services[name]), capture_output=True).returncode:
            assert time.monotonic() < deadline, f"{name} never became healthy"
            time.sleep(1)

    try:
        start("receiver")
        healthy("receiver")
        start("channel")
        healthy("channel")
        out = tmp_path / "demo-output"  # the bind mount: the host's side of /out
        out.mkdir()
        sender_args = [interpolate(arg.replace("/out/", f"{out}/")) for arg in localize(services["sender"]["command"], ports)]
        sender_args[sender_args.index("--samples") + 1] = "2"
        sender = subprocess.run(kvwire + sender_args, env=environment(services["sender"]), cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert sender.returncode == 0, sender.stdout + sender.stderr
        assert "accuracy against bytes" in sender.stdout
        assert "q2c:0.5+int4:g32" in sender.stdout
        assert (out / "kvwire-demo.png").exists() and (out / "kvwire-demo.json").exists()
        # The receiver saw the transfers through the relay, and counts them.
        token = environment(services["receiver"])["KVWIRE_TOKEN"]
        with Client(f"127.0.0.1:{ports['50052']}", token=token) as client:
            client.wait_until_serving(10)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
