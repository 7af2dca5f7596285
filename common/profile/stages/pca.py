"""pca:bB[...] — transform coding (KVTC): keys (RoPE removed) and values in the model's PCA basis.

B bits per element on average, allocated over the components (zero bits: dropped). The mode names
how (the compact form's flags in brackets):
- `plain`: each layer on its own, K bits per key element (`kK`, default B; the values get 2B - K);
- `weighted` [w]: over all the layers the stage codes, by the basis's calibrated layer weights;
- `entropy` [w:e]: one weighted step for every component, range-coded under the basis's model,
  B bits per element expected (`common.quant.pca_entropy`); `a` codes them with rANS
  (`common.quant.rans`) instead, on the cache's device;
- `joint` [w:e:j]: as entropy, in the basis's joint transform of each layer's keys and values
  (kvwire calibrate --basis --joint).
With entropy or joint, `iG` steps each token by its share of the question's attention (G how
strongly) and `fF` bounds how coarse a token's step gets (2^(F/2) times the component's). The basis
is the one `kvwire calibrate --basis` shipped, named by its hash `hHASH` (the sender fills it in).
Per-layer bits apply: pca:b0.5+pca:b2@13-24.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.profile.stage import ProfileError, Stage, exact, option
from common.profile.stages.precision import LAYERS_DOC

MAX_BITS = 8.0  # common.quant.pca.MAX_BITS
HASH_CHARS = 16  # common.quant.pca.HASH_CHARS
MAX_CLASS = 8  # common.quant.pca_entropy.MAX_CLASS
MAX_STRENGTH = 4.0  # common.quant.pca_entropy.MAX_STRENGTH
MODES = ("plain", "weighted", "entropy", "joint")
_FLAGS = {"plain": (), "weighted": ("w",), "entropy": ("w", "e"), "joint": ("w", "e", "j")}


@dataclass(frozen=True)
class PCA(Stage):
    bits: float = option("bits per element: on average, over keys and values", kind=float, low=0, high=MAX_BITS,
                         low_open=True, letter="b")
    key_bits: float | None = option("bits per key element: plain mode only; the values get 2 * bits - key_bits",
                                    None, kind=float, low=0, high=MAX_BITS, letter="k")
    mode: str = option("mode: how the bits are allocated and written (plain, weighted [w], entropy [w:e], "
                       "joint [w:e:j])", "plain", kind=str, choices=MODES,
                   spelled="w | w:e | w:e:j")
    importance: float = option("importance strength: how far the question's attention moves each token's step "
                               "(entropy and joint modes)", 0.0, kind=float, low=0, high=MAX_STRENGTH, letter="i")
    rans: bool = option("rANS: the entropy coder of interleaved lanes that runs where the cache is (on a GPU too), "
                        "instead of the range coder on the CPU (entropy and joint modes)", False, kind=bool, flag="a")
    floor: int | None = option("lowest step class: no token's step coarser than 2^(F/2) times the component's "
                               "(with importance; default 8)", None, kind=int, low=0, high=MAX_CLASS, letter="f")
    digest: str | None = option("basis hash: the fitted basis the stage codes in (filled in by the sender)", None,
                                kind=str, letter="h", pattern=f"[0-9a-f]{{{HASH_CHARS}}}",
                                range_message=f"a basis hash is {HASH_CHARS} hex digits")
    layers: tuple[int, int] | None = option(LAYERS_DOC, None)

    name: ClassVar[str] = "pca"
    summary: ClassVar[str] = "transform coding in the model's PCA basis (KVTC), B bits per element on average"
    order: ClassVar[int] = 30
    layered: ClassVar[bool] = True
    layer_order: ClassVar[int] = 0
    examples: ClassVar[tuple[str, ...]] = ("pca:b2", "pca:b2:k1.5", "pca:b2.8:w+text", "pca:b3:w:e:j",
                                           "pca:b1.7:w:e:j:i1:f3+text", "pca:b1.7:w:e:j:a:i1:f3+text", "pca:b0.5+pca:b2@13-24")
    needs_rope: ClassVar[bool] = True

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        flags = [o for o in options if o in ("w", "e", "j")]
        for flag in flags:
            if flags.count(flag) > 1:
                raise ProfileError(f"repeated option {flag!r}")
        if "e" in flags and "w" not in flags:
            raise ProfileError("e (entropy coding) steps every component by the layer weights; add w")
        if "j" in flags and "e" not in flags:
            raise ProfileError("j (keys and values in the joint transform) is a form of e; add e, e.g. pca:b3:w:e:j")
        mode = next(m for m in reversed(MODES) if set(_FLAGS[m]) == set(flags))
        values = super().parse_options(name, [o for o in options if o not in flags])
        if "bits" not in values:
            raise ProfileError("give the bits per element, e.g. pca:b2")
        return cls.from_values({**values, **({"mode": mode} if mode != "plain" else {})})

    def check(self) -> None:
        if self.key_bits is not None:
            if self.mode != "plain":
                raise ProfileError("with w the layer weights share the bits between keys and values; drop k "
                                   "(key_bits takes the plain mode)")
            low, high = max(0.0, 2 * self.bits - MAX_BITS), min(2 * self.bits, MAX_BITS)
            if not low <= self.key_bits <= high:
                raise ProfileError(f"bits per key element must lie in [{low:g}, {high:g}], got {self.key_bits:g}")
        if self.rans and not self.entropy:
            raise ProfileError("a (the rANS coder) codes what e steps; add e, e.g. pca:b2:w:e:a")
        if self.importance and not self.entropy:
            raise ProfileError("i (per-token steps by the question's attention) needs e, e.g. pca:b2:w:e:i1 "
                               "(importance takes the entropy or joint mode)")
        if self.floor is not None and not self.importance:
            raise ProfileError("f (the lowest step class) bounds the per-token steps of i; add i, e.g. pca:b2:w:e:i2:f2 "
                               "(floor takes an importance)")
        if self.digest is not None and self.layers is not None:
            raise ProfileError("the basis hash goes on the profile's pca stage, not on per-layer bits")

    @classmethod
    def from_values(cls, values: dict) -> Stage:
        if "importance" in values:
            if values.get("mode") not in ("entropy", "joint"):
                raise ProfileError("i (per-token steps by the question's attention) needs e, e.g. pca:b2:w:e:i1 "
                                   "(importance takes the entropy or joint mode)")
            try:
                zero = float(values["importance"]) == 0
            except (TypeError, ValueError):
                zero = False
            if zero:
                raise ProfileError("the importance strength must be positive (leave i out for none)")
        return super().from_values(values)

    @property
    def weighted(self) -> bool:
        return self.mode != "plain"

    @property
    def entropy(self) -> bool:
        return self.mode in ("entropy", "joint")

    @property
    def joint(self) -> bool:
        return self.mode == "joint"

    def compact(self) -> str:
        parts = [f"pca:b{exact(self.bits)}"]
        if self.key_bits is not None:
            parts.append(f"k{exact(self.key_bits)}")
        parts += _FLAGS[self.mode]
        if self.rans:
            parts.append("a")
        if self.importance:
            parts.append(f"i{exact(self.importance)}")
        if self.floor is not None:
            parts.append(f"f{self.floor}")
        if self.digest:
            parts.append(f"h{self.digest}")
        return ":".join(parts) + self.layer_suffix()

    def conflict(self, profile) -> str | None:
        if self.layers is None and (profile.precision is not None or profile.rank is not None
                                    or profile.rotation is not None or profile.prerope):
            return ("pca allocates its own bits over RoPE-free, decorrelated components; it takes no other precision, "
                    "svd, rot or prerope stage (per-layer overrides @A-B apply)")
        if self.layers is not None and profile.pca is None:
            return "per-layer pca bits need a pca stage for the other layers, e.g. pca:b0.5+pca:b2@13-24"
        return None
