"""Score new images with a saved ensemble.

    python -m ensembles.query --ensemble RUN/ensemble [--class washer] [--out maps/] IMAGE_OR_DIR...

Prints one JSON line per image: ``path``, ``class``, ``score``, ``anomalous`` (score >= the
threshold chosen on the validation set), ``threshold``, ``members`` (each member's image score,
normalised as the fusion sees it) and ``map`` (the written PNG: the fused
map at the image's own size, 8-bit, 0 = the median validation-normal pixel, 255 = the strongest
defect pixel seen on the validation set). An unreadable file gets a line with ``error`` and the
rest are still scored; the exit code is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from anomaly_data import DatasetError, read_image
from anomaly_data.records import IMAGE_EXTENSIONS
from ensembles.ensemble import Ensemble, EnsembleError
from ensembles.runtime import ExportedEnsemble, ExportError, is_export, map_png, result_row

def expand_paths(items: Iterable) -> Iterator[tuple[Path, Path]]:
    """``(file, name for its outputs)``: files as given; folders walked recursively for images,
    in name order, keeping their sub-folders in the output name (no clashes between stems)."""
    for item in items:
        path = Path(item)
        if path.is_dir():
            for p in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
                yield p, Path(path.name) / p.relative_to(path)
        else:
            yield path, Path(path.name)


def unique_name(name: Path, taken: set[Path]) -> Path:
    """``name`` or ``name`` with ``_2``, ``_3``... so that no two images share a map file."""
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = name.with_name(f"{name.stem}_{k}{name.suffix}")
    taken.add(candidate)
    return candidate


def query_images(ensemble: Ensemble | ExportedEnsemble, paths: Iterable, class_name: str | None = None, out_dir=None,
                 batch_size: int = 8) -> Iterator[dict]:
    """One result dict per image file of ``paths`` (files or folders)."""
    return score_files(ensemble, expand_paths(paths), class_name, out_dir, batch_size)


def score_files(ensemble: Ensemble | ExportedEnsemble, named_paths: Iterable[tuple[Path, Path]], class_name: str | None = None,
                out_dir=None, batch_size: int = 8) -> Iterator[dict]:
    """One result dict per ``(file, output name)``, in order; an unreadable file gets an
    ``error`` entry and the others are still scored."""
    fusion = ensemble.fusion_for(class_name)
    out_dir = Path(out_dir) if out_dir is not None else None
    batch: list[tuple[Path, Path, np.ndarray]] = []
    written: set[Path] = set()

    def flush():
        result = ensemble.predict([img for _, _, img in batch], fusion.class_name)  # resized as the datasets are
        for i, (path, name, img) in enumerate(batch):
            row = {"path": str(path), **result_row(result, i)}
            if out_dir is not None:
                target = unique_name(out_dir / name.parent / f"{name.stem}_map.png", written)
                target.parent.mkdir(parents=True, exist_ok=True)
                map_png(result["maps"][i], img.shape[:2], fusion.map_range).save(target)
                row["map"] = str(target)
            yield row
        batch.clear()

    for path, name in named_paths:
        path, name = Path(path), Path(name)
        try:
            batch.append((path, name, read_image(path)))
        except DatasetError as err:
            if batch:  # keep the output in input order
                yield from flush()
            yield {"path": str(path), "error": str(err)}
            continue
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles.query", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--ensemble", required=True, help="an ensemble folder (RUN/ensemble), its s3:// / gs:// URI, "
                                                    "or a folder written by python -m ensembles.export")
    p.add_argument("--class", dest="class_name", default=None, help="class of the images (needed when the "
                                                                    "ensemble covers several)")
    p.add_argument("--out", type=Path, default=Path("anomaly_maps"), help="folder for the map PNGs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a = p.parse_args(argv)
    try:
        ensemble = ExportedEnsemble.load(a.ensemble) if is_export(a.ensemble) else Ensemble.load(a.ensemble, a.device)
        failed = 0
        for row in query_images(ensemble, a.inputs, a.class_name, a.out):
            failed += "error" in row
            print(json.dumps(row), flush=True)
    except (EnsembleError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
