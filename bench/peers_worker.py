"""Runs inside the peers' own environment (anomalib installed there, never in ours).

    PEERS_PYTHON bench/peers_worker.py WORK_DIR METHOD [--coreset-ratio 0.1]

Reads ``WORK_DIR/input.npz`` (uint8 ``train`` [N,H,W,3] and ``test`` images at the input size)
and ``WORK_DIR/backbone.pt`` (a state dict of the whole timm ``tf_efficientnet_lite0``), fits
anomalib's torch model of ``METHOD`` (patchcore or padim) on layers 2 and 3 of that backbone,
and writes ``WORK_DIR/METHOD.npz``: test ``scores`` [N], ``maps`` [N,H,W], ``fit_s``, ``infer_s``.
Only torch, numpy and anomalib are imported: nothing of this project runs here.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

BACKBONE = "tf_efficientnet_lite0"
LAYERS = [2, 3]
MEAN = STD = 0.5  # what the packaged EfficientNet-Lite0 weights were trained with


def build(method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "patchcore":
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel
            return PatchcoreModel(layers=LAYERS, backbone=BACKBONE, pre_trained=False, num_neighbors=9)
        from anomalib.models.image.padim.torch_model import PadimModel
        return PadimModel(backbone=BACKBONE, layers=LAYERS, pre_trained=False, n_features=100)


def load_backbone(model, path: Path) -> None:
    net = model.feature_extractor.feature_extractor
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False).missing_keys
    if missing:
        raise SystemExit(f"backbone weights lack {len(missing)} tensor(s) of the feature extractor, e.g. {missing[:3]}")


def batches(images: np.ndarray, size: int = 16):
    for i in range(0, len(images), size):
        x = torch.from_numpy(images[i:i + size]).permute(0, 3, 1, 2).float() / 255
        yield (x - MEAN) / STD


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work_dir", type=Path)
    p.add_argument("method", choices=("patchcore", "padim"))
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    a = p.parse_args()
    data = np.load(a.work_dir / "input.npz")
    torch.manual_seed(0)
    model = build(a.method)
    load_backbone(model, a.work_dir / "backbone.pt")
    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for x in batches(data["train"]):
            model(x)
        if a.method == "patchcore":
            model.subsample_embedding(a.coreset_ratio)
        else:
            model.fit()
    fit_s = time.perf_counter() - t0
    model.eval()
    scores, maps = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches(data["test"]):
            out = model(x)
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(len(x), *x.shape[-2:]))
    infer_s = time.perf_counter() - t0
    np.savez(a.work_dir / f"{a.method}.npz", scores=torch.cat(scores).numpy(), maps=torch.cat(maps).numpy(),
             fit_s=fit_s, infer_s=infer_s)


if __name__ == "__main__":
    main()
