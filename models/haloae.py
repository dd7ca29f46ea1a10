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

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import backbones
from models.base import AnomalyModel, ConfigError, normalize
from models.layers.halo_attention import HaloAttention, check_halo_geometry, positive_int
from models.layers.ssim import ssim




# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass
class HaloAEConfig:
    """HaloAE hyper-parameters; the defaults are the ``fast`` preset."""

    weights: str = "packaged"
    """Backbone weights: "imagenet", "packaged" (tf_efficientnet_lite0 only), a file path, or "none"."""
    image_size: int = 128
    """Input side in pixels."""
    backbone: str = "tf_efficientnet_lite0"
    """timm architecture of the frozen feature extractor (a ``vgg*`` or any features_only CNN)."""
    layers: tuple = (1, 2)
    """Feature layers: ``out_indices`` (ints) of a timm features_only CNN, or VGG layer names
    such as "relu1_1", "relu3_4" (block_conv, counted from 1) for a ``vgg*`` backbone."""
    feature_stride: int = 4
    """Every feature map is resized to the grid ``image_size // feature_stride`` (larger maps are
    average-pooled, smaller ones bilinearly upsampled) and the maps are concatenated."""
    channels: tuple = (64, 32, 16)
    """Encoder widths: the stem's output, then the output of each bottleneck stage; the last one
    is the bottleneck. The decoder mirrors them back."""
    heads: tuple = (4, 4)
    """Attention heads of each encoder stage (the decoder mirrors them); one per stage."""
    kernels: tuple = (3, 3)
    """Kernel of the conv after the attention in each encoder stage (odd); mirrored in the decoder."""
    dim_head: int = 16
    """Width of one attention head; the attention's inner width is ``heads * dim_head`` whatever
    the stage width, so heads need not divide the channels."""
    block: int = 8
    """Side b of the query blocks of the halo attention (in grid cells)."""
    halo: int = 2
    """Halo h: each b x b query block attends to the (b + 2h) x (b + 2h) window around it."""
    standardize_features: bool = True
    """Standardise each feature channel (BatchNorm without affine parameters, cumulative running
    statistics) before reconstructing it. CNN features have very different scales per layer and
    channel (tens for deep VGG channels); standardised, every channel weighs the same in the
    loss and the map, and the reconstruction starts near the right scale, so training converges
    in far fewer steps. False reconstructs the raw features, as the original does."""
    stem_kernel: int = 3
    """Kernel of the stem conv (features -> channels[0]), "same" padding."""
    image_decoder_width: int = 32
    """Width of the first conv of the image decoder."""
    image_decoder_depth: int = 1
    """Number of width-halving 3x3 convs of the image decoder before it upsamples."""
    feature_loss_weight: float = 1.0
    """Weight of (feature MSE + 1 - feature SSIM) in the loss."""
    image_loss_weight: float = 0.5
    """Weight of (image MSE + 1 - image SSIM) in the loss."""
    image_map_weight: float = 0.0
    """Weight of the image reconstruction error added to the anomaly map. 0 by default: a small
    conv decoder reconstructs images blurrily, so its error lights up every edge and texture
    detail of normal images too; the original's reported scores also use the feature map only."""

    def __post_init__(self) -> None:
        # JSON (Ray Tune, checkpoints edited by hand) gives lists: keep tuples
        for name in ("layers", "channels", "heads", "kernels"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))


PRESETS: dict[str, dict[str, Any]] = {
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


RECIPES: dict[str, dict[str, Any]] = {
    # Adam 1e-4, weight decay 1e-5, batch 4, 251 "epochs" of 3000 samples each (the original
    # repeats the class's images to 3000 per epoch), no schedule, no clipping
    "paper": dict(lr=1e-4, epochs=251, samples_per_epoch=3000, batch_size=4, optimizer="adam",
                  weight_decay=1e-5, grad_clip=0.0),
    "fast": dict(lr=1e-3, epochs=20, batch_size=8, optimizer="adamw", weight_decay=1e-5, grad_clip=1.0),
}


def check_config(cfg: HaloAEConfig) -> None:
    """Everything that can be checked before building the backbone."""
    n = "haloae"
    if not positive_int(cfg.image_size):
        raise ConfigError(f"{n}: image_size={cfg.image_size!r} must be a positive integer (pixels)")
    if not positive_int(cfg.feature_stride):
        raise ConfigError(f"{n}: feature_stride={cfg.feature_stride!r} must be a positive integer")
    grid = cfg.image_size // cfg.feature_stride
    if grid < 1:
        raise ConfigError(f"{n}: image_size={cfg.image_size} / feature_stride={cfg.feature_stride} gives an "
                          "empty feature grid; lower feature_stride or raise image_size")
    if not cfg.layers:
        raise ConfigError(f"{n}: layers is empty; name at least one backbone layer")
    is_vgg = cfg.backbone.startswith("vgg")
    if is_vgg and not all(isinstance(x, str) and re.fullmatch(r"relu\d+_\d+", x) for x in cfg.layers):
        raise ConfigError(f"{n}: for a VGG backbone, layers must be names like 'relu1_1', 'relu3_4'; got {cfg.layers}")
    if not is_vgg and not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in cfg.layers):
        raise ConfigError(f"{n}: for backbone {cfg.backbone!r}, layers must be features_only out_indices "
                          f"(integers >= 0); got {cfg.layers}")
    if len(set(cfg.layers)) != len(cfg.layers):
        raise ConfigError(f"{n}: layers {cfg.layers} repeat a layer")
    if len(cfg.channels) < 2 or not all(positive_int(c) for c in cfg.channels):
        raise ConfigError(f"{n}: channels={cfg.channels} must list >= 2 positive widths "
                          "(the stem's output, then one per encoder stage)")
    stages = len(cfg.channels) - 1
    if len(cfg.heads) != stages or not all(positive_int(h) for h in cfg.heads):
        raise ConfigError(f"{n}: heads={cfg.heads} must give one positive head count per encoder stage "
                          f"({stages} stages, from channels={cfg.channels})")
    if len(cfg.kernels) != stages or not all(positive_int(k) and k % 2 == 1 for k in cfg.kernels):
        raise ConfigError(f"{n}: kernels={cfg.kernels} must give one odd kernel size per encoder stage "
                          f"({stages} stages)")
    if not positive_int(cfg.stem_kernel) or cfg.stem_kernel % 2 == 0:
        raise ConfigError(f"{n}: stem_kernel={cfg.stem_kernel!r} must be an odd positive integer")
    if not positive_int(cfg.dim_head):
        raise ConfigError(f"{n}: dim_head={cfg.dim_head!r} must be a positive integer")
    check_halo_geometry(cfg.block, cfg.halo, n)
    if cfg.block > grid:
        raise ConfigError(f"{n}: block={cfg.block} is larger than the {grid}x{grid} feature grid "
                          f"(image_size {cfg.image_size} // feature_stride {cfg.feature_stride}); the padding "
                          f"would be wasted work: choose block <= {grid} (block = {grid} is global attention)")
    if not isinstance(cfg.standardize_features, bool):
        raise ConfigError(f"{n}: standardize_features={cfg.standardize_features!r} must be True or False")
    if not positive_int(cfg.image_decoder_width):
        raise ConfigError(f"{n}: image_decoder_width={cfg.image_decoder_width!r} must be a positive integer")
    if not isinstance(cfg.image_decoder_depth, int) or cfg.image_decoder_depth < 0:
        raise ConfigError(f"{n}: image_decoder_depth={cfg.image_decoder_depth!r} must be an integer >= 0")
    for name in ("feature_loss_weight", "image_loss_weight", "image_map_weight"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{n}: {name}={value!r} must be a finite number >= 0")
    if cfg.feature_loss_weight == 0 and cfg.image_loss_weight == 0:
        raise ConfigError(f"{n}: feature_loss_weight and image_loss_weight are both 0: nothing to train")


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


class VGGFeatures(nn.Module):
    """The convolutional stack of a timm VGG, cut after the deepest requested ReLU.

    ``features`` keeps timm's module indices, so its state-dict keys are those of the full
    model and ``backbones.load_weights_into`` fills it. The full model is built on the meta
    device (no memory, no init time) and only the kept layers are materialised.
    """

    def __init__(self, arch: str, layer_names: Sequence[str]):
        super().__init__()
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False)
        names: dict[str, int] = {}
        stage, conv, last_channels = 1, 0, {}
        channels = 3
        for index, module in enumerate(full.features):
            if isinstance(module, nn.MaxPool2d):
                stage, conv = stage + 1, 0
            elif isinstance(module, nn.Conv2d):
                conv += 1
                channels = module.out_channels
            elif isinstance(module, nn.ReLU):
                names[f"relu{stage}_{conv}"] = index
                last_channels[f"relu{stage}_{conv}"] = channels
        unknown = [n for n in layer_names if n not in names]
        if unknown:
            raise ConfigError(f"haloae: {arch} has no layer {unknown}; choose among {list(names)}")
        self.taps = [names[n] for n in layer_names]
        self.channels = [last_channels[n] for n in layer_names]
        kept = list(full.features)[: max(self.taps) + 1]
        self.features = nn.Sequential(*kept).to_empty(device="cpu")
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = set(self.taps)
        found: dict[int, Tensor] = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in taps:
                found[index] = x
        return [found[t] for t in self.taps]


def build_backbone(cfg: HaloAEConfig) -> tuple[nn.Module, list[int], str]:
    """(frozen feature extractor returning a list of maps, their channels, weights label)."""
    if cfg.backbone.startswith("vgg"):
        with backbones.frozen_init():
            net = VGGFeatures(cfg.backbone, cfg.layers)
        label = backbones.load_weights_into(net, cfg.backbone, cfg.weights)
        return backbones.optimize_frozen_cnn(net), list(net.channels), label
    try:
        net, label = backbones.create_feature_backbone(cfg.backbone, cfg.weights, cfg.layers)
    except (IndexError, AssertionError) as err:
        raise ConfigError(f"haloae: layers={cfg.layers} are not valid out_indices of {cfg.backbone!r} ({err})") from err
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"haloae: unknown timm backbone {cfg.backbone!r}") from err
        raise
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
    presets = PRESETS
    recipes = RECIPES
    check_config = staticmethod(check_config)

    def __init__(self, config: HaloAEConfig):
        check_config(config)
        super().__init__(config)
        cfg = config
        self.backbone, feature_channels, self.weights_used = build_backbone(cfg)
        self.feature_channels = sum(feature_channels)
        self.mean, self.std = backbones.input_normalization(cfg.backbone, cfg.weights)
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
    def normalized(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)

    def features(self, normalized_images: Tensor) -> Tensor:
        """Frozen multi-scale features on the grid ``input side // feature_stride``, standardised
        if configured (batch statistics in training, running statistics in eval)."""
        grid = (max(1, normalized_images.shape[-2] // self.config.feature_stride),
                max(1, normalized_images.shape[-1] // self.config.feature_stride))
        with torch.no_grad():
            return self.feature_norm(resize_to_grid(backbones.cnn_maps(self.backbone, normalized_images), grid))

    def reconstruct_features(self, features: Tensor) -> Tensor:
        return self.decoder(self.encoder(features))

    def reconstruct_image(self, features_hat: Tensor, size: tuple[int, int]) -> Tensor:
        image = self.image_decoder(features_hat)
        if tuple(image.shape[-2:]) != tuple(size):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return image

    # ----- interface -------------------------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = self.normalized(batch["image"])
        feats = self.features(images)
        feats_hat = self.reconstruct_features(feats)
        images_hat = self.reconstruct_image(feats_hat, images.shape[-2:])
        parts = {
            "feature_mse": F.mse_loss(feats_hat, feats),
            "feature_ssim": 1.0 - ssim(feats_hat, feats),
            "image_mse": F.mse_loss(images_hat, images),
            "image_ssim": 1.0 - ssim(images_hat, images),
        }
        cfg = self.config
        parts["loss"] = (cfg.feature_loss_weight * (parts["feature_mse"] + parts["feature_ssim"])
                         + cfg.image_loss_weight * (parts["image_mse"] + parts["image_ssim"]))
        return parts

    def anomaly_map(self, images: Tensor) -> Tensor:
        normalized = self.normalized(images)
        feats = self.features(normalized)
        feats_hat = self.reconstruct_features(feats)
        error = (feats_hat - feats).pow(2).mean(dim=1, keepdim=True)
        maps = F.interpolate(error, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.config.image_map_weight > 0:
            images_hat = self.reconstruct_image(feats_hat, images.shape[-2:])
            maps = maps + self.config.image_map_weight * (images_hat - normalized).pow(2).mean(dim=1, keepdim=True)
        return maps


__all__ = ["HaloAE", "HaloAEConfig", "HaloBottleneck", "PRESETS"]
