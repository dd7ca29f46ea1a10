"""A disk cache of decoded, resized training and validation sets.

Every trial of a search trains on the same images; without this each trial process decodes
and resizes the whole class again (2.9 s for 120 PNGs of 1024 x 1024 at 256 px on 2 cores,
about a GPU epoch of such a class). With it, the first trial on a node builds the arrays and
the others load them in 0.04 s (``python -m bench.data``).

An entry is keyed by everything its content depends on: the parameters, the path, size and
modification time of every image and mask it reads, and the source of the code that decodes
images and draws the validation defects. A changed image or a new version of that code gives a
new entry; stale entries are never read. Entries are written atomically, and a lock per entry
makes concurrent trials on one node wait for the first instead of all decoding at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from anomaly_data.datasets import ArrayDataset
from anomaly_data.records import ImageRecord

log = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = Path(os.environ.get("ANOMALY_ENSEMBLE_CACHE", Path.home() / ".cache" / "anomaly-ensemble"))
"""Where the demo dataset and the prepared-splits cache live; ``ANOMALY_ENSEMBLE_CACHE`` overrides it."""

ENTRY_WAIT_S = 3600.0  # how long a trial waits for another one preparing the same entry

# the modules whose behaviour decides the cached arrays
_CODE_FILES = ("io.py", "transforms.py", "datasets.py", "defects.py", "validation.py", "splits.py")
_FIELDS = ("images", "masks", "labels", "class_indices")
_LISTS = ("class_names", "defects", "paths", "skipped")


def _code_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _CODE_FILES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def _file_stamp(path: Path | None) -> list:
    if path is None:
        return [None]
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]  # missing or unreadable: the build reports it
    return [str(path), st.st_size, st.st_mtime_ns]


def splits_key(records: list[ImageRecord], params: dict) -> str:
    """Hex digest of the parameters, every record's files (path, size, mtime) and the code."""
    payload = {"params": params, "code": _code_digest(),
               "records": [[r.class_name, r.label, r.split, r.defect, *_file_stamp(r.path),
                            *_file_stamp(r.mask_path)] for r in records]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save(path: Path, datasets: dict[str, ArrayDataset]) -> None:
    arrays = {}
    for name, ds in datasets.items():
        for f in _FIELDS:
            arrays[f"{name}.{f}"] = getattr(ds, f)
        for f in _LISTS:
            arrays[f"{name}.{f}"] = np.array(getattr(ds, f), dtype=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)  # readers see the whole entry or none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, names: tuple[str, ...]) -> dict[str, ArrayDataset]:
    with np.load(path, allow_pickle=False) as data:
        return {name: ArrayDataset(*(data[f"{name}.{f}"] for f in _FIELDS),
                                   *([str(s) for s in data[f"{name}.{f}"]] for f in _LISTS))
                for name in names}


@contextmanager
def bounded_lock(path: Path, wait_s: float, waiting_for: str):
    """An exclusive advisory lock on ``path``, waited for at most ``wait_s`` seconds (then a
    ``TimeoutError`` that says what it waited for). Without locks (Windows, some network file
    systems) it does not lock: concurrent processes may then do the same work twice."""
    try:
        import fcntl  # POSIX only
        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {wait_s:.0f} s for {waiting_for} (lock {path}); if no such "
                                       "process is alive, delete the lock file and run again") from None
                time.sleep(0.2)
            except OSError as err:
                log.warning("cannot lock %s (%s); concurrent processes may do the same work", path, err)
                break
        yield  # closing the file releases the lock


def cached_datasets(cache_dir: Path, key: str, names: tuple[str, ...],
                    build: Callable[[], dict[str, ArrayDataset]]) -> dict[str, ArrayDataset]:
    """The datasets ``names`` stored under ``key`` in ``cache_dir``, built by ``build()`` if absent."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("cannot create the splits cache %s (%s); decoding without it", cache_dir, err)
        return build()
    path = cache_dir / f"splits-{key}.npz"
    with bounded_lock(path.with_suffix(".lock"), ENTRY_WAIT_S, f"another trial on this node preparing {path.name}"):
        if path.exists():
            try:
                return _load(path, names)
            except (OSError, ValueError, KeyError) as err:
                log.warning("unreadable cache entry %s (%s); rebuilding it", path, err)
        datasets = build()
        try:
            _save(path, datasets)
        except OSError as err:
            log.warning("cannot write the splits cache entry %s (%s); going on without it", path, err)
        return datasets
