"""Configuration lives in one place: every KVWIRE_* variable is a field of common.settings.Settings,
read nowhere else, and every command's --model defaults to the settings' model (KVWIRE_MODEL)."""

import ast
import re
from pathlib import Path

import click
import typer

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "sender", "receiver", "channel", "deploy")
SETTINGS = ROOT / "common" / "settings.py"
# Variables of other programs that kvwire reads or sets for its own imports.
FOREIGN = {"HF_HUB_OFFLINE", "RAY_ADDRESS", "TRITON_INTERPRET"}


def _environment_reads(tree: ast.AST):
    """(line, name or None) of each os.environ.get / os.getenv / os.environ[...] read / envvar= in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in ("os.environ.get", "os.getenv", "os.environ.setdefault", "environ.get", "getenv") and node.args:
                yield node.lineno, _literal(node.args[0])
            for keyword in node.keywords:
                if keyword.arg == "envvar":
                    yield node.lineno, _literal(keyword.value)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value) == "os.environ":
            yield node.lineno, _literal(node.slice)


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def test_no_kvwire_variable_is_read_outside_the_settings():
    stray = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == SETTINGS or "_pb2" in path.name:
                continue
            for line, name in _environment_reads(ast.parse(path.read_text())):
                # A name that is not a literal could be a KVWIRE_ one; only the foreign ones may be read.
                if name not in FOREIGN:
                    stray.append(f"{path.relative_to(ROOT)}:{line} reads {name or 'a computed name'}")
    assert stray == [], "read these through common.settings.get_settings():\n" + "\n".join(stray)


def test_the_settings_name_every_variable_the_tree_mentions():
    from common.settings import Settings

    fields = {f"KVWIRE_{name.upper()}" for name in Settings.model_fields} | {"KVWIRE_CONFIG_FILE"}
    mentioned = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            # Python only: deploy/'s shell and compose files name host-side build variables
            # (KVWIRE_TORCH_INDEX, KVWIRE_UID, ...) that no kvwire process reads.
            if path.suffix == ".py" and path.is_file():
                mentioned |= set(re.findall(r"\bKVWIRE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert mentioned - fields == set(), "not fields of Settings"


def test_every_model_option_defaults_to_kvwire_model(monkeypatch):
    from channel.cli import app

    monkeypatch.setenv("KVWIRE_MODEL", "gemma3-270m")
    # `bench fuzz` fuzzes the receiver's parser on the tiny model on purpose; it is the one exception.
    exempt = {"bench fuzz"}
    defaults = {}

    def walk(command: click.Command, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for param in command.params:
            if param.name == "model" and path not in exempt:
                with click.Context(command) as ctx:
                    defaults[path] = param.get_default(ctx, call=True)

    walk(typer.main.get_command(app), "")
    assert len(defaults) >= 16
    assert {path: model for path, model in defaults.items() if model != "gemma3-270m"} == {}


def test_docs_configuration_lists_every_setting():
    from common.settings import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if f"`KVWIRE_{name.upper()}`" not in text]
    assert missing == []
