"""The detectors behind one interface, and a registry.

>>> from models import create_model
>>> model = create_model("haloae", preset="fast")
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

from models.base import CHECKPOINT_FORMAT, AnomalyModel, ConfigError

# name -> "module:Class"; adding a model is one file in models/ and one line here
_REGISTRY = {
    "haloae": "models.haloae:HaloAE",
    "hvq_trans": "models.hvq_trans:HVQTrans",
    "transformaly": "models.transformaly:Transformaly",
    "patchcore": "models.patchcore:PatchCore",
}


def model_names() -> list[str]:
    return list(_REGISTRY)


def model_class(name: str) -> type[AnomalyModel]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {model_names()}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(name: str, preset: str | None = None, **config) -> AnomalyModel:
    """Build model ``name`` from an optional preset (``paper``, ``fast``, ...) plus overrides."""
    return model_class(name).from_config(preset, **config)


def load_model(path, map_location="cpu") -> AnomalyModel:
    """Rebuild a model saved with ``model.save(path)``; the file holds every weight it needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise ConfigError(f"{path} is not a model checkpoint of this version (format {CHECKPOINT_FORMAT})")
    config = dict(ckpt["config"])
    config["weights"] = "none"  # the backbone's tensors come from the checkpoint itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(ckpt["model"]).from_config(None, **config)
    model.load_state_dict(ckpt["state_dict"])
    model.config.weights = ckpt["config"]["weights"]
    model.weights_used = ckpt["weights_used"]
    return model


__all__ = ["AnomalyModel", "ConfigError", "create_model", "load_model", "model_class", "model_names"]
