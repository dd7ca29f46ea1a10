"""Fitting the fusion of one class on its validation set (never the test split)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ensembles.ensemble import ClassFusion, run_members
from ensembles.fusion import IMAGE_RULES, RULES, QuantileNormalizer, RankTable, blur, fuse_maps, simplex_grid
from ensembles.metrics import image_auroc, pixel_auroc

SIGMAS = (0.0, 1 / 64, 1 / 32)  # blur sigma as a fraction of the side
MAX_RANK_SAMPLES = 2_000_000


def score_dataset(models: dict[str, Any], dataset, resolution: int, device, batch_size: int = 8):
    """Member scores ``[N]`` and maps ``[N,1,R,R]`` (CPU tensors) over ``dataset``."""
    scores: dict[str, list] = {m: [] for m in models}
    maps: dict[str, list] = {m: [] for m in models}
    for batch in DataLoader(dataset, batch_size=batch_size):
        out = run_members(models, batch["image"].to(device), resolution)
        for m, (s, mp) in out.items():
            scores[m].append(s.cpu())
            maps[m].append(mp.cpu())
    return {m: (torch.cat(scores[m]), torch.cat(maps[m])) for m in models}


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The image threshold with the best F1 on the validation set (score >= t is anomalous)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct score
    f1 = 2 * tp / (tp + fp + y.sum())
    best = int(np.argmax(np.where(last, f1, -1)))
    return float(s[best])


def _quiet_auroc(fn, *args) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(fn(*args))


def fit_class_fusion(class_name: str, models: dict[str, Any], member_files: dict[str, str], validation,
                     resolution: int, device="cpu") -> ClassFusion:
    """Normalisers on validation normals, then the rule, weights, blur and image-score rule that
    maximise the validation score (mean of image and pixel AUROC).

    The report lists each member at its own best blur and image rule (one-hot weights), and
    the ensemble; ``beats_best_member`` is true only when a combination of members does better
    than every member alone. When the best choice is a single member, the ensemble is that
    member (``members_used``), and the report says so."""
    names = list(models)
    outputs = score_dataset(models, validation, resolution, device)
    labels = np.asarray(validation.labels)
    masks = torch.from_numpy(np.asarray(validation.masks)).unsqueeze(1)
    if masks.shape[-1] != resolution:
        masks = torch.nn.functional.interpolate(masks.float(), size=(resolution,) * 2, mode="nearest") > 0.5
    masks_np = masks[:, 0].numpy().astype(np.uint8)
    normal = labels == 0
    if normal.sum() == 0 or normal.all():
        raise ValueError(f"class {class_name}: the validation set needs normal and defective images")

    pixel_norm = {m: QuantileNormalizer.fit(outputs[m][1][torch.from_numpy(normal)].numpy()) for m in names}
    image_norm = {m: QuantileNormalizer.fit(outputs[m][0][torch.from_numpy(normal)].numpy()) for m in names}
    norm_maps = [pixel_norm[m](outputs[m][1]) for m in names]
    norm_scores = torch.stack([image_norm[m](outputs[m][0]) for m in names])
    rng = np.random.default_rng(0)
    ranks = {}
    for m, nm in zip(names, norm_maps):
        flat = nm.flatten().numpy()
        if flat.size > MAX_RANK_SAMPLES:
            flat = rng.choice(flat, MAX_RANK_SAMPLES, replace=False)
        ranks[m] = RankTable.fit(flat)

    # image-score candidates that do not depend on the map: mixes of the members' own scores
    mixes = simplex_grid(len(names)) if len(names) > 1 else [(1.0,)]
    mix_aurocs = [(_quiet_auroc(image_auroc, torch.einsum("m,mb->b", torch.tensor(w), norm_scores).numpy(), labels),
                   tuple(w)) for w in mixes]
    best_mix_auroc, best_mix = max(mix_aurocs, key=lambda t: t[0])
    own_auroc = {m: next(a for a, w in mix_aurocs if w[k] == 1.0) for k, m in enumerate(names)}

    # every candidate is scored; single-member candidates (one-hot weights) give each member its
    # best blur and image rule too, so "beats its best member" compares like with like
    rank_tables = [ranks[m] for m in names]
    best: dict[str, Any] | None = None
    best_single: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        weight_options = mixes if rule == "weighted" else [tuple([1.0 / len(names)] * len(names))]
        for weights in weight_options:
            used = [m for m, w in zip(names, weights) if w > 0]
            fused = fuse_maps(norm_maps, rule, weights, rank_tables if rule == "rank_mean" else None)
            mix_auroc, mix = (own_auroc[used[0]], tuple(float(m == used[0]) for m in names)) \
                if len(used) == 1 else (best_mix_auroc, best_mix)
            for sigma in SIGMAS:
                blurred = blur(fused, sigma)
                pix = _quiet_auroc(pixel_auroc, blurred[:, 0].numpy(), masks_np)
                map_img = _quiet_auroc(image_auroc, blurred.flatten(1).amax(1).numpy(), labels)
                image_rule, img = ("map_max", map_img) if map_img >= mix_auroc else ("member_mix", mix_auroc)
                candidate = {"rule": rule, "weights": list(weights), "sigma": sigma, "image_rule": image_rule,
                             "image_weights": list(mix), "image_auroc": img, "pixel_auroc": pix,
                             "val_score": (img + pix) / 2, "blurred": blurred, "members_used": used}
                if len(used) == 1 and candidate["val_score"] > best_single.get(used[0], {}).get("val_score", -1):
                    best_single[used[0]] = candidate
                if best is None or candidate["val_score"] > best["val_score"] + 1e-12:
                    best = candidate
    assert best is not None and best["image_rule"] in IMAGE_RULES

    if best["image_rule"] == "map_max":
        final_scores = best["blurred"].flatten(1).amax(1).numpy()
    else:
        final_scores = torch.einsum("m,mb->b", torch.tensor(best["image_weights"]), norm_scores).numpy()
    fused_best = best["blurred"][:, 0].numpy()
    map_range = [float(np.median(fused_best[normal])), float(fused_best[masks_np.astype(bool)].max())]
    report = [{"name": m, "image_auroc": best_single[m]["image_auroc"], "pixel_auroc": best_single[m]["pixel_auroc"],
               "val_score": best_single[m]["val_score"]} for m in names]
    best_member = max(report, key=lambda r: r["val_score"])
    report.append({"name": "ensemble", "image_auroc": best["image_auroc"], "pixel_auroc": best["pixel_auroc"],
                   "val_score": best["val_score"], "members_used": best["members_used"],
                   "beats_best_member": best["val_score"] > best_member["val_score"] + 1e-12,
                   "best_member": best_member["name"]})
    return ClassFusion(
        class_name=class_name, members=names, member_files=member_files,
        weights_used={m: models[m].weights_used for m in names}, resolution=resolution,
        pixel_norm={m: pixel_norm[m].to_dict() for m in names}, image_norm={m: image_norm[m].to_dict() for m in names},
        ranks={m: ranks[m].quantiles for m in names}, rule=best["rule"], weights=best["weights"],
        sigma=best["sigma"], image_rule=best["image_rule"], image_weights=best["image_weights"],
        threshold=f1_threshold(final_scores, labels), map_range=map_range, validation=report)
