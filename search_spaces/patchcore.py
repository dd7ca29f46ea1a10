"""PatchCore: coreset ratio (log scale), which backbone stages, nearest neighbours per patch score."""

from __future__ import annotations

from typing import Any

import optuna

from search_spaces import with_choice

# stage sets of an EfficientNet / ResNet features_only backbone (strides 4-8, 8-16, 8-32)
LAYER_CHOICES = ("1,2", "2,3", "1,2,3", "2,3,4")
DERIVES = {"stages": ("out_indices",)}


def stage_key(out_indices) -> str:
    return ",".join(str(i) for i in out_indices)


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    trial.suggest_float("coreset_ratio", min(0.01, base["coreset_ratio"]), max(0.5, base["coreset_ratio"]), log=True)
    layers = trial.suggest_categorical("stages", with_choice(LAYER_CHOICES, stage_key(base["out_indices"])))
    trial.suggest_int("k", 1, max(5, base["k"]))
    return {"out_indices": tuple(int(i) for i in layers.split(","))}


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The base itself (the paper's: the two middle stages, a 10 % coreset, the nearest patch)."""
    return {"coreset_ratio": base["coreset_ratio"], "stages": stage_key(base["out_indices"]), "k": base["k"]}
