"""A plain training loop, usable without Ray; ``distributed.trial`` wraps the same step."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from models.base import AnomalyModel
from models.config import Recipe


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: the run diverged."""


def unwrap(model: nn.Module) -> AnomalyModel:
    """The AnomalyModel inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def move_batch(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


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


Outputs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (image scores [N], maps [N, 1, H, W])


@torch.no_grad()
def score_outputs(predict: Callable[[torch.Tensor], Outputs], loader: Iterable[dict[str, Any]], device="cpu"
                  ) -> tuple[Outputs, np.ndarray, np.ndarray]:
    """The one scoring loop (training validation, fusion fitting, evaluation): ``predict`` of each
    batch's images, concatenated on the CPU, with the labels ``[N]`` and masks ``[N, H, W]``
    (uint8) of the batches."""
    parts: dict[str, tuple[list, list]] = {}
    labels, masks = [], []
    for batch in loader:
        for name, (s, m) in predict(batch["image"].to(device)).items():
            parts.setdefault(name, ([], []))
            parts[name][0].append(s.float().cpu())
            parts[name][1].append(m.float().cpu())
        labels.append(np.asarray(batch["label"]).reshape(-1))
        masks.append((batch["mask"][:, 0] > 0.5).cpu().numpy().astype(np.uint8))
    if not labels:
        raise ValueError("the evaluation loader is empty")
    outputs = {name: (torch.cat(s), torch.cat(m)) for name, (s, m) in parts.items()}
    return outputs, np.concatenate(labels).astype(np.int64), np.concatenate(masks)


def score_loader(model: nn.Module, loader: Iterable[dict[str, Any]], device="cpu") -> dict[str, np.ndarray]:
    """One model's image scores, maps (float32 ``[N, H, W]``), labels and masks over ``loader``."""
    net = unwrap(model)
    net.eval()
    outputs, labels, masks = score_outputs(lambda x: {net.name: net.predict(x)}, loader, device)
    scores, maps = outputs[net.name]
    return {"scores": scores.numpy(), "maps": maps[:, 0].numpy(), "labels": labels, "masks": masks}


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
