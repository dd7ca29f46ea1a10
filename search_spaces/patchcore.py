"""PatchCore: coreset ratio (log scale), which backbone stages, nearest neighbours per patch score."""

from __future__ import annotations

from typing import Any

import optuna

# stage sets of an EfficientNet / ResNet features_only backbone (strides 4-8, 8-16, 8-32)
LAYER_CHOICES = ("1,2", "2,3", "1,2,3", "2,3,4")


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    trial.suggest_float("coreset_ratio", 0.01, 0.5, log=True)
    layers = trial.suggest_categorical("stages", LAYER_CHOICES)
    trial.suggest_int("k", 1, 5)
    return {"out_indices": tuple(int(i) for i in layers.split(","))}


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The paper: the two middle stages, a 10 % coreset, the nearest patch only."""
    stages = ",".join(str(i) for i in base["out_indices"])
    return {"coreset_ratio": 0.1, "stages": stages if stages in LAYER_CHOICES else "2,3", "k": 1}
