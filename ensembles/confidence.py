"""How sure the validation set is that one selection procedure beats another: a paired bootstrap.

A held-out estimate on a few dozen validation images moves by several AUROC points when other
images are drawn; a fixed margin cannot tell a real gain from that noise. Here the validation
images are redrawn with replacement (normals, and each defect kind's images, drawn apart, so
every redraw keeps the set's make-up), the held-out estimate of both procedures is recomputed
on each redraw with their per-kind picks fixed, and the share of redraws in which the
challenger is ahead is the confidence.

AUROCs are computed from per-image histograms (the values binned on the candidate's own
quantiles), so a redraw costs a matrix product instead of a sort of every pixel.
"""

from __future__ import annotations

import numpy as np

BINS = 1024
RESAMPLES = 400


def per_image_counts(values: np.ndarray, positive: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histograms ``[N, B]`` of each image's anomalous and normal values, on shared quantile bins.

    ``values``/``positive``: ``[N, ...]`` (a map and its mask per image, or ``[N, 1]`` image scores
    and labels)."""
    n = len(values)
    flat = values.reshape(n, -1)
    edges = np.unique(np.quantile(flat, np.linspace(0, 1, bins + 1)[1:-1]))
    index = np.searchsorted(edges, flat, side="right") + (len(edges) + 1) * np.arange(n)[:, None]
    size = n * (len(edges) + 1)
    pos = positive.reshape(n, -1).astype(bool)
    counts = [np.bincount(index[m], minlength=size).reshape(n, -1) for m in (pos, ~pos)]
    return counts[0].astype(np.float64), counts[1].astype(np.float64)


def auroc_of_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from histograms ``[..., B]`` (ties within a bin count one half)."""
    below = np.cumsum(neg, axis=-1) - neg
    pairs = pos.sum(-1) * neg.sum(-1)
    wins = (pos * (below + 0.5 * neg)).sum(-1)
    return np.divide(wins, pairs, out=np.full(pairs.shape, np.nan), where=pairs > 0)


def strata_of(labels: np.ndarray, groups: list[np.ndarray]) -> list[np.ndarray]:
    """The disjoint parts the groups are made of (their normals, their defective images), as indices."""
    parts = {np.flatnonzero(g & (labels == y)).tobytes(): np.flatnonzero(g & (labels == y))
             for g in groups for y in (0, 1)}
    return list(parts.values())


def redraw_weights(labels: np.ndarray, groups: list[np.ndarray], resamples: int = RESAMPLES,
                   seed: int = 0) -> np.ndarray:
    """``[R, N]`` how often each image is drawn in each redraw, each stratum (the normals of a
    group, its defective images) redrawn among itself."""
    rng = np.random.default_rng(seed)
    strata = strata_of(labels, groups)
    weights = np.zeros((resamples, len(labels)))
    for members in strata:
        if len(members):
            draws = rng.integers(0, len(members), size=(resamples, len(members)))
            np.add.at(weights, (np.arange(resamples)[:, None], members[draws]), 1.0)
    return weights


def held_out_on_redraws(picks: list[tuple[np.ndarray, np.ndarray]], groups: list[np.ndarray],
                        weights: np.ndarray) -> np.ndarray:
    """``[R]`` held-out estimate on each redraw: group k scored with pick k's counts."""
    per_group = [auroc_of_counts((weights * g) @ pos, (weights * g) @ neg) for (pos, neg), g in zip(picks, groups)]
    return np.nanmean(np.stack(per_group), axis=0)


def confidence_ahead(challenger: list[tuple[np.ndarray, np.ndarray]], default: list[tuple[np.ndarray, np.ndarray]],
                     labels: np.ndarray, groups: list[np.ndarray], resamples: int = RESAMPLES) -> float:
    """Share of redraws of the validation images in which the challenger's held-out estimate is
    above the default's (each given as its per-group picks' counts)."""
    weights = redraw_weights(labels, groups, resamples)
    diff = held_out_on_redraws(challenger, groups, weights) - held_out_on_redraws(default, groups, weights)
    return float(np.mean(diff > 0))
