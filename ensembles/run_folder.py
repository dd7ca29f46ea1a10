"""The run folder of ``distributed.train`` / ``distributed.tune``: where each file lives, the key
of a class group, and the index of the best checkpoints.

::

    RUN/config.json                        the run's options, data, resources, per study its spec
    RUN/trials.csv                         every trial: model, classes, config, metrics, status
    RUN/studies.json                       finished studies of distributed.tune (resume skips them)
    RUN/progress.json                      the last progress lines and the trials' waits
    RUN/optuna.journal                     each study's Optuna history
    RUN/best/<model>/<classes>/model.pt    best validation checkpoint (loads with models.load_model)
    RUN/best/<model>/<classes>/best.json   its config, validation metrics, trial id and source path
    RUN/best.json                          index of the above
    RUN/ensemble/                          the fitted ensemble (ensembles.build)
    RUN/tune/                              the Ray Tune run
    RUN/train/train-<trial id>/            the Ray Train run of a DDP trial

Here, not in ``distributed/``: ``ensembles.build`` reads the run folder too, and ``ensembles``
never imports ``distributed``; this module imports neither it nor Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

CLASS_SEPARATOR = "+"
CONFIG_FILE = "config.json"
TRIALS_FILE = "trials.csv"
STUDIES_FILE = "studies.json"
PROGRESS_FILE = "progress.json"
OPTUNA_FILE = "optuna.journal"  # optuna.storages.JournalStorage
BEST_DIR = "best"
BEST_INFO_FILE = "best.json"  # in each RUN/best/<model>/<classes>/
BEST_INDEX_FILE = "best.json"  # RUN/best.json: every BEST_INFO_FILE's content, one list
ENSEMBLE_DIR = "ensemble"
TUNE_DIR = "tune"
TRAIN_DIR = "train"
TRAIN_RUN_PREFIX = "train-"  # RUN/train/train-<trial id>: a DDP trial's Ray Train run


def group_key(classes) -> str:
    """Name of a class group in file names and tables: the class, or ``a+b+c`` for a unified model."""
    return CLASS_SEPARATOR.join(classes)


def best_dir(run_dir: Path, model: str, classes) -> Path:
    """``RUN/best/<model>/<classes>/``: the best checkpoint of one (model, class group)."""
    return Path(run_dir) / BEST_DIR / model / group_key(classes)


def train_run_dir(run_dir: Path, trial_id: str) -> Path:
    """``RUN/train/train-<trial id>/``: where Ray Train keeps a DDP trial's checkpoints."""
    return Path(run_dir) / TRAIN_DIR / f"{TRAIN_RUN_PREFIX}{trial_id}"


def read_best_index(run_dir: Path) -> list[dict]:
    """The entries of ``RUN/best.json`` (none when the run has no best checkpoint yet)."""
    path = Path(run_dir) / BEST_INDEX_FILE
    return json.loads(path.read_text()) if path.exists() else []


def update_best_index(run_dir: Path, infos: list[dict]) -> list[dict]:
    """Add ``infos`` to ``RUN/best.json``, replacing the entries of the same (model, classes)."""
    path = Path(run_dir) / BEST_INDEX_FILE
    index = read_best_index(run_dir)
    keys = {(i["model"], group_key(i["classes"])) for i in infos}
    index = [i for i in index if (i["model"], group_key(i["classes"])) not in keys] + infos
    path.write_text(json.dumps(index, indent=2, default=str) + "\n")
    return index
