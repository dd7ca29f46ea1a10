"""The run folder of ``distributed.train`` / ``distributed.tune``: where each file lives, the key
of a class group, and the index of the best checkpoints.

::

    RUN/config.json                        the run's options, data, resources, per study its spec
    RUN/trials.csv                         every trial: model, classes, config, metrics, status
    RUN/studies.json                       finished studies of distributed.tune (resume skips them)
    RUN/progress.json                      the last progress lines and the trials' waits
    RUN/optuna.journal                     each study's Optuna history
    RUN/times.json                         seconds spent: search, ensemble and test, whole run
    RUN/report.html                        the report of the run (ensembles.report)
    RUN/best/<model>/<classes>/model.safetensors  best validation checkpoint (loads with models.load_model)
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

from anomaly_data.storage import is_uri, join, upload_folder
from ensembles.ensemble import CONFIG_FILE as ENSEMBLE_FILE

CLASS_SEPARATOR = "+"
CONFIG_FILE = "config.json"
TRIALS_FILE = "trials.csv"
STUDIES_FILE = "studies.json"
PROGRESS_FILE = "progress.json"
OPTUNA_FILE = "optuna.journal"  # optuna.storages.JournalStorage
TIMES_FILE = "times.json"
BEST_DIR = "best"
BEST_INFO_FILE = "best.json"  # in each RUN/best/<model>/<classes>/
BEST_INDEX_FILE = "best.json"  # RUN/best.json: every BEST_INFO_FILE's content, one list
ENSEMBLE_DIR = "ensemble"
TUNE_DIR = "tune"
TRAIN_DIR = "train"
TRAIN_RUN_PREFIX = "train-"  # RUN/train/train-<trial id>: a DDP trial's Ray Train run
RESUME_ONLY = "resume_only"
"""Set (1) in a trial's report that carries only a checkpoint to resume from, no validation: its
score is -inf so that Tune's checkpoint ranking never prefers it, and searchers, schedulers,
the trial table and the report skip it."""


def group_key(classes) -> str:
    """Name of a class group in file names and tables: the class, or ``a+b+c`` for a unified model."""
    return CLASS_SEPARATOR.join(classes)


def best_dir(run_dir: Path, model: str, classes) -> Path:
    """``RUN/best/<model>/<classes>/``: the best checkpoint of one (model, class group)."""
    return Path(run_dir) / BEST_DIR / model / group_key(classes)


def train_run_dir(run_dir: str | Path, trial_id: str) -> str | Path:
    """``RUN/train/train-<trial id>/``: where Ray Train keeps a DDP trial's checkpoints (``run_dir``
    may be the run's URI)."""
    return join(run_dir if isinstance(run_dir, str) and is_uri(run_dir) else Path(run_dir),
                TRAIN_DIR, f"{TRAIN_RUN_PREFIX}{trial_id}")


def read_best_index(run_dir: Path) -> list[dict]:
    """The entries of ``RUN/best.json`` (none when the run has no best checkpoint yet), each
    ``checkpoint`` in ``run_dir``'s own ``best/``: a run folder may have been moved, or fetched
    from a bucket onto another machine."""
    path = Path(run_dir) / BEST_INDEX_FILE
    index = json.loads(path.read_text()) if path.exists() else []
    for info in index:
        if "checkpoint" in info:
            info["checkpoint"] = str(best_dir(run_dir, info["model"], info["classes"]) / Path(info["checkpoint"]).name)
    return index


def update_best_index(run_dir: Path, infos: list[dict]) -> list[dict]:
    """Add ``infos`` to ``RUN/best.json``, replacing the entries of the same (model, classes)."""
    path = Path(run_dir) / BEST_INDEX_FILE
    index = read_best_index(run_dir)
    keys = {(i["model"], group_key(i["classes"])) for i in infos}
    index = [i for i in index if (i["model"], group_key(i["classes"])) not in keys] + infos
    path.write_text(json.dumps(index, indent=2, default=str) + "\n")
    return index


# index files go last: whoever sees them finds the files they name
POINTER_FILES = (BEST_INDEX_FILE, STUDIES_FILE, f"{ENSEMBLE_DIR}/{ENSEMBLE_FILE}")


def sync_run(run_dir: Path, run_uri: str | None) -> int:
    """For a run in a bucket: upload its own files that changed since the last sync, each in one
    PUT, the index files last (Tune and Train write theirs to the bucket themselves). Nothing to
    do for a local run. Returns how many files were put."""
    if run_uri is None:
        return 0
    return upload_folder(Path(run_dir), run_uri, exclude=(TUNE_DIR, TRAIN_DIR), last=POINTER_FILES)
