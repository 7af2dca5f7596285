"""Check the link model against reality: re-run sweep points through real gRPC and the shaping relay."""

from __future__ import annotations

from channel.evaluation.squad import Sample
from channel.nodes import local_receiver
from channel.relay import BackgroundRelay
from common.link import link_from_options
from common.models import load_model
from common.profile import parse_profile
from sender.client import Client
from sender.pipeline import Sender


def validate(model: str, samples: dict[str, Sample], points: list[dict]) -> list[dict]:
    """For each point (constant-rate links only): measured transfer time through the relay vs the model's."""
    loaded = load_model(model)
    results = []
    with local_receiver(model) as receiver:
        for point in points:
            sample = samples[point["sample_id"]]
            profile = parse_profile(point["profile"])  # a point read back from the sweep's JSONL
            make_link = lambda: link_from_options(point["rate"], "constant", "0")  # noqa: E731
            with BackgroundRelay(receiver, make_link) as relay, Client(relay.target) as client:
                asked = Sender(loaded, client).ask(sample.context, sample.question, profile, max_new_tokens=1)
            modeled = point["link_s"]  # the receiver assembles while the stream arrives
            results.append({"sample_id": point["sample_id"], "profile": point["profile"], "rate": point["rate"],
                            "bytes": asked.bytes_sent, "modeled_s": modeled, "measured_s": asked.transfer_s,
                            "ratio": asked.transfer_s / modeled})
    return results
