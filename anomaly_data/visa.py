"""VisA reader: straight from the original release (``split_csv/1cls.csv``) or already
converted to the MVTec layout (``<root>/<object>/train/good`` ...).

``1cls.csv`` has the columns ``object, split, label, image, mask``; paths are relative to the
VisA root; ``label`` is ``normal`` or ``anomaly``; masks mark anomalies with any non-zero value.
"""

from __future__ import annotations

import csv
from pathlib import Path

from anomaly_data.mvtec import find_mvtec_classes, read_mvtec
from anomaly_data.records import ClassRecords, DatasetError, ImageRecord, select_classes

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")


def _inside_root(root: Path, relative: str, csv_path: Path, row: int) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DatasetError(f"{csv_path} row {row}: path {relative!r} leaves the dataset root {root}; "
                           "fix the CSV")
    return path


def read_visa_csv(root: Path, classes: list[str] | None = None) -> dict[str, ClassRecords]:
    csv_path = root / SPLIT_CSV
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path} lacks the column(s) {missing}; expected {list(CSV_COLUMNS)}")
        rows = list(reader)
    found = sorted({r["object"] for r in rows})
    chosen = select_classes(found, classes, root)
    out = {c: ClassRecords(c) for c in chosen}
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        if r["object"] not in out:
            continue
        split, label = r["split"].strip(), r["label"].strip()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise DatasetError(f"{csv_path} row {i}: split {split!r} / label {label!r} not understood "
                               "(expected train|test and normal|anomaly)")
        image = _inside_root(root, r["image"], csv_path, i)
        if not image.is_file():
            raise DatasetError(f"{csv_path} row {i}: image {image} does not exist")
        if label == "normal":
            record = ImageRecord(image, r["object"], split, 0, "good")
        else:
            if not r["mask"]:
                raise DatasetError(f"{csv_path} row {i}: anomalous image {image} has no mask")
            mask = _inside_root(root, r["mask"], csv_path, i)
            if not mask.is_file():
                raise DatasetError(f"{csv_path} row {i}: mask {mask} of image {image} does not exist")
            record = ImageRecord(image, r["object"], split, 1, "bad", mask)
        if split == "train" and record.label == 1:
            raise DatasetError(f"{csv_path} row {i}: anomalous image {image} in the train split")
        getattr(out[r["object"]], split).append(record)
    for name, recs in out.items():
        if not recs.train:
            raise DatasetError(f"{csv_path}: class {name!r} has no training image")
    return out


def read_visa(root, classes: list[str] | None = None) -> dict[str, ClassRecords]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder: check --root")
    if (root / SPLIT_CSV).is_file():
        return read_visa_csv(root, classes)
    if find_mvtec_classes(root):
        return read_mvtec(root, classes)
    raise DatasetError(f"{root} is not a VisA root: expected {root / SPLIT_CSV} (original release) "
                       "or one folder per object with train/good (converted layout)")
