"""The committed stubs are exactly what the pinned grpcio-tools generates from the .proto."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ["kvwire_pb2.py", "kvwire_pb2.pyi", "kvwire_pb2_grpc.py"]


def test_regenerating_stubs_changes_nothing(tmp_path):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Icommon/proto=proto/kvwire/v1", "--python_out=.",
         "--grpc_python_out=.", "--pyi_out=.", "common/proto/kvwire.proto"],
        cwd=tmp_path, check=True,
    )
    for name in STUBS:
        assert filecmp.cmp(tmp_path / "common" / "proto" / name, ROOT / "common" / "proto" / name, shallow=False), name
