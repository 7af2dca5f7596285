"""--device and --dtype: checked before any work, with a message that names the device."""

import os
import subprocess
import sys

import pytest
import torch

from common.models import DeviceError, load_model, resolve_device, resolve_dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks a machine without CUDA")
@pytest.mark.parametrize("command", [["eval"], ["receiver", "serve"], ["demo"]])
def test_cuda_without_a_gpu_is_a_clear_error(command):
    result = subprocess.run([sys.executable, "-m", "channel.cli", *command, "--device", "cuda:1"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2
    assert "device 'cuda:1' asked for, but this machine has no CUDA device" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu and resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)
    with pytest.raises(DeviceError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")


def test_the_weights_identity_does_not_depend_on_the_compute_dtype():
    full = load_model("tiny-llama", "cpu", "float32").fingerprint
    half = load_model("tiny-llama", "cpu", "bfloat16").fingerprint
    assert full.weights_sha256 == half.weights_sha256
    assert (full.dtype, half.dtype) == ("float32", "bfloat16")
