"""Ensembles of anomaly detectors: normalisers, fusion rules, metrics and evaluation reports."""

from ensembles.ensemble import Ensemble, EnsembleError

__all__ = ["Ensemble", "EnsembleError"]
