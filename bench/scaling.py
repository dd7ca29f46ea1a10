"""Ray Train data-parallel scaling: epoch time with 1 and 2 workers (more where the machine has them).

    python -m bench.scaling [--model hvq_trans] [--train-images 96] [--image-size 128]

Trains the model's ``fast`` preset on a generated synthetic class through ``TorchTrainer``
(gloo on CPU, NCCL with one worker per GPU when GPUs are present) and reports the second
epoch's training time (the first includes start-up), images/s and the speed-up over one
worker. On CPU, one worker with all the CPUs (intra-op threads) is shown too, since that is
the alternative to DDP on a single machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path


from bench.common import machine, table


def main(argv=None) -> int:
    import ray

    from anomaly_data.synthetic import generate_dataset
    from distributed.trial import Resources, TrainJob, run_training

    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hvq_trans")
    p.add_argument("--train-images", type=int, default=96)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    root = generate_dataset(work / "data", ["brick"], 0, a.image_size, a.train_images + 8, 1, 1)
    ray.init(log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    print(f"machine: {machine()}; Ray sees {cpus} CPUs, {gpus} GPUs")
    job = dataclasses.replace(TrainJob.of(a.model, "mvtec", root, ["brick"], recipe={"epochs": 2, "batch_size": a.batch_size},
                                          image_size=a.image_size), val_fraction=8 / (a.train_images + 8))
    if gpus:
        layouts = [(n, 1.0, 1.0) for n in sorted({1, 2, gpus}) if n <= gpus]
    else:
        per = max(cpus - 0.2, 0.8)  # leave a little CPU for Ray's controller
        layouts = [(1, 1.0, 0.0), (1, per, 0.0)] + [(n, per / n, 0.0) for n in range(2, cpus + 1) if per / n >= 0.5]
    rows = []
    for workers, cpu_per_worker, gpu_per_worker in layouts:
        started = time.perf_counter()
        result = run_training(job, str(work / "train"), f"w{workers}-c{cpu_per_worker:.2f}",
                              Resources(workers, cpu_per_worker, gpu_per_worker), max_failures=0)
        total = time.perf_counter() - started
        epoch_s = result.metrics["epoch_seconds"]
        rows.append({"workers": workers, "CPU/worker": cpu_per_worker, "GPU/worker": gpu_per_worker,
                     "epoch_s": epoch_s, "img/s": a.train_images / epoch_s, "fit_total_s": total})
    base = rows[0]["epoch_s"]
    for r in rows:
        r["speed-up"] = base / r["epoch_s"]
    ray.shutdown()
    print(table(rows))
    best = max(rows, key=lambda r: r["speed-up"])
    print(f"\nsummary: {a.model} at {a.image_size} px, {a.train_images} training images: best layout "
          f"{best['workers']} worker(s) x {best['CPU/worker']:.2f} CPU -> {best['speed-up']:.2f}x the epoch speed of "
          f"1 worker x 1 CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
