"""Named presets: profiles by intent, resolved at the sender into a concrete profile for the model in use.

The wire never carries a preset's name, only the canonical concrete profile it resolved to.

- `lossless`: raw, the model's dtype bit for bit.
- `int8`: int8:g32, 8-bit codes per group of 32 (scale and offset in fp16).
- `balanced` (the default): the round-8 compression frontier's pick at a budget of 12.5% of the fp16
  bytes, for models that ship a PCA basis; int4:g32 for the others.
- `compact`: the frontier's pick at 6.25% of the fp16 bytes; int2:g32 for models without a basis.
- `auto`: the receiver's planner picks among its calibrated profiles for the link's bandwidth and the
  deadline (see sender.pipeline.Sender.negotiate).

The picks and their measured fidelity come from results/frontier.json (smollm2-135m),
results/frontier_gemma3.json (gemma3-270m) and results/frontier_qwen.json (qwen2.5-coder-1.5b, picked
with rANS, `:a`, whose indices are the range coder's), held-out SQuAD samples (see docs/results.md and
docs/qwen.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from common.profile.grammar import parse_profile
from common.profile.profile import Profile
from common.profile.stage import ProfileError

AUTO = "auto"
DEFAULT_PROFILE = "balanced"  # the CLI's, the HTTP API's and the Python API's default


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    fallback: str  # the profile for a model without a shipped basis (or any model, where `picks` is empty)
    picks: dict[str, str] = field(default_factory=dict)  # model -> its frontier pick


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("lossless", "the model's dtype, bit for bit (token-identical answers)", "raw"),
    Preset("int8", "8-bit uniform codes per group of 32", "int8:g32"),
    Preset("balanced", "the compression frontier's pick at 12.5% of the fp16 bytes", "int4:g32", {
        "smollm2-135m": "pca:b3.05:w:e:j:i1:f3+text:h:q",
        "gemma3-270m": "pca:b1.7:w:e:j:i1+protect:s4:r0+text:q",
        "qwen2.5-coder-1.5b": "pca:b2.6:w:e:j:i1:f3+text:h:q",
    }),
    Preset("compact", "the compression frontier's pick at 6.25% of the fp16 bytes", "int2:g32", {
        "smollm2-135m": "pca:b1.7:w:e:j:i1:f3+text:h:q",
        "gemma3-270m": "pca:b0.65:w:e:j:i1+protect:s4:r0+text:q",
        "qwen2.5-coder-1.5b": "pca:b1.3:w:e:j:i1:f3+text:h:q",
    }),
)}


def has_shipped_basis(model: str) -> bool:
    """Whether `kvwire calibrate --basis` shipped a PCA basis for `model` (common/data/basis-MODEL.safetensors)."""
    return (resources.files("common") / "data" / f"basis-{model}.safetensors").is_file()


def resolved_spec(name: str, model: str | None) -> str:
    """The concrete spec preset `name` stands for on `model` (None: a model without a basis)."""
    preset = PRESETS[name]
    if model in preset.picks and has_shipped_basis(model):
        return preset.picks[model]
    return preset.fallback


def is_preset(spec: object) -> bool:
    return isinstance(spec, str) and spec.strip().lower() in PRESETS


def resolve(spec: str | dict | list | Profile, model: str | None) -> Profile:
    """A concrete profile from a preset name, compact text, long form or Profile; `auto` is the caller's
    to handle (it is negotiated, not resolved here)."""
    if isinstance(spec, str) and spec.strip().lower() == AUTO:
        raise ProfileError("auto is planned by the receiver at negotiation; resolve it there")
    if is_preset(spec):
        return parse_profile(resolved_spec(spec.strip().lower(), model))
    return parse_profile(spec)


def presets_table(model: str | None) -> list[tuple[str, str, str]]:
    """(name, what it is, what it resolves to on `model`) for every preset, auto included."""
    rows = [(p.name, p.summary + (f"; {p.fallback} for a model without a shipped basis" if p.picks else ""),
             resolved_spec(p.name, model)) for p in PRESETS.values()]
    rows.append((AUTO, "the receiver's planner picks a calibrated profile for the link's bandwidth (measured, or "
                       "given with --bandwidth; 100 Mbit/s assumed, with a warning, when neither) and the deadline",
                 "(chosen at negotiation)"))
    return rows
