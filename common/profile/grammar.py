"""The two written forms of a profile, both read through the stage registry.

Compact text: stages joined by `+`, each a name with `:`-separated options and, for per-layer
stages, `@A-B` (`q2c:0.5+int4:g32`, `pca:b1.7:w:e:j:i1:f3+text`). Long form (JSON):
{"stages": [{"stage": "pca", "bits": 1.7, "mode": "joint", ...}, ...]}, or a bare list of stages.
Both give the same `Profile`, and the same messages for the same mistakes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from common.profile.profile import MAX_PROFILE_CHARS, Profile
from common.profile.registry import stage_class, stage_for
from common.profile.stage import ProfileError, Stage
from common.profile.stages.precision import Precision

_STAGE = re.compile(r"^(?P<name>[a-z0-9-]+)(?P<options>(:[^:@]+)*)(@(?P<first>\d+)(-(?P<last>\d+))?)?$")


def parse_profile(spec: str | Profile | dict | list) -> Profile:
    """A profile from its compact text, its long form (a dict or list, or JSON text of one), or a Profile."""
    if isinstance(spec, Profile):
        return spec
    if isinstance(spec, (dict, list)):
        return profile_from_json(spec)
    if not isinstance(spec, str):
        raise ProfileError(f"a profile is text or its long form (an object), got {type(spec).__name__}")
    text = spec.strip()
    if len(text) > MAX_PROFILE_CHARS:
        raise ProfileError(f"profile of {len(text)} characters; at most {MAX_PROFILE_CHARS}")
    if text.startswith(("{", "[")):
        try:
            return profile_from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile long form is not JSON: {exc}") from None
        except RecursionError:
            raise ProfileError("profile long form is nested too deeply") from None
    text = text.lower()
    if not text:
        raise ProfileError("empty profile; try raw, int8 or int4:g32")
    stages = []
    for stage_text in text.split("+"):
        match = _STAGE.match(stage_text)
        if not match:
            raise ProfileError(f"cannot parse stage {stage_text!r} of profile {spec!r}")
        name = match["name"]
        options = match["options"].split(":")[1:] if match["options"] else []
        try:
            cls = stage_for(name)
            layers = _layers(cls, match)
            stage = cls.parse(name, options)
            if layers is not None:
                stage = type(stage).from_values({**_values(stage), "layers": layers})
        except ProfileError as exc:
            raise ProfileError(f"{stage_text!r}: {exc}") from None
        stages.append(stage)
    return Profile.of(stages, spec)


def _layers(cls: type[Stage], match: re.Match) -> tuple[int, int] | None:
    if match["first"] is None:
        return None
    if not cls.layered:
        raise ProfileError(cls.no_layers_message or f"{cls.name} takes no layer range")
    first = int(match["first"])
    last = int(match["last"]) if match["last"] is not None else first
    return first, last


def _values(stage: Stage) -> dict[str, Any]:
    from dataclasses import MISSING, fields

    return {f.name: getattr(stage, f.name) for f in fields(stage)
            if f.name != "layers" and (f.default is MISSING or getattr(stage, f.name) != f.default)}


def parse_precision(name: str, options: list[str]) -> Precision:
    """A precision stage in compact text (a tier's)."""
    cls = stage_for(name)
    if not issubclass(cls, Precision):
        raise ProfileError(f"a tier's precision is a precision stage, not {name!r}")
    return cls.parse(name, options)


def precision_from_json(value: str | dict) -> Precision:
    if isinstance(value, str):
        name, *options = value.lower().split(":")
        return parse_precision(name, options)
    if isinstance(value, dict) and not issubclass(stage_class(value.get("stage")), Precision):
        raise ProfileError(f"precision takes a precision stage, not {value.get('stage')!r}")  # (before any nesting)
    return stage_from_json(value)


def stage_from_json(value: dict) -> Stage:
    if not isinstance(value, dict) or "stage" not in value:
        raise ProfileError(f"a stage of the long form is an object with a \"stage\" name, got {value!r}")
    cls = stage_class(value["stage"])
    return cls.from_values({k: v for k, v in value.items() if k != "stage"})


def profile_from_json(document: dict | list) -> Profile:
    """The long form: {"stages": [{"stage": NAME, FIELD: VALUE, ...}, ...]} (or the bare list)."""
    if isinstance(document, dict):
        unknown = sorted(document.keys() - {"stages"})
        if unknown:
            raise ProfileError(f"profile long form has no field {unknown[0]!r}; it is {{\"stages\": [...]}}")
        document = document.get("stages")
    if not isinstance(document, list):
        raise ProfileError("profile long form: \"stages\" is a list of stages ([] for raw)")
    stages = []
    for index, value in enumerate(document):
        try:
            stages.append(stage_from_json(value))
        except ProfileError as exc:
            name = value.get("stage") if isinstance(value, dict) else None
            raise ProfileError(f"stage {index + 1}{f' ({name})' if name else ''}: {exc}") from None
    return Profile.of(stages, "long form")
