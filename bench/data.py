"""Data preparation per trial: decoding and resizing an MVTec-sized class, with and without the cache.

    python -m bench.data [--images 120] [--sizes 128,256]

Writes ``--images`` training PNGs of 1024 x 1024 (shifted crops of scikit-image's brick photo
with noise, so PNG decoding costs what it costs on MVTec AD) to a temporary folder, then times
``prepare_splits`` (training set + validation set with synthetic defects) at each input size:
without the cache (what every trial paid before), filling the cache (the first trial on a
node) and reading it (every later trial on that node).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import machine, table


def write_class(root: Path, n: int, side: int = 1024) -> None:
    from skimage import data

    photo = np.asarray(Image.fromarray(data.brick()).convert("RGB").resize((side, side), Image.BILINEAR))
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 2)):
        folder = root / "bricks" / split / "good"
        folder.mkdir(parents=True)
        for i in range(count):
            shifted = np.roll(photo, tuple(rng.integers(0, side, 2)), axis=(0, 1)).astype(np.int16)
            noisy = np.clip(shifted + rng.integers(-8, 9, shifted.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"{i:03d}.png")


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=120, help="training images of the class (MVTec AD: 60-391)")
    p.add_argument("--sizes", default="128,256")
    a = p.parse_args(argv)
    from anomaly_data import prepare_splits

    print(f"machine: {machine()}\n{a.images} training PNGs of 1024 x 1024, validation 20 % + 1 defect each\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_class(root, a.images)
        for size in [int(s) for s in a.sizes.split(",")]:
            cache = Path(tmp) / f"cache-{size}"

            def run(cache_dir=None):
                return prepare_splits("mvtec", root, ["bricks"], image_size=size, cache_dir=cache_dir)

            plain = seconds(run)
            filling = seconds(lambda: run(cache))
            cached = seconds(lambda: run(cache))
            entry = sum(f.stat().st_size for f in cache.glob("*.npz")) / 2**20
            rows.append({"px": size, "no cache s": plain, "ms/image": 1000 * plain / a.images,
                         "fill cache s": filling, "cached s": cached, "speed-up": plain / cached,
                         "entry MB": entry})
    print(table(rows))
    last = rows[-1]
    print(f"\nsummary: at {last['px']} px a trial prepares its data in {last['cached s']:.2f} s from the cache "
          f"instead of {last['no cache s']:.1f} s ({last['speed-up']:.0f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
