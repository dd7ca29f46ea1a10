"""Rewrite a run made before checkpoints were ``.safetensors`` into the present format, in place.

    python -m ensembles.convert RUN_DIR [--trust-pickles]

Every pickled checkpoint under ``RUN_DIR`` (``torch.save`` files: ``best/*/*/model.pt``,
``ensemble/members/*/*.pt``, a trial's ``checkpoint_*/model.pt`` and ``state.pt``) is read with
torch's weights-only loader, which builds tensors and plain values and refuses anything else,
and written beside it as ``.safetensors``; then ``best.json`` files, ``studies.json`` and
``ensemble/ensemble.json`` (the member files, their SHA-256, format 2) are updated and the pickled
files removed. Running
it again finishes an interrupted conversion; a converted run is left as it is. ``RUN_DIR`` may
also be an ensemble folder alone. A run in a bucket: copy it to a disk, convert it, copy it back.

``--trust-pickles``: a file the weights-only loader refuses is named with the Python objects it
would import (say ``numpy._core.multiarray.scalar``, or ``builtins.exec`` in a malicious file);
with this option such a file is unpickled in full and converted. That can run code: give it
only for files you made yourself.

Tune's own experiment state (``tune/``) stays as Tune wrote it (pickles, read by Tune's restore
on ``--resume``): resume only runs from a location you trust.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch

from ensembles.ensemble import CONFIG_FILE, FORMAT, file_sha256
from ensembles.run_folder import BEST_INDEX_FILE, BEST_INFO_FILE, STUDIES_FILE
from models import ConfigError, model_from_full_state
from models.base import CHECKPOINT_FORMAT
from models.checkpoint_files import SUFFIX, encode_model, encode_trial_state, is_pickle, write

PICKLE_SUFFIXES = (".pt", ".pth")
# what our own pickled checkpoints hold besides tensors and plain values: torch.__version__ (a str)
INERT_GLOBALS = [torch.torch_version.TorchVersion]


class ConvertError(ValueError):
    """A file that cannot be converted without trusting it, or that is not ours."""


def read_pickle(path: Path, trust: bool, log=print):
    """A pickled checkpoint through torch's weights-only loader; a file it refuses is unpickled in
    full only with ``trust`` (the weights-only loader cannot be told to trust one file: the objects
    it would need are found only one at a time, NumPy's dtype classes say)."""
    try:
        with torch.serialization.safe_globals(INERT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # noqa: BLE001 -- a damaged file, whatever the loader says
        raise ConvertError(f"{path} cannot be read ({type(err).__name__}: {err}); left as it is") from None
    if not trust:
        raise ConvertError(f"{path}: the weights-only loader refused it: it names {needed}, which unpickling would "
                           "import and may call; not converted. If you made this file yourself, run again with "
                           "--trust-pickles")
    log(f"[convert] {path}: unpickled in full (--trust-pickles), with {needed}")
    return torch.load(path, map_location="cpu", weights_only=False)  # the one full unpickling: asked for by name


def safetensors_bytes(content, path: Path) -> bytes:
    """The present format of a pickled model checkpoint (formats 1 and 2) or trial state."""
    if not isinstance(content, dict):
        raise ConvertError(f"{path} holds a {type(content).__name__}, not a checkpoint of this package; left as it is")
    if content.get("format") in (1, 2) and "model" in content:
        ckpt = model_from_full_state(content, path).checkpoint() if content["format"] == 1 else content
        return encode_model({**ckpt, "format": CHECKPOINT_FORMAT})
    if {"epoch", "rng"} <= set(content):
        return encode_trial_state(content.get("optimizer"), content["epoch"], content.get("metrics", {}),
                                  content.get("job", {}), content["rng"])
    raise ConvertError(f"{path} is not a model checkpoint or trial state of this package; left as it is")


def pickled_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()
                  and is_pickle(p))


def renamed(text: str) -> str:
    return str(Path(text).with_suffix(SUFFIX)) if Path(text).suffix in PICKLE_SUFFIXES else text


def update_index_files(run: Path) -> int:
    """The run's JSON files that name checkpoints, renamed: ``best.json`` (the index and each
    ``best/<model>/<classes>/best.json``: ``checkpoint``) and ``studies.json`` (``best``)."""
    count = 0
    files = [(run / BEST_INDEX_FILE, "checkpoint"), (run / STUDIES_FILE, "best"),
             *((p, "checkpoint") for p in sorted(run.glob(f"best/*/*/{BEST_INFO_FILE}")))]
    for path, key in files:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        entries = data if isinstance(data, list) else list(data.values()) if path.name == STUDIES_FILE else [data]
        entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get(key), str)]
        if any(renamed(e[key]) != e[key] for e in entries):
            for e in entries:
                e[key] = renamed(e[key])
            path.write_text(json.dumps(data, indent=2, default=str) + "\n")
            count += 1
    return count


def update_ensemble(folder: Path) -> bool:
    """``ensemble.json`` of format 1: member files renamed, their SHA-256 recorded, format 2."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    if config.get("format") != 1:
        return False
    for fusion in config["classes"].values():
        fusion["member_files"] = {m: Path(renamed(rel)).as_posix() for m, rel in fusion["member_files"].items()}
    files = sorted({rel for f in config["classes"].values() for rel in f["member_files"].values()})
    missing = [rel for rel in files if not (folder / rel).is_file()]
    if missing:
        raise ConvertError(f"{path}: member files {missing} are missing; copy the whole run folder and convert it")
    config.update(format=FORMAT, files={rel: file_sha256(folder / rel) for rel in files})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return True


def convert_run(folder: Path, trust: bool = False, log=print) -> dict[str, int]:
    """Convert ``folder`` (a run or an ensemble folder) in place; returns what was done."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder} is not a folder")
    files = pickled_files(folder)
    for path in files:  # all written before anything is removed: an interruption loses nothing
        target = path.with_suffix(SUFFIX)
        write(target, safetensors_bytes(read_pickle(path, trust, log), path))
        log(f"[convert] {path.relative_to(folder)} -> {target.name}")
    ensembles = [p.parent for p in sorted(folder.rglob(CONFIG_FILE))]
    done = {"files": len(files), "best": update_index_files(folder),
            "ensembles": sum(update_ensemble(e) for e in ensembles)}
    for path in files:
        path.unlink()
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles.convert", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path,
                   help="a run folder of distributed.tune / distributed.train, or an ensemble folder")
    p.add_argument("--trust-pickles", action="store_true",
                   help="unpickle in full a file the weights-only loader refuses (can run code: only for files "
                        "you made)")
    a = p.parse_args(argv)
    try:
        done = convert_run(a.run_dir, a.trust_pickles)
    except (ConvertError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[convert] {a.run_dir}: {done['files']} file(s) rewritten as {SUFFIX}, {done['best']} index file(s) "
          f"updated, {done['ensembles']} ensemble(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
