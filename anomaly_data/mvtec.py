"""MVTec AD layout reader (also VisA converted to that layout, and our synthetic data).

::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/good/*.png
    <root>/<class>/test/<defect>/*.png
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png, as converted VisA)
"""

from __future__ import annotations

from pathlib import Path

from anomaly_data.records import (IMAGE_EXTENSIONS, ClassRecords, DatasetError, ImageRecord, list_images,
                                  select_classes)

NORMAL = "good"


def is_mvtec_class_dir(path: Path) -> bool:
    return (path / "train" / NORMAL).is_dir()


def find_mvtec_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_mvtec_class_dir(p))


def find_mask(gt_dir: Path, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask", image.stem):
        for ext in IMAGE_EXTENSIONS:
            for candidate in (gt_dir / f"{name}{ext}", gt_dir / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def read_mvtec_class(class_dir: Path) -> ClassRecords:
    name = class_dir.name
    train_dir = class_dir / "train" / NORMAL
    if not train_dir.is_dir():
        raise DatasetError(f"class folder {class_dir} has no train/good folder (MVTec AD layout expected)")
    records = ClassRecords(name)
    records.train = [ImageRecord(p, name, "train", 0) for p in list_images(train_dir)]
    if not records.train:
        raise DatasetError(f"{train_dir} holds no image: a class needs normal training images")
    test_dir = class_dir / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image in list_images(defect_dir):
                if defect == NORMAL:
                    records.test.append(ImageRecord(image, name, "test", 0, NORMAL))
                    continue
                mask = find_mask(class_dir / "ground_truth" / defect, image)
                if mask is None:
                    raise DatasetError(
                        f"anomalous test image {image} has no mask: expected "
                        f"{class_dir / 'ground_truth' / defect / (image.stem + '_mask.png')}; "
                        "add it or remove the image")
                records.test.append(ImageRecord(image, name, "test", 1, defect, mask))
    return records


def read_mvtec(root, classes: list[str] | None = None) -> dict[str, ClassRecords]:
    """Records per class of an MVTec-layout dataset under ``root`` (default: all classes)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder: check --root")
    chosen = select_classes(find_mvtec_classes(root), classes, root)
    return {c: read_mvtec_class(root / c) for c in chosen}
