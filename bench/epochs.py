"""Accuracy of the trained members against training epochs, on validation and on the test split.

    python -m bench.epochs --root DIR [--dataset mvtec] [--classes a,b] [--models hvq_trans,haloae]
        [--epochs 3,10,25,50]

Each model at its ``fast`` preset, lr 1e-3, batch 8, trained once per class and scored after each
listed epoch count: validation (held-out normals + synthetic defects) and test image / pixel
AUROC side by side, with the training seconds so far. It answers "does the search give a member
enough epochs?"; the test split is only read here, never by the search.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import DataLoader

from anomaly_data import DATASET_KINDS, load_records, prepare_splits, read_dataset
from bench.common import machine, table
from ensembles.metrics import image_auroc, pixel_auroc
from models import create_model
from models.training import make_optimizer, score_loader, train_epoch


def aurocs(model, loader) -> tuple[float, float]:
    r = score_loader(model, loader)
    return float(image_auroc(r["scores"], r["labels"])), float(pixel_auroc(r["maps"], r["masks"]))


def curve(name: str, splits, test, checkpoints: list[int], batch: int) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(name, "fast")
    train = DataLoader(splits.train, batch_size=batch, shuffle=True)
    optimizer, done, seconds, rows = make_optimizer(model, 1e-3), 0, 0.0, []
    for epochs in checkpoints:
        start = time.perf_counter()
        model.train()
        for _ in range(epochs - done):
            train_epoch(model, train, optimizer, "cpu", 1.0)
        seconds += time.perf_counter() - start
        done = epochs
        model.eval()
        model.fit_statistics(train)
        val = aurocs(model, DataLoader(splits.validation, batch_size=batch))
        tst = aurocs(model, DataLoader(test, batch_size=batch))
        rows.append({"model": name, "epochs": epochs, "val I": val[0], "val P": val[1], "test I": tst[0],
                     "test P": tst[1], "train s": seconds})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.epochs", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASET_KINDS, default="mvtec")
    p.add_argument("--root", required=True)
    p.add_argument("--classes", default=None, help="comma-separated (default: every class)")
    p.add_argument("--models", default="hvq_trans,haloae")
    p.add_argument("--epochs", default="3,10,25,50", help="epoch counts to score at, increasing")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    checkpoints = sorted(int(x) for x in a.epochs.split(","))
    per_class = read_dataset(a.dataset, a.root, a.classes.split(",") if a.classes else None, seed=0)
    print(machine())
    warnings.simplefilter("ignore")
    rows = []
    for c, records in per_class.items():
        splits = prepare_splits(a.dataset, a.root, [c], image_size=128, seed=0)
        test = load_records(records.test, [c], 128)
        for m in a.models.split(","):
            rows += [{"class": c, **r} for r in curve(m, splits, test, checkpoints, a.batch)]
            print(table(rows[-len(checkpoints):], "{:.3f}"), flush=True)
    print(table(rows, "{:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
