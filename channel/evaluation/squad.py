"""SQuAD-format datasets: the embedded subset or any file given with --data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]  # empty for an unanswerable question


def embedded_path() -> Path:
    return Path(str(resources.files("common") / "data" / "squad_v2_dev_subset.json"))


def load_squad(path: str | Path | None = None, limit: int | None = None, answerable_only: bool = True,
               skip: int = 0) -> list[Sample]:
    """The file's questions in order (answerable ones only, by default), the first `skip` left out."""
    path = Path(path) if path else embedded_path()
    try:
        articles = json.loads(path.read_text())["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable SQuAD-format JSON file: {exc}") from None
    samples = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa.get("answers", []))
                if answerable_only and not answers:
                    continue
                if skip:
                    skip -= 1
                    continue
                samples.append(Sample(qa["id"], paragraph["context"], qa["question"], answers))
                if limit is not None and len(samples) >= limit:
                    return samples
    return samples
