"""Transformaly: which ViT blocks get students (a range or a subset), PCA variance kept, lr."""

from __future__ import annotations

from typing import Any

import optuna

MAX_SEARCH_DEPTH = 8  # the teacher runs up to the deepest chosen block: keep trials affordable


def space(trial: optuna.Trial, base: dict[str, Any], depth: int | None = None) -> dict[str, Any]:
    depth = min(depth or _depth(base), MAX_SEARCH_DEPTH)
    mode = trial.suggest_categorical("layer_mode", ["range", "subset"])
    if mode == "range":
        first = trial.suggest_int("first_layer", 0, depth - 1)
        last = trial.suggest_int("last_layer", first, depth - 1)
        layers = list(range(first, last + 1))
    else:
        layers = [i for i in range(depth) if trial.suggest_categorical(f"use_layer_{i}", [True, False])]
        layers = layers or [depth - 1]
    trial.suggest_float("whitening_threshold", 0.8, 0.99)
    # with a random teacher (offline) the CLS-feature likelihood is near chance: let the search drop it
    trial.suggest_categorical("pretrained_score_weight", [0.0, 1.0])
    trial.suggest_float("lr", 1e-4, 3e-3, log=True)
    return {"layers": layers}


def _depth(base: dict[str, Any]) -> int:
    from models.transformaly import Transformaly

    return Transformaly._teacher_depth(base["arch"])


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The paper: blocks 2 to the last (of 12), PCA keeping 90 % of the variance."""
    depth = min(_depth(base), MAX_SEARCH_DEPTH)
    return {"layer_mode": "range", "first_layer": min(2, depth - 1), "last_layer": depth - 1,
            "whitening_threshold": 0.9, "pretrained_score_weight": 1.0, "lr": 1e-3}
