"""Plain folders of your own images.

``read_folder`` takes the folders explicitly. As a dataset root (``--dataset folder``) a class
is a folder holding::

    normal/          normal images (required)
    normal_test/     normal images kept for testing (optional; otherwise a share of normal/)
    abnormal/        anomalous images (optional)
    masks/           masks matched to abnormal images by file stem (``<stem>.png`` or
                     ``<stem>_mask.png``; optional: without masks only image metrics exist)

The root is either one such class folder or a folder of them.
"""

from __future__ import annotations

import random
from pathlib import Path

from anomaly_data.mvtec import find_mask
from anomaly_data.records import ClassRecords, DatasetError, ImageRecord, list_images, select_classes


def read_folder(normal_dir, abnormal_dir=None, mask_dir=None, normal_test_dir=None, class_name: str | None = None,
                test_fraction: float = 0.2, seed: int = 0) -> ClassRecords:
    normal_dir = Path(normal_dir)
    if not normal_dir.is_dir():
        raise DatasetError(f"normal image folder {normal_dir} does not exist")
    name = class_name or normal_dir.parent.name
    normals = list_images(normal_dir)
    if not normals:
        raise DatasetError(f"{normal_dir} holds no image (extensions .png .jpg .bmp .tif .webp)")
    records = ClassRecords(name)
    if normal_test_dir is not None and Path(normal_test_dir).is_dir():
        train, test_normals = normals, list_images(Path(normal_test_dir))
    elif abnormal_dir is not None and Path(abnormal_dir).is_dir():
        if not 0.0 <= test_fraction < 1.0:
            raise DatasetError(f"test_fraction must be in [0, 1), got {test_fraction}")
        shuffled = normals[:]
        random.Random(seed).shuffle(shuffled)
        n_test = int(round(test_fraction * len(shuffled)))
        test_set = set(shuffled[:n_test])
        train = [p for p in normals if p not in test_set]
        test_normals = [p for p in normals if p in test_set]
    else:
        train, test_normals = normals, []
    records.train = [ImageRecord(p, name, "train", 0) for p in train]
    records.test = [ImageRecord(p, name, "test", 0) for p in test_normals]
    if abnormal_dir is not None and Path(abnormal_dir).is_dir():
        masks = Path(mask_dir) if mask_dir is not None and Path(mask_dir).is_dir() else None
        for image in list_images(Path(abnormal_dir)):
            mask = find_mask(masks, image) if masks else None
            if masks and mask is None:
                raise DatasetError(f"abnormal image {image} has no mask in {masks} (expected "
                                   f"{image.stem}.png or {image.stem}_mask.png); add it, or drop the "
                                   "masks folder to evaluate image scores only")
            records.test.append(ImageRecord(image, name, "test", 1, "abnormal", mask))
    return records


def read_folder_root(root, classes: list[str] | None = None, seed: int = 0) -> dict[str, ClassRecords]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder: check --root")
    class_dirs = [root] if (root / "normal").is_dir() else \
        sorted(p for p in root.iterdir() if p.is_dir() and (p / "normal").is_dir())
    chosen = select_classes([p.name for p in class_dirs], classes, root)
    by_name = {p.name: p for p in class_dirs}
    return {c: read_folder(by_name[c] / "normal", by_name[c] / "abnormal", by_name[c] / "masks",
                           by_name[c] / "normal_test", class_name=c, seed=seed) for c in chosen}
