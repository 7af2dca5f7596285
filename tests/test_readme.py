"""The README stays a manual: at most 300 lines, no first person, and every `kvwire` command in
its code blocks names a real command with options that command has."""

import re
import shlex
from pathlib import Path

import typer

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_lines() -> list[str]:
    blocks, inside = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            blocks.append([]) if inside else None
        elif inside:
            blocks[-1].append(line)
    lines = []
    for block in blocks:
        joined = "\n".join(block).replace("\\\n", " ")
        lines += [line.split(" #")[0].strip().rstrip("&").strip() for line in joined.splitlines()
                  if line.strip().startswith("kvwire ")]
    return lines


def test_the_readme_is_short_and_impersonal():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert re.findall(r"\b(I|I'm|I've|we|We|our|Our|my|My)\b", text) == []


def test_every_kvwire_command_in_the_readme_exists_with_its_options():
    from channel.cli import app

    root = typer.main.get_command(app)  # typer's own click classes: groups are told by their `commands`
    lines = _command_lines()
    assert len(lines) >= 4
    for line in lines:
        words = shlex.split(line)[1:]
        command = root
        while hasattr(command, "commands") and words and not words[0].startswith("-"):
            assert words[0] in command.commands, f"{line}: no command {words[0]!r}"
            command = command.commands[words.pop(0)]
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        given = {word.split("=")[0] for word in words if word.startswith("--")}
        assert given <= known, f"{line}: unknown options {sorted(given - known)}"
