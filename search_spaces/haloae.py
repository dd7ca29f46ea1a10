"""HaloAE: halo size, block size, encoder depth, heads, learning rate."""

from __future__ import annotations

from typing import Any

import optuna

from search_spaces import lr_range

BLOCKS = (2, 4, 6, 8, 10, 12, 16)
HEAD_SCALES = (0.5, 1.0, 2.0)
DERIVES = {"depth": ("channels", "heads", "kernels"), "head_scale": ("heads",)}


def feature_grid(base: dict[str, Any]) -> int:
    return base["image_size"] // base["feature_stride"]


def block_choices(grid: int, block: int | None = None) -> list[int]:
    """Block sides up to the grid, and the base's own block. A block need not divide the grid:
    the map is padded to a multiple of it and the padding is masked out of the attention, so
    the paper's block 12 works on our 64-cell grid at 256 px (its 60 cells come from an unpadded
    stem that we do not copy: it would misalign the map with the image)."""
    choices = [b for b in BLOCKS if b <= grid] or [grid]
    return sorted(set(choices) | ({block} if block and block <= grid else set()))


def stages(base: dict[str, Any], depth: int, head_scale: float = 1.0) -> dict[str, list]:
    """The base's encoder cut to ``depth`` stages, or extended by halving widths (min 8)."""
    channels, heads, kernels = list(base["channels"]), list(base["heads"]), list(base["kernels"])
    while len(channels) < depth + 1:
        channels.append(max(8, channels[-1] // 2))
        heads.append(heads[-1])
        kernels.append(kernels[-1])
    heads = [max(1, round(h * head_scale)) for h in heads[:depth]]
    return {"channels": channels[:depth + 1], "heads": heads, "kernels": kernels[:depth]}


def space(trial: optuna.Trial, base: dict[str, Any]) -> dict[str, Any]:
    block = trial.suggest_categorical("block", block_choices(feature_grid(base), base["block"]))
    trial.suggest_int("halo", 0, min(4, block))
    base_depth = len(base["channels"]) - 1
    depth = trial.suggest_int("depth", 1, max(3, base_depth))
    head_scale = trial.suggest_categorical("head_scale", HEAD_SCALES)
    trial.suggest_float("lr", *lr_range(base["lr"]), log=True)
    return stages(base, depth, head_scale)


def defaults(base: dict[str, Any]) -> dict[str, Any]:
    """The base itself (the paper's: block 12, halo 2, 4 stages with heads 4/8/8/8)."""
    return {"block": base["block"], "halo": base["halo"], "depth": len(base["channels"]) - 1,
            "head_scale": 1.0, "lr": base["lr"]}

