"""Ensembles of anomaly detectors: normalisers, fusion rules, metrics and evaluation reports."""
