"""The registry of profile stages: every kind the grammar knows, in the order the docs list them.

A new stage is its own module under common/profile/stages/ (a `Stage` dataclass) plus a line here.
"""

from __future__ import annotations

from common.profile.stage import ProfileError, Stage
from common.profile.stages.pca import PCA
from common.profile.stages.precision import NF4, Cast, Int, Raw
from common.profile.stages.protect import Protect
from common.profile.stages.selection import Selection
from common.profile.stages.svd import SVD
from common.profile.stages.text import Text
from common.profile.stages.tier import Tier
from common.profile.stages.transforms import PreRoPE, Rotation

STAGES: tuple[type[Stage], ...] = (Raw, Cast, Int, NF4, SVD, Selection, PreRoPE, Rotation, PCA, Protect, Tier, Text)
BY_NAME: dict[str, type[Stage]] = {stage.name: stage for stage in STAGES}


def known_names() -> str:
    """Every compact stage name, for the "known stages" message."""
    return ", ".join(name for stage in STAGES for name in stage.names())


def stage_for(name: str) -> type[Stage]:
    """The stage class a compact name selects; ProfileError listing every known one."""
    for stage in STAGES:
        if stage.matches(name):
            return stage
    from common.profile.presets import AUTO, PRESETS

    raise ProfileError(f"unknown stage {name!r}; known: {known_names()} (or, at the sender, a preset: "
                       f"{', '.join([*PRESETS, AUTO])})")


def stage_class(long_name) -> type[Stage]:
    """The stage class a long-form name selects."""
    if long_name not in BY_NAME:
        raise ProfileError(f"unknown stage {long_name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[long_name]
