"""The second benchmark family: other surfaces, other defect makers.

Selected on one kind of defect, tested on another: the validation defects (``anomaly_data.defects``:
pasted foreign textures, CutPaste, scars, and in-place distortions and re-toned regions in
Perlin-shaped masks) and the first family's test defects (scratch, hole, stain, contamination,
missing part) are made by other code. This family's defects are subtle surface changes made by
other means (Gaussian bumps and their gradients, random-walk fibres, ellipses of wear, shading
ridges), and its classes are cut from other photos or rendered, so that a choice fitted to our
validation defects is measured on defects it never saw:

- classes: ``moon`` (lunar surface) and ``cell`` (microscopy) crops of scikit-image photos that
  no other generator uses for normals, ``weave`` (rendered fabric) and ``brushed`` (rendered
  brushed metal);
- defects: ``dent`` (a local displacement of the surface with a shading change), ``smudge``
  (a soft, low-contrast tone change), ``fibre`` (a thin, long, wandering thread), ``abrasion``
  (a worn patch: locally blurred, lower contrast) and ``crease`` (a ridge of light and shadow).

Every mask marks the pixels that changed by at least ``MIN_DELTA`` grey levels.

    python -m anomaly_data.synthetic OUT_DIR --family surfaces
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from anomaly_data.defects import changed_pixels, ellipse_mask
from anomaly_data.transforms import resize_image

CLASSES = ("moon", "cell", "weave", "brushed")
DEFECT_KINDS = ("dent", "smudge", "fibre", "abrasion", "crease")
MIN_DELTA = 5
TINTS = {"moon": (0.95, 0.93, 0.90), "cell": (0.80, 0.88, 1.00), "weave": (0.62, 0.55, 0.95),
         "brushed": (0.92, 0.94, 0.97)}


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    return (img[..., :3].mean(axis=2) if img.ndim == 3 else img).astype(np.float32)


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    side = int(min(photo.shape) * 0.45)
    y = int(rng.integers(0, photo.shape[0] - side + 1))
    x = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = np.rot90(photo[y:y + side, x:x + side], int(rng.integers(4)))
    return resize_image(np.ascontiguousarray(crop[..., None].repeat(3, axis=2)).astype(np.uint8), size)[..., 0]


def _weave(size: int, rng: np.random.Generator) -> np.ndarray:
    period = size / rng.uniform(15.5, 16.5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + rng.uniform(0, period, 2)[:, None, None]
    warp = np.sin(2 * np.pi * xx / period)
    weft = np.sin(2 * np.pi * yy / period)
    over = np.sign(np.sin(np.pi * xx / period) * np.sin(np.pi * yy / period))
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 0.7) * 8
    return 130 + 45 * np.where(over > 0, np.abs(warp), np.abs(weft)) + grain


def _brushed(size: int, rng: np.random.Generator) -> np.ndarray:
    streaks = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), (0.6, size / 6))
    light = np.linspace(0, 1, size)[None, :] * rng.uniform(10, 20)
    return 150 + 250 * streaks + light + rng.normal(0, 1.5, (size, size))


def render_normal(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if class_name in ("moon", "cell"):
        gray = _crop(_photo(class_name), size, rng).astype(np.float32)
    elif class_name == "weave":
        gray = _weave(size, rng)
    else:
        gray = _brushed(size, rng)
    rgb = gray[..., None] * np.asarray(TINTS[class_name], dtype=np.float32) * rng.uniform(0.97, 1.03)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ----- defects ---------------------------------------------------------------------------
def _centre(size: int, rng: np.random.Generator, margin: float = 0.2) -> tuple[float, float]:
    return tuple(float(v) for v in rng.uniform(margin * size, (1 - margin) * size, 2))


def _soft_blob(size: int, rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """A smooth bump in [0, 1] made of a few overlapping Gaussians (not a Perlin threshold)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = _centre(size, rng)
    out = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        oy, ox = rng.normal(0, radius[0] * 0.4, 2)
        r = rng.uniform(*radius)
        out = np.maximum(out, np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * r * r)))
    return out


def dent(image, rng):
    size = image.shape[0]
    bump = _soft_blob(size, rng, (0.04 * size, 0.08 * size))
    gy, gx = np.gradient(bump)
    strength = rng.uniform(4, 8) * size / 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coords = [yy + strength * gy * size / 8, xx + strength * gx * size / 8]
    warped = np.stack([ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="reflect")
                       for c in range(3)], axis=-1)
    shade = 1 + rng.uniform(0.12, 0.25) * (gx - gy)[..., None] * size / 4
    out = np.clip(warped * shade, 0, 255).astype(np.uint8)
    return out, changed_pixels(image, out, bump > 1e-3, MIN_DELTA)   # the warp reaches far into the tails


def smudge(image, rng):
    size = image.shape[0]
    blob = _soft_blob(size, rng, (0.05 * size, 0.12 * size))
    gain = rng.uniform(0.55, 0.75) if rng.random() < 0.6 else rng.uniform(1.3, 1.5)
    factor = 1 + (gain - 1) * blob[..., None]
    out = np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)
    return out, changed_pixels(image, out, blob > 0.05, MIN_DELTA)


def fibre(image, rng):
    size = image.shape[0]
    y, x = _centre(size, rng)
    heading = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.uniform(0.4, 0.8) * size)):
        heading += rng.normal(0, 0.15)
        y, x = y + np.sin(heading), x + np.cos(heading)
        if 0 <= int(y) < size and 0 <= int(x) < size:
            mask[int(y), int(x)] = True
    if size >= 200:   # iterations=0 would dilate until nothing changes
        mask = ndimage.binary_dilation(mask, iterations=size // 200)
    tone = rng.uniform(20, 60) if rng.random() < 0.5 else rng.uniform(200, 240)
    alpha = rng.uniform(0.5, 0.8)
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1 - alpha) + tone * alpha
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out, changed_pixels(image, out, mask, MIN_DELTA)


def abrasion(image, rng):
    size = image.shape[0]
    region = ellipse_mask((size, size), _centre(size, rng), (rng.uniform(0.06, 0.14) * size,
                          rng.uniform(0.06, 0.14) * size), rng.uniform(0, np.pi))
    weight = ndimage.gaussian_filter(region.astype(np.float32), size / 64)[..., None]
    worn = ndimage.gaussian_filter(image.astype(np.float32), (size / 48, size / 48, 0))
    worn = worn.mean() + (worn - worn.mean()) * 0.6 + rng.uniform(5, 15)
    out = np.clip(image * (1 - weight) + worn * weight, 0, 255).astype(np.uint8)
    return out, changed_pixels(image, out, weight[..., 0] > 0.05, MIN_DELTA)


def crease(image, rng):
    size = image.shape[0]
    cy, cx = _centre(size, rng)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    half = rng.uniform(0.15, 0.35) * size
    width = rng.uniform(1.5, 3.0) * size / 128
    ridge = -across / width * np.exp(-(across / width) ** 2) * np.clip(1 - np.abs(along) / half, 0, 1)
    out = np.clip(image.astype(np.float32) * (1 + rng.uniform(0.5, 0.8) * ridge[..., None]), 0, 255)
    out = out.astype(np.uint8)
    return out, changed_pixels(image, out, np.abs(ridge) > 0.02, MIN_DELTA)


DEFECTS = {"dent": dent, "smudge": smudge, "fibre": fibre, "abrasion": abrasion, "crease": crease}


def make_defect(class_name: str, kind: str, size: int, rng: np.random.Generator):
    """A normal sample of ``class_name`` with one ``kind`` defect; retried until visible."""
    for _ in range(20):
        image = render_normal(class_name, size, rng)
        out, mask = DEFECTS[kind](image, rng)
        if mask.sum() >= max(4, size * size // 2000):
            return out, mask
    raise RuntimeError(f"could not make a visible {kind} defect on {class_name}")
