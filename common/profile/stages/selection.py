"""METHOD:KEEP[:GRANULARITY][:BUDGET][:OPTIONS] — token selection, applied by the sender before the codec.

METHOD is a selector of common.select.METHODS; KEEP a fraction of the context (0.5) or a count
(256t); GRANULARITY global, layer or head (default: the method's); BUDGET uniform, pyramid or
adaptive; OPTIONS the selector's own `grammar_options` (snapkv wN kN max|avg; h2o rF; sink sN;
random seedN; capkv and capkv-q sN tauF; capkv-leverage ridgeF). The selectors import torch, so
the method's options are read from them only when a selection stage is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from common.profile.stage import ProfileError, Stage, option

# The names of common.select.METHODS (a test keeps the two equal), readable without torch.
METHOD_NAMES = ("q2c", "q2c-last", "snapkv", "h2o", "sink", "window", "random", "knorm", "capkv", "capkv-q",
                "capkv-leverage")
GRANULARITIES = ("global", "layer", "head")  # common.select.base.GRANULARITIES
BUDGETS = ("uniform", "pyramid", "adaptive")  # common.select.budgets.BUDGETS


def method_options(method: str) -> dict[str, tuple[str, type]]:
    """The selector's grammar options: name -> (its field, its type; str for a bare word)."""
    from common.select import METHODS

    return METHODS[method].grammar_options


@dataclass(frozen=True)
class Selection(Stage):
    method: str = option("method: the selector (common.select)", kind=str, choices=METHOD_NAMES, in_name=True)
    keep: Any = option("keep: a fraction of the context in (0, 1] (0.5), or a count of tokens (256t; long form: "
                       "keep_tokens)", kind=object, positional=True)
    granularity: str = option("granularity: the same tokens for every layer (global), per layer, or per KV head; "
                              "default: the method's", "", kind=str, words={g: g for g in GRANULARITIES})
    budget: str = option("budget: how the kept tokens are shared among layers (adaptive: by the measured layer "
                         "sensitivities)", "uniform", kind=str, words={b: b for b in BUDGETS})
    options: tuple = option("options: the method's own, e.g. snapkv w16 (window), k5 (kernel), max|avg; h2o r0.1; "
                            "sink s4; random seed1; capkv s4 tau0.5; capkv-leverage ridge0.01", (), kind=object,
                            spelled="(the method's)")

    name: ClassVar[str] = "selection"
    summary: ClassVar[str] = "token selection (METHOD:KEEP...), applied by the sender before the codec"
    order: ClassVar[int] = 0
    examples: ClassVar[tuple[str, ...]] = ("q2c:0.5+int4:g32", "snapkv:256t:w16", "h2o:0.25:layer:pyramid")
    no_layers_message: ClassVar[str] = "selection takes no layer range; use a pyramid or adaptive budget"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return METHOD_NAMES

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        if not options:
            raise ProfileError(f"give what to keep, e.g. {name}:0.5 or {name}:256t")
        keep_text, *rest = options
        try:
            keep = int(keep_text[:-1]) if keep_text.endswith("t") else float(keep_text)
        except ValueError:
            raise ProfileError(f"keep {keep_text!r} is neither a fraction nor a count like 256t") from None
        granularity, budget, own = "", "uniform", []
        known = method_options(name)
        for text in rest:
            if text in GRANULARITIES:
                if granularity:
                    raise ProfileError("two granularities")
                granularity = text
            elif text in BUDGETS:
                budget = text
            else:
                match = re.fullmatch(r"([a-z]+)(\d+(\.\d+)?)?", text)
                if (not match or match.group(1) not in known
                        or (known[match.group(1)][1] is str) != (match.group(2) is None)):
                    raise ProfileError(f"unknown option {text!r} for {name}; "
                                       f"known: {', '.join(GRANULARITIES + BUDGETS + tuple(known))}")
                own.append((match.group(1), match.group(2) or ""))
        return cls(name, keep, granularity, budget, tuple(own))

    @classmethod
    def from_values(cls, values: dict) -> Stage:
        values = dict(values)
        if "keep_tokens" in values:
            if "keep" in values:
                raise ProfileError("give keep (a fraction) or keep_tokens (a count), not both")
            count = values.pop("keep_tokens")
            if isinstance(count, bool) or not isinstance(count, int):
                raise ProfileError(f"keep_tokens (a count of tokens) takes an integer, got {count!r}")
            values["keep"] = count
        elif isinstance(values.get("keep"), (int, float)) and not isinstance(values["keep"], bool):
            values["keep"] = float(values["keep"])
        elif "keep" in values:
            raise ProfileError(f"keep (a fraction of the context) takes a number, got {values['keep']!r}")
        method = values.get("method")
        if method not in METHOD_NAMES:
            raise ProfileError(f"method (the selector) is one of {', '.join(METHOD_NAMES)}, got {method!r}")
        own = values.get("options", {})
        if not isinstance(own, dict):
            raise ProfileError(f"options (the method's own) takes an object like {{\"w\": 16}}, got {own!r}")
        known = method_options(method)
        pairs = []
        for key, value in own.items():
            if key not in known:
                raise ProfileError(f"options: unknown option {key!r} for {method}; known: {', '.join(known) or 'none'}")
            if known[key][1] is str:
                if value is not True:
                    raise ProfileError(f"options.{key} is a word: give true")
                pairs.append((key, ""))
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"options.{key} takes a number, got {value!r}")
            else:
                pairs.append((key, str(value)))
        values["options"] = tuple(pairs)
        return super().from_values(values)

    def check(self) -> None:
        if ((isinstance(self.keep, int) and self.keep < 1)
                or (isinstance(self.keep, float) and not 0 < self.keep <= 1)):
            raise ProfileError("keep must be a fraction in (0, 1] or a positive count")
        if self.budget != "uniform" and self.resolved_granularity == "global":
            raise ProfileError(f"a {self.budget} budget needs layer or head granularity, not global")
        try:
            self.selector()
        except ValueError as exc:
            raise ProfileError(str(exc)) from None

    def as_selection(self):
        """The common.select.Selection this stage names (imports torch)."""
        from common.select import Selection as Selecting

        return Selecting(self.method, self.keep, self.granularity, self.budget, self.options)

    def selector(self):
        return self.as_selection().selector()

    @property
    def resolved_granularity(self) -> str:
        return self.as_selection().resolved_granularity

    def needs(self, seq_len: int, context_len: int) -> dict[str, range]:
        return self.as_selection().needs(seq_len, context_len)

    def kept_count(self, context_len: int) -> int:
        return self.as_selection().kept_count(context_len)

    def compact(self) -> str:
        return str(self.as_selection())

    def long_form(self) -> dict:
        out = {"stage": self.name, "method": self.method}
        out["keep_tokens" if isinstance(self.keep, int) else "keep"] = self.keep
        if self.granularity:
            out["granularity"] = self.granularity
        if self.budget != "uniform":
            out["budget"] = self.budget
        known = method_options(self.method)
        if self.options:
            out["options"] = {k: True if known[k][1] is str else known[k][1](v) for k, v in self.options}
        return out
