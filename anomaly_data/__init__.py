"""Datasets: MVTec AD, VisA and folder readers, the synthetic generator, the validation set.

The names below load their module on first use, so that ``anomaly_data.io`` and
``anomaly_data.transforms`` (images with PIL and NumPy) import without torch: the exported
ensemble's runtime (``ensembles.runtime``) runs where torch is not installed.
"""

import importlib

_WHERE = {
    "ArrayDataset": "datasets", "TrainingImages": "datasets", "load_records": "datasets", "read_folder": "folder",
    "read_folder_root": "folder",
    "read_image": "io", "read_mask": "io", "read_mvtec": "mvtec", "ClassRecords": "records",
    "DatasetError": "records", "ImageRecord": "records", "DATASET_KINDS": "splits", "Splits": "splits",
    "prepare_splits": "splits", "read_dataset": "splits", "build_validation_set": "validation",
    "split_train_validation": "validation", "read_visa": "visa",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'anomaly_data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"anomaly_data.{_WHERE[name]}"), name)
