"""All configuration in one place: `KVWIRE_*` environment variables or a `.env` file."""

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVWIRE_", env_file=".env", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "kvwire"
    model: str = "smollm2-135m"

    # Receiver limits, checked against each header before anything is allocated.
    max_frame_bytes: int = 8 << 20
    max_transfer_bytes: int = 1 << 30
    max_tokens: int = 32768
    session_ttl_s: float = 600.0
    session_budget_bytes: int = 4 << 30


def get_settings() -> Settings:
    return Settings()
