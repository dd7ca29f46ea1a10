"""Overlay pictures: image, ground truth, each member's map and the fused map, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# blue -> cyan -> yellow -> red, a perceptually ordered heat scale
_ANCHORS = np.array([[0, 0, 130], [0, 180, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)


def heat(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [0, 1] -> ``uint8 [H, W, 3]`` colours."""
    x = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (x - lo)[..., None]
    return (_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def blend_heat(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    span = float(values.max() - values.min())
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return (image.astype(np.float32) * (1 - alpha) + heat(scaled).astype(np.float32) * alpha).astype(np.uint8)


def show_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask.astype(bool)] = (0.4 * out[mask.astype(bool)] + np.array([153, 0, 0])).astype(np.uint8)
    return out


def save_overlay(path: Path, image: np.ndarray, mask: np.ndarray, maps: dict[str, np.ndarray]) -> Path:
    """One row of tiles with a caption each; every map is min-max scaled within the image."""
    tiles = [("image", image), ("ground truth", show_mask(image, mask))]
    tiles += [(name, blend_heat(image, m)) for name, m in maps.items()]
    h, w = image.shape[:2]
    caption = 14
    canvas = Image.new("RGB", (w * len(tiles), h + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (name, tile) in enumerate(tiles):
        canvas.paste(Image.fromarray(tile), (i * w, caption))
        draw.text((i * w + 2, 1), name[: max(4, w // 7)], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
