"""One Optuna define-by-run search space per model (``search_spaces/<model>.py``).

Each module has ``space(trial, base) -> dict`` (suggests on an ``optuna.Trial``; returns the
derived constants) and ``defaults(base) -> dict`` (the paper's choice, enqueued first). ``base`` is
the model's config before the search (preset + overrides), so a space can stay consistent with
it (e.g. the halo block must fit the feature grid). Suggested names are model-config fields,
``lr``, or search-only helpers (recorded in the trial table, not passed to the model).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

from models import ConfigError, model_class


def base_config(model: str, preset: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cls = model_class(model)
    values = dict(cls.presets.get(preset, {})) if preset else {}
    values.update(overrides or {})
    return dataclasses.asdict(cls.config_class(**values))


def get_space(model: str, base: dict[str, Any]) -> tuple[Callable, list[dict[str, Any]]]:
    """``(define-by-run function of an optuna.Trial, [paper defaults])`` for ``model``."""
    try:
        module = importlib.import_module(f"search_spaces.{model}")
    except ModuleNotFoundError:
        raise ConfigError(f"no search space for model {model!r}") from None
    return functools.partial(module.space, base=base), [module.defaults(base)]
