"""Checks of a dataset before anything starts, cheap enough for a whole MVTec AD or VisA.

``check_masks`` compares mask and image sizes from the file headers only; ``verify_images``
checks each image's file structure without decoding its pixels, within a time bound;
``check_dataset`` runs both on what ``read_dataset`` found. Problems raise ``DatasetError``
naming the files and saying what to do, before hours of search are spent on bad input.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import Iterable

from PIL import Image

import anomaly_data.io  # noqa: F401  (sets the decompression-bomb limit used when reading)
from anomaly_data.records import ClassRecords, DatasetError, ImageRecord

log = logging.getLogger(__name__)

# verify_image on 900x900 photos (see the report): PNG 1.2 MB 0.7 ms warm / 1.9 ms from disk,
# JPEG 0.7 MB 0.1 / 0.3 ms (a full decode: 49 / 17 ms). A whole MVTec AD (5354 images, ~5 GB)
# takes about 10 s from a local disk; 60 s still fits its 3629 training images read at ~60 MB/s.
DEFAULT_TIME_LIMIT_S = 60.0
SHOWN = 5  # offenders listed in an error message
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
JPEG_END = b"\xff\xd9"


@dataclass
class VerifyResult:
    """What ``verify_images`` did: images checked, seconds spent, images left unchecked
    because the time bound was reached, and bad training images skipped (``skip_bad``)."""

    checked: int
    seconds: float
    unchecked: list[Path] = field(default_factory=list)
    bad: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        text = f"checked {self.checked} image(s) in {self.seconds:.1f} s"
        if self.bad:
            text += f"; {len(self.bad)} unreadable training image(s) will be skipped"
        if self.unchecked:
            text += (f"; {len(self.unchecked)} image(s) not checked before the run "
                     "(they are checked when loaded)")
        return text


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; the pixels are not decoded."""
    with Image.open(path) as img:
        return img.size


def read_problem(kind: str, path: Path, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return f"{kind} {path} does not exist"
    return f"cannot read {kind} {path} ({err})"


def mask_problem(record: ImageRecord) -> str | None:
    """Why the mask of ``record`` cannot be used, or None."""
    mask = record.mask_path
    try:
        mask_wh = image_size(mask)
    except READ_ERRORS as err:
        return read_problem("mask", mask, err) + f" (the mask of image {record.path})"
    try:
        image_wh = image_size(record.path)
    except READ_ERRORS as err:
        return read_problem("image", record.path, err) + f" (the image of mask {mask})"
    if mask_wh != image_wh:
        return (f"mask {mask} is {mask_wh[0]}x{mask_wh[1]} but its image {record.path} is "
                f"{image_wh[0]}x{image_wh[1]} (width x height)")
    return None


def listing(problems: list[str], title: str, advice: str) -> str:
    """One error message: the count, the first few problems, what to do."""
    lines = [f"{len(problems)} {title}:"] + [f"  {p}" for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    return "\n".join(lines + [advice])


def check_masks(records: Iterable[ImageRecord]) -> int:
    """Check that every mask of ``records`` exists, is readable and has its image's size.

    Only file headers are read. Returns the number of masks checked; raises ``DatasetError``
    listing the first few offenders and their count.
    """
    with_mask = [r for r in records if r.mask_path is not None]
    problems = [p for p in map(mask_problem, with_mask) if p]
    if problems:
        raise DatasetError(listing(problems, "ground-truth mask(s) cannot be used",
                                   "Resize each mask to the size of its image or fix the image/mask "
                                   "pairing; replace missing or unreadable files."))
    return len(with_mask)


def jpeg_is_complete(path: Path) -> bool:
    """True when the file ends with the JPEG end-of-image marker (a cut download does not)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - 64))
        return f.read().rstrip(b"\x00\r\n").endswith(JPEG_END)


def verify_image(path: Path) -> None:
    """Raise one of ``READ_ERRORS`` when ``path`` is not an intact image file."""
    with Image.open(path) as img:
        img.verify()
        jpeg = img.format == "JPEG"
    if jpeg and not jpeg_is_complete(path):
        # rare: decode to tell a truncated file (an error) from one with bytes after its end
        with Image.open(path) as img:
            img.load()


def skippable(record: ImageRecord) -> bool:
    """The images ``load_records(..., skip_bad_images=True)`` may skip: training normals."""
    return record.split == "train" and record.mask_path is None


def verify_images(records: Iterable[ImageRecord], time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
                  skip_bad: bool = False) -> VerifyResult:
    """Check each image's file without decoding its pixels: training images first, then test.

    PNG: every chunk is read and its CRC checked, so truncated and corrupted files are found.
    JPEG: only the header is parsed and the end-of-image marker looked for (a file without it
    is decoded once to decide); damage inside the compressed data is found only when loaded.
    Other formats (BMP, TIFF, WebP): only the header is parsed.

    Checking stops once ``time_limit_s`` seconds have passed (None: no bound); the images left
    are returned in ``unchecked``. Unreadable images raise ``DatasetError`` listing them;
    with ``skip_bad`` unreadable *training* images are returned in ``bad`` instead (test
    images are never skipped: the evaluation would silently change).
    """
    ordered = sorted(records, key=lambda r: r.split != "train")
    start = monotonic()
    bad, problems, checked = [], [], 0
    for record in ordered:
        if time_limit_s is not None and monotonic() - start >= time_limit_s:
            break
        checked += 1
        try:
            verify_image(record.path)
        except READ_ERRORS as err:
            if skip_bad and skippable(record):
                log.warning("unreadable training image, skipped: %s", read_problem("image", record.path, err))
                bad.append(record.path)
            else:
                problems.append(read_problem(f"{record.split} image", record.path, err))
    if problems:
        advice = ("Replace each file (or delete it), or pass --skip-bad-images to skip unreadable "
                  "training images with a warning (test images cannot be skipped).")
        raise DatasetError(listing(problems, "image file(s) cannot be read", advice))
    return VerifyResult(checked, monotonic() - start, [r.path for r in ordered[checked:]], bad)


def check_dataset(found: dict[str, ClassRecords], skip_bad: bool = False,
                  time_limit_s: float | None = DEFAULT_TIME_LIMIT_S) -> VerifyResult:
    """``check_masks`` then ``verify_images`` on every class ``read_dataset`` found."""
    check_masks(r for c in found.values() for r in c.test)
    result = verify_images([r for c in found.values() for r in c.train + c.test], time_limit_s, skip_bad)
    bad = set(result.bad)
    for name, records in found.items():
        if records.train and all(r.path in bad for r in records.train):
            raise DatasetError(f"every training image of class {name!r} is unreadable "
                               f"({len(records.train)}, e.g. {records.train[0].path}); replace the files")
    return result
