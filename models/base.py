"""The interface every detector implements, and what they share.

A model takes images as float tensors ``[B, 3, H, W]`` in ``[0, 1]`` (RGB) and normalises them
itself for its backbone, so the ensemble can feed one tensor to every member. Batches are the
dicts produced by ``anomaly_data`` (keys ``image``, ``mask``, ``label``, ``class_index``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor, nn

from models import backbones
from models.layers.blur import gaussian_blur

# 1: every tensor; 2: no frozen tensor (the backbone is rebuilt from the config and checked
# against the stored digest of its tensors)
CHECKPOINT_FORMAT = 2


class ConfigError(ValueError):
    """An invalid model configuration (names the parameter and what to do)."""


def normalize(images: Tensor, mean, std) -> Tensor:
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


class AnomalyModel(nn.Module):
    """Base class: a detector built from a config dataclass.

    Subclasses set ``name``, ``config_class`` and ``presets`` (name -> dict of config
    overrides), and implement ``loss`` and ``anomaly_map``. Frozen parts (backbones, teachers)
    are registered in ``frozen_modules()`` and stay in eval mode even in ``train()``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # per preset, the training recipe (``models.training.Recipe`` fields) that goes with it
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}
    # sigma (in pixels of the input) of the blur applied before max-pooling the image score
    score_blur_sigma: ClassVar[float] = 4.0
    # False for a model that is fitted, not trained (no trainable parameter): its whole training
    # is one ``fit_statistics`` pass, with no optimiser, no epochs and no DDP
    trains: ClassVar[bool] = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weights_used = "random"  # set by subclasses: imagenet / packaged / file / random
        self._frozen_digest: str | None = None

    # ----- construction ----------------------------------------------------------------
    @classmethod
    def from_config(cls, preset: str | None = None, **overrides) -> "AnomalyModel":
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                raise ConfigError(f"{cls.name}: unknown preset {preset!r}; choose one of {sorted(cls.presets)}")
            values.update(cls.presets[preset])
        values.update(overrides)
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"{cls.name}: unknown config parameter(s) {unknown}; known: {sorted(fields)}")
        return cls(cls.config_class(**values))

    @classmethod
    def check_config(cls, config) -> None:
        """Checks that need no backbone, run before Ray starts; raise ``ConfigError``."""

    @classmethod
    def recipe(cls, preset: str | None):
        """The training recipe of ``preset`` (``Recipe()`` defaults for none)."""
        from models.training import Recipe

        if preset is not None and preset not in cls.presets:
            raise ConfigError(f"{cls.name}: unknown preset {preset!r}; choose one of {sorted(cls.presets)}")
        return Recipe(**cls.recipes.get(preset, {})) if preset else Recipe()

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    # ----- the interface ---------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``forward`` is the training loss, so that a DDP wrapper's hooks see it."""
        return self.loss(batch)

    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def anomaly_map(self, images: Tensor) -> Tensor:
        """``[B, 1, H, W]`` at the input resolution, higher = more anomalous."""
        raise NotImplementedError

    def image_score_from_map(self, maps: Tensor) -> Tensor:
        """Default rule: the maximum of the map blurred with ``score_blur_sigma``."""
        return gaussian_blur(maps, self.score_blur_sigma).flatten(1).amax(dim=1)

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(image scores [B], anomaly maps [B, 1, H, W])`` in one pass."""
        maps = self.anomaly_map(images)
        return self.image_score_from_map(maps), maps

    def image_score(self, images: Tensor) -> Tensor:
        return self.predict(images)[0]

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
        import timm

        frozen = self.frozen_state_keys()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.name,
            "config": self.config_dict(),
            "weights_used": self.weights_used,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items() if k not in frozen},
            "frozen": {"sha256": self.frozen_digest(), "tensors": len(frozen), "weights": self.config.weights,
                       "torch": torch.__version__, "timm": timm.__version__},
        }

    def save(self, path) -> None:
        torch.save(self.checkpoint(), str(path))

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
