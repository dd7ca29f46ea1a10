"""The prototype optimal-transport score of a vector against a codebook (HVQ-Trans).

Computed in torch with a log-softmax (HVQ-Trans's original code uses sklearn on the CPU and an
unguarded exponential).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _direction_and_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    """Unit vectors and norms of ``x [..., D]`` without overflowing for huge entries."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    scaled = x / scale
    scaled_norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return scaled / scaled_norm, (scale * scaled_norm).squeeze(-1)


def prototype_ot_score(z: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """``sum_k (1 - cos(z, e_k)) * softmax_k(z . e_k / temperature)`` for every vector of ``z``.

    ``z [..., N, D]``, ``codebook [..., K, D]`` (leading dims broadcast) -> ``[..., N]``.
    The logits are formed as ``cos * |z| |e| / temperature`` with overflow clamped, and the
    softmax is taken in log space, so the score is finite for any finite input.
    """
    z_dir, z_norm = _direction_and_norm(z)
    e_dir, e_norm = _direction_and_norm(codebook)
    cos = (z_dir @ e_dir.transpose(-1, -2)).clamp(-1.0, 1.0)
    big = torch.finfo(cos.dtype).max
    magnitude = ((z_norm / temperature).unsqueeze(-1) * e_norm.unsqueeze(-2)).clamp(max=big)
    weights = torch.log_softmax(cos * magnitude, dim=-1).exp()
    return ((1.0 - cos) * weights).sum(dim=-1)
