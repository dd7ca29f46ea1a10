"""HaloAE: an autoencoder with 2-D halo attention over frozen multi-scale CNN features.

After Mathian et al., "HaloAE: an HaloNet based local transformer auto-encoder for anomaly
detection and localization" (VISAPP 2023). Pipeline::

    image ─ frozen CNN ─> multi-scale features, resized to one grid (stride ``feature_stride``)
          ─ encoder: stem conv + bottleneck blocks around halo attention ─> narrow bottleneck
          ─ mirrored decoder ─> reconstructed features ─ small conv decoder ─> reconstructed image

Loss: (MSE + 1 - SSIM) on the features and on the (backbone-normalised) image.
Anomaly map: per-pixel feature reconstruction error, upsampled to the input size.

Differences from the original code, on purpose:

- the halo attention is real attention: the original's padding mask is inverted, which turns
  its attention into block averaging (see reference notes). Any map size works: the map is
  padded to a multiple of the block and the padded positions are masked out;
- the stem keeps the grid size ("same" padding), so no 60 -> 64 resize at the end;
- features are standardised per channel by default (``standardize_features``): raw VGG/
  EfficientNet features span very different scales, which slows training a lot;
- the image decoder ends with a linear conv: its target (a normalised image) can be negative;
- only the backbone layers that are used are run (VGG19 up to relu3_4, not all 16 convs), and
  inference skips the image decoder unless the image error is part of the map;
- no CutPaste head and a fixed loss weighting instead of the inverse-logistic schedule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import backbones, register_model
from models.base import AnomalyModel
from models.config import ConfigError, ModelConfig, NonNegative, NonNegativeInt, OddInt, PositiveInt
from models.layers.halo_attention import HaloAttention, check_halo_geometry
from models.layers.ssim import ssim


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HaloAEConfig(ModelConfig):
    """HaloAE hyper-parameters; the defaults are the ``fast`` preset."""

    weights: str = "packaged"
    """Backbone weights: "imagenet", "packaged" (tf_efficientnet_lite0 only), a file path, or "none"."""
    image_size: PositiveInt = 128
    """Input side in pixels."""
    backbone: str = "tf_efficientnet_lite0"
    """timm architecture of the frozen feature extractor (a ``vgg*`` or any features_only CNN)."""
    layers: tuple[int | str, ...] = (1, 2)
    """Feature layers: ``out_indices`` (ints) of a timm features_only CNN, or VGG layer names
    such as "relu1_1", "relu3_4" (block_conv, counted from 1) for a ``vgg*`` backbone."""
    feature_stride: PositiveInt = 4
    """Every feature map is resized to the grid ``image_size // feature_stride`` (larger maps are
    average-pooled, smaller ones bilinearly upsampled) and the maps are concatenated."""
    channels: tuple[PositiveInt, ...] = (64, 32, 16)
    """Encoder widths: the stem's output, then the output of each bottleneck stage; the last one
    is the bottleneck. The decoder mirrors them back."""
    heads: tuple[PositiveInt, ...] = (4, 4)
    """Attention heads of each encoder stage (the decoder mirrors them); one per stage."""
    kernels: tuple[OddInt, ...] = (3, 3)
    """Kernel of the conv after the attention in each encoder stage (odd); mirrored in the decoder."""
    dim_head: PositiveInt = 16
    """Width of one attention head; the attention's inner width is ``heads * dim_head`` whatever
    the stage width, so heads need not divide the channels."""
    block: PositiveInt = 8
    """Side b of the query blocks of the halo attention (in grid cells)."""
    halo: NonNegativeInt = 2
    """Halo h: each b x b query block attends to the (b + 2h) x (b + 2h) window around it."""
    standardize_features: bool = True
    """Standardise each feature channel (BatchNorm without affine parameters, cumulative running
    statistics) before reconstructing it. CNN features have very different scales per layer and
    channel (tens for deep VGG channels); standardised, every channel weighs the same in the
    loss and the map, and the reconstruction starts near the right scale, so training converges
    in far fewer steps. False reconstructs the raw features, as the original does."""
    stem_kernel: OddInt = 3
    """Kernel of the stem conv (features -> channels[0]), "same" padding."""
    image_decoder_width: PositiveInt = 32
    """Width of the first conv of the image decoder."""
    image_decoder_depth: NonNegativeInt = 1
    """Number of width-halving 3x3 convs of the image decoder before it upsamples."""
    feature_loss_weight: NonNegative = 1.0
    """Weight of (feature MSE + 1 - feature SSIM) in the loss."""
    image_loss_weight: NonNegative = 0.5
    """Weight of (image MSE + 1 - image SSIM) in the loss."""
    image_map_weight: NonNegative = 0.0
    """Weight of the image reconstruction error added to the anomaly map. 0 by default: a small
    conv decoder reconstructs images blurrily, so its error lights up every edge and texture
    detail of normal images too; the original's reported scores also use the feature map only."""

    presets = {
        # The original's architecture: VGG19 relu1_1, relu2_1, relu3_1, relu3_4 (704 channels) on a
        # 64 x 64 grid at 256 px, stem 5x5 to 234, stages 234 -> 234 -> 117 -> 58 -> 29.
        # (standardize_features=False reconstructs raw features as the original does.)
        "paper": dict(
            weights="imagenet", image_size=256, backbone="vgg19",
            layers=("relu1_1", "relu2_1", "relu3_1", "relu3_4"), feature_stride=4, standardize_features=True,
            channels=(234, 234, 117, 58, 29), heads=(4, 8, 8, 8), kernels=(3, 3, 5, 5),
            dim_head=16, block=12, halo=2, stem_kernel=5,
            image_decoder_width=380, image_decoder_depth=4,
            feature_loss_weight=1.0, image_loss_weight=0.5, image_map_weight=0.0,
        ),
        # Offline and small: EfficientNet-Lite0 strides 4 and 8 (24 + 40 channels) on a 32 x 32 grid.
        "fast": dict(
            weights="packaged", image_size=128, backbone="tf_efficientnet_lite0",
            layers=(1, 2), feature_stride=4, standardize_features=True,
            channels=(64, 32, 16), heads=(4, 4), kernels=(3, 3),
            dim_head=16, block=8, halo=2, stem_kernel=3,
            image_decoder_width=32, image_decoder_depth=1,
            feature_loss_weight=1.0, image_loss_weight=0.5, image_map_weight=0.0,
        ),
    }

    recipes = {
        # Adam 1e-4, weight decay 1e-5, batch 4, 251 "epochs" of 3000 samples each (the original
        # repeats the class's images to 3000 per epoch), no schedule, no clipping
        "paper": dict(lr=1e-4, epochs=251, samples_per_epoch=3000, batch_size=4, optimizer="adam",
                      weight_decay=1e-5, grad_clip=0.0),
        "fast": dict(lr=1e-3, epochs=20, batch_size=8, optimizer="adamw", weight_decay=1e-5, grad_clip=1.0),
    }

    def check(self) -> None:
        """The rules between fields (each field's type and range is checked by ``ModelConfig``)."""
        grid = self.image_size // self.feature_stride
        self.need(grid >= 1, f"image_size={self.image_size} / feature_stride={self.feature_stride} gives an "
                             "empty feature grid; lower feature_stride or raise image_size")
        self.need(len(self.layers) >= 1, "layers is empty; name at least one backbone layer")
        if self.backbone.startswith("vgg"):
            self.need(all(isinstance(x, str) and re.fullmatch(r"relu\d+_\d+", x) for x in self.layers),
                      f"for a VGG backbone, layers must be names like 'relu1_1', 'relu3_4'; got {self.layers}")
        else:
            self.need(all(isinstance(x, int) and x >= 0 for x in self.layers), f"for backbone {self.backbone!r}, "
                      f"layers must be features_only out_indices (integers >= 0); got {self.layers}")
        self.need(len(set(self.layers)) == len(self.layers), f"layers {self.layers} repeat a layer")
        stages = len(self.channels) - 1
        self.need(stages >= 1, f"channels={self.channels} must list >= 2 widths (the stem's output, then one "
                               "per encoder stage)")
        self.need(len(self.heads) == stages, f"heads={self.heads} must give one head count per encoder stage "
                                             f"({stages} stages, from channels={self.channels})")
        self.need(len(self.kernels) == stages, f"kernels={self.kernels} must give one odd kernel size per "
                                               f"encoder stage ({stages} stages)")
        check_halo_geometry(self.block, self.halo, self.owner)
        self.need(self.block <= grid, f"block={self.block} is larger than the {grid}x{grid} feature grid "
                  f"(image_size {self.image_size} // feature_stride {self.feature_stride}); the padding would be "
                  f"wasted work: choose block <= {grid} (block = {grid} is global attention)")
        self.need(self.feature_loss_weight > 0 or self.image_loss_weight > 0,
                  "feature_loss_weight and image_loss_weight are both 0: nothing to train")


class HaloBottleneck(nn.Module):
    """conv1x1-BN-ReLU -> halo attention -> ReLU -> conv kxk-BN -> + shortcut -> ReLU."""

    def __init__(self, c_in: int, c_out: int, heads: int, dim_head: int, block: int, halo: int, kernel: int):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.attention = HaloAttention(c_out, heads, dim_head, block, halo)
        self.mix = nn.Sequential(nn.Conv2d(c_out, c_out, kernel, padding=kernel // 2, bias=False),
                                 nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.mix(F.relu(self.attention(self.reduce(x))))
        return F.relu(y + self.shortcut(x))


def build_backbone(cfg: HaloAEConfig) -> tuple[nn.Module, list[int], str]:
    """(frozen feature extractor returning a list of maps, their channels, weights label)."""
    if cfg.backbone.startswith("vgg"):
        with backbones.frozen_init():
            try:
                net = backbones.VGGFeatures(cfg.backbone, cfg.layers)
            except backbones.WeightsError as err:
                raise ConfigError(f"haloae: {err}") from None
        label = backbones.load_weights_into(net, cfg.backbone, cfg.weights)
        return backbones.optimize_frozen_cnn(net), list(net.channels), label
    net, label = backbones.create_feature_backbone(cfg.backbone, cfg.weights, cfg.layers, cfg.owner, "layers")
    return net, list(net.feature_info.channels()), label


def resize_to_grid(maps: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
    """Bring every map to ``grid``: average-pool larger maps, bilinearly upsample smaller ones."""
    out = []
    for m in maps:
        if tuple(m.shape[-2:]) == grid:
            out.append(m)
        elif m.shape[-2] >= grid[0] and m.shape[-1] >= grid[1]:
            out.append(F.adaptive_avg_pool2d(m, grid))
        else:
            out.append(F.interpolate(m, size=grid, mode="bilinear", align_corners=False))
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------
def build_image_decoder(c_in: int, width: int, depth: int, upsamplings: int) -> nn.Sequential:
    """conv3x3-ReLU head, ``depth`` halvings, ``upsamplings`` x (2x bilinear + conv3x3-ReLU), linear RGB conv."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(inplace=True)]
    c = width
    for _ in range(depth):
        layers += [nn.Conv2d(c, max(c // 2, 8), 3, padding=1), nn.ReLU(inplace=True)]
        c = max(c // 2, 8)
    for _ in range(upsamplings):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                   nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(c, 3, 3, padding=1))  # linear: the normalised target can be negative
    return nn.Sequential(*layers)


@register_model(space="search_spaces.haloae")
class HaloAE(AnomalyModel):
    """HaloAE detector (see the module docstring).

    Map: mean over channels of the squared feature reconstruction error (standardised features
    by default), bilinearly upsampled to the input, plus ``image_map_weight`` times the image
    reconstruction error. Image score: the base rule, the maximum of the map blurred with
    sigma ``score_blur_sigma`` = 4 px (the original used the map's mean; a local maximum does
    not dilute small defects).
    """

    name = "haloae"
    config_class = HaloAEConfig

    def __init__(self, config: HaloAEConfig):
        super().__init__(config)
        cfg = config
        self.backbone, feature_channels, self.weights_used = build_backbone(cfg)
        self.feature_channels = sum(feature_channels)
        # momentum=None: running statistics are the plain average over all training batches,
        # exact after a few steps (an EMA would still be biased by its initial 0 / 1)
        self.feature_norm = (nn.BatchNorm2d(self.feature_channels, affine=False, momentum=None)
                             if cfg.standardize_features else nn.Identity())

        ch, heads, kernels = list(cfg.channels), list(cfg.heads), list(cfg.kernels)
        attn = dict(dim_head=cfg.dim_head, block=cfg.block, halo=cfg.halo)
        self.encoder = nn.Sequential(
            nn.Sequential(nn.Conv2d(self.feature_channels, ch[0], cfg.stem_kernel,
                                    padding=cfg.stem_kernel // 2, bias=False),
                          nn.BatchNorm2d(ch[0]), nn.ReLU(inplace=True)),
            *[HaloBottleneck(ch[i], ch[i + 1], heads[i], kernel=kernels[i], **attn) for i in range(len(heads))],
        )
        self.decoder = nn.Sequential(
            *[HaloBottleneck(ch[i + 1], ch[i], heads[i], kernel=kernels[i], **attn)
              for i in reversed(range(len(heads)))],
            nn.Conv2d(ch[0], self.feature_channels, 1),  # linear: features need not be >= 0
        )
        upsamplings = max(0, round(math.log2(cfg.feature_stride)))
        self.image_decoder = build_image_decoder(self.feature_channels, cfg.image_decoder_width,
                                                 cfg.image_decoder_depth, upsamplings)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    # ----- pieces ----------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Frozen multi-scale features of a prepared batch on the grid ``image_size //
        feature_stride``, standardised if configured (batch statistics in training, running
        statistics in eval)."""
        grid = (max(1, x.shape[-2] // self.config.feature_stride), max(1, x.shape[-1] // self.config.feature_stride))
        with torch.no_grad():
            return self.feature_norm(resize_to_grid(backbones.cnn_maps(self.backbone, x), grid))

    def reconstruct_features(self, features: Tensor) -> Tensor:
        return self.decoder(self.encoder(features))

    def reconstruct_image(self, features_hat: Tensor, size: tuple[int, int]) -> Tensor:
        image = self.image_decoder(features_hat)
        if tuple(image.shape[-2:]) != tuple(size):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return image

    # ----- interface -------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = self.prepare(batch["image"])
        feats = self.features(x)
        feats_hat = self.reconstruct_features(feats)
        x_hat = self.reconstruct_image(feats_hat, x.shape[-2:])
        parts = {
            "feature_mse": F.mse_loss(feats_hat, feats),
            "feature_ssim": 1.0 - ssim(feats_hat, feats),
            "image_mse": F.mse_loss(x_hat, x),
            "image_ssim": 1.0 - ssim(x_hat, x),
        }
        cfg = self.config
        parts["loss"] = (cfg.feature_loss_weight * (parts["feature_mse"] + parts["feature_ssim"])
                         + cfg.image_loss_weight * (parts["image_mse"] + parts["image_ssim"]))
        return parts

    def map_of(self, x: Tensor) -> Tensor:
        feats = self.features(x)
        feats_hat = self.reconstruct_features(feats)
        error = (feats_hat - feats).pow(2).mean(dim=1, keepdim=True)
        maps = F.interpolate(error, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.config.image_map_weight > 0:
            x_hat = self.reconstruct_image(feats_hat, x.shape[-2:])
            maps = maps + self.config.image_map_weight * (x_hat - x).pow(2).mean(dim=1, keepdim=True)
        return maps


__all__ = ["HaloAE", "HaloAEConfig", "HaloBottleneck"]
