"""Outputs of a frozen network for inputs it has seen before, kept in memory up to a byte budget.

A search validates each trial several times, and every validation refits statistics on the same
training images and scores the same validation images; a frozen network (Transformaly's ViT
teacher, whose pass costs more than its students' training) gives the same outputs each time,
and so do the next trials of the study that the same Tune actor runs. One cache per process,
keyed by the frozen weights' digest and the input batch's bytes, least recently used first out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor

DEFAULT_BUDGET_BYTES = 1 << 30


def nbytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def input_key(owner: str, x: Tensor) -> str:
    """``owner`` (e.g. the frozen weights' digest) and the exact bytes, shape and dtype of ``x``."""
    h = hashlib.sha1(owner.encode())
    h.update(f"{tuple(x.shape)}{x.dtype}".encode())
    h.update(x.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class FrozenOutputCache:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.used_bytes = 0
        self.hits = self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key][0]
        self.misses += 1
        value = compute()
        size = nbytes(value)
        if size <= self.budget_bytes:
            while self.used_bytes + size > self.budget_bytes:
                _, (_, freed) = self.entries.popitem(last=False)
                self.used_bytes -= freed
            self.entries[key] = (value, size)
            self.used_bytes += size
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.used_bytes = 0


FROZEN_OUTPUTS = FrozenOutputCache()
"""The process's cache (see the module's docstring)."""


def caching_allowed(module: torch.nn.Module) -> bool:
    """Only where outputs are exact and reused: in eval mode, outside autocast (a training forward
    runs on shuffled batches under autocast), not while tracing or exporting a graph."""
    return not (module.training or torch.is_autocast_enabled() or torch.jit.is_tracing()
                or torch.compiler.is_exporting() or torch.compiler.is_compiling())
