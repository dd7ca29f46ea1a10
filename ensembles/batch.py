"""Batch scoring of large folders with Ray Data: the ensemble runs in a pool of actors.

    python -m ensembles.batch --ensemble RUN/ensemble [--class washer] --out scored/ IMAGE_OR_DIR...
        [--address auto] [--actors N] [--batch-size 16]

Same rows as ``ensembles.query`` (path, class, score, anomalous, threshold, map, error), written
in input order to ``OUT/scores.jsonl``; map PNGs under ``OUT/``. Each actor loads the ensemble
once (on a GPU when the cluster has one); files are spread over the actors in batches. On a
multi-node cluster the inputs and ``--out`` must be on storage every node sees (see cluster.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import ray

from anomaly_data.storage import is_uri
from ensembles.ensemble import Ensemble, EnsembleError
from ensembles.query import expand_paths, score_files, unique_name

COLUMNS = ("path", "class", "score", "anomalous", "threshold", "map", "error")


def ensemble_location(ensemble_dir) -> str:
    """What each actor loads: the URI as given (every node fetches its own copy) or the absolute folder."""
    return str(ensemble_dir) if is_uri(str(ensemble_dir)) else str(Path(ensemble_dir).resolve())


class EnsembleScorer:
    """A Ray Data actor: holds one loaded ensemble and scores batches of file paths."""

    def __init__(self, folder: str, class_name: str | None, out_dir: str):
        self.ensemble = Ensemble.load(folder)
        self.class_name = class_name
        self.out_dir = out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = list(score_files(self.ensemble, zip(batch["path"], batch["name"]), self.class_name, self.out_dir,
                                batch_size=len(batch["path"])))
        return {c: np.array([row.get(c, None) for row in rows], dtype=object) for c in COLUMNS}


def score_folder(ensemble_dir, inputs, out_dir, class_name: str | None = None, actors: int | None = None,
                 batch_size: int = 16) -> Path:
    """Score every image of ``inputs`` with a pool of actors; returns ``OUT/scores.jsonl``."""
    Ensemble.load(ensemble_dir, "cpu").fusion_for(class_name)  # fail here, not in the actors, on a bad folder/class
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[Path] = set()
    items = [{"path": str(p), "name": str(unique_name(n, taken))} for p, n in expand_paths(inputs)]
    if not items:
        raise EnsembleError(f"no image found in {list(map(str, inputs))}")
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    actors = actors or max(1, int(gpus) if gpus else int(cpus) // 2 or 1)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    dataset = ray.data.from_items(items).map_batches(
        EnsembleScorer, fn_constructor_args=(ensemble_location(ensemble_dir), class_name, str(out_dir)),
        batch_size=batch_size, concurrency=actors, num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        batch_format="numpy")
    target = out_dir / "scores.jsonl"
    with open(target, "w") as f:
        for row in dataset.iter_rows():
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}, default=float) + "\n")
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--ensemble", required=True, help="an ensemble folder (RUN/ensemble), or its s3:// / gs:// URI")
    p.add_argument("--class", dest="class_name", default=None)
    p.add_argument("--out", required=True, type=Path, help="folder for scores.jsonl and the map PNGs")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: a local one)")
    p.add_argument("--actors", type=int, default=None, help="scoring actors (default: one per GPU, or CPUs/2)")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    try:
        if a.address:
            ray.init(address=a.address, log_to_driver=False)
        target = score_folder(a.ensemble, a.inputs, a.out, a.class_name, a.actors, a.batch_size)
    except EnsembleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = sum("error" in json.loads(line) for line in target.read_text().splitlines())
    print(f"scored {sum(1 for _ in open(target))} file(s) into {target}" + (f"; {failed} unreadable" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
