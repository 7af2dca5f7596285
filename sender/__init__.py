"""The sender node; `connect` is its Python entry point.

    from sender import connect

    with connect("localhost:50051", model="smollm2-135m") as session:
        print(session.ask(context, question, profile="balanced").answer)

`profile` is a preset name (lossless, int8, balanced, compact, auto), compact text (`int4:g32`),
the long form ({"stages": [{"stage": "int", "bits": 4}]}) or a `common.profile.Profile`; the
default is `balanced`, as on the CLI and the HTTP API. The model loads (once per process) on the
device and in the dtype of the settings (KVWIRE_DEVICE, KVWIRE_DTYPE) unless given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.profile.presets import DEFAULT_PROFILE

if TYPE_CHECKING:
    from common.models import LoadedModel
    from sender.pipeline import AskResult


class Session:
    """A connection to one receiver with one loaded model; `ask` as often as you like, then `close`."""

    def __init__(self, target: str | None = None, model: str | LoadedModel | None = None, *,
                 device: str | None = None, dtype: str | None = None, zstd_level: int = 3, attempts: int | None = None,
                 timeout_s: float = 120.0):
        from common.models import load_model
        from common.settings import get_settings
        from sender.client import Client
        from sender.pipeline import Sender

        settings = get_settings()
        loaded = model if model is not None and not isinstance(model, str) else load_model(model or settings.model,
                                                                                            device, dtype)
        self.client = Client.from_settings(settings, target, timeout_s)
        self.sender = Sender(loaded, self.client, zstd_level, attempts)

    def ask(self, context: str, question: str, profile=DEFAULT_PROFILE, *, query_aware: bool = True,
            max_new_tokens: int = 64, bandwidth_bps: float | None = None, deadline_s: float | None = None) -> AskResult:
        """Send `context`'s cache under `profile` and return the receiver's answer (`.answer`, `.token_ids`,
        `.profile`: the canonical profile that travelled, `.bytes_sent`, timings). ProfileError for a bad
        profile (before anything is sent); grpc.RpcError for a refusal."""
        return self.sender.ask(context, question, profile, query_aware, max_new_tokens, bandwidth_bps, deadline_s)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(target: str | None = None, model: str | LoadedModel | None = None, **options) -> Session:
    """A `Session` with the receiver at `target` (host:port; default KVWIRE_RECEIVER_TARGET) for `model`
    (a name, default KVWIRE_MODEL, or a loaded model); options: device, dtype, zstd_level, attempts, timeout_s."""
    return Session(target, model, **options)


__all__ = ["DEFAULT_PROFILE", "Session", "connect"]
