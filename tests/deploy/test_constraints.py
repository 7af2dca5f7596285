"""constraints.txt pins what CI tests and the image installs: every dependency of the package is
pinned there, to a version its own requirement allows (regenerate: deploy/compose/constraints.sh)."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = (line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pairs}


def test_every_dependency_is_pinned_to_an_allowed_version():
    pinned = pins()
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not in constraints.txt: run deploy/compose/constraints.sh"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, pyproject.toml asks {requirement}: run deploy/compose/constraints.sh"


def test_torch_is_the_cpu_release_ci_tests_and_compose_is_not_pinned():
    pinned = pins()
    assert pinned["torch"] == "2.13.0"  # no local label: the CPU wheel and the PyTorch CPU index both match
    assert "docker-compose" not in pinned  # never installed into the venv (its command is broken there)
