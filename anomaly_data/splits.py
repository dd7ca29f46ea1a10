"""One call from a dataset root to train / validation / test datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from anomaly_data.cache import cached_datasets, splits_key
from anomaly_data.datasets import ArrayDataset, load_records
from anomaly_data.folder import read_folder_root
from anomaly_data.mvtec import read_mvtec
from anomaly_data.records import ClassRecords, DatasetError, ImageRecord
from anomaly_data.validation import build_validation_set, split_train_validation
from anomaly_data.visa import read_visa

DATASET_KINDS = ("mvtec", "visa", "folder", "synthetic")


def read_dataset(kind: str, root, classes: list[str] | None = None, seed: int = 0) -> dict[str, ClassRecords]:
    """Records per class for a dataset of ``kind`` under ``root``."""
    if kind in ("mvtec", "synthetic"):
        return read_mvtec(root, classes)
    if kind == "visa":
        return read_visa(root, classes)
    if kind == "folder":
        return read_folder_root(root, classes, seed=seed)
    raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {list(DATASET_KINDS)}")


@dataclass
class Splits:
    """Training normals, validation set (held-out normals + synthetic defects) and test split.

    ``test`` is loaded only when first used: tuning and fusion never need it.
    """

    class_names: list[str]
    image_size: int
    train: ArrayDataset
    validation: ArrayDataset
    test_records: list[ImageRecord] = field(repr=False)
    skip_bad_images: bool = False

    @cached_property
    def test(self) -> ArrayDataset:
        if not self.test_records:
            raise DatasetError(f"classes {self.class_names} have no test image")
        return load_records(self.test_records, self.class_names, self.image_size)

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + self.validation.skipped


def prepare_splits(kind: str, root, classes: list[str] | None = None, image_size: int = 128,
                   val_fraction: float = 0.2, seed: int = 0, skip_bad_images: bool = False,
                   defects_per_normal: int = 1, cache_dir: str | Path | None = None) -> Splits:
    """Read ``root``, hold out validation normals per class, add synthetic defects to them.

    With ``cache_dir`` the decoded training and validation arrays are stored there and reused
    by later calls with the same images and parameters (see ``anomaly_data.cache``).
    """
    per_class = read_dataset(kind, Path(root), classes, seed)
    names = list(per_class)
    train_records, val_records, test_records = [], [], []
    for name in names:
        train, val = split_train_validation(per_class[name].train, val_fraction, seed)
        train_records += train
        val_records += val
        test_records += per_class[name].test

    def decode() -> dict[str, ArrayDataset]:
        train_ds = load_records(train_records, names, image_size, skip_bad_images)
        val_normals = load_records(val_records, names, image_size, skip_bad_images)
        validation = build_validation_set(val_normals, seed, defects_per_normal)
        validation.skipped = val_normals.skipped
        return {"train": train_ds, "validation": validation}

    if cache_dir is None:
        datasets = decode()
    else:
        params = dict(classes=names, image_size=image_size, val_fraction=val_fraction, seed=seed,
                      skip_bad_images=skip_bad_images, defects_per_normal=defects_per_normal)
        key = splits_key(train_records + val_records, params)
        datasets = cached_datasets(Path(cache_dir), key, ("train", "validation"), decode)
    return Splits(names, image_size, datasets["train"], datasets["validation"], test_records, skip_bad_images)
