"""The base of every profile stage: a frozen dataclass whose fields carry their own grammar.

A field's metadata (`option(...)`) says what it means (`doc`), its bounds or choices, and how the
compact text form writes it:
- `letter="g"`: a letter and a value, `g32`;
- `words={"sym": True, "asym": False}`: a bare word that sets the field;
- `assign="k"`: `k=channel`;
- `positional=True`: the next option in order (a selection's KEEP, a tier's FRACTION);
- `in_name=True`: part of the stage's name (`int4`'s 4);
- `flag="w"`: a bare letter that sets a boolean.
From that one description come the compact parser and printer, the JSON long form, the docs'
stage table, the error messages and the fuzzer's draws. Checks that span several fields or
stages live in the stage's `check()` (its own fields) and `conflict()` (the rest of the profile).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar


class ProfileError(ValueError):
    """A profile spec that cannot be parsed, or that contradicts itself."""


@dataclass(frozen=True)
class Option:
    doc: str
    kind: type = float  # int, float, str or bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound `low` itself is refused
    choices: tuple[str, ...] = ()
    letter: str | None = None
    words: dict | None = None
    assign: str | None = None
    flag: str | None = None
    positional: bool = False
    in_name: bool = False
    pattern: str | None = None  # a str field's form, as a regular expression
    range_message: str | None = None  # the message for a value out of bounds ({value} is replaced)
    spelled: str | None = None  # how the compact form writes it, where the stage parses it itself


    @property
    def compact(self) -> str:
        """How the compact form writes it, for the docs."""
        if self.spelled:
            return self.spelled
        if self.letter:
            return f"{self.letter}{'HASH' if self.kind is str else 'N' if self.kind is int else 'X'}"
        if self.words:
            return "|".join(self.words)
        if self.assign:
            return f"{self.assign}={'|'.join(self.choices)}"
        if self.flag:
            return self.flag
        return "(positional)" if self.positional else "(in the name)"

    @property
    def bounds(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        if self.low is None:
            return ""
        high = "" if self.high is None else _number_text(self.high)
        return f"{'(' if self.low_open else '['}{_number_text(self.low)}, {high}]"


def option(doc: str, default: Any = dataclasses.MISSING, **grammar) -> Any:
    """A stage field with its documentation and grammar (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"option": Option(doc, **grammar)})


def exact(number: float) -> str:
    """Short text that parses back to exactly `number`."""
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


def _number_text(number: float) -> str:
    return f"{number:d}" if isinstance(number, int) else f"{number:g}"


def options_of(cls) -> list[tuple[str, Option, Any]]:
    """(field name, Option, default) of a stage class, in declaration order (the compact order)."""
    found = []
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            default = f.default if f.default is not dataclasses.MISSING else None
            found.append((f.name, f.metadata["option"], default))
    return found


@dataclass(frozen=True)
class Stage:
    """One stage of a profile. Subclasses are frozen dataclasses registered in common.profile.registry."""

    name: ClassVar[str]  # the long form's name
    summary: ClassVar[str]  # one line for the docs
    order: ClassVar[int]  # position in the canonical text
    layered: ClassVar[bool] = False  # takes @A-B (then it has a `layers` field)
    layer_order: ClassVar[int] = 0  # among the per-layer stages, which come first
    repeatable: ClassVar[bool] = False  # may appear more than once without @A-B (tiers)
    exclusive: ClassVar[str | None] = None  # stages sharing this slot may appear once (the precisions)
    examples: ClassVar[tuple[str, ...]] = ()
    no_layers_message: ClassVar[str | None] = None  # the message for an @A-B on a stage that takes none

    # --- the compact text form ---------------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The compact names this stage answers to, for the "known stages" message."""
        return (cls.name,)

    @classmethod
    def matches(cls, name: str) -> bool:
        return name in cls.names()

    @classmethod
    def parse(cls, name: str, options: list[str]) -> Stage:
        """The stage `name:option:...` (its @A-B removed); ProfileError naming what is wrong."""
        return cls.from_values(cls.parse_options(name, options))

    @classmethod
    def parse_options(cls, name: str, options: list[str]) -> dict[str, Any]:
        """The compact options -> {field: text or value}, each at most once."""
        fields = [(n, o) for n, o, _ in options_of(cls) if not (o.in_name or o.spelled) and n != "layers"]
        if options and not fields:
            raise ProfileError(f"{name} takes no options")
        found: dict[str, Any] = {}
        positional = [n for n, o in fields if o.positional]
        for text in options:
            if positional and not found.keys() & {positional[0]}:
                found[positional.pop(0)] = text
                continue
            field_name, value = cls._match_option(name, text, fields)
            if field_name in found:
                o = dict(fields)[field_name]
                raise ProfileError(f"repeated option {text!r}: give {' or '.join(o.words)} once" if o.words else
                                   f"repeated option {text!r}: give the {o.doc.split(':')[0]} {o.compact} once"
                                   if o.letter else f"repeated option {text!r}")
            found[field_name] = value
        return found

    @classmethod
    def _match_option(cls, name: str, text: str, fields: list[tuple[str, Option]]) -> tuple[str, Any]:
        for field_name, o in sorted(fields, key=lambda f: -len(f[1].letter or "")):
            if o.words and text in o.words:
                return field_name, o.words[text]
            if o.flag and text == o.flag:
                return field_name, True
            if o.assign and text.startswith(o.assign + "=") and text[len(o.assign) + 1:] in o.choices:
                return field_name, text[len(o.assign) + 1:]
            if o.letter and text.startswith(o.letter) and re.fullmatch(r"[0-9a-f.]+", text[len(o.letter):]):
                return field_name, text[len(o.letter):]
        raise ProfileError(f"unknown option {text!r} for {name}; options: "
                           + ", ".join(o.compact for _, o in fields if not o.positional))

    def __str__(self) -> str:
        return self.compact()

    def compact(self) -> str:
        """The canonical text of the stage (its @A-B included)."""
        parts = [self.compact_name()]
        for field_name, o, default in options_of(type(self)):
            value = getattr(self, field_name)
            if o.in_name or field_name == "layers" or (value == default and not o.positional):
                continue
            if o.words:
                parts.append(next(word for word, v in o.words.items() if v == value))
            elif o.flag:
                parts.append(o.flag)
            elif o.assign:
                parts.append(f"{o.assign}={value}")
            elif o.letter:
                parts.append(f"{o.letter}{exact(value) if o.kind is float else value}")
            else:
                parts.append(exact(value) if o.kind is float else str(value))
        return ":".join(parts) + self.layer_suffix()

    def compact_name(self) -> str:
        return self.name

    def layer_suffix(self) -> str:
        layers = getattr(self, "layers", None)
        if layers is None:
            return ""
        first, last = layers
        return f"@{first}" if first == last else f"@{first}-{last}"

    # --- values, from text or JSON -----------------------------------------------------------------

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Stage:
        """The stage with `values` (text from the compact form, or JSON values), each coerced and checked."""
        known = {n: o for n, o, _ in options_of(cls)}
        unknown = sorted(values.keys() - known.keys())
        if unknown:
            raise ProfileError(f"{cls.name} has no field {unknown[0]!r}; fields: {', '.join(known) or 'none'}")
        coerced = {n: _coerce(n, known[n], v) for n, v in values.items()}
        missing = [n for n, o, d in options_of(cls) if d is None and n not in coerced and _required(cls, n)]
        if missing:
            raise ProfileError(f"give {cls.name}'s {known[missing[0]].doc.split(':')[0]} ({missing[0]}), "
                               f"e.g. {cls.examples[0] if cls.examples else cls.name}")
        return cls(**coerced)

    def __post_init__(self):
        layers = getattr(self, "layers", None)
        if layers is not None and layers[1] < layers[0]:
            raise ProfileError(f"layer range {layers[0]}-{layers[1]} is empty")
        for field_name, o, _ in options_of(type(self)):
            _check_bounds(field_name, o, getattr(self, field_name))
        self.check()

    def check(self) -> None:
        """Checks across this stage's own fields; ProfileError naming them."""

    def conflict(self, profile) -> str | None:
        """Why this stage cannot go with the rest of `profile` (None: it can)."""
        return None

    def long_form(self) -> dict[str, Any]:
        """{"stage": name, field: value, ...}: the fields that differ from their defaults."""
        out: dict[str, Any] = {"stage": self.name}
        for field_name, _, default in options_of(type(self)):
            value = getattr(self, field_name)
            if value != default or default is None and value is not None:
                out[field_name] = list(value) if isinstance(value, tuple) else value
        return out


def _required(cls, field_name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == field_name)
    return f.default is dataclasses.MISSING


def _coerce(field_name: str, o: Option, value: Any) -> Any:
    """A text (compact form) or JSON value -> the field's type; ProfileError naming the field."""
    if field_name == "layers":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ProfileError(f"layers takes [FIRST, LAST], two layer numbers, got {value!r}")
        return tuple(value)
    what = o.doc.split(":")[0]
    if o.kind is object:
        return value
    if o.kind is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{field_name} ({what}) takes true or false, got {value!r}")
        return value
    if o.kind is str:
        if not isinstance(value, str):
            raise ProfileError(f"{field_name} ({what}) takes text, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            return int(value) if o.kind is int else float(value)
        except ValueError:
            raise ProfileError(f"{what} ({field_name}) {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (o.kind is int and not isinstance(value, int)):
        raise ProfileError(f"{field_name} ({what}) takes {'an integer' if o.kind is int else 'a number'}, got {value!r}")
    return o.kind(value)


def _check_bounds(field_name: str, o: Option, value: Any) -> None:
    if value is None or field_name == "layers":
        return
    what = o.doc.split(":")[0]
    if o.choices and value not in o.choices:
        raise ProfileError(f"{field_name} ({what}) is one of {', '.join(o.choices)}, got {value!r}")
    if o.pattern and not re.fullmatch(o.pattern, value):
        raise ProfileError(o.range_message.format(value=value) if o.range_message else
                           f"{field_name} ({what}) {value!r} is malformed")
    if o.low is None or o.kind in (str, bool):
        return
    high = math.inf if o.high is None else o.high
    if not (o.low < value if o.low_open else o.low <= value) or not value <= high:
        raise ProfileError(o.range_message.format(value=value) if o.range_message else
                           f"{what} must lie in {o.bounds}, got {value}")
