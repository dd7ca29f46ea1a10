"""What a checkpoint costs on disk, per model and preset, with and without the frozen backbone.

    python -m bench.checkpoints [--demo-run RUN_DIR]

Sizes are of ``.safetensors`` files, the format ``model.save`` writes. "all tensors" is a file
with every tensor, the frozen backbone's included; "lean" is what ``model.save`` writes
(trainable parameters and fitted statistics only; the backbone is rebuilt from the config and
checked against a digest); "optimizer" is the AdamW state a resumable checkpoint adds (two
tensors per trainable parameter), kept only in the latest checkpoint of an unfinished trial. Weights "none" (offline); sizes do not depend on the weights.
With ``--demo-run`` it also prints the size of a run folder (e.g. the offline demo's) and how
long its ensemble takes to load (``Ensemble.load`` on the CPU, in a fresh process, the fastest of
``LOAD_REPEATS``; imports not counted).
"""

from __future__ import annotations

import argparse
import subprocess
import warnings

import torch

from bench.common import in_fresh_process, machine, table

MODELS = ("haloae", "hvq_trans", "transformaly", "patchcore")
MB = 1e6
LOAD_REPEATS = 3


def file_mb(ckpt: dict) -> float:
    """Size of ``ckpt`` (``AnomalyModel.checkpoint()``'s form) as the ``.safetensors`` file ``save`` writes."""
    from models.checkpoint_files import encode_model

    return len(encode_model(ckpt)) / MB


def fitted(net) -> None:
    """Statistics with their real shapes (PatchCore's memory bank, Gaussians) from a few images."""
    size = net.config.image_size
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.fit_statistics([{"image": images, "label": torch.zeros(4), "class_index": torch.zeros(4, dtype=torch.long)}])


def row(model: str, preset: str) -> dict:
    from models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_model(model, preset, weights="none").eval()
        fitted(net)
    lean = net.checkpoint()
    full = {**lean, "format": 1, "state_dict": {k: v.detach() for k, v in net.state_dict().items()}}
    trainable = [p for p in net.parameters() if p.requires_grad]
    frozen = net.frozen_state_keys()
    return {"model": model, "preset": preset, "image_px": net.config.image_size,
            "all tensors MB": file_mb(full), "lean MB": file_mb(lean),
            "frozen tensors written": len(set(lean["state_dict"]) & frozen), "frozen tensors": len(frozen),
            "optimizer MB": 2 * sum(p.numel() * p.element_size() for p in trainable) / MB}


def folder_mb(path: str) -> str:
    out = subprocess.run(["du", "-sm", path], capture_output=True, text=True, check=True).stdout
    return out.split()[0]


def ensemble_load_seconds(folder: str) -> float:
    """Seconds ``Ensemble.load(folder, "cpu")`` takes in this process, imports done before."""
    import time

    from ensembles import Ensemble

    t0 = time.perf_counter()
    Ensemble.load(folder, "cpu")
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="fast,paper")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--demo-run", default=None, help="a run folder whose size (and best/, tune/) to print")
    a = p.parse_args(argv)
    print(f"machine: {machine()}\n")
    rows = [row(m, preset) for preset in a.presets.split(",") for m in a.models.split(",")]
    print(table(rows, floats="{:.1f}"))
    if a.demo_run:
        parts = ", ".join(f"{name}/ {folder_mb(f'{a.demo_run}/{name}')} MB" for name in ("best", "tune", "ensemble"))
        print(f"\nrun folder {a.demo_run}: {folder_mb(a.demo_run)} MB ({parts})")
        load_s = min(in_fresh_process(ensemble_load_seconds, f"{a.demo_run}/ensemble") for _ in range(LOAD_REPEATS))
        print(f"ensemble load: {load_s:.2f} s (Ensemble.load on the CPU, fastest of {LOAD_REPEATS} fresh processes)")


if __name__ == "__main__":
    main()
