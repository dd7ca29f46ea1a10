"""HVQ-Trans: hierarchical vector-quantised transformer for feature reconstruction.

After Lu et al., "Hierarchical Vector Quantized Transformer for Multi-class Unsupervised
Anomaly Detection" (NeurIPS 2023). Written from the paper's description and the notes in
``reference/seed-models.md``; no code of the original repository is used.

Pipeline (``N = h*w`` tokens on the coarsest feature grid used)::

    image -> frozen EfficientNet stages (features_only, area-averaged to the coarsest grid, concatenated)
          -> 1x1 conv to ``embed_dim`` -> post-norm transformer encoder (as the original), outputs
             [projected tokens, layer 1, ..., layer L]
          -> level 1: VQ(layer L); level j >= 2: VQ([output L-j+1 || quantised level 1])
          -> post-norm transformer decoder: self-attention + cross-attention to the levels
          -> (class-specific) linear head -> reconstructed backbone features

Anomaly map: per-position L2 reconstruction error + ``ot_weight`` x the prototype
optimal-transport score of the lowest level's input against its codebook, upsampled
bilinearly to the input size. Image score: the maximum of the map average-pooled over
windows of one feature cell (16x16 px at the paper preset, as the original's
``avg_pool2d(16, stride 1)`` then max).

Differences from the original code, on purpose:

- the codebook (and head) of a class is chosen without the label at test time (the original
  reads the ground-truth class): :meth:`HVQTrans.predict_class` picks the class whose
  prototype (mean unit descriptor of its training images, fitted by ``fit_statistics``) is
  nearest in cosine, so the image is quantised once; before prototypes are fitted it picks
  the class whose codebooks quantise the image with the lowest total squared error
  (:meth:`HVQTrans.route_by_quantisation`, which quantises it with every class's codebooks);
- the quantiser's EMA statistics, its dead-code restarts and the OT score differ too, as
  ``layers/vector_quantizer.py`` and ``layers/ot_score.py`` say;
- unused backbone stages are cut off (the original runs the whole network and its head), and
  finer stages are area-averaged onto the grid instead of sampled bilinearly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import backbones, register_model
from models.base import AnomalyModel, at_size
from models.config import (ConfigError, Fraction, ModelConfig, NonNegative, OpenFraction, Positive, PositiveInt,
                           Range)
from models.layers.class_heads import ClassHeads
from models.layers.class_routing import (class_indices, fit_prototypes, nearest_prototype, prototypes_fitted,
                                         unit_descriptor)
from models.layers.ot_score import prototype_ot_score
from models.layers.transformer import DecoderLayer, EncoderLayer, PositionalEmbedding2d, decoder_memory_groups
from models.layers.vector_quantizer import ClassCodebooks, quantisation_error

MAX_LEVELS = 5


@dataclass(frozen=True)
class HVQTransConfig(ModelConfig):
    """HVQ-Trans hyper-parameters; the defaults are the ``fast`` preset."""

    backbone: str = "tf_efficientnet_lite0"
    """timm EfficientNet-family architecture used as the frozen feature extractor."""
    weights: str = "packaged"
    """Backbone weights: "imagenet", "packaged" (offline, tf_efficientnet_lite0 only), a file, "none"."""
    out_indices: tuple[Annotated[int, Range(0)], ...] = (1, 2, 3)
    """timm ``features_only`` stages; all are resized to the coarsest one's grid and concatenated."""
    image_size: PositiveInt = 128
    """Input side in pixels; must be a multiple of the coarsest stage's stride."""
    embed_dim: PositiveInt = 64
    """Encoder width d; levels >= 2 quantise 2d-dimensional vectors."""
    decoder_dim: PositiveInt = 128
    """Decoder width (the original: 2 x embed_dim); levels of another width are projected to it."""
    num_heads: PositiveInt = 4
    """Attention heads in encoder and decoder layers."""
    encoder_layers: PositiveInt = 2
    """Transformer encoder layers L; allows up to L + 1 levels."""
    decoder_layers: PositiveInt = 2
    """Transformer decoder layers (each cross-attends to one level, or a group of levels)."""
    ffn_dim: PositiveInt = 256
    """Hidden width of the feed-forward blocks."""
    dropout: Fraction = 0.1
    """Dropout in attention and feed-forward blocks."""
    levels: Annotated[int, Range(1, MAX_LEVELS + 1)] = 3
    """Depth of the quantiser hierarchy, 1 to 5 (the original: 5)."""
    codebook_size: Annotated[int, Range(2, 65537)] = 64
    """Codes per codebook (the original: 512)."""
    num_classes: PositiveInt = 1
    """Class-specific codebooks and heads; 1 = one model per class, >1 = unified model whose
    training batches carry "class_index" and whose test images are routed by predict_class."""
    class_specific_head: bool = True
    """One output head per class (the original's "expert switch"); False shares one head."""
    commitment_weight: NonNegative = 0.25
    """Weight of the summed commitment terms in the loss."""
    ema_decay: OpenFraction = 0.99
    """EMA decay of the codebook statistics."""
    ema_eps: Positive = 1e-5
    """Laplace smoothing of the EMA code counts."""
    dead_code_threshold: NonNegative = 0.01
    """Codes whose EMA usage (assignments per step) is below this are restarted; 0 disables."""
    ot_weight: NonNegative = 80.0
    """Weight of the optimal-transport score in the anomaly map (the original: 80; at the fast
    preset 80 beat 0 and 20 on pixel AUROC, 200 was better on two of three classes: searched)."""
    ot_temperature: Positive | None = None
    """Softmax temperature of the OT score; None = codebook_size (the original divides by it)."""

    presets = {
        "paper": dict(
            backbone="tf_efficientnet_b4", weights="imagenet", out_indices=(0, 1, 2, 3),  # 24+32+56+160
            image_size=224, embed_dim=256, decoder_dim=512, num_heads=8, encoder_layers=4,
            decoder_layers=4, ffn_dim=1024, dropout=0.1, levels=5, codebook_size=512,
            commitment_weight=0.25, ot_weight=80.0),
        "fast": dict(
            backbone="tf_efficientnet_lite0", weights="packaged", out_indices=(1, 2, 3),  # 24+40+112
            image_size=128, embed_dim=64, decoder_dim=128, num_heads=4, encoder_layers=2,
            decoder_layers=2, ffn_dim=256, dropout=0.1, levels=3, codebook_size=64,
            commitment_weight=0.25, ot_weight=80.0),
    }
    # the original: AdamW 1e-4 (wd 1e-4), batch 16, 1000 epochs, lr x0.1 after 800, clip 0.1
    recipes = {
        "paper": dict(lr=1e-4, epochs=1000, batch_size=16, optimizer="adamw", weight_decay=1e-4,
                      grad_clip=0.1, lr_step_epochs=800, lr_gamma=0.1),
        "fast": dict(lr=1e-3, epochs=20, batch_size=8, optimizer="adamw", weight_decay=1e-5, grad_clip=1.0),
    }

    def check(self) -> None:
        """The rules between fields (each field's type and range is checked by ``ModelConfig``)."""
        self.need(self.levels <= self.encoder_layers + 1,
                  f"levels={self.levels} needs encoder_layers >= {self.levels - 1} (level j quantises encoder "
                  f"output L-j+1), got encoder_layers={self.encoder_layers}")
        for name in ("embed_dim", "decoder_dim"):
            value = getattr(self, name)
            self.need(value % self.num_heads == 0 and value % 2 == 0,
                      f"{name}={value} must be even and divisible by num_heads={self.num_heads}")
        self.need(len(self.out_indices) >= 1 and len(set(self.out_indices)) == len(self.out_indices),
                  f"out_indices must be distinct backbone stages, got {self.out_indices}")


@register_model(space="search_spaces.hvq_trans")
class HVQTrans(AnomalyModel):
    name: ClassVar[str] = "hvq_trans"
    config_class: ClassVar[type] = HVQTransConfig

    def __init__(self, config: HVQTransConfig):
        super().__init__(config)
        c = config
        self.backbone, self.weights_used = backbones.create_feature_backbone(c.backbone, c.weights, c.out_indices, self.name)
        backbones.drop_stages_after_last(self.backbone)
        stride = max(self.backbone.feature_info.reduction())
        if c.image_size < stride or c.image_size % stride:
            raise ConfigError(f"hvq_trans: image_size={c.image_size} must be a multiple of the "
                              f"coarsest stage's stride {stride}")
        self.grid = c.image_size // stride
        self.feature_dim = sum(self.backbone.feature_info.channels())

        d, n_classes = c.embed_dim, c.num_classes
        self.input_proj = nn.Conv2d(self.feature_dim, d, kernel_size=1)
        self.encoder_pos = PositionalEmbedding2d(self.grid, self.grid, d)
        self.encoder = nn.ModuleList(EncoderLayer(d, c.num_heads, c.ffn_dim, c.dropout)
                                     for _ in range(c.encoder_layers))
        level_dims = [d] + [2 * d] * (c.levels - 1)
        self.quantizers = nn.ModuleList(
            ClassCodebooks(n_classes, c.codebook_size, dim, c.ema_decay, c.ema_eps, c.dead_code_threshold)
            for dim in level_dims)
        memory_dims = level_dims[1:] if c.levels > 1 else level_dims
        self.memory_proj = nn.ModuleList(nn.Identity() if dim == c.decoder_dim else nn.Linear(dim, c.decoder_dim)
                                         for dim in memory_dims)
        self.memory_groups = decoder_memory_groups(len(memory_dims), c.decoder_layers)
        self.decoder_pos = PositionalEmbedding2d(self.grid, self.grid, c.decoder_dim)
        self.decoder = nn.ModuleList(DecoderLayer(c.decoder_dim, c.num_heads, c.ffn_dim, c.dropout)
                                     for _ in range(c.decoder_layers))
        self.head = ClassHeads(n_classes if c.class_specific_head else 1, c.decoder_dim, self.feature_dim)
        # routing prototypes, one unit descriptor per class; all zero until fit_statistics
        self.register_buffer("class_prototypes", torch.zeros(n_classes, self.feature_dim))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # ----- stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def extract_features(self, x: Tensor) -> Tensor:
        """Backbone stages of a prepared batch, resized to the coarsest grid and concatenated:
        ``[B, F, h, w]``."""
        self.backbone.eval()
        maps = backbones.cnn_maps(self.backbone, x)
        # finer stages are area-averaged onto the grid (the original samples them bilinearly)
        return torch.cat([F.adaptive_avg_pool2d(m, self.grid) for m in maps], dim=1)

    def encode(self, features: Tensor) -> list[Tensor]:
        """``[projected tokens, layer 1, ..., layer L]``, each ``[B, N, embed_dim]``."""
        x = self.input_proj(features).flatten(2).transpose(1, 2)
        pos = self.encoder_pos().to(x.dtype)
        outputs = [x]
        for layer in self.encoder:
            x = layer(x, pos)
            outputs.append(x)
        return outputs

    def level_inputs(self, outputs: list[Tensor], top: Tensor) -> list[Tensor]:
        """Inputs of levels 2..depth: ``[output L-j+1 || quantised level 1]``."""
        top = top.to(outputs[0].dtype)
        return [torch.cat([outputs[-1 - j], top], dim=-1) for j in range(1, self.config.levels)]

    def quantize_hierarchy(self, outputs: list[Tensor], class_index: Tensor):
        """Quantised levels (straight-through), commitment terms, and the lowest level's input."""
        top, commitment = self.quantizers[0](outputs[-1], class_index)
        quantized, terms, lowest_input = [top], [commitment], outputs[-1]
        for quantizer, z in zip(self.quantizers[1:], self.level_inputs(outputs, top)):
            q, commitment = quantizer(z, class_index)
            quantized.append(q)
            terms.append(commitment)
            lowest_input = z
        return quantized, torch.stack(terms), lowest_input

    def decode(self, quantized: list[Tensor], class_index: Tensor) -> Tensor:
        """Reconstructed features ``[B, N, F]`` from the quantised levels."""
        levels = quantized[1:] if len(quantized) > 1 else quantized
        dtype = self.input_proj.weight.dtype
        memories = [proj(q.to(dtype)) for proj, q in zip(self.memory_proj, levels)]
        pos = self.decoder_pos().to(memories[0].dtype)
        x = memories[0]
        for layer, group in zip(self.decoder, self.memory_groups):
            memory = torch.cat([memories[i] for i in group], dim=1)
            x = layer(x, pos, memory, pos.repeat(len(group), 1))
        return self.head(x, class_index)

    def _class_index(self, values, batch_size: int, device) -> Tensor:
        return class_indices(values, batch_size, self.config.num_classes, device, self.name)

    # ----- the interface ---------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = self.prepare(batch["image"])
        class_index = self._class_index(batch.get("class_index"), x.shape[0], x.device)
        features = self.extract_features(x)
        outputs = self.encode(features)
        quantized, commitments, _ = self.quantize_hierarchy(outputs, class_index)
        reconstruction = self.decode(quantized, class_index)
        target = features.flatten(2).transpose(1, 2)
        rec_loss = F.mse_loss(reconstruction.float(), target.float())
        commitment = commitments.sum()
        return {"loss": rec_loss + self.config.commitment_weight * commitment,
                "reconstruction": rec_loss, "commitment": commitment}

    # ----- routing: which class's codebooks and head an image uses --------------------------
    @torch.no_grad()
    def fit_statistics(self, loader: Iterable[dict[str, Any]]) -> None:
        """Fit the routing prototypes (``layers.class_routing``) of a unified model; batches must
        carry "class_index". A one-class model fits nothing."""
        C, device = self.config.num_classes, self.class_prototypes.device
        if C == 1:
            return

        def descriptors():
            for batch in loader:
                x = self.prepare(batch["image"].to(device))
                yield unit_descriptor(self.extract_features(x)), self._class_index(batch.get("class_index"),
                                                                                    x.shape[0], device)

        prototypes, missing = fit_prototypes(descriptors(), C, self.feature_dim, device)
        if missing:
            warnings.warn(f"hvq_trans: no training image of class(es) {missing}: their prototypes stay "
                          "unfitted and images are routed by quantising them with every class")
        self.class_prototypes.copy_(prototypes)

    @property
    def prototypes_fitted(self) -> bool:
        return prototypes_fitted(self.class_prototypes)

    @torch.no_grad()
    def predict_class(self, images: Tensor) -> Tensor:
        """The class whose codebooks and head each image uses: ``[B]``.

        The nearest prototype (cosine) once ``fit_statistics`` has fitted them, otherwise the
        lowest quantisation error (:meth:`route_by_quantisation`).
        """
        return self._route(self.extract_features(self.prepare(images)))

    @torch.no_grad()
    def route_by_quantisation(self, images: Tensor) -> Tensor:
        """Class whose codebooks quantise each image with the lowest total squared error: ``[B]``."""
        return self._lowest_quantisation_error(self.encode(self.extract_features(self.prepare(images))))

    @torch.no_grad()
    def routing_agreement(self, images: Tensor) -> float:
        """Fraction of ``images`` that :meth:`predict_class` and :meth:`route_by_quantisation` route alike."""
        features = self.extract_features(self.prepare(images))
        outputs = self.encode(features)
        chosen = self._route(features, outputs)
        return (chosen == self._lowest_quantisation_error(outputs)).float().mean().item()

    def _route(self, features: Tensor, outputs: list[Tensor] | None = None) -> Tensor:
        """Only the quantisation rule needs the encoder ``outputs``; they are computed if not given."""
        if self.config.num_classes == 1:
            return torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        if self.prototypes_fitted:
            return nearest_prototype(unit_descriptor(features), self.class_prototypes)
        return self._lowest_quantisation_error(self.encode(features) if outputs is None else outputs)

    def _lowest_quantisation_error(self, outputs: list[Tensor]) -> Tensor:
        """All classes at once: level 1 is quantised in every class's codebook, the quantised
        level 1 of class c feeds the higher levels of class c."""
        C = self.config.num_classes
        expand = [o.float().unsqueeze(1).expand(-1, C, -1, -1) for o in outputs]  # [B, C, N, d]

        with torch.autocast(outputs[0].device.type, enabled=False):  # distances in float32
            total, top = quantisation_error(self.quantizers[0].embed.unsqueeze(0), expand[-1])
            for quantizer, z in zip(self.quantizers[1:], self.level_inputs(expand, top)):
                total = total + quantisation_error(quantizer.embed.unsqueeze(0), z)[0]
        return total.argmin(dim=1)

    def anomaly_map(self, images: Tensor, class_index: Tensor | None = None) -> Tensor:
        """``class_index`` picks the codebooks; by default :meth:`predict_class` chooses them."""
        return at_size(self.map_of(self.prepare(images), class_index), images)

    @torch.no_grad()
    def map_of(self, x: Tensor, class_index: Tensor | None = None) -> Tensor:
        """L2 reconstruction error + ``ot_weight`` x OT score, upsampled to the input size."""
        features = self.extract_features(x)
        outputs = self.encode(features)
        if class_index is None:
            class_index = self._route(features, outputs)
        else:
            class_index = self._class_index(class_index, x.shape[0], x.device)
        quantized, _, lowest_input = self.quantize_hierarchy(outputs, class_index)
        reconstruction = self.decode(quantized, class_index).float()
        target = features.flatten(2).transpose(1, 2).float()
        score = torch.linalg.vector_norm(reconstruction - target, dim=-1)
        if self.config.ot_weight > 0:
            codebook = self.quantizers[-1].embed[class_index]
            with torch.autocast(x.device.type, enabled=False):
                temperature = float(self.config.ot_temperature or self.config.codebook_size)
                ot = prototype_ot_score(lowest_input.float(), codebook, temperature)
            score = score + self.config.ot_weight * ot
        grid = score.view(-1, 1, self.grid, self.grid)
        return F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def image_score_from_map(self, maps: Tensor) -> Tensor:
        """Maximum of the map average-pooled over one feature cell (16 px at 224 px / 14x14)."""
        cell = max(1, round(maps.shape[-1] / self.grid))
        # a cell x cell mean as two 1-D means: same values, 5x faster at 256 px (avg_pool2d sums whole windows)
        column_means = F.avg_pool2d(maps, kernel_size=(cell, 1), stride=1)
        return F.avg_pool2d(column_means, kernel_size=(1, cell), stride=1).flatten(1).amax(dim=1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # checkpoints saved before routing prototypes existed load unfitted (quantisation routing)
        if "class_prototypes" not in state_dict:
            state_dict = {**state_dict, "class_prototypes": torch.zeros_like(self.class_prototypes)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
