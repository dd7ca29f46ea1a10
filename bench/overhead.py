"""Where a trial's time goes besides its optimiser steps, and what it writes: validated and
checkpointed after every epoch ("every epoch") against the search's default ``ReportPlan``
(ASHA's rungs, the last epoch, a checkpoint to resume from at most every
``--checkpoint-minutes``: "default").

    python -m bench.overhead [--models haloae,hvq_trans,transformaly] [--presets fast,paper]
    python -m bench.overhead --run RUN_DIR [--run RUN_DIR ...]

Per trained model and preset (weights none, a small synthetic class), a real trial
(``distributed.trial.train_loop``) trains ``--epochs`` epochs, validating after each and
writing each checkpoint to disk as Tune does. From its last epoch it takes the seconds of a
training pass and of a validation (refit + scoring) per image (the first validation, which
fills the frozen-output cache, and a later one), and the seconds and bytes of one checkpoint,
and works out a whole trial on an MVTec-sized class (``CLASS_IMAGES`` normals: 80 % train, the
rest and their synthetic defects validate) at the preset's recipe. Shares are of the
whole trial's wall time on this machine. A checkpoint to resume from is written per
``--checkpoint-minutes`` of training: for the bytes, the training time is that of one GPU,
``--gpu-trial-minutes`` (an assumption the output states; ``bench/gpu.py`` measures it).
PatchCore is fitted in one pass: its fit and validation seconds on the small class are printed
instead.

With ``--run``, the shares come from a finished search instead (its trials' ``result.json``):
``1 - training seconds / reported wall time`` per model, over every trial.

Besides the table, one line per figure, for scripts::

    overhead: MODEL PRESET SHARE %            (before and after: two lines, "every-epoch" / "default")
    bytes per trial: MODEL paper GB GB        (every epoch, default)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import machine, table
from distributed.trial import TrainSession

MODELS = ("haloae", "hvq_trans", "transformaly", "patchcore")
CLASS_IMAGES = 240  # an MVTec-sized class: 80 % train (val_fraction 0.2)
GPU_TRIAL_MINUTES = 30.0  # assumed training minutes of a paper trial on one GPU (resume checkpoints' bytes)
GB = 1e9


class DiskSession(TrainSession):
    """A trial's session without Ray, in this process: each report's checkpoint is written to a
    temporary folder and copied into the trial's storage, as Tune persists it; what each costs
    is kept."""

    def __init__(self, storage: Path):  # noqa: super().__init__ asks Ray where it runs
        self.in_tune_trial, self.rank, self.world, self.node, self.placement_group = True, 0, 1, "bench", None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.storage = storage
        self.reports: list[dict] = []

    def checkpoint(self):
        return None

    def report(self, metrics: dict, write_checkpoint) -> None:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp))
            target = self.storage / f"checkpoint_{len(self.reports):06d}"
            shutil.copytree(tmp, target)
        written = sum(f.stat().st_size for f in target.iterdir())
        self.reports.append({**metrics, "checkpoint_seconds": time.perf_counter() - started,
                             "checkpoint_bytes": written})


def small_class(image_size: int) -> Path:
    from anomaly_data.synthetic import ensure_dataset

    return ensure_dataset(Path(tempfile.gettempdir()) / f"bench-overhead-{image_size}", classes=["washer"],
                          image_size=image_size, n_train=20, n_test_good=2, n_test_per_defect=1)


def measure(model: str, preset: str, epochs: int) -> dict:
    """Seconds per training image, per validated image, per checkpoint, and a checkpoint's bytes."""
    from distributed.trial import TrainJob, load_splits, train_loop
    from models import model_class

    config = model_class(model).config_class.from_preset(preset, weights="none")
    root = small_class(config.image_size)
    job = TrainJob.of(model, "mvtec", str(root), ["washer"], preset, recipe={"epochs": epochs},
                      weights="none")
    splits = load_splits(job, config.image_size)
    with tempfile.TemporaryDirectory() as storage, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = DiskSession(Path(storage))
        started = time.perf_counter()
        train_loop(job, session)
        wall = time.perf_counter() - started
    first, last = session.reports[0], session.reports[-1]  # the first epoch pays for warm-up
    n_train, n_val = len(splits.train), len(splits.validation)
    return {"train_s_per_image": last.get("train_seconds", last["epoch_seconds"]) / n_train,
            "validate_s_per_image": last["validate_seconds"] / (n_train + n_val),
            # a trial's first validation fills the frozen-output cache (models/layers/frozen_cache.py)
            "first_validate_s_per_image": first["validate_seconds"] / (n_train + n_val),
            "checkpoint_s": last["checkpoint_seconds"], "checkpoint_bytes": last["checkpoint_bytes"],
            "val_per_train": n_val / n_train, "wall_s": wall, "n_train": n_train}


def whole_trial(model: str, preset: str, m: dict, checkpoint_minutes: float, gpu_minutes: float) -> dict:
    """The measured costs worked out for a trial on a ``CLASS_IMAGES`` class, before and after."""
    from distributed.spec import study_recipe
    from distributed.studies import ReportPlan, SearchOptions
    from distributed.tune import SEARCH_DEFAULTS

    n_train = round(CLASS_IMAGES * 0.8)
    passes = study_recipe(model, preset, {}, n_train, None, None)[0].epochs
    pass_s = m["train_s_per_image"] * n_train
    validate_s = m["validate_s_per_image"] * n_train * (1 + m["val_per_train"])
    first_validate_s = m["first_validate_s_per_image"] * n_train * (1 + m["val_per_train"])
    row = {"model": model, "preset": preset, "passes": passes, "pass s": pass_s, "validate s": validate_s,
           "first validate s": first_validate_s,
           "checkpoint s": m["checkpoint_s"], "checkpoint MB": m["checkpoint_bytes"] / 1e6}
    plans = {"every-epoch": ReportPlan(),
             "default": dataclasses.replace(SearchOptions(trials=1, epochs=passes, grace_epochs=SEARCH_DEFAULTS["grace_epochs"][0])
                                            .report_plan("bench"), checkpoint_minutes=checkpoint_minutes)}
    for name, plan in plans.items():
        validations = plan.validations(passes)
        resumes = resume_checkpoints(plan, passes, pass_s)
        train = passes * pass_s
        total = (train + first_validate_s + (validations - 1) * validate_s
                 + (validations + resumes) * m["checkpoint_s"])
        row[f"validations {name}"] = validations
        row[f"overhead {name} %"] = 100 * (1 - train / total)
        gpu_resumes = resume_checkpoints(plan, passes, 60 * gpu_minutes / passes)
        row[f"GB {name}"] = (validations + gpu_resumes) * m["checkpoint_bytes"] / GB
    return row


def resume_checkpoints(plan, passes: int, pass_s: float) -> int:
    """Checkpoints to resume from that ``plan`` writes between its validations, at ``pass_s`` a pass."""
    count, since = 0, 0.0
    for epoch in range(1, passes + 1):
        since += pass_s
        if plan.validates(epoch, passes):
            since = 0.0
        elif plan.resume_due(since):
            count, since = count + 1, 0.0
    return count


def fitted_once(preset: str) -> dict:
    """PatchCore's trial: one fit and one validation, as measured on the small class (its greedy
    coreset grows with the square of the patches: not worked out for a bigger class;
    ``bench/gpu.py`` fits a 192-image class)."""
    m = measure("patchcore", preset, 1)
    return {"model": "patchcore", "preset": preset, "training images": m["n_train"],
            "fit s": m["train_s_per_image"] * m["n_train"],
            "validate s": m["validate_s_per_image"] * m["n_train"] * (1 + m["val_per_train"]),
            "checkpoint MB": m["checkpoint_bytes"] / 1e6}


def search_shares(run_dir: Path) -> list[dict]:
    """Per model: the share of its trials' reported wall time outside training, from a finished search."""
    totals: dict[str, list[float]] = {}
    for result in sorted((run_dir / "tune").rglob("result.json")):
        for line in result.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            model = (r.get("config") or {}).get("model")
            if model is None or "time_this_iter_s" not in r:
                continue
            train = r.get("train_seconds", r.get("epoch_seconds", 0.0))
            t = totals.setdefault(model, [0.0, 0.0, 0])
            t[0], t[1], t[2] = t[0] + train, t[1] + r["time_this_iter_s"], t[2] + 1
    return [{"run": run_dir.name, "model": model, "reports": int(n), "train s": train, "wall s": wall,
             "overhead %": 100 * (1 - train / wall)} for model, (train, wall, n) in sorted(totals.items())]


def main(argv=None) -> None:
    from distributed.studies import DEFAULT_CHECKPOINT_MINUTES

    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--presets", default="fast,paper")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each measured trial (the last one is used)")
    p.add_argument("--checkpoint-minutes", type=float, default=DEFAULT_CHECKPOINT_MINUTES)
    p.add_argument("--gpu-trial-minutes", type=float, default=GPU_TRIAL_MINUTES,
                   help="a paper trial's training minutes on one GPU, for the resume checkpoints' bytes")
    p.add_argument("--run", action="append", default=[], help="a finished search's run folder (repeatable)")
    a = p.parse_args(argv)
    print(f"machine: {machine()}\n")
    if a.run:
        rows = [r for run in a.run for r in search_shares(Path(run))]
        print(table(rows, floats="{:.1f}"))
        for r in rows:
            print(f"overhead: {r['model']} search {r['overhead %']:.1f} % ({r['run']})")
        return
    rows, fitted = [], []
    for preset in a.presets.split(","):
        for model in a.models.split(","):
            if model == "patchcore":
                fitted.append(fitted_once(preset))
            else:
                rows.append(whole_trial(model, preset, measure(model, preset, a.epochs), a.checkpoint_minutes,
                                        a.gpu_trial_minutes))
    print(f"a trial on a {CLASS_IMAGES}-image class, from a measured trial on {a.epochs} epoch(s) of a small "
          f"class (weights none); resume checkpoints every {a.checkpoint_minutes:g} min of training (GB: "
          f"assuming {a.gpu_trial_minutes:g} min of training on one GPU)\n")
    print(table(rows, floats="{:.2f}"))
    if fitted:
        print("\nfitted in one pass:\n" + table(fitted, floats="{:.2f}"))
    for r in rows:
        for name in ("every-epoch", "default"):
            print(f"overhead: {r['model']} {r['preset']} {r[f'overhead {name} %']:.1f} % ({name})")
        if r["preset"] == "paper":
            print(f"bytes per trial: {r['model']} paper {r['GB every-epoch']:.1f} GB {r['GB default']:.2f} GB")


if __name__ == "__main__":
    main()
