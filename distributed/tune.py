"""Search, train and (unless --no-ensemble) ensemble: ``python -m distributed.tune``.

With no arguments: a small offline demo on a local Ray instance (synthetic data generated once
into ~/.cache/anomaly-ensemble, three models, a few trials each). On a cluster: ``--address
auto``, a real ``--dataset``/``--root`` and a bigger ``--trials``/``--epochs``.

Every study is searched in one Ray Tune run sharing the cluster: one Optuna TPE study (seeded;
the paper's setting first) and one ASHA per study over ``search_spaces/<model>.py``
(``distributed/studies.py``). The metric is ``val_score``: the mean of image AUROC and pixel
AUROC on the validation set (held-out training normals + synthetic defects; never the test
split). ``--study-scope class`` (default) runs one study per (model, class) and keeps one best
model per class; ``unified`` runs one study per model that trains a single model on all
classes together.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray import tune

from anomaly_data import DatasetError
from anomaly_data.storage import StorageError, is_file, join, parse_location, read_bytes
from distributed.checkpoints import drop_trial_checkpoints, pickled_checkpoints
from distributed.cli import (CliError, RunContext, add_cluster_args, add_data_args, fill_resources, prepare_run,
                             split_list, start_ray, trial_placement, write_json)
from distributed.monitor import run_callbacks
from distributed.results import choose_trial, export_best, format_table, trial_rows, write_trials
from distributed.spec import SpecError, build_specs
from distributed.studies import STUDY_KEY, SearchOptions, Study, live_trial_limit, make_search
from distributed.tracking import Tracking, close_tracking, open_tracking, run_status
from distributed.train import spec_jobs
from distributed.trial import METRIC, MODE, tune_trial
from ensembles.build import build_and_evaluate
from ensembles.ensemble import EnsembleError
from ensembles.report import REPORT_FILE, write_report
from ensembles.run_folder import (CONFIG_FILE, OPTUNA_FILE, STUDIES_FILE, TIMES_FILE, TRAIN_DIR, TRIALS_FILE, TUNE_DIR,
                                  group_key, read_best_index, sync_run, update_best_index)
from models import model_class, model_names

DEFAULT_MODELS = tuple(model_names())  # every registered model
SEARCH_NAME = "search"  # RUN/tune/search: the one Tune run of every study


# Search defaults as (usual, offline demo); epochs None = each preset's own recipe. Trained
# members are starved by a handful of epochs: on the surfaces family HVQ-Trans went from 0.78
# to 0.90 test image AUROC between 3 and 25-50 epochs (python -m bench.epochs). The demo runs
# fewer and shorter trials, to stay within a few minutes on a laptop.
SEARCH_DEFAULTS = {"trials": (3, 2), "epochs": (None, 3), "grace_epochs": (3, 1)}


def default_help(option: str) -> str:
    usual, demo = SEARCH_DEFAULTS[option]
    return f"default: {usual if usual is not None else 'the preset recipe'}; the demo: {demo}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distributed.tune", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated models to tune")
    g.add_argument("--preset", default="fast", help="model preset the search starts from: fast or paper")
    g.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="fix a model config or training field (never searched), e.g. --set hvq_trans.num_heads=8 "
                        "or --set haloae.lr=1e-4 (repeatable)")
    g.add_argument("--trials", type=int, default=None, help=f"trials per study ({default_help('trials')})")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"maximum epochs per trial, ASHA stops bad ones earlier ({default_help('epochs')})")
    g.add_argument("--grace-epochs", type=int, default=None,
                   help=f"epochs every trial gets before ASHA may stop it ({default_help('grace_epochs')})")
    g.add_argument("--search", choices=("tpe", "random"), default="tpe",
                   help="tpe: Optuna TPE + ASHA early stopping; random: random sampling of the same space, "
                        "every trial trained to the end (a baseline)")
    g.add_argument("--batch-size", type=int, default=None, help="default: each preset's recipe")
    g.add_argument("--max-concurrent-per-study", type=int, default=None,
                   help="trials of one study running at once (default: its TPE random start-up trials, "
                        "min(10, max(3, trials // 3)); TPE learns only from finished trials)")
    g.add_argument("--time-budget", type=float, default=None, help="seconds for the whole search")
    g.add_argument("--study-scope", choices=("class", "unified"), default="class",
                   help="one study per (model, class), or one per model training on all classes")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run (a folder, or the run's s3:// / gs:// URI, from any "
                        "machine): finished studies and trials are kept; the run's recorded options are used "
                        "(only --address may be given anew)")
    g.add_argument("--no-ensemble", action="store_true", help="stop after the search (no ensemble, no test)")
    g.add_argument("--stall-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="when no trial has started for this long while trials wait, look for orphaned "
                        "placement groups and remove them; stop with an error if that does not help")
    g.add_argument("--mlflow", default=None, metavar="URI",
                   help="log to MLflow (default: off): each trial as a run (params, per-epoch metrics, its "
                        "study as a tag) under a parent run that gets the test table and report.html; a local "
                        "store such as sqlite:///mlflow.db, or a tracking server http://HOST:5000")
    g.add_argument("--mlflow-experiment", default=None, metavar="NAME",
                   help="MLflow experiment of the run (default: the run folder's name)")
    g.add_argument("--tune-verbose", type=int, choices=(0, 1, 2, 3), default=0,
                   help="Ray Tune's own console output (default 0: one progress line per study instead)")
    add_cluster_args(p)
    args = p.parse_args(argv)
    demo = args.dataset == "synthetic" and args.root is None
    for option, (usual, demo_value) in SEARCH_DEFAULTS.items():  # an explicit option still wins
        if getattr(args, option) is None:
            setattr(args, option, demo_value if demo else usual)
    return args


def restore_args(argv) -> argparse.Namespace:
    """``--resume RUN_DIR``: the run's own recorded options, with the new run folder fixed."""
    args = parse_args(argv)
    if args.resume is None:
        return args
    try:
        config = join(parse_location(args.resume), CONFIG_FILE)
        if not is_file(config):
            raise CliError(f"--resume {args.resume}: no config.json there (is it a run folder of distributed.tune?)")
        written = json.loads(read_bytes(config))
        recorded = written.get("args")
        pickled = pickled_checkpoints(parse_location(args.resume))
    except StorageError as err:
        raise CliError(f"--resume: {err}") from None
    if recorded is None:
        raise CliError(f"--resume {args.resume}: this run folder was not made by distributed.tune")
    if pickled:
        raise CliError(f"--resume {args.resume}: {len(pickled)} checkpoint(s) of an earlier version, pickled (e.g. "
                       f"{pickled[0]}): they are not loaded, since unpickling can run code. Convert the run first: "
                       f"python -m ensembles.convert {args.resume}")
    resumed = parse_args([])
    for key, value in recorded.items():
        setattr(resumed, key, value)
    if not resumed.classes and written.get("classes"):
        # the classes the run resolved, not those found now (the demo's root is recorded
        # resolved, and its folder or a dataset may hold more classes by now)
        resumed.classes = ",".join(written["classes"])
    resumed.resume, resumed.run_dir = args.resume, args.resume
    if args.address is not None:
        resumed.address = args.address  # the cluster may have a new address after a restart
    return resumed


def search_studies(ctx: RunContext, scope: str) -> list[Study]:
    """One study per (model, class), or per model over all classes with ``unified``."""
    groups = [ctx.classes] if scope == "unified" else [[c] for c in ctx.classes]
    return [Study(f"{m}-{group_key(g)}", m, tuple(g)) for m in ctx.models for g in groups]


def run_search(ctx: RunContext, args, todo: list, specs: dict, tracking: Tracking | None):
    """Every study as trials of one Tune run (restored when an interrupted one is found)."""
    options = SearchOptions(trials=args.trials, epochs={s.key: specs[s.key].recipe.epochs for s in todo},
                            grace_epochs=args.grace_epochs, search=args.search, seed=args.seed,
                            max_concurrent_per_study=args.max_concurrent_per_study,
                            optuna_storage=str(ctx.run_dir / OPTUNA_FILE), eval_every=ctx.eval_every,
                            checkpoint_minutes=ctx.checkpoint_minutes)
    bases = spec_jobs(ctx, {s.key: specs[s.key] for s in todo}, args.skip_bad_images,
                      {s.key: options.report_plan(s.key) for s in todo})
    for model in dict.fromkeys(s.model for s in todo if model_class(s.model).trains):
        job = next(bases[s.key] for s in todo if s.model == model)
        print(f"[tune] {model}: {job.plan.describe(job.recipe.epochs)}", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, bases=bases, storage=join(ctx.location, TRAIN_DIR), resources=ctx.resources()),
        functools.partial(trial_placement, ctx))
    path = join(ctx.location, TUNE_DIR, SEARCH_NAME)
    callbacks, stopper = run_callbacks(ctx, todo, args)
    if tracking is not None:
        callbacks.append(tracking.trial_callback())
    if args.tune_verbose == 0:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's new console output prints a banner even when silent
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if tune.Tuner.can_restore(str(path)):
        print("[tune] resuming the search: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)
        run_config = tuner._local_tuner.get_run_config()  # noqa: SLF001 -- restore would keep the pickled ones
        run_config.callbacks, run_config.stop = callbacks, stopper
    else:
        spaces = {s.key: specs[s.key].space() for s in todo}
        searcher, scheduler = make_search(todo, spaces, options, METRIC, MODE)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=searcher.total_trials,
                                        max_concurrent_trials=live_trial_limit(ctx.max_concurrent,
                                                                               args.max_concurrent is not None),
                                        time_budget_s=args.time_budget,
                                        # a DDP trial's thread outlives a stop (Train runs on): no reuse
                                        reuse_actors=ctx.workers <= 1),
            run_config=tune.RunConfig(
                name=SEARCH_NAME, storage_path=join(ctx.location, TUNE_DIR), verbose=args.tune_verbose,
                callbacks=callbacks, stop=stopper, failure_config=tune.FailureConfig(max_failures=0),
                # trials that train in their own process hand their checkpoints to Tune
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                        checkpoint_score_order=MODE)))
    with InterruptWatch() as watch:
        grid = tuner.fit()
    return grid, watch.interrupted, stopper


class InterruptWatch(logging.Handler):
    """Notices Tune's "Experiment has been interrupted" warning: on Ctrl-C ``Tuner.fit`` returns
    normally, and only that warning tells an interrupted search from a finished one."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.interrupted = False

    def emit(self, record: logging.LogRecord) -> None:
        if "has been interrupted" in record.getMessage():
            self.interrupted = True

    def __enter__(self):
        logging.getLogger("ray.tune").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("ray.tune").removeHandler(self)


def finish_studies(ctx: RunContext, todo: list, grid, specs: dict, done: dict) -> None:
    """Per study: its rows in trials.csv, its best checkpoint in best/, its entry in studies.json."""
    results = [r for r in grid if r.config]
    for study in todo:
        mine = [r for r in results if r.config.get(STUDY_KEY) == study.key]
        if not mine:
            print(f"[tune] {study.key}: no trial ran (was --time-budget too short?)", flush=True)
            continue
        rows = trial_rows(mine, study.model)
        write_trials(rows, ctx.run_dir / TRIALS_FILE)
        chosen, why = choose_trial(mine, specs[study.key].first_point())
        if why:
            print(f"[tune] {study.key}: {why}", flush=True)
        info = export_best(chosen, ctx.run_dir, study.model, list(study.classes),
                           {"study": study.key, **({"search_choice": why} if why else {})})
        update_best_index(ctx.run_dir, [info] if info else [])
        drop_trial_checkpoints(mine, ctx.location)  # best/ holds the one copy the study keeps
        failed = sum(r["status"] == "error" for r in rows)
        if failed:
            print(f"[tune] {study.key}: {failed} of {len(rows)} trial(s) failed (see trials.csv, column error)",
                  flush=True)
        done[study.key] = {"best": info["checkpoint"] if info else None, "trials": len(rows),
                           "finished": time.time()}
    write_json(ctx.run_dir / STUDIES_FILE, done)


def print_specs(specs: dict) -> None:
    """One line per model (its studies share preset and recipe but for the epochs)."""
    seen = set()
    for spec in specs.values():
        if spec.model in seen:
            continue
        seen.add(spec.model)
        r = spec.recipe
        pinned = f", fixed {sorted(spec.pinned)}" if spec.pinned else ""
        training = f", {r.optimizer} lr {r.lr:g} (searched around it)" if model_class(spec.model).trains else ""
        print(f"[tune] {spec.model}: preset {spec.preset}, {spec.epochs_note}, batch {r.batch_size}"
              f"{training}{pinned}", flush=True)


def first_failure(trials_csv: Path) -> str:
    """The cause of the first failed trial in ``trials.csv``, for the final error message."""
    if not trials_csv.is_file():
        return "no trial ran (see the log above)"
    rows = pd.read_csv(trials_csv)
    failed = rows[rows["status"] == "error"] if "status" in rows else rows.iloc[:0]
    if failed.empty:
        return f"no trial reported a validation score (see {trials_csv})"
    row = failed.iloc[0]
    return f"the first failure ({row['model']} on {row['classes']}): {row['error']} (all in {trials_csv})"


def load_done(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STUDIES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv=None) -> int:
    t0 = time.time()
    tracking = None
    try:
        args = restore_args(argv)
        models = split_list(args.models) or list(DEFAULT_MODELS)
        if args.trials < 1 or (args.epochs is not None and args.epochs < 1):
            raise CliError("--trials and --epochs must be >= 1")
        if args.max_concurrent_per_study is not None and args.max_concurrent_per_study < 1:
            raise CliError(f"--max-concurrent-per-study must be >= 1, got {args.max_concurrent_per_study}")
        if args.stall_timeout <= 0:
            raise CliError(f"--stall-timeout must be > 0 seconds, got {args.stall_timeout}")
        ctx = prepare_run(args, models)
        studies = search_studies(ctx, args.study_scope)
        specs = build_specs(studies, ctx.records, args.preset, args.set, args.epochs, args.batch_size,
                            args.image_size, args.seed)
        if args.mlflow:  # before Ray starts: a store that cannot be reached fails at once
            tracking = open_tracking(args.mlflow, args.mlflow_experiment or Path(ctx.location).name, ctx.run_dir,
                                     {k: v for k, v in vars(args).items() if v is not None})
        start_ray(ctx)
        fill_resources(ctx)
    except (CliError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        if tracking is not None:  # Ray did not start: the parent run ends here
            tracking.client().set_terminated(tracking.parent_run_id, "FAILED")
        return 2
    times: dict[str, float] = {}
    code = 1
    try:
        code = run(ctx, args, studies, specs, t0, times, tracking)
        return code
    finally:
        finish_run(ctx, tracking, code, {**times, "total_s": time.time() - t0})
        try:
            sync_run(ctx.run_dir, ctx.run_uri)  # whatever happened, the bucket gets what the run wrote
        except StorageError as err:
            print(f"error: the run's files in {ctx.run_dir} could not be uploaded to {ctx.run_uri}: {err}",
                  file=sys.stderr, flush=True)


def finish_run(ctx: RunContext, tracking: Tracking | None, code: int, times: dict[str, float]) -> None:
    """At the end of every run, whatever its outcome: ``times.json``, ``report.html`` and the
    MLflow parent run's figures and files. A failure here is reported, never raised: the run's
    own outcome stands."""
    write_json(ctx.run_dir / TIMES_FILE, times)
    try:
        report = write_report(ctx.run_dir)
        where = join(ctx.location, REPORT_FILE) if ctx.run_uri else report
        print(f"[tune] report: {where}", flush=True)
    except Exception as err:  # noqa: BLE001 -- a report must not turn a finished run into a failed one
        print(f"warning: report.html not written: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    if tracking is not None:
        try:
            close_tracking(tracking, ctx.run_dir, run_status(code))
            print(f"[tune] MLflow: run {tracking.parent_run_id} in experiment {tracking.experiment_name!r} at "
                  f"{tracking.tracking_uri} (open it with: mlflow ui --backend-store-uri {tracking.tracking_uri})",
                  flush=True)
        except Exception as err:  # noqa: BLE001 -- the same: the run's files are already safe on disk
            print(f"warning: MLflow: the run's results were not logged: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)


def run(ctx: RunContext, args, studies: list[Study], specs: dict, t0: float, times: dict[str, float],
        tracking: Tracking | None) -> int:
    """The search, the best checkpoints and the ensemble of a checked run; the exit code.
    ``times`` gets the seconds the search and the ensemble took."""
    recorded = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recorded["root"] = str(ctx.root)  # resolved: a resume from another folder finds the data
    write_json(ctx.run_dir / CONFIG_FILE, {"command": "tune", "args": recorded, "dataset": ctx.dataset,
                                             "root": str(ctx.root), "classes": ctx.classes,
                                             "resources": ctx.resources(), "max_concurrent": ctx.max_concurrent,
                                             "cluster": ctx.cluster,
                                             "specs": {k: s.summary() for k, s in specs.items()}})
    sync_run(ctx.run_dir, ctx.run_uri)  # before the search: a resume from another machine needs config.json
    print_specs(specs)
    staged = f" (staged in {ctx.run_dir})" if ctx.run_uri else ""
    print(f"[tune] run folder {ctx.location}{staged}; {len(ctx.classes)} class(es), models {ctx.models}, "
          f"{args.trials} trial(s) per study, up to {ctx.max_concurrent} at a time", flush=True)
    done = load_done(ctx.run_dir)
    todo = [s for s in studies if s.key not in done]
    if todo:
        started = time.time()
        grid, interrupted, stopper = run_search(ctx, args, todo, specs, tracking)
        times["search_s"] = time.time() - started
        if stopper.failure:
            print(f"error: {stopper.failure}", file=sys.stderr, flush=True)
            return 1
        if interrupted:
            print(f"[tune] interrupted; continue with python -m distributed.tune --resume {ctx.location}",
                  file=sys.stderr, flush=True)
            return 130
        finish_studies(ctx, todo, grid, specs, done)
        sync_run(ctx.run_dir, ctx.run_uri)
    index = read_best_index(ctx.run_dir)
    index = [i for i in index if i["model"] in ctx.models and set(i["classes"]) <= set(ctx.classes)]
    print("\nBest validation scores (validation = held-out normals + synthetic defects):")
    print(format_table(index), flush=True)
    if not index:
        print(f"error: no trial of any study succeeded; {first_failure(ctx.run_dir / TRIALS_FILE)}", file=sys.stderr)
        return 1
    if not args.no_ensemble:
        started = time.time()
        try:
            print(build_and_evaluate(ctx.run_dir, index, ctx.dataset, ctx.local_root, ctx.classes, args.seed,
                                     skip_bad_images=args.skip_bad_images), flush=True)
        except (EnsembleError, DatasetError) as err:
            print(f"error: no ensemble: {err}", file=sys.stderr)
            return 1
        times["ensemble_s"] = time.time() - started
    print(f"[tune] finished in {time.time() - t0:.0f} s; results in {ctx.location}", flush=True)
    return 0

if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    sys.exit(main())
