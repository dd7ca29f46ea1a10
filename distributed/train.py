"""Ray Train: one (model, classes) training run with DDP workers, validated every epoch.

    python -m distributed.train --model haloae --dataset mvtec --root DIR --classes bottle,cable \\
        --workers 2 [--address auto]

Every class is its own run (all runs go through Ray Tune so that they run concurrently as
resources allow); ``--unified`` trains one model on all the classes instead (HVQ-Trans's
multi-class mode). Each epoch the workers train on their shard of the training normals, then
rank 0 fits the model's statistics, scores the validation set (held-out normals + synthetic
defects, never the test split) and reports ``val_image_auroc``, ``val_pixel_auroc``,
``val_score`` (their mean) and the training loss together with a checkpoint.

This module is the command: the grid of trainings, one Tune trial per class group, each trial
``distributed.trial.tune_trial`` (no search: ``distributed.tune`` searches).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from ray import tune

from anomaly_data.storage import join
from distributed.cli import (CliError, RunContext, add_cluster_args, add_data_args, fill_resources, prepare_run,
                             start_ray, trial_placement, write_json)
from distributed.results import collect_best, format_table
from distributed.spec import SpecError, build_specs, spec_job
from distributed.studies import ReportPlan, Study
from distributed.trial import METRIC, MODE, TrainJob, tune_trial
from ensembles.run_folder import CONFIG_FILE, TRAIN_DIR, TUNE_DIR, group_key, sync_run


def spec_jobs(ctx: RunContext, specs: dict, skip_bad_images: bool,
              plans: dict[str, ReportPlan] | None = None) -> dict[str, TrainJob]:
    """Per study key, the training job of its spec (``distributed.spec``) on this run's data, with
    its ``ReportPlan`` (default: validate every ``--eval-every`` epochs and at the last)."""
    default = ReportPlan((), ctx.eval_every, ctx.checkpoint_minutes)
    return {key: spec_job(spec, ctx.dataset, str(ctx.root), ctx.seed, skip_bad_images, ctx.precision,
                          (plans or {}).get(key, default))
            for key, spec in specs.items()}


def run_grid(ctx: RunContext, specs: dict, skip_bad_images: bool) -> str:
    """Train each study's spec once, concurrently through Ray Tune (no search)."""
    bases = spec_jobs(ctx, specs, skip_bad_images)
    model = next(iter(specs.values())).model
    start_ray(ctx)
    fill_resources(ctx)
    write_json(ctx.run_dir / CONFIG_FILE, {"command": "train", "jobs": {k: b.to_dict() for k, b in bases.items()},
                                           "specs": {k: s.summary() for k, s in specs.items()},
                                           "resources": ctx.resources(), "max_concurrent": ctx.max_concurrent})
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, bases=bases, storage=join(ctx.location, TRAIN_DIR),
                             resources=ctx.resources()),
        functools.partial(trial_placement, ctx))
    tuner = tune.Tuner(trainable, param_space={"study": tune.grid_search(list(bases)), "model": model},
                       tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, max_concurrent_trials=ctx.max_concurrent),
                       run_config=tune.RunConfig(name="train", storage_path=join(ctx.location, TUNE_DIR),
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    try:
        grid = tuner.fit()
        best = collect_best(grid, ctx.run_dir, model, {k: list(b.classes) for k, b in bases.items()}, ctx.location)
    finally:
        sync_run(ctx.run_dir, ctx.run_uri)  # a run in a bucket: its own files go there too
    return format_table(best)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m distributed.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a registered model: haloae, hvq_trans, transformaly, patchcore")
    add_data_args(p)
    p.add_argument("--preset", default="fast", help="model preset: fast (CPU-sized) or paper")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="fix a model config or training field, e.g. --set haloae.halo=3 (repeatable)")
    p.add_argument("--unified", action="store_true", help="one model for all the classes (multi-class)")
    p.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    add_cluster_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.epochs is not None and args.epochs < 1:
            raise CliError(f"--epochs must be >= 1, got {args.epochs}")
        ctx = prepare_run(args, models=[args.model])
        groups = [ctx.classes] if args.unified else [[c] for c in ctx.classes]
        sets = list(args.set) + ([f"{args.model}.lr={args.lr}"] if args.lr is not None else [])
        studies = [Study(group_key(g), args.model, tuple(g)) for g in groups]
        specs = build_specs(studies, ctx.records, args.preset, sets, args.epochs, args.batch_size,
                            args.image_size, args.seed)
        table = run_grid(ctx, specs, args.skip_bad_images)
    except (CliError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    sys.exit(main())
