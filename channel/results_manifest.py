"""results/MANIFEST.json: for every file in results/, the command, commit, device and date that produced it.

    .venv/bin/python -m channel.results_manifest            # rewrite results/MANIFEST.json
    .venv/bin/python -m channel.results_manifest --check    # exit 1 if a file in results/ is not listed

Where each field comes from (the `sources` of an entry say which rule gave it):
- commit and date: the commit that added the file (`git log --diff-filter=A`), and the last one that changed it;
- command: a `command` field of the JSON; a text file's first line `# COMMAND`; the `command` field of the JSON of
  the same stem beside a text file (its console output); else a command in backticks that names the file, in the
  README of 0356822 (the last one to describe every result; its text now lives in docs/), in docs/,
  or in deploy/ (scripts and run.sh); else "unknown";
- device: the JSON's `environment.device`, `device`, `source` or `run` fields; the file's name (h100,
  h200, cpu); the file's first lines; the paragraph of the README that names it; the commit message;
  else "unknown".
A rule that guesses says so in `sources`; nothing is filled in without one.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
MANIFEST = RESULTS / "MANIFEST.json"
README_COMMIT = "0356822"  # the README before it became a manual: its text names how each result was made
COMMAND_START = re.compile(r"^(kvwire |\.venv/bin/|python3? |deploy/|make |[A-Z_]+=\S+ )")
DEVICES = [(re.compile(r"NVIDIA H200|\bH200\b", re.I), "NVIDIA H200"),
           (re.compile(r"NVIDIA H100|\bH100\b", re.I), "NVIDIA H100"),
           (re.compile(r"\bCPU\b|2-core|2 cores|cpu\b", re.I), "CPU (the 2-core development machine)")]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def tracked_results() -> list[str]:
    """Every file in results/ that git tracks or would track (new files too; ignored ones not)."""
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "results").split()
    return sorted(p for p in set(listed) if p != "results/MANIFEST.json" and (ROOT / p).is_file())


def _device_in(text: str) -> str | None:
    for pattern, name in DEVICES:
        if pattern.search(text):
            return name
    return None


def _json_fields(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _documents() -> list[tuple[str, str]]:
    """(name, text) of every text that may name how a result was made."""
    docs = [(f"README.md at {README_COMMIT}", git("show", f"{README_COMMIT}:README.md"))]
    for folder, pattern in (("docs", "*.md"), ("deploy", "*.sh"), ("deploy", "*.py")):
        docs += [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / folder).rglob(pattern))]
    return docs


def _names_for(path: str) -> list:
    """Ways a text may name the file: its path, the path with `.*`, a `{a,b}` group for its letter,
    `_S` for the model's short name (smollm2, gemma3), and the folder of a sweep's report."""
    stem, _, _ = path.rpartition(".")
    names: list = [path, f"{stem}.*"]
    letter = re.match(r"(.*_)([a-z])(_[^/]*)$", stem)
    if letter:
        names.append(re.compile(re.escape(letter[1]) + r"\{[a-z,]*" + letter[2] + r"[a-z,]*\}" + re.escape(letter[3])))
    model = re.match(r"(.*_)(smollm2|gemma3)$", stem)
    if model:
        names.append(re.compile(re.escape(model[1]) + r"S\." + re.escape(path.rpartition(".")[2]) + r"\b"))
    parts = Path(path).parts
    if len(parts) == 3 and parts[1] not in ("frontier", "gpu", "qwen"):
        names.append(re.compile(re.escape("/".join(parts[:2])) + r"(/|\b)(?!\.)"))
    return names


def _sibling(path: str) -> re.Pattern:
    """The file's stem with another extension: a .txt or .png written beside the .json a command names."""
    stem, _, _ = path.rpartition(".")
    return re.compile(re.escape(stem) + r"\.(json|txt|png|jsonl)\b")


def _mentions(text: str, names: list) -> bool:
    return any((n in text) if isinstance(n, str) else n.search(text) for n in names)


def _candidates(text: str) -> list[str]:
    """Commands in a text: spans in backticks, and the lines of fenced code blocks."""
    spans = [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        spans += [line.split("  #")[0].strip() for line in block.splitlines()]
    return [span for span in spans if COMMAND_START.match(span)]


GENERIC_WORDS = {"smollm2", "gemma3", "cpu", "h100", "h200", "round", "session"}
GPU_RUNS = (("kernel_sweep", "python3 deploy/gpu/kernel_sweep.py"), ("kernel_tests", "deploy/gpu/run.sh kernels OUT"),
            ("codec_gpu", "deploy/gpu/run.sh kernels OUT"), ("gpu_tests_smollm2", "deploy/gpu/run.sh smollm2 OUT"),
            ("gpu_tests", "deploy/gpu/run.sh all OUT (or tiny)"), ("bench_gpu", "deploy/gpu/run.sh all OUT (or tiny)"))


def _gpu_run(path: str) -> str | None:
    if not path.startswith("results/gpu/"):
        return None
    name = Path(path).name
    return next((command for prefix, command in GPU_RUNS if name.startswith(prefix)), None)


def _command(path: str, fields: dict, documents, message: str) -> tuple[str, str]:
    if isinstance(fields.get("command"), str):
        return fields["command"], "the JSON's command field"
    if path.endswith(".txt"):
        first = (ROOT / path).read_text(errors="replace").partition("\n")[0]
        if first.startswith("# ") and COMMAND_START.match(first[2:]):
            return first[2:].strip(), "the file's first line"
        beside = _json_fields((ROOT / path).with_suffix(".json"))
        if isinstance(beside.get("command"), str):
            return beside["command"], "the command field of the JSON beside it (this file is its console output)"
    names = _names_for(path)
    commands = [(source, span) for source, text in documents for span in _candidates(text)]
    commands += [("the message of the commit that added it", span) for span in _candidates(message)]
    for source, span in commands:
        if _mentions(span, names):
            return span, f"a command in {source} that names the file"
    for source, text in documents:
        first_line = (ast.get_docstring(ast.parse(text)) or "\n").splitlines()[0] if source.endswith(".py") else ""
        if source.startswith("deploy/") and path in first_line:  # "Round 8's results/frontier.json: ..."
            return f".venv/bin/python {source}", f"{source}'s docstring names the file"
    # A paragraph that names the file and holds one command that shares a word of the file's name
    # ("capkv" in capkv_100.json): nearly always the command that wrote it.
    words = {w for w in re.split(r"[_./]", Path(path).stem) if len(w) >= 3 and w not in GENERIC_WORDS}
    for source, text in documents:
        for paragraph in text.split("\n\n"):
            in_paragraph = {c for c in _candidates(paragraph) if len(c.split()) >= 3}
            if len(in_paragraph) == 1 and _mentions(paragraph, names):
                command = in_paragraph.pop()
                if any(word in command for word in words):
                    return command, f"the one command of the paragraph of {source} that names the file (a guess)"
    for source, text in documents:
        for section in re.split(r"\n(?=#+ )", text):
            heading, _, body = section.partition("\n")
            # A bare "kvwire frontier" names no run; a heading's command counts only with its arguments.
            heading_commands = [c for c in _candidates(heading) if len(c.split()) >= 3 or c.startswith("make ")]
            if len(heading_commands) == 1 and _mentions(body, names):
                return heading_commands[0], f"the heading of the section of {source} that names the file (a guess)"
    gpu_run = _gpu_run(path)
    if gpu_run:
        return gpu_run, "deploy/gpu/run.sh's mode that writes a file of this name (a guess from the name)"
    for source, span in commands:
        if _sibling(path).search(span):
            return span, f"a command in {source} that names a file of the same stem (a guess: its console output or plot)"
    return "unknown", "no command names the file"


def _device(path: str, fields: dict, documents, message: str) -> tuple[str, str]:
    environment = fields.get("environment")
    for key, value in (("environment.device", environment.get("device") if isinstance(environment, dict) else None),
                       ("device", fields.get("device")), ("source", fields.get("source")), ("run", fields.get("run"))):
        if isinstance(value, str) and _device_in(value):
            return _device_in(value), f"the JSON's {key} field"
    name = Path(path).name.lower()
    for token, device in (("h200", "NVIDIA H200"), ("h100", "NVIDIA H100"), ("cpu", "CPU (the 2-core development machine)")):
        if token in name:
            return device, "the file's name"
    file = ROOT / path
    if file.suffix in (".txt", ".log", ".json", ".jsonl"):
        head = file.read_text(errors="replace")[:3000]
        if _device_in(head) and re.search(r"NVIDIA|H100|H200|CPU", head):
            return _device_in(head), "the file's first lines (a guess)"
    names = _names_for(path)
    for source, text in documents:
        for paragraph in text.split("\n\n"):
            if _mentions(paragraph, names) and _device_in(paragraph):
                return _device_in(paragraph), f"the paragraph of {source} that names it (a guess)"
    if _device_in(message):
        return _device_in(message), "the commit message of the commit that added it (a guess)"
    readme = documents[0][1]
    results = readme[readme.find("\n## Results\n"):readme.find("\n## Layout\n")]
    for section in re.split(r"\n(?=### )", results):
        if _mentions(section, names) and not re.search(r"GPU|H100|H200|CUDA", section):
            return ("CPU (the 2-core development machine)",
                    f"the README at {README_COMMIT}: its Results are from the 2-core CPU unless a section says otherwise")
    return "unknown", "nothing names the device"


def entry(path: str, documents) -> dict:
    added = git("log", "--diff-filter=A", "--format=%H,%cI,%s", "--", path).strip().splitlines()
    commit, date, subject = (added[-1].split(",", 2) if added else ("unknown", "unknown", ""))
    last = git("log", "-1", "--format=%H,%cI", "--", path).strip()
    message = git("log", "-1", "--format=%B", commit) if commit != "unknown" else ""
    fields = _json_fields(ROOT / path) if path.endswith(".json") else {}
    command, command_source = _command(path, fields, documents, message)
    device, device_source = _device(path, fields, documents, message)
    return {"file": path, "command": command, "device": device, "commit": commit, "date": date,
            "commit_subject": subject, "last_commit": last.split(",")[0] if last else "unknown",
            "sources": {"command": command_source, "device": device_source}}


def build() -> list[dict]:
    documents = _documents()
    return [entry(path, documents) for path in tracked_results()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m channel.results_manifest", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that every file in results/ is listed")
    args = parser.parse_args(argv)
    if args.check:
        listed = {e["file"] for e in json.loads(MANIFEST.read_text())}
        missing = sorted(set(tracked_results()) - listed)
        print("\n".join(missing) or "every file in results/ is listed")
        return 1 if missing else 0
    entries = build()
    MANIFEST.write_text(json.dumps(entries, indent=1) + "\n")
    known = sum(e["command"] != "unknown" for e in entries), sum(e["device"] != "unknown" for e in entries)
    print(f"wrote {MANIFEST.relative_to(ROOT)}: {len(entries)} files, command known for {known[0]}, device for {known[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
