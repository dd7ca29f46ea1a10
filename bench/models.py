"""Training and inference throughput and peak memory of each model and of the ensemble.

    python -m bench.models [--sizes 128,256] [--batch 8] [--models haloae,hvq_trans,transformaly,patchcore]
    python -m bench.models --models hvq_trans-paper,hvq_trans-paper-15cls

Each model at its ``fast`` preset (packaged / random weights: speed does not depend on them) at
each input size, batch 8 of random images: training images/s (loss, backward, AdamW step) and
inference images/s (``predict``: score + map, under ``inference_mode``); a model that is fitted,
not trained (PatchCore) gets its fit time on 3 batches instead of a training figure; on the CPU threads
available, and on the GPU too when there is one. Peak memory: the process's peak resident
memory (CPU) or ``max_memory_allocated`` (GPU), each measurement in a fresh process. The
ensemble row runs every member and the fusion (mean of normalised maps, blur, max).

The rows of ``VARIANTS`` run a model at another preset, at that preset's own input size
(``--sizes`` does not apply): HVQ-Trans at its paper preset as one per-class model and as the
paper's unified model over the 15 MVTec classes, whose images are routed to a class by the
nearest class prototype (fitted, like every model's statistics, on random images: two or more
of each class).
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

from bench.common import in_fresh_process, machine, peak_rss_mb, table, timed

from models import model_class, model_names

MODELS = tuple(model_names())
# row name -> (model, preset, config overrides); random backbone weights: speed does not depend on them
VARIANTS = {
    "hvq_trans-paper": ("hvq_trans", "paper", dict(weights="none")),
    "hvq_trans-paper-15cls": ("hvq_trans", "paper", dict(weights="none", num_classes=15)),
}


def variant_size(name: str) -> int:
    model, preset, overrides = VARIANTS[name]
    return {**model_class(model).config_class.preset_values(preset), **overrides}["image_size"]


def build(name: str, size: int, device):
    from models import create_model

    model, preset, overrides = VARIANTS.get(name, (name, "fast", dict(image_size=size)))  # variants: own size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(model, preset, **overrides).to(device)


def fitted(model, size: int, batch: int, device):
    """Fit statistics (Transformaly's Gaussians, HVQ-Trans's class prototypes) on a few random
    batches so that predict runs; a unified model gets two or more images of each class."""
    classes = getattr(model.config, "num_classes", 1)
    class_index = torch.arange(max(3, math.ceil(2 * classes / batch)) * batch, device=device) % classes
    loader = [{"image": torch.rand(batch, 3, size, size, device=device), "class_index": index}
              for index in class_index.split(batch)]
    model.eval()
    model.fit_statistics(loader)
    return model


def measure(name: str, size: int, batch: int, device_name: str, steps: int) -> dict:
    from models.training import make_optimizer

    device = torch.device(device_name)
    sync = device.type == "cuda"
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device)
    batch_dict = {"image": images, "class_index": torch.zeros(batch, dtype=torch.long, device=device)}
    base = peak_rss_mb()
    if sync:
        torch.cuda.reset_peak_memory_stats()
    if name == "ensemble":
        from ensembles.fusion import blur

        members = [fitted(build(m, size, device), size, batch, device).eval() for m in MODELS]

        def infer():
            maps = [m.predict(images)[1] for m in members]
            fused = blur(torch.stack([(mp - mp.mean()) / (mp.std() + 1e-6) for mp in maps]).mean(0), 1 / 32)
            return fused.flatten(1).amax(1)

        with torch.inference_mode():
            infer_s = timed(infer, steps, sync=sync)
        train_s = float("nan")
    elif not model_class(VARIANTS.get(name, (name,))[0]).trains:
        model = build(name, size, device)
        train_s = timed(lambda: fitted(model, size, batch, device), 1, sync=sync) / 3  # s per batch of fit
        with torch.inference_mode():
            infer_s = timed(lambda: model.predict(images), steps, sync=sync)
    else:
        model = build(name, size, device)
        optimizer = make_optimizer(model, 1e-4)

        def train_step():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch_dict)["loss"].backward()
            optimizer.step()

        train_s = timed(train_step, steps, sync=sync)
        fitted(model, size, batch, device)
        with torch.inference_mode():
            infer_s = timed(lambda: model.predict(images), steps, sync=sync)
    peak = torch.cuda.max_memory_allocated() / 2**20 if sync else peak_rss_mb() - base
    return {"train_img_s": batch / train_s, "infer_img_s": batch / infer_s, "peak_mb": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per figure (the fastest is reported)")
    p.add_argument("--models", default=",".join([*MODELS, "ensemble", *VARIANTS]),
                   help=f"models, 'ensemble', and rows at other presets: {', '.join(VARIANTS)}")
    a = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"machine: {machine()}\nbatch {a.batch}, fast presets (but {', '.join(VARIANTS)}), "
          f"fastest of {a.steps} steps\n")
    rows = []
    for device in devices:
        for name in a.models.split(","):
            sizes = [variant_size(name)] if name in VARIANTS else [int(s) for s in a.sizes.split(",")]
            for size in sizes:
                r = in_fresh_process(measure, name, size, a.batch, device, a.steps)
                rows.append({"device": device, "model": name, "px": size, "train img/s": r["train_img_s"],
                             "infer img/s": r["infer_img_s"], "peak MB": r["peak_mb"]})
    print(table(rows, "{:.1f}"))
    members = [r for r in rows if r["model"] in MODELS]
    ens = [r for r in rows if r["model"] == "ensemble"]
    if members:
        slowest = min(members, key=lambda r: r["infer img/s"])
        print(f"\nsummary: slowest member at inference: {slowest['model']} at {slowest['px']} px "
              f"({slowest['infer img/s']:.1f} img/s on {slowest['device']})"
              + (f"; ensemble {ens[0]['infer img/s']:.1f} img/s at {ens[0]['px']} px" if ens else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
