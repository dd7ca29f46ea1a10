"""A plain training loop, usable without Ray; ``distributed.train`` wraps the same step."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from models.base import AnomalyModel


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: the run diverged."""


def unwrap(model: nn.Module) -> AnomalyModel:
    """The AnomalyModel inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def move_batch(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class Recipe:
    """How a model is trained. One epoch is one pass over the training images; a paper that
    counts its "epochs" in samples (HaloAE: 3000 samples whatever the class size) sets
    ``samples_per_epoch``, and ``passes(n_train)`` converts its epochs into passes."""

    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 8
    optimizer: str = "adamw"
    weight_decay: float = 1e-5
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    """Maximum gradient norm; 0 = no clipping."""
    lr_step_epochs: int = 0
    """StepLR: multiply the learning rate by ``lr_gamma`` every this many epochs; 0 = constant."""
    lr_gamma: float = 0.1
    samples_per_epoch: int = 0
    """0: ``epochs`` are passes over the training images. N: the paper's epochs of N samples each."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)

    def passes(self, n_train: int) -> int:
        """Epochs as passes over ``n_train`` training images."""
        if not self.samples_per_epoch:
            return self.epochs
        return max(1, math.ceil(self.epochs * self.samples_per_epoch / max(1, n_train)))

    def check(self, where: str) -> None:
        from models.base import ConfigError

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {message}")

        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"lr={self.lr!r} must be a number > 0")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name}={value!r} must be an integer >= 1")
        need(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}: choose one of {sorted(OPTIMIZERS)}")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
             f"weight_decay={self.weight_decay!r} must be >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas={self.betas!r}: two values in [0, 1)")
        need(isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0,
             f"grad_clip={self.grad_clip!r} must be >= 0 (0 = no clipping)")
        for name in ("lr_step_epochs", "samples_per_epoch"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name}={value!r} must be an integer >= 0")
        need(0 < self.lr_gamma <= 1, f"lr_gamma={self.lr_gamma!r} must be in (0, 1]")


def recipe_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Recipe)}


def make_optimizer(model: nn.Module, lr: float, recipe: Recipe | None = None) -> torch.optim.Optimizer:
    """The recipe's optimiser (default ``Recipe()``: AdamW) at learning rate ``lr``."""
    recipe = recipe or Recipe()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(unwrap(model)).__name__} has no trainable parameter")
    return OPTIMIZERS[recipe.optimizer](params, lr=lr, weight_decay=recipe.weight_decay, betas=recipe.betas)


def make_lr_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe):
    """Stepped once per epoch; None when the learning rate is constant."""
    if not recipe.lr_step_epochs:
        return None
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.lr_step_epochs, gamma=recipe.lr_gamma)


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every process (one tiny all-reduce under DDP), so that
    all ranks stop together instead of one raising while the others wait in a collective."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               grad_clip: float = 1.0) -> dict[str, float]:
    """One optimisation step on ``batch``; returns the loss parts as floats.

    ``model`` may be DDP-wrapped: the loss is computed through the wrapper's ``forward``
    (which calls ``loss``) so that gradient all-reduce hooks fire. A non-finite loss on any
    rank raises ``NonFiniteLossError`` on every rank.
    """
    model.train()
    losses = model(batch) if isinstance(model, nn.parallel.DistributedDataParallel) else model.loss(batch)
    total = losses["loss"]
    if not all_ranks_finite(total):
        raise NonFiniteLossError(f"{unwrap(model).name}: loss is {total.item()} (diverged); "
                                 "lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def train_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer, device="cpu",
                grad_clip: float = 1.0) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        parts = train_step(model, move_batch(batch, device), optimizer, grad_clip)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    if n == 0:
        raise ValueError("the training loader is empty: no training image was found")
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def score_loader(model: nn.Module, loader: Iterable[dict[str, Any]], device="cpu") -> dict[str, np.ndarray]:
    """Image scores, maps (float32 ``[N, H, W]``), labels and masks (uint8) over ``loader``."""
    net = unwrap(model)
    net.eval()
    scores, maps, labels, masks = [], [], [], []
    for batch in loader:
        s, m = net.predict(batch["image"].to(device))
        scores.append(s.float().cpu().numpy())
        maps.append(m[:, 0].float().cpu().numpy())
        labels.append(np.asarray(batch["label"]).reshape(-1))
        masks.append((batch["mask"][:, 0] > 0.5).cpu().numpy().astype(np.uint8))
    if not scores:
        raise ValueError("the evaluation loader is empty")
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps),
            "labels": np.concatenate(labels).astype(np.int64), "masks": np.concatenate(masks)}


def fit(model: AnomalyModel, train_loader, epochs: int, lr: float = 1e-3, device="cpu",
        recipe: Recipe | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` on normal images, then fit its statistics.

    ``recipe`` gives the optimiser, clipping and schedule (default: ``Recipe()``); ``epochs``
    and ``lr`` win over its own. A model that is fitted, not trained (``model.trains`` is
    False) gets its one ``fit_statistics`` pass only."""
    if epochs < 1 or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"need epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    model.to(device)
    if not model.trains:
        model.eval()
        model.fit_statistics(train_loader)
        return []
    recipe = dataclasses.replace(recipe or Recipe(), lr=lr, epochs=epochs)
    optimizer = make_optimizer(model, lr, recipe)
    schedule = make_lr_schedule(optimizer, recipe)
    history = []
    for epoch in range(epochs):
        parts = train_epoch(model, train_loader, optimizer, device, recipe.grad_clip)
        history.append(parts)
        if schedule is not None:
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, parts)
    model.eval()
    model.fit_statistics(train_loader)
    return history
