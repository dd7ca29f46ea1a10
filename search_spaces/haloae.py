"""HaloAE: halo size, block size (fitting the feature grid), heads, depth, learning rate."""

from __future__ import annotations

from typing import Any

import optuna

WIDTHS = (64, 48, 32, 16)


def feature_grid(base: dict[str, Any]) -> int:
    return base["image_size"] // base["feature_stride"]


def block_choices(grid: int) -> list[int]:
    """Block sides that tile the grid without padding, at most the grid itself."""
    return [b for b in (2, 4, 6, 8, 10, 12, 16) if b <= grid and grid % b == 0] or [grid]


def channels_for_depth(depth: int, stem: int) -> list[int]:
    return [stem] + [max(8, stem // 2 ** (i + 1)) for i in range(depth)]


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    grid = feature_grid(base)
    block = trial.suggest_categorical("block", block_choices(grid))
    trial.suggest_int("halo", 0, min(4, block))
    depth = trial.suggest_int("depth", 1, 3)
    heads = trial.suggest_categorical("heads", [1, 2, 4, 8])
    trial.suggest_float("lr", 1e-4, 3e-3, log=True)
    stem = base["channels"][0]
    return {"channels": channels_for_depth(depth, stem), "heads": [heads] * depth,
            "kernels": [3] * depth}


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The paper's halo 2 with the preset's block (12 on the paper's 60-cell grid)."""
    depth = len(base["channels"]) - 1
    return {"block": min(base["block"], max(block_choices(feature_grid(base)))), "halo": 2,
            "depth": max(1, min(3, depth)), "heads": 4, "lr": 1e-3}
