"""PatchCore: a memory bank of normal patch features, nearest-neighbour distances as the score.

After Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), written
from the paper; no code of the original or of anomalib is used.

    image -> frozen CNN stages (``out_indices``), each averaged over a ``neighbourhood`` x
             ``neighbourhood`` window of cells ("locally aware patch features"), the coarser
             ones upsampled to the finest grid, concatenated
          -> fit: every training patch, reduced to a coreset by greedy k-centre selection on a
             random projection (``coreset_ratio`` of the patches)
          -> patch score: distance to the nearest memory patch (mean of the ``k`` nearest)
          -> map: patch scores upsampled to ``image_size`` and blurred (sigma ``map_blur_sigma`` px)
          -> image score: the largest patch score, re-weighted by how isolated its nearest
             memory patch is among its ``reweight_neighbours`` neighbours (the paper's eq. 7)

It has no trainable parameter: ``fit_statistics`` on the training normals is its whole
training (``trains = False``), so the training loop, Ray Train and the search fit it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from models import backbones, register_model
from models.base import AnomalyModel
from models.config import ModelConfig, NonNegative, OddInt, PositiveInt, Range
from models.layers.blur import gaussian_blur

DISTANCE_CHUNK = 4096  # query patches per distance matrix, to bound memory at large inputs


@dataclass(frozen=True)
class PatchCoreConfig(ModelConfig):
    backbone: str = "tf_efficientnet_lite0"
    """timm CNN used as the frozen feature extractor."""
    weights: str = "packaged"
    """Backbone weights: "imagenet", "packaged" (offline, tf_efficientnet_lite0 only), a file, "none"."""
    out_indices: tuple[Annotated[int, Range(0)], ...] = (2, 3)
    """timm ``features_only`` stages whose features are concatenated (the paper: the middle ones)."""
    image_size: Annotated[int, Range(32)] = 128
    """Input side in pixels."""
    neighbourhood: OddInt = 3
    """Side of the cell window each patch feature is averaged over (odd; 1 = no aggregation)."""
    coreset_ratio: float = 0.1
    """Share of the training patches kept in the memory bank (1.0 keeps all)."""
    projection_dim: PositiveInt = 128
    """Dimension of the random projection the coreset is selected on (the original: 128)."""
    k: PositiveInt = 1
    """Nearest memory patches whose distances are averaged into a patch score (the paper: 1)."""
    reweight_neighbours: PositiveInt = 9
    """Neighbours of the nearest memory patch used to re-weight the image score (the paper: b = 9)."""
    map_blur_sigma: NonNegative = 4.0
    """Gaussian blur of the map upsampled to ``image_size``, in pixels of that size."""
    seed: int = 0
    """Seed of the projection and of the coreset's first pick."""

    presets = {
        # the paper: WideResNet-50 stages 2 and 3, 10 % coreset, 224 px
        "paper": dict(backbone="wide_resnet50_2", weights="imagenet", out_indices=(2, 3), image_size=224,
                      neighbourhood=3, coreset_ratio=0.1, k=1, reweight_neighbours=9),
        # offline: the packaged EfficientNet-Lite0, stages of stride 8 and 16
        "fast": dict(backbone="tf_efficientnet_lite0", weights="packaged", out_indices=(2, 3), image_size=128,
                     neighbourhood=3, coreset_ratio=0.1, k=1, reweight_neighbours=9),
    }
    # fitted in one pass: only the batch size of its feature extraction applies
    recipes = {"paper": dict(epochs=1, batch_size=32), "fast": dict(epochs=1, batch_size=8)}

    def check(self) -> None:
        self.need(len(self.out_indices) >= 1 and len(set(self.out_indices)) == len(self.out_indices),
                  f"out_indices must be distinct backbone stages, got {self.out_indices}")
        self.need(0 < self.coreset_ratio <= 1, f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")


def greedy_coreset(features: Tensor, size: int, projection_dim: int, seed: int) -> Tensor:
    """Indices of ``size`` rows chosen by greedy k-centre selection: each pick is the row farthest
    from those already picked, distances measured on a random projection (Johnson-Lindenstrauss)."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n, device=features.device)
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim < x.shape[1]:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5
        x = x @ projection.to(x.device)
    chosen = torch.empty(size, dtype=torch.long, device=x.device)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = torch.cdist(x, x[chosen[:1]]).squeeze(1)
    for i in range(1, size):
        chosen[i] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, torch.cdist(x, x[chosen[i:i + 1]]).squeeze(1))
    return chosen


def nearest_distances(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(distances [Q, k], indices [Q, k])`` of each query's ``k`` nearest rows of ``bank``, in
    chunks of queries (bounded memory), or at once while exported (one graph for any batch)."""
    k = min(k, bank.shape[0])
    if torch.compiler.is_exporting():
        return nearest_rows(queries, bank, k)
    parts = [nearest_rows(part, bank, k) for part in queries.split(DISTANCE_CHUNK)]
    return torch.cat([d for d, _ in parts]), torch.cat([i for _, i in parts])


def nearest_rows(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Euclidean distances as ``|q|^2 - 2 q.b + |b|^2`` (what ``torch.cdist`` computes for large
    inputs too, written out so that it exports for any number of queries), ``k`` smallest."""
    squared = queries.pow(2).sum(1, keepdim=True) - 2 * queries @ bank.T + bank.pow(2).sum(1)
    d, i = squared.clamp_min(0).topk(k, dim=1, largest=False)
    return d.sqrt(), i


@register_model(space="search_spaces.patchcore")
class PatchCore(AnomalyModel):
    """Frozen CNN patch features against a coreset memory bank of the training normals."""

    name: ClassVar[str] = "patchcore"
    config_class: ClassVar[type] = PatchCoreConfig
    trains: ClassVar[bool] = False

    def __init__(self, config: PatchCoreConfig):
        super().__init__(config)
        self.backbone, self.weights_used = backbones.create_feature_backbone(
            config.backbone, config.weights, config.out_indices, self.name)
        self.register_buffer("memory_bank", torch.zeros(0, sum(self.backbone.feature_info.channels())))

    def frozen_modules(self):
        return [self.backbone]

    @torch.no_grad()
    def patch_features(self, x: Tensor) -> Tensor:
        """Locally aware patch features of a prepared batch on the finest used grid: ``[B, D, h, w]``."""
        self.backbone.eval()
        maps = backbones.cnn_maps(self.backbone, x)
        p = self.config.neighbourhood
        # zero padding counts: border patches shrink towards 0 and stop being the noisiest ones (averaged
        # over fewer cells they vary most), which otherwise decide the image's max (measured on the
        # surfaces family: image AUROC 0.85 without, 0.97 with)
        maps = [F.avg_pool2d(m, p, stride=1, padding=p // 2, count_include_pad=True) if p > 1 else m for m in maps]
        grid = max(m.shape[-2:] for m in maps)
        maps = [m if tuple(m.shape[-2:]) == tuple(grid) else
                F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(maps, dim=1)

    @torch.no_grad()
    def fit_statistics(self, loader: Iterable[dict[str, Any]]) -> None:
        """The memory bank: every training patch, reduced to a greedy coreset."""
        device = self.memory_bank.device
        patches = []
        for batch in loader:
            f = self.patch_features(self.prepare(batch["image"].to(device)))
            patches.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        if not patches:
            raise ValueError("patchcore.fit_statistics: the loader is empty; give it the training normals")
        features = torch.cat(patches)
        size = max(1, round(self.config.coreset_ratio * features.shape[0]))
        keep = greedy_coreset(features, size, self.config.projection_dim, self.config.seed)
        self.memory_bank = features[keep].contiguous()

    def patch_scores(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per patch of a prepared batch: score ``[B, h, w]``, nearest memory index ``[B, h*w]``, features ``[B, h*w, D]``."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patchcore: the memory bank is empty; call fit_statistics on the training normals")
        f = self.patch_features(x)
        b, d, h, w = f.shape
        flat = f.permute(0, 2, 3, 1).reshape(-1, d)
        dist, idx = nearest_distances(flat, self.memory_bank, self.config.k)
        return dist.mean(1).view(b, h, w), idx[:, 0].view(b, h * w), flat.view(b, h * w, d)

    def map_from_scores(self, scores: Tensor, out_size: tuple[int, int]) -> Tensor:
        maps = F.interpolate(scores.unsqueeze(1), size=out_size, mode="bilinear", align_corners=False)
        return gaussian_blur(maps, self.config.map_blur_sigma)

    def map_of(self, x: Tensor) -> Tensor:
        return self.score(x)[1]

    def reweighted_image_scores(self, scores: Tensor, nearest: Tensor, features: Tensor) -> Tensor:
        """The paper's eq. 7: ``s = (1 - softmax(-)[m*]) * s*`` over the ``b`` memory neighbours of
        the nearest memory patch ``m*`` of the most anomalous test patch (written as a softmax so
        that large distances cannot overflow the exponentials)."""
        flat = scores.flatten(1)
        top, where = flat.max(dim=1)
        b = min(self.config.reweight_neighbours, self.memory_bank.shape[0])
        if b <= 1:
            return top
        anchor = nearest.gather(1, where[:, None]).squeeze(1)                       # m* per image
        _, neighbours = nearest_distances(self.memory_bank[anchor], self.memory_bank, b)  # N_b(m*), m* first
        query = features.gather(1, where[:, None, None].expand(-1, 1, features.shape[-1])).squeeze(1)  # m_test*
        d = torch.linalg.vector_norm(self.memory_bank[neighbours] - query[:, None], dim=-1)
        return (1 - torch.softmax(d, dim=1)[:, 0]) * top

    @torch.no_grad()
    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(re-weighted image scores [B], maps [B, 1, s, s])``; needs ``fit_statistics``."""
        scores, nearest, features = self.patch_scores(x)
        maps = self.map_from_scores(scores, tuple(x.shape[-2:]))
        return self.reweighted_image_scores(scores, nearest, features), maps


__all__ = ["PatchCore", "PatchCoreConfig", "greedy_coreset", "nearest_distances"]
