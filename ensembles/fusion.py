"""Making members comparable, and fusing their maps and image scores.

Normalisation: each member's pixel scores are mapped by ``(x - median) / (q99 - median)`` of its
scores on validation *normal* pixels, so 0 is a typical normal pixel and 1 the level that only
1 % of normal pixels reach. Quantiles rather than mean/std because anomaly maps are heavy-tailed:
a few bright normal edges would inflate a standard deviation, while the median and the 99th
percentile describe what "normal" looks like for that member. Image scores get the same
treatment with the validation normal images' scores.

Fusion rules (on normalised maps ``[N, H, W]``):

- ``mean``: the average of the members;
- ``weighted``: a weighted average, weights on the simplex searched on the validation set;
- ``max``: the pixel-wise maximum (a pixel is anomalous if any member says so);
- ``rank_mean``: the average of each member's rank (empirical CDF against that member's
  validation pixels), invariant to any monotone transform of a member's scores.

The fused map is blurred with a Gaussian (``sigma`` as a fraction of the image side). The image
score is ``map_max`` (the maximum of the blurred fused map) or ``member_mix`` (a weighted mean of
the members' normalised own image scores, e.g. Transformaly's likelihood score).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from models.layers.blur import gaussian_blur

RULES = ("mean", "weighted", "max", "rank_mean")
IMAGE_RULES = ("map_max", "member_mix")
RANK_QUANTILES = 2001


@dataclass
class QuantileNormalizer:
    """``(x - center) / scale`` with center = median and scale = q99 - median of normal scores."""

    center: float
    scale: float

    @classmethod
    def fit(cls, normal_scores: np.ndarray, upper: float = 0.99) -> "QuantileNormalizer":
        values = np.asarray(normal_scores, dtype=np.float64).ravel()
        if values.size == 0:
            raise ValueError("cannot fit a normaliser without validation normal scores")
        center, top = np.quantile(values, [0.5, upper])
        scale = top - center
        if not np.isfinite(scale) or scale <= 1e-12:
            spread = values.std()
            scale = spread if spread > 1e-12 else 1.0
        return cls(float(center), float(scale))

    def __call__(self, x):
        return (x - self.center) / self.scale

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RankTable:
    """Empirical CDF of a member's (normalised) validation pixel scores."""

    quantiles: list[float]

    @classmethod
    def fit(cls, scores: np.ndarray, n: int = RANK_QUANTILES) -> "RankTable":
        # "inverted_cdf" picks observed values, so the table moves with any monotone transform
        q = np.quantile(np.asarray(scores, dtype=np.float64).ravel(), np.linspace(0, 1, n), method="inverted_cdf")
        return cls([float(v) for v in q])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(self.quantiles, dtype=x.dtype, device=x.device)
        idx = count_at_or_below(q, x).clamp(1, len(q) - 1)
        lo, hi = q[idx - 1], q[idx]
        frac = ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        rank = (idx - 1 + frac) / (len(q) - 1)
        # keep order beyond the table's ends (no ties among extreme pixels)
        span = (q[-1] - q[0]).clamp_min(1e-12)
        rank = torch.where(x > q[-1], 1 + 1e-3 * torch.tanh((x - q[-1]) / span), rank)
        return torch.where(x < q[0], -1e-3 * torch.tanh((q[0] - x) / span), rank)


def count_at_or_below(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(q, x, right=True)`` for a sorted 1-D ``q``: how many of ``q`` are <= each
    value of ``x``. A binary search of a fixed ``ceil(log2(len(q) + 1))`` steps of gathers and
    comparisons, the same integers, written out because ONNX has no searchsorted."""
    n = q.numel()
    low = torch.zeros_like(x, dtype=torch.long)
    high = torch.full_like(low, n)
    for _ in range(math.ceil(math.log2(n + 1))):
        middle = torch.div(low + high, 2, rounding_mode="floor")
        below = q[middle.clamp(max=n - 1)] <= x
        open_ = low < high
        low = torch.where(open_ & below, middle + 1, low)
        high = torch.where(open_ & ~below, middle, high)
    return low


def fuse_maps(maps: list[torch.Tensor], rule: str, weights=None, ranks: list[RankTable] | None = None) -> torch.Tensor:
    """Fuse normalised member maps (each ``[N, 1, H, W]`` or ``[N, H, W]``) with ``rule``."""
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; choose one of {RULES}")
    stack = torch.stack(maps)
    if rule == "mean":
        return stack.mean(0)
    if rule == "max":
        return stack.amax(0)
    if rule == "weighted":
        w = torch.as_tensor(weights, dtype=stack.dtype, device=stack.device)
        if w.numel() != len(maps) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weighted fusion needs {len(maps)} non-negative weights, got {weights}")
        return torch.einsum("m,m...->...", w / w.sum(), stack)
    if ranks is None or len(ranks) != len(maps):
        raise ValueError("rank_mean fusion needs one rank table per member")
    return torch.stack([table(m) for table, m in zip(ranks, maps)]).mean(0)


def blur(maps: torch.Tensor, sigma_fraction: float) -> torch.Tensor:
    """Gaussian blur with sigma given as a fraction of the map's side."""
    if sigma_fraction <= 0:
        return maps
    four_d = maps if maps.dim() == 4 else maps.unsqueeze(1)
    out = gaussian_blur(four_d, sigma_fraction * max(four_d.shape[-2:]))
    return out if maps.dim() == 4 else out.squeeze(1)


def simplex_grid(members: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with coordinates in multiples of ``step``."""
    n = int(round(1 / step))
    return [tuple(c / n for c in combo) for combo in itertools.product(range(n + 1), repeat=members)
            if sum(combo) == n]
