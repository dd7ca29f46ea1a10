"""EMA vector quantisers with one codebook set per class, and the code search they use.

Unlike HVQ-Trans's original code: the EMA statistics are computed for the whole batch at once
and, under DDP, all-reduced once per level as a ``[classes, codes, dim + 1]`` tensor (each
sample counted once, in its own class), so workers that see different classes do not mix their
codebooks (the original reduces per sample inside a Python loop); and codes whose EMA usage
falls below ``dead_code_threshold`` are restarted from current encoder vectors of their class,
identically on every worker (the original has no restart). Since usage starts at zero, the
first training step initialises the codebooks from data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# EMA usage (in "assignments per step") given to a restarted code: with decay 0.99 and the
# default threshold 0.01 it survives ~460 steps without being used before the next restart.
RESTART_USAGE = 1.0


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_workers(t: Tensor) -> Tensor:
    """``[world, *t.shape]``: ``t`` from every worker, in rank order."""
    if distributed_world() == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the closest code (squared L2): ``z [..., N, D]``, ``codebook [..., K, D]`` -> ``[..., N]``."""
    scores = 2.0 * (z @ codebook.transpose(-1, -2)) - codebook.pow(2).sum(-1).unsqueeze(-2)
    return scores.argmax(dim=-1)


def lookup_codes(codebook: Tensor, codes: Tensor) -> Tensor:
    """``codebook [..., K, D]`` at ``codes [..., N]`` -> ``[..., N, D]`` (leading dims broadcast; a
    gather over expanded views, which exports for any batch)."""
    lead = torch.broadcast_shapes(codebook.shape[:-2], codes.shape[:-1])
    index = codes.unsqueeze(-1).expand(*lead, codes.shape[-1], codebook.shape[-1])
    return torch.gather(codebook.expand(*lead, *codebook.shape[-2:]), -2, index)


def quantisation_error(codebook: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(squared error of z's nearest codes summed over tokens and dims [...], those codes [..., N, D])``."""
    q = lookup_codes(codebook, nearest_codes(z, codebook))
    return (z - q).pow(2).sum(dim=(-1, -2)), q


class ClassCodebooks(nn.Module):
    """One EMA vector quantiser per class for a single level of the hierarchy.

    Buffers: ``embed [C, K, D]`` (the codes), ``cluster_size [C, K]`` (EMA usage) and
    ``embed_sum [C, K, D]`` (EMA sum of assigned vectors). Usage starts at zero: a code that
    was never assigned keeps its random initialisation and counts as dead.
    """

    def __init__(self, num_classes: int, size: int, dim: int, decay: float, eps: float,
                 dead_code_threshold: float):
        super().__init__()
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        # all-reduce / all-gather statistics when torch.distributed is initialised; tests turn
        # this off to show what happens without it
        self.sync_across_workers = True
        self.register_buffer("embed", torch.randn(num_classes, size, dim))
        self.register_buffer("cluster_size", torch.zeros(num_classes, size))
        self.register_buffer("embed_sum", torch.zeros(num_classes, size, dim))

    def quantize(self, z: Tensor, class_index: Tensor) -> tuple[Tensor, Tensor]:
        """Codes and code vectors of ``z [B, N, D]`` in the codebooks of ``class_index [B]``."""
        codebook = self.embed[class_index]
        codes = nearest_codes(z, codebook)
        return codes, lookup_codes(codebook, codes)

    def forward(self, z: Tensor, class_index: Tensor) -> tuple[Tensor, Tensor]:
        """Straight-through quantised ``z`` and the commitment term ``mean((z - sg[q])^2)``.

        In training mode the codebooks of the classes in the batch are updated (EMA, then
        dead-code restarts) after the assignment.
        """
        z = z.float()
        with torch.autocast(z.device.type, enabled=False):  # distances in float32 under AMP
            codes, q = self.quantize(z.detach(), class_index)
        commitment = F.mse_loss(z, q)
        if self.training:
            self.update(z.detach(), codes, class_index)
        return z + (q - z).detach(), commitment

    def _reduce(self, t: Tensor) -> Tensor:
        if self.sync_across_workers and distributed_world() > 1:
            dist.all_reduce(t)
        return t

    def _gather(self, t: Tensor) -> Tensor:
        return gather_across_workers(t) if self.sync_across_workers else t.unsqueeze(0)

    @torch.no_grad()
    def update(self, z: Tensor, codes: Tensor, class_index: Tensor) -> None:
        """EMA update from vectors ``z [B, N, D]`` assigned to ``codes [B, N]``."""
        C, K, D = self.num_classes, self.size, self.dim
        flat_z = z.reshape(-1, D).float()
        token_class = class_index.repeat_interleave(z.shape[1])
        slot = token_class * K + codes.reshape(-1)
        with_count = torch.cat([flat_z, torch.ones_like(flat_z[:, :1])], dim=1)
        stats = torch.zeros(C * K, D + 1, device=z.device, dtype=torch.float32).index_add_(0, slot, with_count)
        stats = self._reduce(stats.view(C, K, D + 1))  # the one collective per level and step
        sums, counts = stats[..., :D], stats[..., D]
        present = counts.sum(dim=1) > 0  # classes seen this step by any worker
        keep = self.decay
        size = torch.where(present[:, None], keep * self.cluster_size + (1 - keep) * counts, self.cluster_size)
        embed_sum = torch.where(present[:, None, None], keep * self.embed_sum + (1 - keep) * sums, self.embed_sum)
        total = size.sum(dim=1, keepdim=True)
        smoothed = (size + self.eps) / (total + K * self.eps) * total
        used = (size > 0) & present[:, None]
        embed = torch.where(used[..., None], embed_sum / smoothed.clamp_min(1e-30)[..., None], self.embed)
        self.cluster_size.copy_(size)
        self.embed_sum.copy_(embed_sum)
        self.embed.copy_(embed)
        if self.dead_code_threshold > 0:
            self.restart_dead_codes(flat_z, token_class, present)

    @torch.no_grad()
    def restart_dead_codes(self, flat_z: Tensor, token_class: Tensor, present: Tensor) -> None:
        """Re-initialise rarely used codes of the classes present with random current vectors.

        Usage is identical on every worker (reduced statistics), so all workers agree on which
        codes are dead. Each worker samples candidates of each class from its own vectors; the
        candidates of all workers are gathered, and every worker assigns the i-th dead code of
        a class the i-th valid candidate (workers interleaved), so codebooks stay identical.
        """
        C, K, D = self.num_classes, self.size, self.dim
        dead = (self.cluster_size < self.dead_code_threshold) & present[:, None]
        # K candidates per class, whether or not any code is dead: sizes that depend on the data
        # would make the host wait for the device at every level of every step
        wanted = K
        is_class = token_class[None, :] == torch.arange(C, device=flat_z.device)[:, None]
        local_valid = is_class.any(dim=1)
        # classes this worker lacks draw dummies (marked invalid) so every worker sends one shape
        weights = torch.where(local_valid[:, None], is_class.float(), torch.ones(1, device=flat_z.device))
        picks = torch.multinomial(weights, wanted, replacement=True)  # [C, wanted]
        candidates = torch.cat([flat_z[picks], local_valid[:, None, None].float().expand(C, wanted, 1)], dim=-1)
        gathered = self._gather(candidates)  # [W, C, wanted, D + 1]
        workers = gathered.shape[0]
        pool = gathered.permute(1, 2, 0, 3).reshape(C, wanted * workers, D + 1)
        valid_first = torch.argsort((pool[..., D] <= 0).to(torch.int8), dim=1, stable=True)
        dead_rank = (dead.long().cumsum(dim=1) - 1).clamp_min(0)
        source = torch.take_along_dim(valid_first, dead_rank, dim=1)  # [C, K]
        fresh = torch.take_along_dim(pool[..., :D], source[..., None], dim=1)
        self.embed.copy_(torch.where(dead[..., None], fresh, self.embed))
        self.embed_sum.copy_(torch.where(dead[..., None], fresh * RESTART_USAGE, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, RESTART_USAGE),
                                            self.cluster_size))
