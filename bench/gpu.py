"""What the GPU path costs, per model at the paper preset: training images per second and peak
GPU memory in fp32 and in the GPU's mixed precision (bf16, or fp16 with a gradient scaler), the
share of a trial's time outside training (``bench.overhead``), and PatchCore's fit (its greedy
coreset included) on an MVTec-sized class.

    python -m bench.gpu [--out gpu.json]            # on a GPU: the figures the README quotes (~8 min)
    python -m bench.gpu --tiny --out /tmp/gpu.json  # CPU path, tiny settings (the test runs this)
    python -m bench.gpu --steps 2 --batch 4 --no-overhead   # a CPU's paper-preset speeds, for estimates

Training speed is of ``models.training.optimisation_step`` on one repeated uint8 batch already
on the device (the data feed is not in it), weights none, after ``WARMUP_STEPS``; the timed
steps end with one device synchronisation. It prints a table and writes every figure to
``--out`` (JSON), with the device's name.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from bench.common import machine, table

TRAINED = ("haloae", "hvq_trans", "transformaly")
WARMUP_STEPS = 3
CLASS_TRAIN_IMAGES = 192  # an MVTec-sized class (240 normals) less its 20 % held out for validation
TINY = {"image_size": 64, "steps": 1, "batch": 2, "fit_images": 4}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mixed_precision(dev: torch.device) -> str:
    """What ``--precision auto`` picks on ``dev`` besides fp32 (bf16 on a CPU, to exercise it)."""
    from models.training import resolve_precision

    return resolve_precision("auto", dev) if dev.type == "cuda" else "bf16"


def build(model: str, preset: str, image_size: int | None):
    from models import create_model

    overrides = {"weights": "none", **({"image_size": image_size} if image_size else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(model, preset, **overrides)


def training_speed(model: str, preset: str, precision: str, steps: int, batch: int | None,
                   image_size: int | None) -> dict:
    """Training images per second and peak device memory of ``model`` at ``precision``."""
    from models.training import make_grad_scaler, make_optimizer, optimisation_step, read_parts, use_fast_kernels

    dev = device()
    use_fast_kernels(dev)
    net = build(model, preset, image_size).to(dev)
    recipe = net.recipe(preset)
    size = batch or recipe.batch_size
    optimizer = make_optimizer(net, recipe.lr, recipe)
    scaler = make_grad_scaler(precision, dev)
    side = net.config.image_size
    images = torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(dev)
    data = {"image": images, "class_index": torch.zeros(size, dtype=torch.long, device=dev)}
    for _ in range(WARMUP_STEPS):
        optimisation_step(net, data, optimizer, recipe.grad_clip, precision, scaler)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    parts = None
    for _ in range(steps):
        parts = optimisation_step(net, data, optimizer, recipe.grad_clip, precision, scaler)
    loss = read_parts(parts, 1)["loss"]  # waits for the device once
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"model": model, "precision": precision, "batch": size, "image_px": side,
            "img_per_s": size * steps / seconds, "peak_gib": peak, "loss": loss}


def patchcore_fit(preset: str, images: int, image_size: int | None) -> dict:
    """Seconds of PatchCore's fit (features, greedy coreset, memory bank) on ``images`` images."""
    dev = device()
    net = build("patchcore", preset, image_size).to(dev).eval()
    side = net.config.image_size
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(min(8, images - i), 3, side, side, generator=generator)}
               for i in range(0, images, 8)]
    started = time.perf_counter()
    with torch.no_grad():
        net.fit_statistics(batches)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {"images": images, "image_px": side, "fit_s": time.perf_counter() - started,
            "memory_bank": int(net.memory_bank.shape[0]) if hasattr(net, "memory_bank") else None}


def overhead_shares(presets: str, epochs: int) -> list[dict]:
    from bench.overhead import GPU_TRIAL_MINUTES, measure, whole_trial
    from distributed.studies import DEFAULT_CHECKPOINT_MINUTES

    return [whole_trial(m, preset, measure(m, preset, epochs), DEFAULT_CHECKPOINT_MINUTES, GPU_TRIAL_MINUTES)
            for preset in presets.split(",") for m in TRAINED]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu.json", help="where to write the figures (JSON)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--steps", type=int, default=20, help="timed optimisation steps per model and precision")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: each recipe's)")
    p.add_argument("--no-overhead", action="store_true", help="leave out the overhead shares (bench/overhead.py)")
    p.add_argument("--tiny", action="store_true",
                   help=f"CPU-sized settings ({TINY}): checks the script runs, its figures mean little")
    a = p.parse_args(argv)
    tiny = TINY if a.tiny else {}
    steps = tiny.get("steps", a.steps)
    dev = device()
    print(f"machine: {machine()}\n")
    speed = [training_speed(m, a.preset, precision, steps, tiny.get("batch", a.batch), tiny.get("image_size"))
             for m in TRAINED for precision in ("fp32", mixed_precision(dev))]
    print(table(speed, floats="{:.3g}"))
    fit = patchcore_fit(a.preset, tiny.get("fit_images", CLASS_TRAIN_IMAGES), tiny.get("image_size"))
    print(f"\npatchcore fit: {fit['fit_s']:.1f} s for {fit['images']} images at {fit['image_px']} px")
    overhead = [] if a.tiny or a.no_overhead else overhead_shares(a.preset, 2)
    if overhead:
        print("\n" + table(overhead, floats="{:.2f}"))
    figures = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "machine": machine(),
               "preset": a.preset, "tiny": a.tiny, "training": speed, "patchcore_fit": fit, "overhead": overhead}
    Path(a.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nwrote {a.out}")
    return figures


if __name__ == "__main__":
    main()
