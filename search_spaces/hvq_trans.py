"""HVQ-Trans: codebook depth (levels), codebook size (log scale), OT weight, commitment weight, lr."""

from __future__ import annotations

from typing import Any

import optuna


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    levels = trial.suggest_int("levels", 1, 5)
    trial.suggest_int("codebook_size", 16, 512, log=True)
    trial.suggest_float("ot_weight", 1.0, 200.0, log=True)
    trial.suggest_float("commitment_weight", 0.05, 1.0, log=True)
    trial.suggest_float("lr", 1e-4, 3e-3, log=True)
    # level j quantises the output of encoder layer L-j+1: deeper hierarchies need more layers
    return {"encoder_layers": max(base["encoder_layers"], levels - 1)}


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The paper: 5 levels x 512 codes, OT weight 80, commitment 0.25."""
    return {"levels": 5, "codebook_size": 512, "ot_weight": 80.0, "commitment_weight": 0.25, "lr": 1e-3}
