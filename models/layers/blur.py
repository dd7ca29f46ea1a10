"""Separable Gaussian blur of maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` maps with reflect padding; ``sigma<=0`` is a no-op."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device, maps.dtype)
    r = (k.numel() - 1) // 2
    c = maps.shape[1]
    h, w = maps.shape[-2:]
    mode = "reflect" if r < h and r < w else "replicate"
    x = F.pad(maps, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode=mode)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
