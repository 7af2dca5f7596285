"""The layers run one way: every import in every module, function-local ones included, is checked."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "sender", "receiver", "channel")
# What each package may import from the project (itself included); see docs/ARCHITECTURE.md.
ALLOWED = {
    "common": {"common"},
    "sender": {"common", "sender"},
    "receiver": {"common", "receiver"},
    "channel": {"common", "sender", "receiver", "channel"},
}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) for every import statement in the module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative imports stay inside their package
            continue
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PACKAGES]
    return found


def wrong_way_imports(package: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {target}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, target in project_imports(path) if target not in ALLOWED[package]]


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    assert wrong_way_imports(package) == []


def test_the_check_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sender.client import Client\n    import receiver.server\n")
    assert project_imports(module) == [(2, "sender"), (3, "receiver")]
