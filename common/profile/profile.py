"""`Profile`: a profile's syntax, its stages in canonical order. It codes nothing itself: a transfer's
codec plan (common.plan) is built from it and the model's codec context."""

from __future__ import annotations

from dataclasses import dataclass, replace

from common.profile.stage import ProfileError, Stage
from common.profile.stages.pca import PCA
from common.profile.stages.precision import Precision
from common.profile.stages.protect import Protect
from common.profile.stages.selection import Selection
from common.profile.stages.svd import SVD
from common.profile.stages.text import Text
from common.profile.stages.tier import Tier
from common.profile.stages.transforms import PreRoPE, Rotation

# A header's profile is untrusted text. Long enough for a per-layer override on each of 80
# layers, and short enough that no number in it reaches Python's int() digit limit (4300).
MAX_PROFILE_CHARS = 2048


def _canonical_key(indexed: tuple[int, Stage]):
    index, stage = indexed
    layers = getattr(stage, "layers", None)
    if layers is None:
        return (0, stage.order, index if stage.repeatable else 0)
    return (1, stage.layer_order, layers[0])


@dataclass(frozen=True)
class Profile:
    stages: tuple[Stage, ...] = ()  # in canonical order; raw (the default) is no stage at all

    @classmethod
    def of(cls, stages: list[Stage], spec: object = "") -> Profile:
        """The profile of `stages` as given (any order), checked against each other; ProfileError
        naming `spec` (the text or "long form") and the contradiction."""
        main: dict[object, Stage] = {}
        taken: list[tuple[int, int]] = []
        for stage in stages:
            layers = getattr(stage, "layers", None)
            if layers is not None:
                if any(a <= layers[1] and layers[0] <= b for a, b in taken):
                    raise ProfileError(f"{stage.compact()!r}: overlaps another per-layer override")
                taken.append(layers)
                continue
            if stage.repeatable:
                continue
            slot = stage.exclusive or type(stage)
            if slot in main:
                other = main[slot]
                if isinstance(stage, Precision):
                    raise ProfileError(f"{spec!r}: two precision stages, {other.compact()} and {stage.compact()}; "
                                       "use @A-B for per-layer ones")
                raise ProfileError(f"{spec!r}: " + getattr(stage, "once_message", f"two {stage.name} stages"))
            main[slot] = stage
        ordered = tuple(stage for _, stage in sorted(enumerate(stages), key=_canonical_key))
        profile = cls(ordered)
        for stage in sorted(ordered, key=lambda s: (s.order, s.layer_order)):
            reason = stage.conflict(profile)
            if reason:
                raise ProfileError(f"{spec!r}: {reason}")
        if profile.precision is not None and profile.precision.is_raw and profile.rank is None:
            profile = cls(tuple(s for s in ordered if s is not profile.precision))  # raw is the default
        return profile

    def __str__(self) -> str:
        main = [s for s in self.stages if getattr(s, "layers", None) is None]
        layered = [s for s in self.stages if getattr(s, "layers", None) is not None]
        coded = [s for s in main if isinstance(s, (Selection, SVD, Precision, PCA))]
        rest = [s for s in main if s not in coded]
        return "+".join([s.compact() for s in coded] + ([] if coded else ["raw"])
                        + [s.compact() for s in rest + layered])

    def long_form(self) -> dict:
        """{"stages": [...]}: the JSON long form, which parse_profile reads back to this profile."""
        return {"stages": [stage.long_form() for stage in self.stages]}

    # --- the stages, by kind ------------------------------------------------------------------------

    def _main(self, kind: type) -> Stage | None:
        return next((s for s in self.stages if isinstance(s, kind) and getattr(s, "layers", None) is None), None)

    @property
    def precision(self) -> Precision | None:
        """The precision of every layer no override names (None: raw, or fp16 factors under svd)."""
        return self._main(Precision)

    @property
    def overrides(self) -> tuple[tuple[int, int, Precision], ...]:
        return tuple((*s.layers, s) for s in self.stages if isinstance(s, Precision) and s.layers is not None)

    @property
    def rank(self) -> int | None:
        svd = self._main(SVD)
        return None if svd is None else svd.rank

    @property
    def selection(self) -> Selection | None:
        return self._main(Selection)

    @property
    def prerope(self) -> bool:
        return self._main(PreRoPE) is not None

    @property
    def rotation(self) -> int | None:
        """The rotation's seed (None: no rotation)."""
        rot = self._main(Rotation)
        return None if rot is None else rot.seed

    @property
    def pca(self) -> PCA | None:
        return self._main(PCA)

    @property
    def pca_layers(self) -> tuple[tuple[int, int, PCA], ...]:
        return tuple((*s.layers, s) for s in self.stages if isinstance(s, PCA) and s.layers is not None)

    @property
    def protect(self) -> tuple[int, int] | None:
        """(sink, recent) kept tokens sent at fp16."""
        stage = self._main(Protect)
        return None if stage is None else (stage.sink, stage.recent)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return tuple(s for s in self.stages if isinstance(s, Tier))

    @property
    def importance(self) -> tuple[tuple[float, Precision], ...]:
        """The importance tiers: (fraction of the kept tokens, precision), in order."""
        return tuple((t.fraction, t.precision) for t in self.tiers)

    @property
    def text_head(self) -> bool:
        text = self._main(Text)
        return text is not None and text.head

    @property
    def text_question(self) -> bool:
        text = self._main(Text)
        return text is not None and text.question

    # --- what the syntax implies ---------------------------------------------------------------------

    @property
    def as_cache(self) -> Profile:
        """The profile of the part that travels as cache: this one without its text stage."""
        return Profile(tuple(s for s in self.stages if not isinstance(s, Text)))

    @property
    def lossless(self) -> bool:
        return self == Profile()

    @property
    def needs_context(self) -> bool:
        """Whether the codecs need the model's RoPE or basis (a `CodecContext`)."""
        return any(getattr(s, "needs_rope", False) for s in self.stages)

    @property
    def pca_stages(self) -> list[PCA]:
        """The profile's pca stage, then its per-layer ones."""
        return [s for s in self.stages if isinstance(s, PCA)] if self.pca is not None else []

    @property
    def needs_importance(self) -> bool:
        """Whether a pca stage steps each token by the question's attention (pca:...:e:iG): the sender
        captures that attention in its prefill (query-aware) and hands it to the wire in the KVState."""
        return any(stage.importance for stage in self.pca_stages)

    @property
    def entropy_coded(self) -> bool:
        """Whether a pca stage of the profile range-codes its own payload (pca:...:e)."""
        return any(stage.entropy for stage in self.pca_stages)

    def check_layers(self, num_layers: int) -> None:
        for first, last, _ in self.overrides + self.pca_layers:
            if last >= num_layers:
                raise ProfileError(f"override @{first}-{last} names layers beyond the model's {num_layers}")

    def bind(self, context) -> Profile:
        """The profile naming the basis `context` (a CodecContext) holds, for a pca profile given without its hash."""
        if self.pca is None or self.pca.digest is not None:
            return self
        if context is None or context.basis is None:
            raise ProfileError(f"{self}: no PCA basis for this model; fit one with `kvwire calibrate --basis`")
        bound = replace(self.pca, digest=context.basis.digest)
        return Profile(tuple(bound if s is self.pca else s for s in self.stages))
