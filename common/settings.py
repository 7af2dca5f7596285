"""All configuration in one place: `KVWIRE_*` environment variables, a `.env` file, or KVWIRE_CONFIG_FILE (JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KERNEL_PATHS = ("auto", "torch", "triton")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVWIRE_", env_file=".env", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "kvwire"
    model: str = "smollm2-135m"
    # Where the model, prefill, selection and codecs run (auto: cuda when there is one), and in
    # which dtype it computes (auto: bfloat16 on CUDA, float32 on the CPU).
    device: str = "auto"
    dtype: str = "auto"
    # The codec path for the group-wise quantizers: auto (Triton kernels for CUDA tensors when triton
    # imports), torch, or triton (see common/quant/kernels.py).
    kernels: str = "auto"
    # pca:...:a on a GPU: the folded GEMMs on bf16 tensor cores, each operand split in bf16 parts, in fused passes
    # (see common/quant/pca_fused.py); false: torch's float32 GEMM on the SIMT units (docs/gpu.md).
    split_gemm: bool = True
    # A folder of PCA bases fitted on this machine (basis-MODEL.safetensors), read before the shipped
    # ones: `kvwire bench gpu --recompute` fits the random model's here, for its sender and receiver.
    basis_dir: Path | None = None

    # Receiver limits, checked against each header before anything is allocated.
    max_frame_bytes: int = 8 << 20
    max_transfer_bytes: int = 1 << 30
    max_tokens: int = 32768
    # The most tokens one Generate call decodes: it holds the model lock, so it bounds everyone's wait.
    max_new_tokens: int = 512
    session_ttl_s: float = 600.0
    session_budget_bytes: int = 4 << 30
    # A transfer stream that sends no frame for this long is dropped and its reservation freed.
    stream_idle_s: float = 30.0
    # Bytes of frames coded ahead of the link (sender) and read ahead of their decoding (receiver), so that
    # coding, the link and decoding overlap; a larger frame goes alone.
    read_ahead_bytes: int = Field(64 << 20, ge=1)

    # Security: a shared bearer token on every RPC and API call, and TLS when a certificate is set.
    token: str | None = None
    tls_cert: Path | None = None  # server certificate (PEM), for gRPC and HTTP
    tls_key: Path | None = None
    tls_ca: Path | None = None  # what clients trust (PEM); defaults to tls_cert

    # The channel relay's link when `kvwire channel` is given no --rate / --delay.
    channel_rate: str = "100mbit"
    channel_delay: str = "0ms"

    # Where the sender's HTTP API sends caches, and where the dashboard finds the latest sweep.
    receiver_target: str = "127.0.0.1:50051"
    # How many times a sender makes a call the receiver could not take (away, busy, damaged bytes),
    # with exponential backoff from 0.2 s to 5 s: 6 ride out about 6 s, 16 about 56 s (a restart).
    send_attempts: int = Field(6, ge=1, le=100)
    sweep_dir: Path = Path("kvwire-sweep")  # `kvwire sweep`'s default --report-dir

    @field_validator("kernels")
    @classmethod
    def _kernel_path(cls, value: str) -> str:
        value = value.strip().lower() or "auto"
        if value not in KERNEL_PATHS:
            raise ValueError(f"KVWIRE_KERNELS={value!r}; expected one of {', '.join(KERNEL_PATHS)}")
        return value


def get_settings(**overrides) -> Settings:
    """Settings from the environment; KVWIRE_CONFIG_FILE may name a JSON file of the same fields."""
    config_file = os.environ.get("KVWIRE_CONFIG_FILE")
    values = json.loads(Path(config_file).read_text()) if config_file else {}
    return Settings(**{**values, **overrides})
