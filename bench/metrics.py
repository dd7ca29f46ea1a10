"""Pixel metrics on a full-resolution MVTec-sized class.

    python -m bench.metrics [--images 150] [--side 1024]

150 maps of 1024 x 1024 (157 M pixels, float32) with blob-shaped ground truth on half of the
images: time and peak extra memory (tracemalloc: numpy's allocations beyond the inputs) of
pixel AUROC, AUPRO@0.3, pixel F1-max and ``evaluate_all``; then agreement with
scikit-learn (AUROC) and with the tests' slow threshold-by-threshold AUPRO reference on a
subset (8 maps at 64 x 64).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench.common import machine, table
from ensembles.metrics import aupro, evaluate_all, pixel_auroc, pixel_f1_max


def blob_masks(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Half of the images get 1-3 smooth random blobs (thresholded blurred noise)."""
    masks = np.zeros((n, side, side), dtype=bool)
    small = max(8, side // 16)
    for i in range(0, n, 2):
        noise = ndimage.gaussian_filter(rng.standard_normal((small, small)), sigma=small / 12)
        blobs = noise > np.quantile(noise, 0.97)
        masks[i] = np.kron(blobs, np.ones((side // small, side // small), dtype=bool))[:side, :side]
    return masks


def synthetic_maps(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += 0.35 * masks
    return maps


def measure(fn) -> tuple[float, float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return value, seconds, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=150)
    p.add_argument("--side", type=int, default=1024)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    masks = blob_masks(a.images, a.side, rng)
    maps = synthetic_maps(masks, rng)
    scores = maps.reshape(a.images, -1).max(1)
    labels = masks.reshape(a.images, -1).any(1).astype(np.int64)
    pixels = maps.size
    print(f"machine: {machine()}")
    print(f"{a.images} maps of {a.side}x{a.side} = {pixels / 1e6:.0f} M pixels ({maps.nbytes / 2**20:.0f} MiB float32), "
          f"{masks.mean() * 100:.1f} % anomalous\n")
    rows = []
    for name, fn in [("pixel_auroc", lambda: pixel_auroc(maps, masks)), ("aupro", lambda: aupro(maps, masks)),
                     ("pixel_f1_max", lambda: pixel_f1_max(maps, masks)),
                     ("evaluate_all", lambda: evaluate_all(scores, labels, maps, masks)["aupro"])]:
        value, seconds, peak = measure(fn)
        rows.append({"metric": name, "value": float(value), "seconds": seconds, "peak_extra_MB": peak / 2**20,
                     "bytes/pixel": peak / pixels})
    print(table(rows, "{:.3f}"))

    from sklearn.metrics import roc_auc_score

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_metrics import reference_aupro

    sub_masks = blob_masks(8, 64, np.random.default_rng(1))
    sub_maps = synthetic_maps(sub_masks, np.random.default_rng(2))
    ours, ref = aupro(sub_maps, sub_masks), reference_aupro(sub_maps, sub_masks)
    auroc, sk = pixel_auroc(sub_maps, sub_masks), roc_auc_score(sub_masks.ravel(), sub_maps.ravel())
    print(f"\nagreement on 8 maps of 64x64: AUPRO {ours:.9f} vs reference {ref:.9f} (|diff| {abs(ours - ref):.1e}); "
          f"pixel AUROC {auroc:.9f} vs scikit-learn {sk:.9f} (|diff| {abs(auroc - sk):.1e})")
    total = next(r for r in rows if r["metric"] == "evaluate_all")
    print(f"summary: all pixel metrics of a {pixels / 1e6:.0f} M-pixel class in {total['seconds']:.1f} s, "
          f"{total['peak_extra_MB']:.0f} MiB beyond the inputs ({total['bytes/pixel']:.1f} B/pixel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
