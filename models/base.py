"""The interface every detector implements, and what they share.

The input contract, the same for every model: images are float tensors ``[B, 3, H, W]`` in
``[0, 1]`` (RGB) of any size; ``prepare`` resizes them to the config's ``image_size`` and
normalises them with the backbone's data config (its mean and std), in this one place; maps come
back at the size of the input. ``predict`` is the one scoring path (training validation, fusion
fitting, evaluation and queries all call it), so a model's image-score rule is the same
everywhere. Batches are the dicts produced by ``anomaly_data`` (keys ``image``, ``mask``,
``label``, ``class_index``, ...).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import backbones, checkpoint_files
from models.config import ModelConfig, Recipe
from models.layers.blur import gaussian_blur

# 1: every tensor; 2: no frozen tensor (the backbone is rebuilt from the config and checked
# against the stored digest of its tensors); both torch.save pickles. 3: format 2's content in a
# .safetensors file (models.checkpoint_files), the only one loaded
CHECKPOINT_FORMAT = 3


def at_size(maps: Tensor, images: Tensor) -> Tensor:
    """``maps`` resized (bilinear) to the height and width of ``images``."""
    if maps.shape[-2:] == images.shape[-2:]:
        return maps
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)


class AnomalyModel(nn.Module):
    """Base class: a detector built from its ``ModelConfig``.

    Subclasses set ``name`` and ``config_class`` (presets and recipes live on the config), are
    registered with ``models.register_model``, and implement ``loss`` and ``map_of`` (and
    ``score`` when the image score is not the blurred map's maximum). ``map_of`` and ``score``
    get prepared batches; ``loss(batch)`` and ``fit_statistics(loader)`` get the raw batches and
    call ``self.prepare`` on their images. Frozen parts (backbones,
    teachers) are registered in ``frozen_modules()`` and stay in eval mode even in ``train()``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    search_space: ClassVar[str] = ""  # the module of its search space (set by register_model)
    # the config field naming the timm architecture whose data config normalises the input
    # (None: no backbone, inputs stay in [0, 1])
    backbone_field: ClassVar[str | None] = "backbone"
    # sigma (in pixels of the model input, ``image_size``) of the blur before max-pooling the image score
    score_blur_sigma: ClassVar[float] = 4.0
    # False for a model that is fitted, not trained (no trainable parameter): its whole training
    # is one ``fit_statistics`` pass, with no optimiser, no epochs and no DDP
    trains: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weights_used = "random"  # set by subclasses: imagenet / packaged / file / random
        self.mean, self.std = ((0.0,) * 3, (1.0,) * 3) if self.backbone_field is None else \
            backbones.input_normalization(getattr(config, self.backbone_field), config.weights)
        # on the model's device with it: no host-to-device copy in every ``prepare`` (not in checkpoints)
        self.register_buffer("input_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self._frozen_digest: str | None = None

    # ----- construction ----------------------------------------------------------------
    @classmethod
    def from_config(cls, preset: str | None = None, **overrides) -> "AnomalyModel":
        return cls(cls.config_class.from_preset(preset, **overrides))

    @classmethod
    def recipe(cls, preset: str | None) -> Recipe:
        """The training recipe of ``preset`` (``Recipe()`` defaults for none)."""
        if preset is not None:
            cls.config_class.preset_values(preset)  # an unknown preset is a ConfigError
        return Recipe.build(cls.config_class.recipes.get(preset, {}) if preset else None)

    # ----- the interface ---------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``forward`` is the training loss, so that a DDP wrapper's hooks see it."""
        return self.loss(batch)

    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def prepare(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] (or uint8 in [0, 255], as training batches travel to the
        device), any size -> the model's input: ``image_size`` square, normalised for the backbone."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        side = self.config.image_size
        if tuple(images.shape[-2:]) != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return backbones.normalize(images, self.input_mean, self.input_std)

    def map_of(self, x: Tensor) -> Tensor:
        """``[B, 1, s, s]`` at the model's input size from a prepared batch, higher = more anomalous."""
        raise NotImplementedError

    def score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(image scores [B], maps [B, 1, s, s])`` from a prepared batch."""
        maps = self.map_of(x)
        return self.image_score_from_map(maps), maps

    def image_score_from_map(self, maps: Tensor) -> Tensor:
        """The default image-score rule: the maximum of the map blurred with ``score_blur_sigma``."""
        return gaussian_blur(maps, self.score_blur_sigma).flatten(1).amax(dim=1)

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(image scores [B], anomaly maps [B, 1, H, W])`` at the input's size, in one pass."""
        scores, maps = self.score(self.prepare(images))
        return scores, at_size(maps, images)

    def anomaly_map(self, images: Tensor) -> Tensor:
        """``[B, 1, H, W]`` at the input's size (needs no fitted image-score statistics)."""
        return at_size(self.map_of(self.prepare(images)), images)

    def fit_statistics(self, loader: Iterable[dict[str, Any]]) -> None:
        """Fit what is estimated after training on normal images; default: nothing."""

    # ----- frozen parts ----------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return []

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----- checkpoints -----------------------------------------------------------------
    def frozen_state_keys(self) -> set[str]:
        """State-dict keys of the frozen modules (rebuilt from the config, never saved)."""
        frozen = {id(m) for m in self.frozen_modules()}
        prefixes = [f"{name}." for name, m in self.named_modules() if id(m) in frozen]
        return {k for k in self.state_dict() if any(k.startswith(p) for p in prefixes)}

    def frozen_digest(self) -> str:
        """SHA-256 of the frozen tensors; computed once (they do not change unless loaded anew)."""
        if self._frozen_digest is None:
            state = self.state_dict()
            self._frozen_digest = backbones.tensors_digest({k: state[k] for k in self.frozen_state_keys()})
        return self._frozen_digest

    def checkpoint(self) -> dict[str, Any]:
        """What training changed (trainable parameters, fitted statistics) and how to rebuild
        the rest: the config names the backbone and its weights source; ``frozen`` holds the
        digest the rebuilt backbone must match."""
        frozen = self.frozen_state_keys()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.name,
            "config": self.config.to_dict(),
            "weights_used": self.weights_used,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items() if k not in frozen},
            "frozen": {"sha256": self.frozen_digest(), "tensors": len(frozen), "weights": self.config.weights,
                       "torch": torch.__version__, "timm": timm.__version__},
        }

    def save(self, path) -> None:
        """One ``.safetensors`` file: the checkpoint's tensors, the rest as JSON metadata."""
        checkpoint_files.write(path, checkpoint_files.encode_model(self.checkpoint()))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._frozen_digest = None  # a full (format 1) state dict replaces the frozen tensors too
        for prefix, module in self.named_modules():
            if getattr(module, "folded_batch_norms", None):
                state_dict = backbones.fold_state_dict(state_dict, f"{prefix}.", module.folded_batch_norms)
        # Buffers filled by fit_statistics (Gaussians, PCA bases) have data-dependent shapes:
        # take the saved shape before copying.
        for key, value in state_dict.items():
            owner_name, _, buf_name = key.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            if buf_name in owner._buffers and owner._buffers[buf_name] is not None \
                    and owner._buffers[buf_name].shape != value.shape:
                owner._buffers[buf_name] = torch.empty_like(value, device=owner._buffers[buf_name].device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
