"""In-memory torch datasets: each image is decoded and resized once, when the dataset is made."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from anomaly_data.io import read_image, read_mask
from anomaly_data.records import DatasetError, ImageRecord
from anomaly_data.transforms import as_hw, resize_image, resize_mask

log = logging.getLogger(__name__)


@dataclass
class ArrayDataset(Dataset):
    """Images ``uint8 [N, H, W, 3]`` and masks ``bool [N, H, W]`` with their labels.

    Items are dicts: ``image`` float ``[3, H, W]`` in [0, 1], ``mask`` float ``[1, H, W]``,
    ``label`` (0/1), ``class_index``, ``class_name``, ``defect``, ``path``.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    class_indices: np.ndarray
    class_names: list[str]
    defects: list[str]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.images)
        if not (len(self.masks) == len(self.labels) == len(self.class_indices) == len(self.defects)
                == len(self.paths) == n):
            raise ValueError("ArrayDataset: images, masks, labels, class_indices, defects and paths differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        mask = torch.from_numpy(self.masks[i]).float().unsqueeze(0)
        return {"image": image, "mask": mask, "label": int(self.labels[i]),
                "class_index": int(self.class_indices[i]),
                "class_name": self.class_names[int(self.class_indices[i])],
                "defect": self.defects[i], "path": self.paths[i]}

    def subset(self, indices) -> "ArrayDataset":
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(self.images[idx], self.masks[idx], self.labels[idx], self.class_indices[idx],
                            self.class_names, [self.defects[i] for i in idx], [self.paths[i] for i in idx])

    @staticmethod
    def concat(parts: list["ArrayDataset"]) -> "ArrayDataset":
        if not parts:
            raise ValueError("nothing to concatenate")
        return ArrayDataset(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                            np.concatenate([p.labels for p in parts]),
                            np.concatenate([p.class_indices for p in parts]), parts[0].class_names,
                            sum((p.defects for p in parts), []), sum((p.paths for p in parts), []),
                            sum((p.skipped for p in parts), []))


class TrainingImages(Dataset):
    """What a training step reads from an ``ArrayDataset``: ``image`` uint8 ``[3, H, W]`` (a
    quarter of float32's bytes to the device; the model's ``prepare`` converts it there) and
    ``class_index``."""

    def __init__(self, data: ArrayDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.data.images[i]).permute(2, 0, 1),
                "class_index": int(self.data.class_indices[i])}


def _load_one(record: ImageRecord, size) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(record.path)
    if record.mask_path is not None:
        mask = read_mask(record.mask_path, image.shape[:2], record.path)
    else:
        mask = np.zeros(image.shape[:2], dtype=bool)
    return resize_image(image, size), resize_mask(mask, size)


def load_records(records: list[ImageRecord], class_names: list[str], image_size,
                 skip_bad_images: bool = False) -> ArrayDataset:
    """Decode and resize every record once.

    An unreadable image raises ``DatasetError`` naming it; with ``skip_bad_images`` unreadable
    *training* images are skipped with a logged warning and listed in ``dataset.skipped``
    (test images are never skipped: the evaluation would silently change).
    """
    if not records:
        raise DatasetError("no image to load")
    h, w = as_hw(image_size)
    index = {c: i for i, c in enumerate(class_names)}
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_load_one, r, (h, w)) for r in records]
        images, masks, kept, skipped = [], [], [], []
        for record, fut in zip(records, futures):
            try:
                image, mask = fut.result()
            except DatasetError as err:
                if skip_bad_images and record.split == "train" and record.mask_path is None:
                    log.warning("skipping unreadable training image: %s", err)
                    skipped.append(str(record.path))
                    continue
                raise
            images.append(image)
            masks.append(mask)
            kept.append(record)
    if skipped:
        log.warning("skipped %d unreadable training image(s)", len(skipped))
    if not kept:
        raise DatasetError(f"every image was unreadable ({len(skipped)} skipped)")
    return ArrayDataset(np.stack(images), np.stack(masks), np.array([r.label for r in kept], dtype=np.int64),
                        np.array([index[r.class_name] for r in kept], dtype=np.int64), list(class_names),
                        [r.defect for r in kept], [str(r.path) for r in kept], skipped)
