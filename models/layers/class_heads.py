"""Linear output heads with one weight set per class, chosen per sample."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ClassHeads(nn.Module):
    """Linear maps ``dim -> out`` selected per sample by class (one shared map if ``num=1``)."""

    def __init__(self, num: int, dim: int, out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num, dim, out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, out).uniform_(-bound, bound))

    def forward(self, x: Tensor, class_index: Tensor) -> Tensor:
        if self.weight.shape[0] == 1:
            return x @ self.weight[0] + self.bias[0]
        return torch.bmm(x, self.weight[class_index]) + self.bias[class_index].unsqueeze(1)
