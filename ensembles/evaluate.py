"""Final evaluation on the test split: each member and the ensemble, side by side.

    python -m ensembles.evaluate --ensemble RUN/ensemble --dataset mvtec --root DIR [--classes a,b]
        [--out DIR] [--pixel-resolution gt|input]

Writes ``results.csv`` (long form: class, member, image_auroc, pixel_auroc, aupro, image_f1max,
pixel_f1max, val_image_auroc, val_pixel_auroc, weights, plus a ``mean`` class row per member;
``member`` is a model name, ``fused:<a>+<b>...`` for an ablation, or ``ensemble`` for the kept
fusion), ``results.md`` (the same as tables, with the validation -> test gap, what was kept and
why, the pixel resolution and the weights each member ran on) and ``overlays/<class>/*.png`` (worst
misses at the ensemble's threshold first; ``gallery.json`` lists them with verdict and score).
Pixel metrics are computed at ground-truth resolution by default (maps upsampled bilinearly).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from anomaly_data import DATASET_KINDS, DatasetError, load_records, read_dataset, read_mask
from anomaly_data.storage import resolve_root
from anomaly_data.transforms import resize_mask
from ensembles.ensemble import Ensemble, EnsembleError, FusionChoice
from ensembles.fit import ABLATION_PREFIX
from ensembles.metrics import evaluate_all
from ensembles.overlays import save_overlay
from models.training import score_outputs

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")
VAL_METRICS = ("val_image_auroc", "val_pixel_auroc")
ENSEMBLE = "ensemble"
RESULTS_FILE = "results.csv"
RESULTS_MARKDOWN = "results.md"
OVERLAY_DIR = "overlays"
GALLERY_FILE = "gallery.json"  # overlays/<class>/: the pictures in order, their verdicts and scores


def ground_truth(records, resolution: int, pixel_resolution: str) -> list[np.ndarray]:
    """Masks as uint8, at each image's own resolution (``gt``) or at the ensemble's (``input``)."""
    masks = []
    for r in records:
        if pixel_resolution == "input":
            size = (resolution, resolution)
        else:
            with Image.open(r.path) as img:
                size = img.size[::-1]
        if r.mask_path is None:
            masks.append(np.zeros(size, dtype=np.uint8))
            continue
        mask = read_mask(r.mask_path)
        if pixel_resolution == "input":
            mask = resize_mask(mask, size)
        masks.append(mask.astype(np.uint8))
    return masks


def upsample_each(maps: torch.Tensor, masks: list[np.ndarray]) -> list[np.ndarray]:
    """Per image, the ``[1,R,R]`` map resized bilinearly to its mask's size, as float32."""
    out = []
    for m, gt in zip(maps, masks):
        if tuple(m.shape[-2:]) != gt.shape:
            m = F.interpolate(m[None], size=gt.shape, mode="bilinear", align_corners=False)[0]
        out.append(m[0].numpy().astype(np.float32, copy=False))
    return out


def score_class(ens: Ensemble, class_name: str, records, batch_size: int = 8):
    """Image scores and ``[N,1,R,R]`` maps of every member and of the ensemble."""
    fusion = ens.fusion_for(class_name)
    dataset = load_records(records, [class_name], fusion.resolution)
    fusions = {**{name: FusionChoice(**c) for name, c in fusion.ablations.items()}, ENSEMBLE: fusion.choice}

    def members_and_fusions(images):
        outputs = ens.member_outputs(images, class_name)
        return {**outputs, **{name: ens.fuse(fusion, outputs, choice) for name, choice in fusions.items()}}

    outputs = score_outputs(members_and_fusions, DataLoader(dataset, batch_size=batch_size), ens.device)[0]
    return dataset, {m: (scores.numpy(), maps) for m, (scores, maps) in outputs.items()}


VERDICTS = {(1, False): "missed", (0, True): "false_alarm", (1, True): "caught", (0, False): "normal"}


def gallery_order(labels: np.ndarray, scores: np.ndarray, threshold: float, defects: list[str],
                  size: int) -> list[tuple[int, str]]:
    """Up to ``size`` test images to show, each with its verdict at ``threshold``: the worst
    misses first (missed defects from the lowest score up, then false alarms from the highest
    score down), then one caught image per defect kind and one normal."""
    flagged = scores >= threshold  # as Ensemble.predict decides
    verdicts = [VERDICTS[int(label), bool(flag)] for label, flag in zip(labels, flagged)]
    missed = sorted((i for i, v in enumerate(verdicts) if v == "missed"), key=lambda i: scores[i])
    false_alarms = sorted((i for i, v in enumerate(verdicts) if v == "false_alarm"), key=lambda i: -scores[i])
    first_of_kind: dict[str, int] = {}
    for i, v in enumerate(verdicts):
        if v in ("caught", "normal"):
            first_of_kind.setdefault(defects[i], i)
    normal = [first_of_kind.pop("good")] if "good" in first_of_kind else []
    order = missed + false_alarms + list(first_of_kind.values()) + normal
    return [(i, verdicts[i]) for i in order[:size]]


def evaluate_class(ens: Ensemble, class_name: str, records, pixel_resolution: str, overlay_dir: Path | None,
                   overlays: int) -> list[dict]:
    fusion = ens.fusion_for(class_name)
    dataset, outputs = score_class(ens, class_name, records)
    labels = np.asarray(dataset.labels)
    masks = ground_truth(records, fusion.resolution, pixel_resolution)
    validation = {r["name"]: r for r in fusion.validation}
    rows = []
    for member, (scores, maps) in outputs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = evaluate_all(scores, labels, upsample_each(maps, masks), masks)
        used = fusion.members_used if member == ENSEMBLE else \
            member[len(ABLATION_PREFIX):].split("+") if member.startswith(ABLATION_PREFIX) else [member]
        val = validation.get(member, {})
        rows.append({"class": class_name, "member": member, **{k: float(values[k]) for k in METRICS},
                     "val_image_auroc": float(val.get("image_auroc", np.nan)),
                     "val_pixel_auroc": float(val.get("pixel_auroc", np.nan)),
                     "weights": "+".join(sorted({fusion.weights_used.get(m, "") for m in used}))})
    if overlay_dir is not None and overlays > 0:
        scores = outputs[ENSEMBLE][0]
        shown = gallery_order(labels, scores, fusion.threshold, dataset.defects, overlays)
        entries = []
        for rank, (i, verdict) in enumerate(shown):
            name = f"{rank:03d}_{verdict}_{records[i].defect}_{Path(records[i].path).stem}.png"
            save_overlay(overlay_dir / class_name / name, dataset.images[i], dataset.masks[i],
                         {m: outputs[m][1][i, 0].numpy() for m in outputs if not m.startswith(ABLATION_PREFIX)})
            entries.append({"file": name, "image": str(records[i].path), "defect": records[i].defect,
                            "verdict": verdict, "score": float(scores[i])})
        (overlay_dir / class_name / GALLERY_FILE).write_text(json.dumps(
            {"threshold": float(fusion.threshold), "images": entries}, indent=1))
    return rows


def add_mean_rows(frame: pd.DataFrame) -> pd.DataFrame:
    means = frame.groupby("member", sort=False)[list(METRICS) + list(VAL_METRICS)].mean().reset_index()
    means.insert(0, "class", "mean")
    means["weights"] = frame.groupby("member", sort=False)["weights"].first().values
    return pd.concat([frame, means], ignore_index=True)


def markdown(frame: pd.DataFrame, pixel_resolution: str, notes: dict[str, list[str]] | None = None) -> str:
    lines = ["# Test-split evaluation", "",
             f"Pixel metrics at {'ground-truth' if pixel_resolution == 'gt' else 'ensemble input'} resolution. "
             "Weights: the backbone/teacher weights each member ran on (`random` = no pretrained weights "
             "were available offline; such a member is far from its paper's accuracy). "
             "`fused:a+b` rows are ablations (those members fused by the same procedure); `ensemble` is "
             "what was kept. Gap = test - validation (validation: held-out normals + synthetic defects): "
             "a large negative gap means the validation defects did not predict the test defects.", ""]
    columns = list(METRICS) + ["val I-AUROC", "val P-AUROC", "gap I", "gap P"]
    for class_name, part in frame.groupby("class", sort=False):
        lines += [f"## {class_name}", "", "| member | weights | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for _, r in part.iterrows():
            values = [r[m] for m in METRICS] + [r["val_image_auroc"], r["val_pixel_auroc"],
                                                r["image_auroc"] - r["val_image_auroc"],
                                                r["pixel_auroc"] - r["val_pixel_auroc"]]
            lines.append(f"| {r['member']} | {r['weights']} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines += [""] + [f"- {n}" for n in (notes or {}).get(class_name, [])] + [""]
    return "\n".join(lines)


def class_notes(ens: Ensemble, frame: pd.DataFrame) -> dict[str, list[str]]:
    """Per class: what was kept and why, and whether the trained members add anything on test
    to the members that are fitted only (the memory bank)."""
    notes = {}
    for name, fusion in ens.fusions.items():
        part = frame[frame["class"] == name].set_index("member")
        kept = fusion.validation[-1]
        out = [f"kept: {fusion.choice.describe(fusion.members)}; {kept.get('reason', '')}"]
        fitted = [m for m in fusion.members if not ens.member_trains(name, m)]
        everything = ABLATION_PREFIX + "+".join(fusion.members)
        if fitted and everything in part.index and len(fitted) < len(fusion.members):
            alone = part.loc[fitted, ["image_auroc", "pixel_auroc"]].max()
            fused = part.loc[everything, ["image_auroc", "pixel_auroc"]]
            if (fused <= alone + 1e-9).all():
                out.append(f"the trained members add nothing to {'+'.join(fitted)} on this class's test split "
                           f"(all fused: {fused['image_auroc']:.3f} / {fused['pixel_auroc']:.3f} image / pixel "
                           f"AUROC; {'+'.join(fitted)} alone: {alone['image_auroc']:.3f} / {alone['pixel_auroc']:.3f})")
        notes[name] = out
    return notes


def evaluate_ensemble(ens: Ensemble, dataset: str, root, classes: list[str] | None, out_dir,
                      pixel_resolution: str = "gt", overlays: int = 8, seed: int | None = None) -> pd.DataFrame:
    """Evaluate on the test split of ``classes`` (default: every class of the ensemble found in root).

    ``seed`` decides which normals a ``folder`` dataset keeps for testing; by default the one the
    ensemble was built with, so no training or validation image is tested on."""
    if pixel_resolution not in ("gt", "input"):
        raise ValueError(f"pixel_resolution must be 'gt' or 'input', got {pixel_resolution!r}")
    wanted = classes or ens.class_names
    missing = [c for c in wanted if c not in ens.class_names]
    if missing:
        raise EnsembleError(f"the ensemble has no member for class(es) {missing}; it covers {ens.class_names}")
    per_class = read_dataset(dataset, root, wanted, seed=ens.data.get("seed", 0) if seed is None else seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in wanted:
        if not per_class[name].test:
            raise DatasetError(f"class {name!r} has no test image under {root}")
        rows += evaluate_class(ens, name, per_class[name].test, pixel_resolution, out_dir / OVERLAY_DIR, overlays)
    frame = add_mean_rows(pd.DataFrame(rows))
    frame.to_csv(out_dir / RESULTS_FILE, index=False)
    (out_dir / RESULTS_MARKDOWN).write_text(markdown(frame, pixel_resolution, class_notes(ens, frame)))
    return frame


def format_results(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", required=True, help="an ensemble folder (RUN/ensemble), or its s3:// / gs:// URI")
    p.add_argument("--dataset", required=True, choices=DATASET_KINDS)
    p.add_argument("--root", required=True, help="dataset root: a folder, or s3://BUCKET/PREFIX / gs://BUCKET/PREFIX")
    p.add_argument("--classes", default=None, help="comma-separated (default: every class of the ensemble)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the ensemble's parent; for an "
                                                          "ensemble URI, the local copy's)")
    p.add_argument("--pixel-resolution", choices=("gt", "input"), default="gt")
    p.add_argument("--overlays", type=int, default=8,
                   help="overlay pictures per class, worst misses first (missed defects, false alarms)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=None,
                   help="folder datasets: seed of the train/test split (default: the ensemble's own)")
    a = p.parse_args(argv)
    try:
        ens = Ensemble.load(a.ensemble, a.device)
        classes = [c.strip() for c in a.classes.split(",")] if a.classes else None
        local = resolve_root(a.root, classes or ens.class_names)[1]
        frame = evaluate_ensemble(ens, a.dataset, local, classes, a.out or ens.folder.parent,
                                  a.pixel_resolution, a.overlays, a.seed)
    except (EnsembleError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_results(frame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
