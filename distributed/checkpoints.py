"""Keeping a run's checkpoints lean: optimiser state only where a resume can use it, one copy
of each study's best model.

Every epoch a trial writes ``model.pt`` (what training changed, no frozen backbone: see
``AnomalyModel.checkpoint``) and ``state.pt`` (optimiser state, epoch, random state), and Tune
keeps the trial's best two. Only the latest checkpoint of an unfinished trial can be resumed: a
trial training in its own process empties the older ones after each report
(``strip_all_but_latest``); once a trial ends, ``distributed.monitor.DropOptimizerState`` empties the optimiser state of its checkpoints; once
the search is over, ``drop_trial_checkpoints`` deletes a study's trial checkpoints after its
best ``model.pt`` has been exported to ``RUN/best/`` (the one copy ``ensemble/`` refers to).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ensembles.run_folder import train_run_dir

CHECKPOINT_MODEL = "model.pt"  # models.load_model reads it
CHECKPOINT_STATE = "state.pt"  # optimiser state, epoch, random state: what a resume needs besides
CHECKPOINT_GLOB = "checkpoint_*"


def strip_trial(trial_path: str | None, run_dir: Path, trial_id: str | None) -> None:
    for folder in trial_checkpoint_folders(trial_path, run_dir, trial_id):
        strip_optimizer_state(folder)


def trial_checkpoint_folders(trial_path: str | None, run_dir: Path, trial_id: str | None) -> list[Path]:
    """The checkpoint folders a trial wrote: in its Tune folder, and in its Ray Train run (DDP)."""
    folders = []
    if trial_path:
        folders += sorted(Path(trial_path).glob(CHECKPOINT_GLOB))
    if trial_id:
        folders += sorted(train_run_dir(run_dir, trial_id).glob(CHECKPOINT_GLOB))
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


def strip_all_but_latest(trial_dir: Path) -> None:
    """Empty the optimiser state of every checkpoint in ``trial_dir`` but the newest (the one a
    resume starts from). Nothing to do where Tune keeps checkpoints elsewhere (object storage)."""
    for folder in sorted(Path(trial_dir).glob(CHECKPOINT_GLOB))[:-1]:
        strip_optimizer_state(folder)


def drop_trial_checkpoints(results, run_dir: Path) -> int:
    """Delete the checkpoint folders of a finished study's trials; returns how many."""
    count = 0
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        for folder in trial_checkpoint_folders(getattr(result, "path", None), Path(run_dir), trial_id):
            shutil.rmtree(folder, ignore_errors=True)
            count += 1
    return count
