"""Structural similarity (Gaussian window 11, sigma 1.5) of image or feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5

def _ssim_kernel(device, dtype) -> Tensor:
    x = torch.arange(SSIM_WINDOW, device=device, dtype=dtype) - (SSIM_WINDOW - 1) / 2
    k = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return k / k.sum()


def ssim_map(x: Tensor, y: Tensor, data_range: float | Tensor | None = None) -> Tensor:
    """Per-pixel, per-channel SSIM of ``x`` against the target ``y`` (``[B, C, H, W]``).

    Gaussian window 11, sigma 1.5, population (co)variances; maps are reflect-padded (or
    replicate-padded when smaller than the window's radius) so the result has the input's size.
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = ``data_range``; None takes the target's range over
    the batch, so one function fits normalised images and unbounded CNN features.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32 at least: E[x^2] - E[x]^2 cancels badly below
    with torch.autocast(x.device.type, enabled=False):
        return _ssim_map(x.to(dtype), y.to(dtype), data_range)


def _ssim_map(x: Tensor, y: Tensor, data_range: float | Tensor | None) -> Tensor:
    c = x.shape[1]
    k = _ssim_kernel(x.device, x.dtype)
    r = SSIM_WINDOW // 2
    mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    stack = F.pad(stack, (r, r, r, r), mode=mode)
    stack = F.conv2d(stack, k.view(1, 1, 1, -1).expand(5 * c, 1, 1, -1), groups=5 * c)
    stack = F.conv2d(stack, k.view(1, 1, -1, 1).expand(5 * c, 1, -1, 1), groups=5 * c)
    mu_x, mu_y, xx, yy, xy = stack.split(c, dim=1)
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    if data_range is None:
        data_range = (y.detach().amax() - y.detach().amin()).clamp_min(1e-6)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return num / den


def ssim(x: Tensor, y: Tensor, data_range: float | Tensor | None = None) -> Tensor:
    """Mean SSIM over pixels and channels (multi-channel SSIM as the channel average)."""
    return ssim_map(x, y, data_range).mean()


# ----------------------------------------------------------------------------------------
# frozen features
# ----------------------------------------------------------------------------------------
