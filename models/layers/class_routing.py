"""Routing an image to a class without its label: the class prototype nearest in cosine.

A prototype is the normalised mean of the unit descriptors (mean-pooled, L2-normalised
feature maps) of that class's training images; a class without images keeps a zero prototype,
and ``prototypes_fitted`` is then False.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def unit_descriptor(features: Tensor) -> Tensor:
    """Feature maps ``[B, F, h, w]`` mean-pooled and L2-normalised: ``[B, F]``."""
    return F.normalize(features.float().mean(dim=(2, 3)), dim=1)


def fit_prototypes(batches: Iterable[tuple[Tensor, Tensor]], classes: int, dim: int,
                   device) -> tuple[Tensor, list[int]]:
    """``(prototypes [classes, dim], classes without any image)`` from ``(descriptors [B, dim],
    class index [B])`` batches."""
    sums = torch.zeros(classes, dim, device=device)
    counts = torch.zeros(classes, device=device)
    for descriptors, index in batches:
        sums.index_add_(0, index, descriptors)
        counts.index_add_(0, index, torch.ones(index.shape[0], device=device))
    return F.normalize(sums, dim=1), (counts == 0).nonzero().flatten().tolist()


def prototypes_fitted(prototypes: Tensor) -> bool:
    return bool((prototypes.abs().sum(dim=1) > 0).all())


def nearest_prototype(descriptors: Tensor, prototypes: Tensor) -> Tensor:
    """The class of the prototype nearest in cosine to each unit descriptor: ``[B]``."""
    return (descriptors @ prototypes.T).argmax(dim=1)


def class_indices(values, batch_size: int, classes: int, device, owner: str) -> Tensor:
    """A batch's class indices ``[B]`` (all 0 for a one-class model), checked."""
    if classes == 1:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    if values is None:
        raise ValueError(f"{owner}: num_classes={classes} needs a class_index per sample")
    index = torch.as_tensor(values, device=device).long().reshape(-1)
    if index.numel() != batch_size or int(index.min()) < 0 or int(index.max()) >= classes:
        raise ValueError(f"{owner}: class_index must hold {batch_size} values in [0, {classes}), got {index.tolist()}")
    return index
