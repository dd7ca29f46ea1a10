"""Our run beside the tools a user would pick instead: anomalib 2.7's PatchCore and PaDiM.

    python -m bench.peers --run RUN_DIR [--sizes 128,256] [--peers patchcore,padim]
    python -m bench.peers --dataset mvtec --root DIR [--classes a,b] [--sizes 128]

The peers run in their own environment (``bench/.peers-venv``, made on first use with
``pip install anomalib==2.7.0``; or ``--python`` an interpreter that has anomalib), never in
ours: this process only writes their inputs and scores their outputs. Same images, same
packaged EfficientNet-Lite0 weights (layers 2 and 3, inputs normalised with mean = std = 0.5),
no training, each fitted on every training normal of the class (as a user of anomalib would;
our run holds some back for validation). Maps and scores are scored with this project's metrics at
ground-truth resolution, like ``results.csv``, and printed per class and as the macro mean
next to the run's members, ensemble and ablations. With ``--run`` the table is also written
to ``RUN/peers.csv``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anomaly_data import DATASET_KINDS, load_records, read_dataset
from bench.common import machine, table
from ensembles.evaluate import ground_truth, upsample_each
from ensembles.metrics import evaluate_all
from models.backbones import PACKAGED_ARCH, full_model_state_dict

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"
PEERS_REQUIREMENTS = ["anomalib==2.7.0", "torch", "timm"]
INSTALL_TIMEOUT_S = 1800
PEER_TIMEOUT_S = 1800
COLUMNS = ("image_auroc", "pixel_auroc", "aupro")


def peers_python(explicit: Path | None) -> Path:
    """The interpreter the peers run in; their environment is made on first use."""
    if explicit is not None:
        if not explicit.is_file():
            raise SystemExit(f"error: --python {explicit} does not exist")
        return explicit
    python = PEERS_VENV / "bin" / "python"
    if python.is_file():
        return python
    print(f"[peers] making the peers' environment {PEERS_VENV} ({' '.join(PEERS_REQUIREMENTS)}); "
          f"this takes minutes, once", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS_REQUIREMENTS], check=True,
                       timeout=INSTALL_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        raise SystemExit(f"error: could not make {PEERS_VENV} ({err}); remove it and retry, or pass --python "
                         f"an interpreter with anomalib 2.7 installed")
    return python


def run_peer(python: Path, work: Path, method: str, coreset_ratio: float) -> dict:
    cmd = [str(python), str(HERE / "peers_worker.py"), str(work), method, "--coreset-ratio", str(coreset_ratio)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PEER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: anomalib {method} ran past {PEER_TIMEOUT_S} s on {work}; "
                         f"try a smaller --sizes or fewer classes")
    if done.returncode != 0:
        raise SystemExit(f"error: anomalib {method} failed:\n{done.stderr[-3000:]}")
    out = np.load(work / f"{method}.npz")
    return {k: out[k] for k in out.files}


def peer_rows(python: Path, dataset: str, root: Path, class_name: str, size: int, methods: list[str],
              coreset_ratio: float, seed: int) -> list[dict]:
    records = read_dataset(dataset, root, [class_name], seed=seed)[class_name]
    train = load_records(records.train, [class_name], size)
    test = load_records(records.test, [class_name], size)
    masks = ground_truth(records.test, size, "gt")
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        np.savez(work / "input.npz", train=np.asarray(train.images), test=np.asarray(test.images))
        torch.save(full_model_state_dict(PACKAGED_ARCH, "packaged"), work / "backbone.pt")
        for method in methods:
            out = run_peer(python, work, method, coreset_ratio)
            maps = torch.from_numpy(out["maps"]).float()[:, None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                values = evaluate_all(out["scores"], np.asarray(test.labels), upsample_each(maps, masks), masks)
            rows.append({"class": class_name, "method": f"anomalib {method} {size}px",
                         **{k: float(values[k]) for k in COLUMNS}, "fit_s": float(out["fit_s"]),
                         "img_s": len(test.labels) / float(out["infer_s"])})
    return rows


def our_rows(run: Path, classes: list[str]) -> list[dict]:
    results = run / "results.csv"
    if not results.is_file():
        print(f"[peers] {results} does not exist (a run with --no-ensemble?): only the peers are shown")
        return []
    frame = pd.read_csv(results)
    frame = frame[frame["class"].isin(classes)]
    return [{"class": r["class"], "method": r["member"], **{k: float(r[k]) for k in COLUMNS},
             "fit_s": float("nan"), "img_s": float("nan")}
            for _, r in frame.iterrows()]


def with_means(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    means = frame.groupby("method", sort=False)[list(COLUMNS) + ["fit_s", "img_s"]].mean().reset_index()
    means.insert(0, "class", "mean")
    return pd.concat([frame, means], ignore_index=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="a run folder of distributed.tune: its data and results")
    p.add_argument("--dataset", choices=DATASET_KINDS, default=None)
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--classes", default=None, help="comma-separated (default: the run's, or every class)")
    p.add_argument("--sizes", default=None, help="input sizes in px, comma-separated (default: the run's)")
    p.add_argument("--peers", default="patchcore,padim")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="anomalib PatchCore's default")
    p.add_argument("--python", type=Path, default=None, help="an interpreter with anomalib 2.7 installed")
    a = p.parse_args(argv)
    seed, size = 0, 128
    if a.run is not None:
        config = json.loads((a.run / "config.json").read_text())
        dataset, root, classes = config["dataset"], Path(config["root"]), config["classes"]
        seed, size = config["args"].get("seed", 0), config["args"].get("image_size") or 128
    elif a.dataset and a.root:
        dataset, root, classes = a.dataset, a.root, None
    else:
        p.error("give --run RUN_DIR, or --dataset and --root")
    if a.classes:
        classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    classes = classes or list(read_dataset(dataset, root))
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else [size]
    methods = [m.strip() for m in a.peers.split(",") if m.strip()]
    python = peers_python(a.python)
    print(f"machine: {machine()}\n{dataset} {root}: {', '.join(classes)}; peers {methods} at {sizes} px, "
          f"packaged {PACKAGED_ARCH} layers 2+3\n", flush=True)
    t0 = time.time()
    rows = [row for c in classes for s in sizes
            for row in peer_rows(python, dataset, root, c, s, methods, a.coreset_ratio, seed)]
    if a.run is not None:
        rows += our_rows(a.run, classes)
    frame = with_means(rows)
    print(table([{k: (v if not isinstance(v, float) or np.isfinite(v) else "-") for k, v in r.items()}
                 for r in frame.to_dict("records")], "{:.3f}"))
    print(f"\n({time.time() - t0:.0f} s; fit_s and img_s on this machine's CPU threads; - where not measured)")
    if a.run is not None:
        frame.to_csv(a.run / "peers.csv", index=False)
        print(f"wrote {a.run / 'peers.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
