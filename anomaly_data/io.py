"""Reading images and masks with errors that name the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomaly_data.records import DatasetError

# MVTec / VisA images are at most a few megapixels; refuse decompression bombs politely
Image.MAX_IMAGE_PIXELS = 200_000_000


IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB of a loaded image; grayscale, palette, 16-bit and RGBA are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / top * 255.0).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB from an encoded image (PNG, JPEG, ...), as ``read_image`` reads a file;
    raises ``ValueError`` naming what PIL could not read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except IMAGE_ERRORS as err:
        raise ValueError(f"not an image PIL can read ({err})") from None


def read_image(path: Path) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB; grayscale, palette, 16-bit and RGBA images are converted."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist") from None
    except IMAGE_ERRORS as err:
        raise DatasetError(f"cannot read image {path} ({err}); replace or delete the file, "
                           "or pass --skip-bad-images to skip unreadable training images") from None
    return rgb


def read_mask(path: Path, expected_hw: tuple[int, int] | None = None, image_path: Path | None = None) -> np.ndarray:
    """``bool [H, W]``: every non-zero pixel is anomalous (VisA masks are not 0/255)."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except FileNotFoundError:
        raise DatasetError(f"mask {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot read mask {path} ({err}); replace the file") from None
    mask = arr > 0
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise DatasetError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                           f"{image_path} is {expected_hw[1]}x{expected_hw[0]} (width x height): "
                           "masks must have the size of their image")
    return mask
