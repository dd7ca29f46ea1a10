"""Ensembles of anomaly detectors: normalisers, fusion rules, metrics and evaluation reports.

``Ensemble`` loads on first use, so that ``ensembles.runtime`` (the exported ensemble's loader)
imports without torch.
"""

import importlib

__all__ = ["Ensemble", "EnsembleError"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'ensembles' has no attribute {name!r}")
    return getattr(importlib.import_module("ensembles.ensemble"), name)
