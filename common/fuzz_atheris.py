"""Coverage-guided fuzzing of the receiver's frame path with atheris (optional: pip install atheris).

    python -m common.fuzz_atheris -runs=100000

The input bytes are split into length-prefixed protobuf Frames and fed to a wire.Assembler;
anything but acceptance or a WireError is reported by atheris as a crash.
"""

import os
import sys

import atheris

with atheris.instrument_imports(include=["common", "google.protobuf"]):
    from google.protobuf.message import DecodeError

    from common import wire
    from common.fuzz import FUZZ_LIMITS
    from common.proto import kvwire_pb2 as pb

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FINGERPRINT = pb.Fingerprint(architecture="LlamaForCausalLM", num_layers=4, kv_heads=2, head_dim=16, dtype="float32",
                             weights_sha256="0" * 64)


def test_one_input(data: bytes) -> None:
    frames, offset = [], 0
    while offset + 2 <= len(data) and len(frames) < 16:
        size = int.from_bytes(data[offset:offset + 2], "little")
        blob = data[offset + 2: offset + 2 + size]
        offset += 2 + size
        try:
            frames.append(pb.Frame.FromString(blob))
        except DecodeError:
            return
    assembler = wire.Assembler(FINGERPRINT, FUZZ_LIMITS)
    try:
        for frame in frames:
            assembler.add(frame)
        assembler.result()
    except wire.WireError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
