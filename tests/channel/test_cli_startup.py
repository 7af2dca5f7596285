"""The CLI starts without the model stack: `kvwire --help` and `kvwire receiver health` never import
torch or transformers (they take seconds to import; a healthcheck has a timeout). Timings live in
docs/startup.md; these tests check the outcome (which modules got imported), not a duration."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_cli_imports_neither_torch_nor_transformers():
    loaded = _run("import json, sys\nimport channel.cli\n"
                  f"print(json.dumps({{m: m in sys.modules for m in {HEAVY + ('grpc',)!r}}}))")
    assert loaded == {"torch": False, "transformers": False, "grpc": False}


def test_help_and_receiver_health_stay_light():
    result = _run(
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from channel.cli import app\n"
        "runner = CliRunner()\n"
        "help_ = runner.invoke(app, ['--help'])\n"
        "health = runner.invoke(app, ['receiver', 'health', '--target', '127.0.0.1:9'])\n"
        f"print(json.dumps({{'help': help_.exit_code, 'health': health.exit_code, 'out': health.output,"
        f" 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    assert result["help"] == 0
    assert result["health"] == 1  # nothing listens on port 9
    assert "not SERVING" in result["out"] and "UNAVAILABLE" in result["out"]
    assert result["heavy"] == []
