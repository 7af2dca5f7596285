"""The docs' stage table and presets table, rendered from the registry (`kvwire profiles` prints them)."""

from __future__ import annotations

from common.profile.presets import presets_table
from common.profile.registry import STAGES
from common.profile.stage import options_of


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def stage_table() -> str:
    """Markdown: one row per stage field (its compact spelling, default, bounds or choices, meaning)."""
    lines = ["| stage | compact | long-form field | default | bounds / choices | meaning |",
             "| --- | --- | --- | --- | --- | --- |"]
    for stage in STAGES:
        names = "/".join(stage.names())
        lines.append(f"| **{stage.name}** | `{_cell(names)}` |  |  |  | {_cell(stage.summary)}; e.g. "
                     + ", ".join(f"`{_cell(e)}`" for e in stage.examples[:3]) + " |")
        for field_name, option, default in options_of(stage):
            default_text = "" if default is None or default == () else str(default)
            if field_name == "layers":
                compact = "@A-B"
            else:
                compact = option.compact
            lines.append(f"|  | `{_cell(compact)}` | `{field_name}` | {_cell(default_text)} | "
                         f"{_cell(option.bounds)} | {_cell(option.doc)} |")
    return "\n".join(lines)


def presets_markdown(model: str | None) -> str:
    lines = [f"| preset | what | resolves to on {model or 'a model without a basis'} |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {_cell(what)} | `{_cell(spec)}` |" for name, what, spec in presets_table(model)]
    return "\n".join(lines)
