"""Resizing (image bilinear, mask nearest) and per-backbone normalisation constants.

Images stay ``uint8`` until a batch is made; models take ``float`` images in ``[0, 1]`` and
normalise them for their own backbone (``models.base.normalize`` with these constants).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # tf_efficientnet_lite* and most ViTs
HALF_STD = (0.5, 0.5, 0.5)


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
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """``bool [H, W]`` resized with nearest neighbour, so it stays binary."""
    h, w = as_hw(size)
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
