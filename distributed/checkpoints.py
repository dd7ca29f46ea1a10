"""Keeping a run's checkpoints lean: optimiser state only where a resume can use it, one copy
of each study's best model.

Every epoch a trial writes ``model.safetensors`` (what training changed, no frozen backbone: see
``AnomalyModel.checkpoint``) and ``state.safetensors`` (optimiser state, epoch, random state;
tensors in the file, the rest JSON in its metadata: ``models.checkpoint_files``), and Tune
keeps the trial's best two. Only the latest checkpoint of an unfinished trial can be resumed: a
trial training in its own process empties the older ones after each report
(``strip_all_but_latest``); once a trial ends, ``distributed.monitor.DropOptimizerState`` empties the optimiser state of its checkpoints; once
the search is over, ``drop_trial_checkpoints`` deletes a study's trial checkpoints after its
best ``model.safetensors`` has been exported to ``RUN/best/`` (the one copy ``ensemble/`` refers to).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from anomaly_data.storage import (delete_folder, is_file, is_uri, join, location_of, object_stamps, read_bytes,
                                  subfolders, write_bytes)
from ensembles.run_folder import train_run_dir
from models import checkpoint_files

CHECKPOINT_MODEL = "model.safetensors"  # models.load_model reads it
CHECKPOINT_STATE = "state.safetensors"  # optimiser state, epoch, random state: what a resume needs besides
CHECKPOINT_GLOB = "checkpoint_*"
PICKLED_SUFFIX = ".pt"  # checkpoints of earlier versions (torch.save): model.pt, state.pt, members/*/*.pt


def read_trial_state(location: str | Path) -> dict:
    """``state.safetensors`` (a path or a URI) as ``{"optimizer": state dict or None, "epoch",
    "metrics", "job", "rng"}``."""
    return checkpoint_files.decode_trial_state(read_bytes(location), str(location))


def pickled_checkpoints(location: str | Path) -> list[str]:
    """The pickled checkpoints in a run folder or its bucket: those of an earlier version
    (``*.pt``; ``python -m ensembles.convert`` rewrites them) and, on a local disk, any
    ``.safetensors`` file that is a pickle. None of them is ever loaded."""
    if is_uri(location):
        return sorted(f"{location}/{key}" for key in object_stamps(str(location)) if key.endswith(PICKLED_SUFFIX))
    found = [p for p in Path(location).rglob(f"*{PICKLED_SUFFIX}") if p.is_file()]
    found += [p for p in Path(location).rglob(f"*{checkpoint_files.SUFFIX}") if checkpoint_files.is_pickle(p)]
    return sorted(map(str, found))


def strip_trial(trial_location: str | Path | None, storage: str | Path, trial_id: str | None) -> None:
    for folder in trial_checkpoint_folders(trial_location, storage, trial_id):
        strip_optimizer_state(folder)


def trial_checkpoint_folders(trial_location: str | Path | None, storage: str | Path,
                             trial_id: str | None) -> list[str | Path]:
    """The checkpoint folders a trial wrote: in its Tune folder, and in its Ray Train run (DDP),
    on a local disk or in the run's bucket (``storage``: the run folder or its URI)."""
    folders = []
    if trial_location:
        folders += subfolders(trial_location, CHECKPOINT_GLOB)
    if trial_id:
        folders += subfolders(train_run_dir(storage, trial_id), CHECKPOINT_GLOB)
    return folders


def strip_optimizer_state(folder: str | Path) -> bool:
    """Rewrite ``folder/state.safetensors`` (a path or a URI) without its optimiser state; True
    when it had one."""
    path = join(folder, CHECKPOINT_STATE)
    if not is_file(path):
        return False
    state = read_trial_state(path)
    if state["optimizer"] is None:
        return False
    write_bytes(path, checkpoint_files.encode_trial_state(None, state["epoch"], state["metrics"], state["job"],
                                                          state["rng"]))
    return True


def strip_all_but_latest(trial_dir: Path) -> None:
    """Empty the optimiser state of every checkpoint in ``trial_dir`` but the newest (the one a
    resume starts from). Nothing to do where Tune keeps checkpoints elsewhere (object storage):
    there the trial's folder on this node holds none, and ``DropOptimizerState`` empties them
    when the trial ends."""
    for folder in sorted(Path(trial_dir).glob(CHECKPOINT_GLOB))[:-1]:
        strip_optimizer_state(folder)


def result_location(result) -> str | Path | None:
    """Where a Tune result's trial folder is: a local path, or a URI in the run's bucket."""
    path = getattr(result, "path", None)
    if not path:
        return None
    return location_of(getattr(result, "filesystem", None) or pafs.LocalFileSystem(), str(path))


def drop_trial_checkpoints(results, storage: str | Path) -> int:
    """Delete the checkpoint folders of a finished study's trials; returns how many."""
    count = 0
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id")
        for folder in trial_checkpoint_folders(result_location(result), storage, trial_id):
            delete_folder(folder)
            count += 1
    return count
