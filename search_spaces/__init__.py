"""One Optuna define-by-run search space per model: the module its ``@register_model`` names.

Each module has ``space(trial, base) -> dict`` (suggests on an ``optuna.Trial``; returns the
derived model-config fields) and ``defaults(base) -> dict`` (the parameters that reproduce
``base`` exactly: the study's first point). ``base`` is the model's config before the search
(preset + ``--set``) plus the recipe's ``lr``, so a space stays consistent with it (e.g. the halo
block must fit the feature grid). Suggested names are model-config fields, ``lr``, or
search-only helpers, listed in the module's ``DERIVES`` with the fields they decide.

A field fixed by the user (``pinned``) is never sampled: every parameter that is or decides a
pinned field returns its value in ``defaults(base)`` instead (``PinnedTrial``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from models import model_class


def space_module(model: str):
    return importlib.import_module(model_class(model).search_space)


def pinned_parameters(model: str, base: dict[str, Any], pinned: frozenset[str]) -> dict[str, Any]:
    """The parameters of ``model``'s space that a pinned field fixes, with their values."""
    module = space_module(model)
    derives = getattr(module, "DERIVES", {})
    def decides(name: str) -> set[str]:  # a numbered helper (use_layer_3) is listed by its prefix
        return set(derives.get(name) or derives.get(name.rstrip("0123456789"), ()))

    return {name: value for name, value in module.defaults(base).items() if name in pinned or pinned & decides(name)}


class PinnedTrial:
    """An ``optuna.Trial`` whose pinned parameters are not suggested: they return their value."""

    def __init__(self, trial, pinned: dict[str, Any]):
        self._trial, self._pinned = trial, pinned

    def _suggest(self, kind: str, name: str, *args, **kwargs):
        if name in self._pinned:
            return self._pinned[name]
        return getattr(self._trial, kind)(name, *args, **kwargs)

    def suggest_int(self, name, *args, **kwargs):
        return self._suggest("suggest_int", name, *args, **kwargs)

    def suggest_float(self, name, *args, **kwargs):
        return self._suggest("suggest_float", name, *args, **kwargs)

    def suggest_categorical(self, name, *args, **kwargs):
        return self._suggest("suggest_categorical", name, *args, **kwargs)


def _pinned_space(trial, space: Callable, base: dict[str, Any], pinned: dict[str, Any]) -> dict[str, Any]:
    return space(PinnedTrial(trial, pinned) if pinned else trial, base)


def get_space(model: str, base: dict[str, Any],
              pinned: frozenset[str] = frozenset()) -> tuple[Callable, list[dict[str, Any]]]:
    """``(define-by-run function of an optuna.Trial, [first point])`` for ``model``; the first
    point reproduces ``base``; ``pinned`` fields are never sampled."""
    module = space_module(model)
    fixed = pinned_parameters(model, base, frozenset(pinned))
    first = {k: v for k, v in module.defaults(base).items() if k not in fixed}
    return functools.partial(_pinned_space, space=module.space, base=base, pinned=fixed), [first]


def lr_range(lr: float) -> tuple[float, float]:
    """The learning rates searched around the recipe's: a decade below, three times above."""
    return lr / 10, lr * 3


def with_choice(choices, value) -> list:
    """``choices`` plus ``value`` (the base's own choice is always offered)."""
    return list(choices) if value in choices else sorted([*choices, value], key=str)
