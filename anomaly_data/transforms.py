"""Resizing: images bilinear, masks nearest.

Images stay ``uint8`` until a batch is made; models take ``float`` images in ``[0, 1]`` and
normalise them for their own backbone (``models.backbones.input_normalization``), so one
tensor can feed every member of an ensemble.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def as_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """``uint8 [H, W, 3]`` resized to ``size`` (int or ``(h, w)``) with bilinear filtering."""
    h, w = as_hw(size)
    if image.shape[:2] == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # writable, like read_image's


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """``bool [H, W]`` resized with nearest neighbour, so it stays binary."""
    h, w = as_hw(size)
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
