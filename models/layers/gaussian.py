"""Fitted Gaussian statistics: PCA whitening and a full-covariance Gaussian log-likelihood."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

class NotFittedError(RuntimeError):
    """Image scores were asked for before ``fit_statistics`` fitted the Gaussians."""


def components_to_keep(explained_variance_ratio: Tensor, threshold: float) -> int:
    """The fewest leading components whose cumulative explained variance is >= ``threshold``."""
    cumulative = torch.cumsum(explained_variance_ratio, 0)
    # components below the threshold, plus the one that reaches it
    return min(int((cumulative < threshold).sum()) + 1, explained_variance_ratio.numel())


class PCAWhitening(nn.Module):
    """Projection onto the leading principal components, each scaled to unit variance."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("components", torch.zeros(0, 0))  # [k, D]
        self.register_buffer("scale", torch.zeros(0))  # [k] standard deviations

    @torch.no_grad()
    def fit(self, features: Tensor, threshold: float) -> None:
        x = features.double()
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        variance = s.pow(2) / max(x.shape[0] - 1, 1)
        if variance.sum() <= 0:
            raise ValueError("PCA whitening: the features have zero variance (identical images?)")
        k = components_to_keep(variance / variance.sum(), threshold)
        rank = int((variance > 1e-10 * variance[0]).sum())
        k = max(1, min(k, rank))
        self.mean = mean.float()
        self.components = vh[:k].float().contiguous()  # as a checkpoint stores it: a reload computes the same
        self.scale = variance[:k].sqrt().float()

    def forward(self, features: Tensor) -> Tensor:
        return (features - self.mean) @ self.components.T / self.scale


class GaussianDensity(nn.Module):
    """A multivariate normal with a shrunk covariance; ``log_prob`` is its log-density."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        # precision = L @ L.T, so that the Mahalanobis term is |(x - mean) @ L|^2
        self.register_buffer("precision_factor", torch.zeros(0, 0))
        self.register_buffer("log_normalizer", torch.zeros(()))

    @torch.no_grad()
    def fit(self, samples: Tensor, shrinkage: float) -> None:
        x = samples.double()
        n, d = x.shape
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / max(n - 1, 1)
        average_variance = max(float(torch.diagonal(cov).mean()), 1e-12)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        cov = (1 - shrinkage) * cov + shrinkage * average_variance * eye
        cov = cov + 1e-9 * average_variance * eye  # keeps the Cholesky factorisation stable
        chol = torch.linalg.cholesky(cov)
        # inverse of the lower Cholesky factor C: precision = C^-T C^-1 = L L^T with L = C^-T
        factor = torch.linalg.solve_triangular(chol, eye, upper=False).T
        log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
        self.mean = mean.float()
        self.precision_factor = factor.float()
        self.log_normalizer = (-0.5 * (d * math.log(2 * math.pi) + log_det)).float()

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x.float() - self.mean) @ self.precision_factor
        return self.log_normalizer - 0.5 * z.pow(2).sum(-1)
