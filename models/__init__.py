"""The detectors behind one interface, and a registry.

>>> from models import create_model
>>> model = create_model("haloae", preset="fast")
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import warnings
from pathlib import Path

import timm
import torch

from models import checkpoint_files
from models.base import CHECKPOINT_FORMAT, AnomalyModel
from models.config import ConfigError, ModelConfig

# The one registry: a model is one file in models/ whose class carries @register_model.
_MODELS: dict[str, type[AnomalyModel]] = {}
_NOT_MODELS = {"base", "backbones", "checkpoint_files", "config", "layers", "training"}


def register_model(space: str):
    """Class decorator: registers the model under its ``name``, with ``space`` the module of its
    search space (``search_spaces.<file>``); the config learns the name it reports errors under."""
    def add(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if _MODELS.get(cls.name, cls) is not cls:
            raise ValueError(f"two models are registered as {cls.name!r}: {_MODELS[cls.name]} and {cls}")
        if not issubclass(cls.config_class, ModelConfig):
            raise TypeError(f"{cls.name}: its config_class must derive from models.config.ModelConfig")
        needed = {"image_size", "weights"} | ({cls.backbone_field} if cls.backbone_field else set())
        missing = sorted(needed - set(cls.config_class.field_types()))
        if missing:
            raise TypeError(f"{cls.name}: its config lacks the field(s) {missing} every model has (the input "
                            "contract resizes to image_size; checkpoints record the weights)")
        cls.config_class.owner = cls.name
        cls.search_space = space
        _MODELS[cls.name] = cls
        return cls
    return add


def _registry() -> dict[str, type[AnomalyModel]]:
    _import_model_files()
    return _MODELS


@functools.cache
def _import_model_files() -> None:
    """Import every model file of this package once (its decorator registers it)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_MODELS:
            importlib.import_module(f"{__name__}.{info.name}")


def model_names() -> list[str]:
    return sorted(_registry())


def model_class(name: str) -> type[AnomalyModel]:
    models = _registry()
    if name not in models:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(models)}")
    return models[name]


def create_model(name: str, preset: str | None = None, **config) -> AnomalyModel:
    """Build model ``name`` from an optional preset (``paper``, ``fast``, ...) plus overrides."""
    return model_class(name).from_config(preset, **config)


def load_model(path, map_location="cpu") -> AnomalyModel:
    """Rebuild a model saved with ``model.save(path)`` (a ``.safetensors`` file: nothing in it runs).

    The file holds what training changed; the frozen backbone is rebuilt from the config's
    weights source (a random one from its fixed seed) and must match the digest saved with it.
    A pickled checkpoint of an earlier version is refused with how to convert it
    (``python -m ensembles.convert``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return model_from_bytes(path.read_bytes(), path, map_location)


def model_from_bytes(data: bytes, path: Path, map_location="cpu") -> AnomalyModel:
    """``load_model`` of a checkpoint file's bytes, already read (``path`` names it in errors)."""
    tensors, meta = checkpoint_files.decode(data, str(path))
    if meta.get("format") != CHECKPOINT_FORMAT or "model" not in meta:
        raise ConfigError(f"{path} is not a model checkpoint this version reads (format {CHECKPOINT_FORMAT}; found "
                          f"{meta.get('format')!r}, kind {meta.get('kind')!r}): retrain it with this version")
    return model_from_checkpoint({**meta, "state_dict": tensors}, path).to(map_location)


def model_from_checkpoint(ckpt: dict, path: Path) -> AnomalyModel:
    """The model of a checkpoint's content (``AnomalyModel.checkpoint()``: no frozen tensor);
    ``path`` names it in errors."""
    model = _rebuild(ckpt, path)
    saved = ckpt["frozen"]
    if model.frozen_digest() != saved["sha256"]:
        raise ConfigError(
            f"{path}: the frozen backbone rebuilt from weights={saved['weights']!r} differs from the one this "
            f"model was trained with (saved with torch {saved['torch']}, timm {saved['timm']}; this is torch "
            f"{torch.__version__}, timm {timm.__version__}): load it with those versions and the same weights")
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    lacking = sorted(set(missing) - model.frozen_state_keys())
    if lacking or unexpected:
        raise ConfigError(f"{path} does not fit {ckpt['model']} with its saved config: "
                          f"missing {lacking[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.weights_used = ckpt["weights_used"]
    return model


def _rebuild(ckpt: dict, path: Path) -> AnomalyModel:
    """The model of ``ckpt``'s config, its frozen parts from their weights source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return model_class(ckpt["model"]).from_config(None, **ckpt["config"])
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"{path}: cannot rebuild its frozen backbone from weights="
                              f"{ckpt['config'].get('weights')!r} ({type(err).__name__}: {err}); make those "
                              "weights available (the timm hub or cache for 'imagenet', the file for a path)") from err


def model_from_full_state(ckpt: dict, path: Path) -> AnomalyModel:
    """A checkpoint of format 1 (every tensor, the frozen backbone's included; ``ensembles.convert``
    reads those)."""
    model = _rebuild({**ckpt, "config": {**ckpt["config"], "weights": "none"}}, path)
    model.load_state_dict(ckpt["state_dict"])
    model.config = model.config.replace(weights=ckpt["config"]["weights"])
    model.weights_used = ckpt["weights_used"]
    return model


__all__ = ["AnomalyModel", "ConfigError", "ModelConfig", "create_model", "load_model", "model_class",
           "model_from_bytes", "model_from_checkpoint", "model_names", "register_model"]

