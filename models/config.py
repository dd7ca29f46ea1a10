"""One config base for every model (and the training recipe, checked the same way).

A model's config is a dataclass deriving from ``ModelConfig``. Its fields are typed, and the
type says what a value must be: ``int``, ``float``, ``bool``, ``str``, ``tuple[int, ...]``,
``X | None``, ``Literal[...]``, or one of the bounded kinds below (``PositiveInt``, ``OddInt``,
``NonNegative``...). The presets and the training recipe of each preset are data next to the
fields. ``check()`` holds the rules that tie fields together. A config is frozen and checked when it is
made (and by ``replace``, which makes a checked copy), so one that exists is valid; a bad value is a ``ConfigError`` that
names the model, the field and what it must be.

The command line's ``--set MODEL.KEY=VALUE`` goes through ``value_of`` (JSON, else the text
itself), then the same check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal


class ConfigError(ValueError):
    """An invalid model configuration (names the parameter and what to do)."""


@dataclass(frozen=True)
class Range:
    """A bound on a number: ``low <= x`` (``low < x`` when ``open_low``), ``x < high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def holds(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.open_low else x >= self.low)
        return above and (self.high is None or x < self.high)

    def __str__(self) -> str:
        parts = [f"{'>' if self.open_low else '>='} {self.low:g}"] if self.low is not None else []
        return " and ".join(parts + ([f"< {self.high:g}"] if self.high is not None else []))


ODD = "odd"
PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
OddInt = Annotated[int, Range(1), ODD]
Positive = Annotated[float, Range(0, open_low=True)]
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]          # [0, 1)
OpenFraction = Annotated[float, Range(0, 1, open_low=True)]  # (0, 1)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        kind, *marks = args
        return " ".join([_describe(kind)] + [str(m) for m in marks if isinstance(m, Range)]
                        + (["(odd)"] if ODD in marks else []))
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list, each {_describe(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


class _Bad(Exception):
    pass


def _checked(value: Any, hint) -> Any:
    """``value`` as a field of type ``hint`` (lists become tuples, ints floats), or ``_Bad``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        kind, *marks = args
        value = _checked(value, kind)
        for mark in marks:
            if (isinstance(mark, Range) and not mark.holds(value)) or (mark == ODD and value % 2 == 0):
                raise _Bad
        return value
    if origin is Literal:
        if value in args:
            return value
        raise _Bad
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked(value, option)
            except _Bad:
                continue
        raise _Bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad
        item = args[0] if args else Any
        return tuple(_checked(v, item) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Bad
    if hint is str and not isinstance(value, str):
        raise _Bad
    return value


def check_value(option: str, value: Any, hint) -> Any:
    """``value`` as a field of type ``hint``, or a ``ConfigError`` naming ``option``."""
    try:
        return _checked(value, hint)
    except _Bad:
        raise ConfigError(f"{option}={json.dumps(value, default=str)}: expected {_describe(hint)}") from None


def value_of(text: str) -> Any:
    """A command-line value: JSON (``3``, ``true``, ``[1,2]``, ``null``), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class Checked:
    """A dataclass whose fields are checked against their types (and ``check()``) when made."""

    owner: ClassVar[str] = ""
    """Who the values are for (a model's name, "recipe"); prefixes every message."""

    def __post_init__(self) -> None:
        for name, hint in self.field_types().items():
            object.__setattr__(self, name, check_value(f"{self.label()}: {name}", getattr(self, name), hint))
        self.check()

    @classmethod
    def label(cls) -> str:
        return cls.owner or cls.__name__

    def check(self) -> None:
        """Rules that tie fields together; raise ``ConfigError`` via ``self.need``."""

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{self.label()}: {message}")

    @classmethod
    @functools.cache
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls, include_extras=True)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls, base: dict[str, Any] | None = None, **values):
        """``base`` then ``values`` over the field defaults; an unknown field is refused."""
        unknown = sorted((set(base or {}) | set(values)) - set(cls.field_types()))
        if unknown:
            raise ConfigError(f"{cls.label()}: unknown parameter(s) {unknown}; known: {sorted(cls.field_types())}")
        return cls(**{**(base or {}), **values})

    def replace(self, **changes):
        """A copy with ``changes`` (its own fields only), checked."""
        return type(self).build(self.to_dict(), **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig(Checked):
    """The base of every model's config (see the module's docstring)."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Preset name -> field values (every field the preset fixes)."""
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}
    """Preset name -> ``models.training.Recipe`` fields: how that preset is trained."""

    @classmethod
    def preset_values(cls, preset: str) -> dict[str, Any]:
        if preset not in cls.presets:
            raise ConfigError(f"{cls.label()}: unknown preset {preset!r}; choose one of {sorted(cls.presets)}")
        return dict(cls.presets[preset])

    @classmethod
    def from_preset(cls, preset: str | None = None, **values) -> "ModelConfig":
        """The preset's values (none: the field defaults), then ``values``; checked."""
        return cls.build(cls.preset_values(preset) if preset else None, **values)


@dataclass(frozen=True)
class Recipe(Checked):
    """How a model is trained. One epoch is one pass over the training images; a paper that
    counts its "epochs" in samples (HaloAE: 3000 samples whatever the class size) sets
    ``samples_per_epoch``, and ``passes(n_train)`` converts its epochs into passes."""

    owner = "recipe"
    lr: Positive = 1e-3
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 8
    optimizer: Literal["adam", "adamw"] = "adamw"
    weight_decay: NonNegative = 1e-5
    betas: tuple[float, ...] = (0.9, 0.999)
    grad_clip: NonNegative = 1.0
    """Maximum gradient norm; 0 = no clipping."""
    lr_step_epochs: NonNegativeInt = 0
    """StepLR: multiply the learning rate by ``lr_gamma`` every this many epochs; 0 = constant."""
    lr_gamma: float = 0.1
    samples_per_epoch: NonNegativeInt = 0
    """0: ``epochs`` are passes over the training images. N: the paper's epochs of N samples each."""

    def check(self) -> None:
        self.need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas={self.betas!r}: two "
                  "values in [0, 1)")
        self.need(0 < self.lr_gamma <= 1, f"lr_gamma={self.lr_gamma!r} must be in (0, 1]")

    def passes(self, n_train: int) -> int:
        """Epochs as passes over ``n_train`` training images."""
        if not self.samples_per_epoch:
            return self.epochs
        return max(1, math.ceil(self.epochs * self.samples_per_epoch / max(1, n_train)))
