"""Coverage-guided fuzzing of the receiver's frame path with atheris (optional: pip install atheris).

    python -m common.fuzz_atheris -runs=100000

The input bytes are split into length-prefixed protobuf Frames and assembled as the receiver's
handlers do (`common.fuzz.assemble`); an exception other than a WireError, or an UNKNOWN or INTERNAL
status, is reported by atheris as a crash.
"""

import os
import sys

import atheris

with atheris.instrument_imports(include=["common", "google.protobuf"]):
    from google.protobuf.message import DecodeError

    from common.fuzz import FAILURE_STATUSES, assemble
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
    outcome, crash = assemble(frames, FINGERPRINT)
    if crash is not None or outcome in FAILURE_STATUSES:
        raise RuntimeError(crash or outcome)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
