"""Keeping a run's checkpoints lean: optimiser state only where a resume can use it, one copy
of each study's best model.

Every epoch a trial writes ``model.pt`` (what training changed, no frozen backbone: see
``AnomalyModel.checkpoint``) and ``state.pt`` (optimiser state, epoch, random state), and Tune
keeps the trial's best two. Only the latest checkpoint of an unfinished trial can be resumed:
once a trial ends, ``DropOptimizerState`` empties the optimiser state of its checkpoints; once
the search is over, ``drop_trial_checkpoints`` deletes a study's trial checkpoints after its
best ``model.pt`` has been exported to ``RUN/best/`` (the one copy ``ensemble/`` refers to).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from ray.tune import Callback

from distributed.train import CHECKPOINT_STATE

CHECKPOINT_GLOB = "checkpoint_*"
TRAIN_RUN_PREFIX = "train-"  # RUN/train/train-<trial id>: a DDP trial's Ray Train run


def trial_checkpoint_folders(trial_path: str | None, run_dir: Path, trial_id: str | None) -> list[Path]:
    """The checkpoint folders a trial wrote: in its Tune folder, and in its Ray Train run (DDP)."""
    folders = []
    if trial_path:
        folders += sorted(Path(trial_path).glob(CHECKPOINT_GLOB))
    if trial_id:
        folders += sorted((run_dir / "train" / f"{TRAIN_RUN_PREFIX}{trial_id}").glob(CHECKPOINT_GLOB))
    return folders


def strip_optimizer_state(folder: Path) -> bool:
    """Rewrite ``folder/state.pt`` without its optimiser state; True when it had one."""
    path = folder / CHECKPOINT_STATE
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("optimizer") is None:
        return False
    state["optimizer"] = None
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return True


class DropOptimizerState(Callback):
    """A trial that ended (finished, stopped by ASHA, failed) is never resumed."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def _strip(self, trial) -> None:
        for folder in trial_checkpoint_folders(getattr(trial, "path", None), self.run_dir, trial.trial_id):
            strip_optimizer_state(folder)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._strip(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._strip(trial)


def drop_trial_checkpoints(results, run_dir: Path) -> int:
    """Delete the checkpoint folders of a finished study's trials; returns how many."""
    count = 0
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or (result.config or {}).get("trial_id")
        for folder in trial_checkpoint_folders(getattr(result, "path", None), Path(run_dir), trial_id):
            shutil.rmtree(folder, ignore_errors=True)
            count += 1
    return count
