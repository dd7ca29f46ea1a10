"""Offline synthetic anomaly-detection dataset in the MVTec AD layout, deterministic by seed.

Textures are crops of real photos that scikit-image ships (brick, grass, gravel); objects are
rendered (a metal washer, a two-colour pill) with small pose and lighting jitter, like aligned
industrial parts. Test defects: scratch, hole, stain, contamination (a foreign photo texture)
and, for objects, missing part; every mask marks exactly the changed pixels.

    python -m anomaly_data.synthetic OUT_DIR [--classes brick,washer] [--seed 0] [--image-size 128]
    python -m anomaly_data.synthetic OUT_DIR --family surfaces

``--family surfaces`` writes the second benchmark family (``anomaly_data.surfaces``): other
classes, subtle defects made by other means, to measure what was chosen on defects it never saw.

The validation defects (``anomaly_data.defects``) are other kinds on other source photos, so
selecting models on them does not tune them to the test defects.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from anomaly_data import surfaces
from anomaly_data.defects import blend, changed_pixels, ellipse_mask, perlin_blob_mask, rotated_bar_mask
from anomaly_data.records import DatasetError
from anomaly_data.transforms import resize_image

FORMAT_VERSION = 1
TEXTURES = {"brick": (1.00, 0.62, 0.48), "grass": (0.55, 0.85, 0.40), "gravel": (0.92, 0.90, 0.86)}
OBJECTS = ("washer", "pill")
CLASSES = tuple(TEXTURES) + OBJECTS
TEXTURE_DEFECTS = ("scratch", "hole", "stain", "contamination")
OBJECT_DEFECTS = ("scratch", "stain", "contamination", "missing_part")
# contamination sources: photos the validation defects never use
CONTAMINATION_SOURCES = ("coins", "moon", "camera", "clock", "text")


# ----- normal images ---------------------------------------------------------------------
@lru_cache(maxsize=None)
def _gray_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    return img.astype(np.float32)


def render_texture(name: str, size: int, rng: np.random.Generator):
    photo = _gray_photo(name)
    side = int(min(photo.shape) * 0.5)
    y = int(rng.integers(0, photo.shape[0] - side + 1))
    x = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if name != "brick":  # bricks keep their orientation, like a real texture class
        crop = np.rot90(crop, int(rng.integers(4)))
    gain = rng.uniform(0.95, 1.05)
    rgb = crop[..., None] * np.asarray(TEXTURES[name], dtype=np.float32) * gain
    image = np.clip(rgb, 0, 255).astype(np.uint8)
    image = resize_image(np.ascontiguousarray(image), size)
    return image, np.ones((size, size), dtype=bool), None


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    base = 70 + 15 * yy + rng.normal(0, 2.5, (size, size)).astype(np.float32)
    return np.repeat(base[..., None], 3, axis=2)


def render_washer(size: int, rng: np.random.Generator):
    bg = _background(size, rng)
    c = size / 2 + rng.normal(0, size * 0.01, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(yy - c[0], xx - c[1])
    outer, inner = size * rng.uniform(0.36, 0.38), size * rng.uniform(0.16, 0.17)
    ring = (r <= outer) & (r >= inner)
    angle = np.arctan2(yy - c[0], xx - c[1])
    light = rng.uniform(-0.3, 0.3)
    shade = 165 + 45 * np.cos(angle - 0.8 + light) * ((r - inner) / (outer - inner) - 0.5) \
        + 25 * np.cos(2 * (angle + light))
    metal = np.stack([shade, shade * 0.98, shade * 0.95], axis=-1) + rng.normal(0, 3, (size, size, 1))
    image = np.where(ring[..., None], metal, bg)
    return np.clip(image, 0, 255).astype(np.uint8), ring, np.clip(bg, 0, 255).astype(np.uint8)


def render_pill(size: int, rng: np.random.Generator):
    bg = _background(size, rng)
    cy, cx = size / 2 + rng.normal(0, size * 0.01, 2)
    half_len, radius = size * rng.uniform(0.25, 0.27), size * rng.uniform(0.15, 0.16)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = np.clip(xx - cx, -half_len, half_len)
    body = np.hypot(xx - cx - along, yy - cy) <= radius
    shading = 1.0 - 0.35 * ((yy - cy) / radius) ** 2
    left = np.array([200, 45, 40], dtype=np.float32)
    right = np.array([235, 232, 220], dtype=np.float32)
    colour = np.where((xx < cx)[..., None], left, right) * shading[..., None]
    colour += rng.normal(0, 2.0, (size, size, 1))
    image = np.where(body[..., None], colour, bg)
    return np.clip(image, 0, 255).astype(np.uint8), body, np.clip(bg, 0, 255).astype(np.uint8)


def render_normal(class_name: str, size: int, rng: np.random.Generator):
    """``(image, foreground mask, background image or None)`` for one normal sample."""
    if class_name in TEXTURES:
        return render_texture(class_name, size, rng)
    if class_name == "washer":
        return render_washer(size, rng)
    if class_name == "pill":
        return render_pill(size, rng)
    raise DatasetError(f"unknown synthetic class {class_name!r}; choose from {list(CLASSES)}")


# ----- test defects ----------------------------------------------------------------------
def _point_on(foreground: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[float, float]:
    h, w = foreground.shape
    inner = np.zeros_like(foreground)
    inner[margin:h - margin, margin:w - margin] = foreground[margin:h - margin, margin:w - margin]
    ys, xs = np.nonzero(inner if inner.any() else foreground)
    i = int(rng.integers(len(ys)))
    return float(ys[i]), float(xs[i])


def scratch(image, fg, bg, rng):
    h, w = fg.shape
    p0 = np.array(_point_on(fg, rng, h // 8))
    direction = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.2, 0.45) * h
    p2 = p0 + length * np.array([np.sin(direction), np.cos(direction)])
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.08 * h, 2)
    t = np.linspace(0, 1, 200)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    mask = np.zeros((h, w), dtype=bool)
    width = rng.uniform(1.0, 2.2) * h / 128
    yy, xx = np.mgrid[0:h, 0:w]
    for y, x in pts[::4]:
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= width ** 2
    mask &= fg
    tone = rng.choice([20.0, 240.0])
    out = blend(image, np.full_like(image, int(tone)), mask, rng.uniform(0.7, 0.9))
    return out, changed_pixels(image, out, mask)


def hole(image, fg, bg, rng):
    h, w = fg.shape
    center = _point_on(fg, rng, h // 6)
    radius = rng.uniform(0.04, 0.09) * h
    mask = ellipse_mask((h, w), center, (radius, radius * rng.uniform(0.8, 1.2)), rng.uniform(0, np.pi))
    yy, xx = np.mgrid[0:h, 0:w]
    depth = np.clip(1 - np.hypot(yy - center[0], xx - center[1]) / radius, 0, 1)
    dark = (15 + 40 * (1 - depth))[..., None] * np.ones(3)
    out = blend(image, dark.astype(np.uint8), mask, 1.0)
    return out, changed_pixels(image, out, mask)


def stain(image, fg, bg, rng):
    mask = perlin_blob_mask(fg.shape, rng, 0.01, 0.08) & fg
    tint = rng.uniform(0.35, 0.7, size=3) if rng.random() < 0.6 else rng.uniform(1.3, 1.6, size=3)
    stained = np.clip(image.astype(np.float32) * tint, 0, 255).astype(np.uint8)
    out = blend(image, stained, mask, rng.uniform(0.6, 0.9))
    return out, changed_pixels(image, out, mask)


def contamination(image, fg, bg, rng):
    import skimage.data

    h, w = fg.shape
    src = getattr(skimage.data, CONTAMINATION_SOURCES[int(rng.integers(len(CONTAMINATION_SOURCES)))])()
    src = src if src.ndim == 2 else src[..., :3].mean(axis=2)
    side = min(src.shape) // 3
    y, x = int(rng.integers(0, src.shape[0] - side)), int(rng.integers(0, src.shape[1] - side))
    patch = src[y:y + side, x:x + side].astype(np.float32)
    colour = rng.uniform(0.4, 1.0, size=3)
    texture = resize_image(np.clip(patch[..., None] * colour, 0, 255).astype(np.uint8), (h, w))
    center = _point_on(fg, rng, h // 6)
    mask = ellipse_mask((h, w), center, (rng.uniform(0.05, 0.12) * h, rng.uniform(0.05, 0.12) * w),
                        rng.uniform(0, np.pi)) & fg
    out = blend(image, texture, mask, 1.0)
    return out, changed_pixels(image, out, mask)


def missing_part(image, fg, bg, rng):
    h, w = fg.shape
    center = _point_on(fg, rng, h // 6)
    region = rotated_bar_mask((h, w), center, rng.uniform(0.15, 0.3) * h, rng.uniform(0.08, 0.16) * h,
                              rng.uniform(0, np.pi))
    mask = region & fg
    out = image.copy()
    out[mask] = bg[mask]
    return out, changed_pixels(image, out, mask)


DEFECTS = {"scratch": scratch, "hole": hole, "stain": stain, "contamination": contamination,
           "missing_part": missing_part}


def defect_kinds(class_name: str) -> tuple[str, ...]:
    return TEXTURE_DEFECTS if class_name in TEXTURES else OBJECT_DEFECTS


def make_defect(class_name: str, kind: str, size: int, rng: np.random.Generator):
    """A normal sample of ``class_name`` with one ``kind`` defect; retried until visible."""
    for _ in range(20):
        image, fg, bg = render_normal(class_name, size, rng)
        out, mask = DEFECTS[kind](image, fg, bg, rng)
        if mask.sum() >= max(4, size * size // 2000):
            return out, mask
    raise RuntimeError(f"could not make a visible {kind} defect on {class_name}")


# ----- families --------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    classes: tuple[str, ...]
    normal: Callable      # (class_name, size, rng) -> uint8 image
    defect_kinds: Callable  # class_name -> kinds
    make_defect: Callable   # (class_name, kind, size, rng) -> (image, mask)


FAMILIES = {
    "default": Family(CLASSES, lambda c, size, rng: render_normal(c, size, rng)[0], defect_kinds, make_defect),
    "surfaces": Family(surfaces.CLASSES, surfaces.render_normal, lambda c: surfaces.DEFECT_KINDS,
                       surfaces.make_defect),
}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise DatasetError(f"unknown synthetic family {name!r}; choose from {list(FAMILIES)}")
    return FAMILIES[name]


# ----- writing ---------------------------------------------------------------------------
def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def generate_class(out_dir: Path, class_name: str, seed: int, image_size: int, n_train: int,
                   n_test_good: int, n_test_per_defect: int, family: str = "default") -> None:
    fam = family_of(family)
    base = fam.classes.index(class_name)
    root = out_dir / class_name
    for i in range(n_train):
        image = fam.normal(class_name, image_size, np.random.default_rng([seed, base, 0, i]))
        _save(root / "train" / "good" / f"{i:03d}.png", image)
    for i in range(n_test_good):
        image = fam.normal(class_name, image_size, np.random.default_rng([seed, base, 1, i]))
        _save(root / "test" / "good" / f"{i:03d}.png", image)
    for k, kind in enumerate(fam.defect_kinds(class_name)):
        for i in range(n_test_per_defect):
            image, mask = fam.make_defect(class_name, kind, image_size, np.random.default_rng([seed, base, 2 + k, i]))
            _save(root / "test" / kind / f"{i:03d}.png", image)
            _save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)


def generate_dataset(out_dir, classes=None, seed: int = 0, image_size: int = 128, n_train: int = 40,
                     n_test_good: int = 10, n_test_per_defect: int = 4, family: str = "default") -> Path:
    """Write the dataset under ``out_dir`` (MVTec AD layout) and a ``synthetic.json`` manifest."""
    fam = family_of(family)
    classes = list(classes or fam.classes)
    unknown = [c for c in classes if c not in fam.classes]
    if unknown:
        raise DatasetError(f"unknown synthetic class(es) {unknown} in family {family!r}; choose from {list(fam.classes)}")
    if image_size < 32:
        raise DatasetError(f"image_size must be >= 32, got {image_size}")
    if n_train < 2 or n_test_good < 1 or n_test_per_defect < 1:
        raise DatasetError("need n_train >= 2, n_test_good >= 1 and n_test_per_defect >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for c in classes:
        generate_class(out_dir, c, seed, image_size, n_train, n_test_good, n_test_per_defect, family)
    manifest = {"format": FORMAT_VERSION, "family": family, "classes": classes, "seed": seed, "image_size": image_size,
                "n_train": n_train, "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect}
    (out_dir / "synthetic.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def ensure_dataset(out_dir, **params) -> Path:
    """Generate into ``out_dir`` unless a complete dataset with the same parameters is there."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "synthetic.json"
    family = params.get("family", "default")
    wanted = {"format": FORMAT_VERSION, "family": family,
              "classes": list(params.get("classes") or family_of(family).classes),
              "seed": params.get("seed", 0), "image_size": params.get("image_size", 128),
              "n_train": params.get("n_train", 40), "n_test_good": params.get("n_test_good", 10),
              "n_test_per_defect": params.get("n_test_per_defect", 4)}
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()) == wanted:
                return out_dir
        except json.JSONDecodeError:
            pass
    # the manifest is written last, so a half-written folder is regenerated
    return generate_dataset(out_dir, **{k: v for k, v in wanted.items() if k != "format"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anomaly_data.synthetic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder to write the dataset into (MVTec AD layout)")
    p.add_argument("--family", default="default", choices=list(FAMILIES),
                   help="default: brick, grass, gravel, washer, pill; surfaces: moon, cell, weave, brushed "
                        "with subtle defects (dent, smudge, fibre, abrasion, crease)")
    p.add_argument("--classes", default="", help="comma-separated subset of the family's classes (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128, help="side of the square images in px")
    p.add_argument("--train", type=int, default=40, help="normal training images per class")
    p.add_argument("--test-good", type=int, default=10, help="normal test images per class")
    p.add_argument("--test-per-defect", type=int, default=4, help="test images per defect kind")
    a = p.parse_args(argv)
    try:
        out = generate_dataset(a.out_dir, [c.strip() for c in a.classes.split(",") if c.strip()], a.seed,
                               a.image_size, a.train, a.test_good, a.test_per_defect, a.family)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote synthetic dataset to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
