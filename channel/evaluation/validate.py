"""Check the link model against reality: re-run sweep points through real gRPC and the shaping relay."""

from __future__ import annotations

from common import wire
from common.link import link_from_options
from channel.evaluation.squad import Sample
from common.models import load_model
from channel.relay import BackgroundRelay
from sender.client import Client
from channel.nodes import local_receiver
from sender.prefill import prefill_prompt, select_tokens


def validate(model: str, samples: dict[str, Sample], points: list[dict]) -> list[dict]:
    """For each point (constant-rate links only): measured transfer time through the relay vs the model's."""
    loaded = load_model(model)
    results = []
    with local_receiver(model) as receiver:
        for point in points:
            sample = samples[point["sample_id"]]
            pre = prefill_prompt(loaded, sample.context, sample.question, True, [point["profile"]])
            frames = list(wire.encode(select_tokens(loaded, pre, point["profile"]), point["profile"], loaded.fingerprint))
            make_link = lambda: link_from_options(point["rate"], "constant", "0")  # noqa: E731
            with BackgroundRelay(receiver, make_link) as relay, Client(relay.target) as client:
                sent = client.send_frames(frames)
            modeled = point["link_s"]  # the receiver assembles while the stream arrives
            results.append({"sample_id": point["sample_id"], "profile": point["profile"], "rate": point["rate"],
                            "bytes": sent.bytes_sent, "modeled_s": modeled, "measured_s": sent.seconds,
                            "ratio": sent.seconds / modeled})
    return results
