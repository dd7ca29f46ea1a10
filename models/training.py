"""A plain training loop, usable without Ray; ``distributed.trial`` wraps the same step."""

from __future__ import annotations

import contextlib
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
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device``: ``auto`` is bf16 on a GPU
    that has it, fp16 (with a gradient scaler) on one that has not, fp32 on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("--precision fp16 needs a GPU (its gradient scaler is CUDA's); use bf16 or fp32 on a CPU")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device):
    """The trained members' forward under ``precision`` (a no-op context for fp32). Distances,
    statistics and metrics leave it where they are computed (``torch.autocast(enabled=False)``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def make_grad_scaler(precision: str, device) -> torch.amp.GradScaler | None:
    """fp16 needs its loss scaled so that small gradients do not underflow; bf16 and fp32 do not."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def use_fast_kernels(device) -> None:
    """On a GPU: TF32 for float32 matmuls and convolutions, cuDNN picking the fastest algorithm
    for the (fixed) input size."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


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


# Optimisation steps between two finiteness checks of the loss: each check waits for the GPU (and
# is an all-reduce under DDP), so the steps in between queue up without waiting for each other.
FINITE_CHECK_STEPS = 16


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every process (one tiny all-reduce under DDP), so that
    all ranks stop together instead of one raising while the others wait in a collective."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def raise_if_diverged(model: nn.Module, loss_sum: torch.Tensor) -> None:
    """``NonFiniteLossError`` on every rank when the summed loss is NaN/inf on any."""
    if not all_ranks_finite(loss_sum):
        raise NonFiniteLossError(f"{unwrap(model).name}: loss is {loss_sum.item()} (diverged); "
                                 "lower the learning rate")


def optimisation_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                      grad_clip: float = 1.0, precision: str = "fp32",
                      scaler: torch.amp.GradScaler | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step on ``batch``; returns the loss parts as detached tensors on the
    device, without waiting for the device (the caller checks finiteness, ``raise_if_diverged``).

    ``model`` may be DDP-wrapped: the loss is computed through the wrapper's ``forward``
    (which calls ``loss``) so that gradient all-reduce hooks fire. ``precision``
    (``resolve_precision``) runs the forward under autocast; fp16 needs ``scaler``
    (``make_grad_scaler``), whose step reads its overflow flag (a wait fp16 cannot avoid).
    """
    model.train()
    with autocast(precision, batch["image"].device):
        losses = model(batch) if isinstance(model, nn.parallel.DistributedDataParallel) else model.loss(batch)
    total = losses["loss"].float()
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(total) if scaler is not None else total).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping sees the true gradients
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return {k: v.detach().float() for k, v in losses.items()}


def train_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               grad_clip: float = 1.0, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None
               ) -> dict[str, float]:
    """``optimisation_step``, checked and read at once: the loss parts as floats; a non-finite
    loss on any rank raises ``NonFiniteLossError`` on every rank."""
    parts = optimisation_step(model, batch, optimizer, grad_clip, precision, scaler)
    raise_if_diverged(model, parts["loss"])
    return read_parts(parts, 1)


def read_parts(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Mean loss parts over ``steps``, read from the device in one transfer."""
    values = torch.stack([v.reshape(()) for v in sums.values()]).cpu().tolist()
    return {k: v / steps for k, v in zip(sums, values)}


def train_epoch(model: nn.Module, loader: Iterable[dict[str, Any]], optimizer, device="cpu",
                grad_clip: float = 1.0, precision: str = "fp32",
                scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over ``loader``; the mean loss parts. The loss parts are summed on the device and
    read once; the loss is checked every ``FINITE_CHECK_STEPS`` steps and at the end (the same
    steps on every rank: their loaders have equally many batches)."""
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in loader:
        parts = optimisation_step(model, move_batch(batch, device), optimizer, grad_clip, precision, scaler)
        sums = {k: sums[k] + v for k, v in parts.items()} if sums else parts
        n += 1
        if n % FINITE_CHECK_STEPS == 0:
            raise_if_diverged(model, sums["loss"])
    if n == 0:
        raise ValueError("the training loader is empty: no training image was found")
    raise_if_diverged(model, sums["loss"])
    return read_parts(sums, n)


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
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        precision: str = "fp32") -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` on normal images, then fit its statistics.

    ``recipe`` gives the optimiser, clipping and schedule (default: ``Recipe()``); ``epochs``
    and ``lr`` win over its own. ``precision``: ``auto``, ``fp32``, ``bf16`` or ``fp16`` for the
    training forward (``resolve_precision``). A model that is fitted, not trained
    (``model.trains`` is False) gets its one ``fit_statistics`` pass only."""
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
    precision = resolve_precision(precision, device)
    scaler = make_grad_scaler(precision, device)
    history = []
    for epoch in range(epochs):
        parts = train_epoch(model, train_loader, optimizer, device, recipe.grad_clip, precision, scaler)
        history.append(parts)
        if schedule is not None:
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, parts)
    model.eval()
    model.fit_statistics(train_loader)
    return history
