"""What a reader finds on disk: one record per image, grouped by class and split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or value and says what to do."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset. ``mask_path`` is None for normal images."""

    path: Path
    class_name: str
    split: str  # "train" or "test"
    label: int  # 0 normal, 1 anomalous
    defect: str = "good"
    mask_path: Path | None = None


@dataclass
class ClassRecords:
    """The training and test images of one class."""

    name: str
    train: list[ImageRecord] = field(default_factory=list)
    test: list[ImageRecord] = field(default_factory=list)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def select_classes(found: list[str], wanted: list[str] | None, root: Path) -> list[str]:
    """Check ``wanted`` against the classes ``found`` under ``root``; default: all found."""
    if not found:
        raise DatasetError(f"no class folder found under {root}: check --root (it should hold one "
                           "folder per class, e.g. bottle/train/good)")
    if not wanted:
        return sorted(found)
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise DatasetError(f"unknown class(es) {unknown} under {root}; available: {sorted(found)}")
    return list(dict.fromkeys(wanted))
