"""Synthetic defects on ``uint8 [H, W, 3]`` images, each returning ``(image, mask)``.

The validation set uses these (Perlin-shaped foreign texture, CutPaste, scar; distortion and re-tone
of the image's own content in a Perlin-shaped region) so that tuning,
early stopping and fusion never see a test image. The dataset generator uses the shape
primitives (Perlin blobs, rotated bars, strokes) for its own, different test defects.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from anomaly_data.transforms import resize_image


# ----- shapes ----------------------------------------------------------------------------
def perlin_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise in about ``[-0.7, 0.7]``, ``cells`` lattice cells across the image."""
    h, w = shape
    cells = max(1, int(cells))
    angles = rng.uniform(0, 2 * np.pi, (cells + 1, cells + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, cells, h, endpoint=False)
    xs = np.linspace(0, cells, w, endpoint=False)
    y0 = ys.astype(int)[:, None]
    x0 = xs.astype(int)[None, :]
    fy = (ys - ys.astype(int))[:, None]
    fx = (xs - xs.astype(int))[None, :]

    def corner(dy, dx):
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731 - Perlin's quintic
    u, v = fade(fx), fade(fy)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return top * (1 - v) + bottom * v


def perlin_blob_mask(shape, rng, min_area=0.005, max_area=0.15, tries=20) -> np.ndarray:
    """A Perlin-noise threshold mask covering between ``min_area`` and ``max_area`` of the image."""
    h, w = shape
    for _ in range(tries):
        noise = perlin_noise(shape, int(rng.integers(2, 7)), rng)
        mask = noise > rng.uniform(0.25, 0.45)
        if min_area <= mask.mean() <= max_area:
            return mask
    # fall back to an ellipse so that a defect always exists
    return ellipse_mask(shape, (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w),
                        (0.12 * h, 0.08 * w), rng.uniform(0, np.pi))


def ellipse_mask(shape, center, radii, angle=0.0) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / max(radii[1], 1e-6)
    v = (-dx * s + dy * c) / max(radii[0], 1e-6)
    return u * u + v * v <= 1.0


def rotated_bar_mask(shape, center, length, width, angle) -> np.ndarray:
    """A filled rectangle of ``length`` x ``width`` pixels rotated by ``angle`` (radians)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    along = dx * c + dy * s
    across = -dx * s + dy * c
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)


# ----- foreign textures ------------------------------------------------------------------
FOREIGN_SOURCES = ("coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry",
                   "colorwheel", "retina", "chelsea")


@lru_cache(maxsize=None)
def _foreign_image(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def foreign_texture(shape, rng: np.random.Generator) -> np.ndarray:
    """A random crop of one of scikit-image's photos, resized to ``shape``."""
    src = _foreign_image(FOREIGN_SOURCES[int(rng.integers(len(FOREIGN_SOURCES)))])
    side = int(rng.integers(min(src.shape[:2]) // 4, min(src.shape[:2]) // 2 + 1))
    y = int(rng.integers(0, src.shape[0] - side + 1))
    x = int(rng.integers(0, src.shape[1] - side + 1))
    crop = src[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return resize_image(np.ascontiguousarray(crop), shape)


def blend(image: np.ndarray, other: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    out = image.astype(np.float32)
    m = mask[..., None].astype(np.float32) * alpha
    out = out * (1 - m) + other.astype(np.float32) * m
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def changed_pixels(before: np.ndarray, after: np.ndarray, mask: np.ndarray, min_delta: int = 8) -> np.ndarray:
    """Keep only the masked pixels that visibly changed, so masks are exact."""
    return mask & (np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=2) >= min_delta)


# ----- validation defects ----------------------------------------------------------------
def perlin_foreign(image: np.ndarray, rng: np.random.Generator):
    """A Perlin-shaped region blended with a foreign photo texture (DRAEM-style)."""
    mask = perlin_blob_mask(image.shape[:2], rng)
    out = blend(image, foreign_texture(image.shape[:2], rng), mask, rng.uniform(0.5, 1.0))
    return out, changed_pixels(image, out, mask)


def _color_jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(0.75, 1.25, size=3)
    shift = rng.uniform(-25, 25, size=3)
    return np.clip(patch.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)


def cutpaste(image: np.ndarray, rng: np.random.Generator):
    """A rectangle of the image itself, colour-jittered, pasted elsewhere."""
    h, w = image.shape[:2]
    area = rng.uniform(0.02, 0.15) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    ph = int(np.clip(np.sqrt(area * aspect), 2, h - 1))
    pw = int(np.clip(np.sqrt(area / aspect), 2, w - 1))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = image.copy()
    out[dy:dy + ph, dx:dx + pw] = _color_jitter(image[sy:sy + ph, sx:sx + pw], rng)
    mask = np.zeros((h, w), dtype=bool)
    mask[dy:dy + ph, dx:dx + pw] = True
    return out, changed_pixels(image, out, mask, min_delta=4)


def scar(image: np.ndarray, rng: np.random.Generator):
    """A thin rotated bar of random colour or of a foreign texture (CutPaste-scar-like)."""
    h, w = image.shape[:2]
    mask = rotated_bar_mask((h, w), (rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w),
                            rng.uniform(0.10, 0.30) * max(h, w), max(2.0, rng.uniform(0.02, 0.05) * min(h, w)),
                            rng.uniform(-np.pi / 4, np.pi / 4) + (np.pi / 2 if rng.random() < 0.5 else 0.0))
    if rng.random() < 0.5:
        fill = np.broadcast_to(rng.integers(0, 256, size=3).astype(np.uint8), image.shape)
    else:
        fill = foreign_texture((h, w), rng)
    out = blend(image, fill, mask, 1.0)
    return out, changed_pixels(image, out, mask)


def soft_region(shape, rng: np.random.Generator, min_area=0.02, max_area=0.15) -> tuple[np.ndarray, np.ndarray]:
    """A Perlin-shaped region, feathered into a weight in [0, 1] (no hard edge), and its mask as a
    person would draw it: where the weight is at least one half, changed pixels or not (a dent on a
    flat patch changes few pixels, yet all of it is the defect)."""
    region = perlin_blob_mask(shape, rng, min_area, max_area)
    weight = ndimage.gaussian_filter(region.astype(np.float32), max(1.0, min(shape) / 48))
    weight = np.clip(weight / max(float(weight.max()), 1e-6), 0, 1)
    return weight >= 0.5, weight


def distortion(image: np.ndarray, rng: np.random.Generator):
    """The image's own content displaced inside a Perlin-shaped region by a smooth random field: a
    change of geometry (a bend, a dent, a pushed fibre) with no foreign colour in it."""
    h, w = image.shape[:2]
    mask, weight = soft_region((h, w), rng)
    amplitude = rng.uniform(0.05, 0.12) * min(h, w)
    cells = int(rng.integers(2, 5))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coords = [yy + amplitude * perlin_noise((h, w), cells, rng) * weight,
              xx + amplitude * perlin_noise((h, w), cells, rng) * weight]
    out = np.stack([ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="reflect")
                    for c in range(image.shape[2])], axis=-1)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return out, mask


def retone(image: np.ndarray, rng: np.random.Generator):
    """The image's own pixels re-toned inside a Perlin-shaped region, faint to strong: darker or
    brighter, flattened contrast, blurred, or colour-shifted (wear, a stain that is not a foreign
    texture, discolouration)."""
    mask, weight = soft_region(image.shape[:2], rng)
    x = image.astype(np.float32)
    how = ("gain", "contrast", "blur", "colour")[int(rng.integers(4))]
    if how == "gain":
        changed = x * (rng.uniform(0.55, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.5))
    elif how == "contrast":
        changed = x.mean((0, 1)) + (x - x.mean((0, 1))) * rng.uniform(0.2, 0.6)
    elif how == "blur":
        changed = ndimage.gaussian_filter(x, (rng.uniform(1.5, 3.5) * min(image.shape[:2]) / 128,) * 2 + (0,))
    else:
        changed = x + rng.uniform(-40, 40, size=3)
    out = x * (1 - weight[..., None]) + changed * weight[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


# Two families: foreign content put on the image (a photo, a patch of itself, a bar), and the
# image's own content changed in place (its geometry, its tone). Leave-one-kind-out fusion and
# selection only learn something that transfers when the kinds differ this much: with the
# first family alone, members that catch pasted content and miss subtle in-place changes looked
# best on validation and worst on test (surfaces family, python -m bench.peers).
VALIDATION_DEFECTS = {"perlin_foreign": perlin_foreign, "cutpaste": cutpaste, "scar": scar,
                      "distortion": distortion, "retone": retone}


def apply_validation_defect(image: np.ndarray, rng: np.random.Generator, kinds=None):
    """One validation defect (kind drawn from ``kinds``); retries until the mask is non-empty."""
    kinds = list(kinds or VALIDATION_DEFECTS)
    for _ in range(10):
        kind = kinds[int(rng.integers(len(kinds)))]
        out, mask = VALIDATION_DEFECTS[kind](image, rng)
        if mask.sum() >= 4:
            return out, mask, kind
    raise RuntimeError("could not place a visible synthetic defect (is the image constant?)")
