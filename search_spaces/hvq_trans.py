"""HVQ-Trans: codebook depth (levels), codebook size (log scale), OT weight, commitment weight, lr."""

from __future__ import annotations

from typing import Any

import optuna

from search_spaces import lr_range

MAX_LEVELS = 5
DERIVES = {"levels": ("encoder_layers",)}


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    levels = trial.suggest_int("levels", 1, MAX_LEVELS)
    trial.suggest_int("codebook_size", 16, max(512, base["codebook_size"]), log=True)
    trial.suggest_float("ot_weight", 1.0, max(200.0, base["ot_weight"]), log=True)
    trial.suggest_float("commitment_weight", 0.05, max(1.0, base["commitment_weight"]), log=True)
    trial.suggest_float("lr", *lr_range(base["lr"]), log=True)
    # level j quantises the output of encoder layer L-j+1: deeper hierarchies need more layers
    return {"encoder_layers": max(base["encoder_layers"], levels - 1)}


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The base itself (the paper's: 5 levels x 512 codes, OT weight 80, commitment 0.25)."""
    return {"levels": base["levels"], "codebook_size": base["codebook_size"], "ot_weight": base["ot_weight"],
            "commitment_weight": base["commitment_weight"], "lr": base["lr"]}
