"""Cluster efficiency at full scale, simulated: the one-run search against one Tune run per study.

    python -m bench.cluster [--classes 15] [--trials 6] [--epochs 20] [--cpus 64 --gpus 8] [--scale 0.12]

A local Ray instance declares a cluster's resources as logical ones (64 CPUs, 8 GPUs: 8 trial
slots of 1 GPU). The real searcher, scheduler and Tune loop of ``distributed.tune`` run
``--classes`` x 3 models studies; only the training is replaced: each epoch sleeps the
model's measured epoch cost (median ``epoch_seconds`` of the offline demo's trials.csv, 128 px,
this machine) times ``--scale``, and reports a validation score that grows with the epochs
towards a ceiling drawn per configuration, so ASHA stops trials as it would. No Train worker
group is started. A slot is busy from its trial's start to its end, as the driver sees them.
Wall time runs from the first trial's start: the first trial actors' start-up (seconds on a
cluster, where each node starts its own; tens of seconds on 2 cores) is left out, as it would
be lost in a run of hours. The sequential design pays it again for every study: that stays in.

The sequential design runs ``--sequential-studies`` of them (each study alone on the cluster, so
more studies would only repeat the same figure at ~25 s each here). Prints, for both designs: slot utilisation (busy slot-seconds / (slots x wall)), wall time and
trials per hour (at the simulated speed), then ``utilisation: one-run NN.N % | sequential NN.N %``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
import time
from pathlib import Path

# median epoch_seconds per model in the offline demo (python -m distributed.tune; runs/demo_t/trials.csv)
EPOCH_SECONDS = {"haloae": 3.03, "hvq_trans": 0.58, "transformaly": 2.06}


def config_ceiling(config: dict) -> float:
    """A validation score ceiling that depends only on the study and the sampled values."""
    text = repr(sorted((k, round(v, 6) if isinstance(v, float) else v) for k, v in config.items()))
    u = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return 0.5 + 0.45 * u


def sleepy_trial(config: dict, epoch_seconds: dict[str, float], scale: float, epochs: int) -> None:
    from ray import tune

    from distributed.studies import REUSE_WAIT_ENV, REUSE_WAIT_S

    os.environ[REUSE_WAIT_ENV] = str(REUSE_WAIT_S)  # as distributed.tune's trials do
    ceiling = config_ceiling(config)
    cost = epoch_seconds[config["model"]] * scale
    for epoch in range(1, epochs + 1):
        time.sleep(cost)
        tune.report({"val_score": ceiling * (1 - math.exp(-epoch / 4)), "epoch": epoch})


class SlotClock:
    """Busy slot-seconds: each trial from its start to its end, as the driver sees them."""

    def __init__(self):
        from ray.tune import Callback

        class Clock(Callback):
            def __init__(self, owner):
                self.owner = owner

            def on_trial_start(self, iteration, trials, trial, **info):
                self.owner.started[trial.trial_id] = time.time()
                self.owner.first_start = self.owner.first_start or time.time()

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.owner.end(trial.trial_id)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.owner.end(trial.trial_id)

        self.started: dict[str, float] = {}
        self.busy = 0.0
        self.trials = 0
        self.first_start: float | None = None
        self.callback = Clock(self)

    def end(self, trial_id: str) -> None:
        if trial_id in self.started:
            self.busy += time.time() - self.started.pop(trial_id)
            self.trials += 1


def fit(studies, a, storage: Path, clock: SlotClock, name: str, per_study_cap: int | None) -> None:
    from ray import tune

    from distributed.studies import SearchOptions, live_trial_limit, make_search
    from distributed.spec import build_spec

    options = SearchOptions(trials=a.trials, epochs=a.epochs, grace_epochs=a.grace_epochs, seed=0,
                            max_concurrent_per_study=per_study_cap)
    spaces = {s.key: build_spec(s.key, s.model, s.classes, "fast", {}, n_train=100).space() for s in studies}
    searcher, scheduler = make_search(studies, spaces, options, "val_score", "max")
    trainable = tune.with_resources(
        tune.with_parameters(sleepy_trial, epoch_seconds=EPOCH_SECONDS, scale=a.scale, epochs=a.epochs),
        {"CPU": a.cpus / a.gpus, "GPU": 1})
    tune.Tuner(trainable, tune_config=tune.TuneConfig(
        metric="val_score", mode="max", search_alg=searcher, scheduler=scheduler,
        num_samples=searcher.total_trials, max_concurrent_trials=live_trial_limit(a.gpus, False),
        reuse_actors=True),  # as distributed.tune's trials of one worker
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[clock.callback],
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0))).fit()


def run_design(design: str, studies, a, storage: Path) -> dict:
    clock = SlotClock()
    if design == "one-run":
        fit(studies, a, storage, clock, "one-run", None)
    else:  # the previous design: one Tune run per study, each alone on the cluster, no per-study cap
        per_model = math.ceil(a.sequential_studies / len({s.model for s in studies}))
        studies = [s for s in studies if int(s.classes[0][1:]) < per_model]
        for study in studies:
            fit([study], a, storage, clock, f"seq-{study.key}", a.trials)
    wall = time.time() - clock.first_start
    return {"design": design, "studies": len(studies), "trials": clock.trials, "slots": a.gpus,
            "wall_s": wall, "busy_slot_s": clock.busy, "utilisation_%": 100 * clock.busy / (a.gpus * wall),
            "trials_per_hour": clock.trials / wall * 3600}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=15, help="classes per model (15: MVTec AD)")
    p.add_argument("--models", default="haloae,hvq_trans,transformaly")
    p.add_argument("--trials", type=int, default=6, help="trials per study")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--grace-epochs", type=int, default=3)
    p.add_argument("--cpus", type=int, default=64)
    p.add_argument("--gpus", type=int, default=8, help="logical GPUs: trial slots of 1 GPU each")
    p.add_argument("--scale", type=float, default=0.4, help="simulated seconds per measured epoch second")
    p.add_argument("--design", choices=("both", "one-run", "sequential"), default="both")
    p.add_argument("--sequential-studies", type=int, default=6,
                   help="studies the sequential design runs (the first classes of each model): its studies "
                        "run one after another, so its utilisation does not depend on how many follow")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import optuna
    import ray

    from bench.common import table  # here, not at the top: trial actors import this module, not torch
    from distributed.studies import Study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    studies = [Study(f"{m}-c{i:02d}", m, (f"c{i:02d}",)) for m in models for i in range(a.classes)]
    ray.init(num_cpus=a.cpus, num_gpus=a.gpus, include_dashboard=False, log_to_driver=False)
    print(f"{len(studies)} studies x {a.trials} trials, up to {a.epochs} epochs (ASHA grace {a.grace_epochs}), "
          f"{a.gpus} slots of 1 GPU + {a.cpus // a.gpus} CPUs; epoch = measured cost x {a.scale} "
          f"({', '.join(f'{m} {EPOCH_SECONDS[m] * a.scale:.2f} s' for m in models)})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for design in (("one-run", "sequential") if a.design == "both" else (a.design,)):
            rows.append(run_design(design, studies, a, Path(tmp)))
            print(f"  {design}: {rows[-1]['wall_s']:.0f} s", flush=True)
    ray.shutdown()
    print(table(rows, "{:.1f}"))
    util = {r["design"]: f"{r['utilisation_%']:.1f} %" for r in rows}
    print(f"utilisation: one-run {util.get('one-run', 'n/a')} | sequential {util.get('sequential', 'n/a')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
