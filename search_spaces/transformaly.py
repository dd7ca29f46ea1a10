"""Transformaly: which ViT blocks get students (a range or a subset), PCA variance kept, lr."""

from __future__ import annotations

from typing import Any

import optuna

from models.transformaly import parse_layers, teacher_depth
from search_spaces import lr_range, with_choice

DERIVES = {"layer_mode": ("layers",), "first_layer": ("layers",), "last_layer": ("layers",),
           "use_layer_": ("layers",)}  # use_layer_<i>


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    depth = teacher_depth(base["arch"])
    mode = trial.suggest_categorical("layer_mode", ["range", "subset"])
    if mode == "range":
        first = trial.suggest_int("first_layer", 0, depth - 1)
        last = trial.suggest_int("last_layer", first, depth - 1)
        layers = list(range(first, last + 1))
    else:
        layers = [i for i in range(depth) if trial.suggest_categorical(f"use_layer_{i}", [True, False])]
        layers = layers or [depth - 1]
    trial.suggest_float("whitening_threshold", min(0.8, base["whitening_threshold"]),
                        max(0.99, base["whitening_threshold"]))
    # with a random teacher (offline) the CLS-feature likelihood is near chance: let the search drop it
    trial.suggest_categorical("pretrained_score_weight", with_choice([0.0, 1.0], base["pretrained_score_weight"]))
    trial.suggest_float("lr", *lr_range(base["lr"]), log=True)
    return {"layers": layers}


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The base itself (the paper's: students on blocks 2 to 11 of 12, PCA keeping 90 %)."""
    depth = teacher_depth(base["arch"])
    layers = list(parse_layers(base["layers"], depth))
    if layers == list(range(layers[0], layers[-1] + 1)):
        choice = {"layer_mode": "range", "first_layer": layers[0], "last_layer": layers[-1]}
    else:
        choice = {"layer_mode": "subset", **{f"use_layer_{i}": i in layers for i in range(depth)}}
    return {**choice, "whitening_threshold": base["whitening_threshold"],
            "pretrained_score_weight": base["pretrained_score_weight"], "lr": base["lr"]}
