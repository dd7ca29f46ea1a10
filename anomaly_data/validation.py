"""A validation set that never touches the test split.

A share of each class's *training* normals is held out; the validation set is those normals
plus copies of them carrying synthetic defects (with exact masks). Tuning, early stopping,
normalisation and fusion use this set only.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from anomaly_data.datasets import ArrayDataset
from anomaly_data.defects import apply_validation_defect
from anomaly_data.records import DatasetError, ImageRecord


def split_train_validation(records: list[ImageRecord], val_fraction: float, seed: int
                           ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out ``val_fraction`` of the training normals (at least one), deterministically."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(records) < 2:
        name = records[0].class_name if records else "?"
        raise DatasetError(f"class {name!r} has {len(records)} training image(s); at least 2 are needed "
                           "to hold one out for validation")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(len(records) - 1, max(1, int(round(val_fraction * len(records)))))
    held = set(order[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val


def build_validation_set(normals: ArrayDataset, seed: int, defects_per_normal: int = 1,
                         kinds=None) -> ArrayDataset:
    """``normals`` plus ``defects_per_normal`` defective copies of each, deterministic by seed."""
    if len(normals) == 0:
        raise DatasetError("no held-out normal image to build a validation set from")
    if defects_per_normal < 1:
        raise DatasetError(f"defects_per_normal must be >= 1, got {defects_per_normal}")
    images, masks, defects, paths, classes = [], [], [], [], []
    for i in range(len(normals)):
        for k in range(defects_per_normal):
            # seeded by the image's path below the dataset root, so a class gets the same
            # defects in any class mix and wherever the dataset lies
            key = "/".join(Path(normals.paths[i]).parts[-4:])
            rng = np.random.default_rng([seed, zlib.crc32(key.encode()), k])
            image, mask, kind = apply_validation_defect(normals.images[i], rng, kinds)
            images.append(image)
            masks.append(mask)
            defects.append(f"synthetic_{kind}")
            paths.append(f"{normals.paths[i]}#synthetic{k}")
            classes.append(normals.class_indices[i])
    defective = ArrayDataset(np.stack(images), np.stack(masks), np.ones(len(images), dtype=np.int64),
                             np.asarray(classes, dtype=np.int64), normals.class_names, defects, paths)
    return ArrayDataset.concat([normals, defective])
