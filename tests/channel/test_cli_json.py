"""Every --json output: its folder is made before any model work, and a path that cannot be written is refused
at once (exit 2), so a long run never ends with nowhere to put its results."""

import json

from typer.testing import CliRunner

from channel.cli import app


def test_eval_writes_into_a_folder_not_made_yet(tmp_path):
    out = tmp_path / "new" / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--samples", "1", "--profiles", "fp16",
                                      "--max-new-tokens", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["profiles"][0]["profile"] == "fp16"


def test_a_json_path_under_a_file_is_refused_before_the_run(tmp_path, monkeypatch):
    import channel.cli.longcontext as longcontext

    def no_run(*args):
        raise AssertionError("the command ran")

    monkeypatch.setattr(longcontext, "use_device", no_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["longcontext", "--model", "tiny-llama", "--lengths", "600", "--profiles", "fp16",
                                      "--json", str(blocker / "out.json")])
    assert result.exit_code == 2, result.output
    assert "cannot write" in result.output
