"""Fitting the fusion of one class on its validation set (never the test split).

The validation defects are synthetic and of a few kinds; test defects are of other kinds. A
choice that is only good on the kinds it was chosen on does not transfer, so every choice here
is judged on a kind it was *not* chosen on:

1. normalisers are fitted on validation normals only (no defect involved);
2. the candidates are few: a subset of members, fused by ``mean``, ``max`` or ``rank_mean``
   (no free weights), a blur from ``SIGMAS``, an image rule (``map_max`` of the fused map, or
   ``member_mix``, the equal-weight mean of the used members' own normalised scores); the
   procedures are "one member", "all members fused" and "any subset fused";
3. leave-one-kind-out: for each defect kind, the candidate that is best on the *other* kinds is
   scored on the held-out kind; the mean of those held-out scores estimates how a selection
   procedure does on defects it never saw;
4. the better of the two fusion procedures is kept only when its held-out estimate beats the
   single-member one (the robust default) by ``FUSION_MARGIN``; otherwise the ensemble is the
   best member alone, and the report says so;
5. the image threshold: the F1-optimal one is kept only when, chosen on the other kinds, it beats
   the robust default (the highest validation-normal score) in held-out F1; otherwise the default.

The candidate finally kept is the procedure's choice on all kinds together.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ensembles.ensemble import ClassFusion, FusionChoice, run_members
from ensembles.fusion import QuantileNormalizer, RankTable, blur, fuse_maps
from models.training import score_outputs
from ensembles.metrics import f1_threshold, image_auroc, pixel_auroc, validation_score

SIGMAS = (0.0, 1 / 32)             # blur sigma as a fraction of the side
FUSED_RULES = ("mean", "max", "rank_mean")
FUSION_MARGIN = 0.005              # held-out val_score the fusion must gain over the best member
THRESHOLD_MARGIN = 0.02            # held-out F1 the F1-optimal threshold must gain over the default
MAX_RANK_SAMPLES = 2_000_000
ABLATION_PREFIX = "fused:"


def score_dataset(models: dict[str, Any], dataset, resolution: int, device, batch_size: int = 8):
    """Member scores ``[N]`` and maps ``[N,1,R,R]`` (CPU tensors) over ``dataset``."""
    members = functools.partial(run_members, models, resolution=resolution)
    return score_outputs(members, DataLoader(dataset, batch_size=batch_size), device)[0]


def f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    pred = scores >= threshold
    tp = float((pred & (labels == 1)).sum())
    return 2 * tp / max(float(pred.sum()) + float((labels == 1).sum()), 1e-12)


def _quiet(fn, *args) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(fn(*args))


def defect_groups(defects: list[str], labels: np.ndarray) -> list[np.ndarray]:
    """Boolean masks over the validation set, one per defect kind (two alternating folds when the
    set has only one kind), each with every normal image included."""
    normal = labels == 0
    kinds = sorted({d for d, y in zip(defects, labels) if y == 1})
    if len(kinds) >= 2:
        return [normal | np.array([d == k for d in defects]) for k in kinds]
    defective = np.flatnonzero(labels == 1)
    return [normal | np.isin(np.arange(len(labels)), defective[i::2]) for i in range(2)]


@dataclass
class Candidate:
    choice: FusionChoice
    used: list[str]
    per_group: np.ndarray      # val_score on each defect group
    image_auroc: float         # on the whole validation set
    pixel_auroc: float
    scores: np.ndarray         # image scores on the validation set

    @property
    def val_score(self) -> float:
        return validation_score(self.image_auroc, self.pixel_auroc)


def choose(candidates: list[Candidate], groups: list[int]) -> Candidate:
    """The candidate with the best mean val_score over ``groups`` (ties: fewer members, listed first)."""
    return max(candidates, key=lambda c: (round(float(c.per_group[groups].mean()), 12), -len(c.used)))


def held_out_estimate(candidates: list[Candidate], n_groups: int) -> float:
    """Mean over groups of the held-out score of the candidate chosen on the other groups."""
    picks = [choose(candidates, [j for j in range(n_groups) if j != k]) for k in range(n_groups)]
    return float(np.mean([p.per_group[k] for k, p in enumerate(picks)]))


class CandidateScorer:
    """Scores fusion candidates on the validation set, per defect group and in total."""

    def __init__(self, names, norm_maps, norm_scores, ranks, masks, labels, groups):
        self.names, self.norm_maps, self.norm_scores, self.ranks = names, norm_maps, norm_scores, ranks
        self.masks, self.labels, self.groups = masks, labels, groups

    def fused_map(self, used: list[str], rule: str, sigma: float) -> torch.Tensor:
        idx = [self.names.index(m) for m in used]
        maps = [self.norm_maps[i] for i in idx]
        fused = maps[0] if len(maps) == 1 else \
            fuse_maps(maps, rule, ranks=[self.ranks[self.names[i]] for i in idx] if rule == "rank_mean" else None)
        return blur(fused, sigma)

    def candidates(self, used: list[str], rule: str, sigma: float) -> list[Candidate]:
        """Both image rules for one fused map."""
        fused = self.fused_map(used, rule, sigma)[:, 0]
        weights = [1.0 / len(used) if m in used else 0.0 for m in self.names]
        image_options = {"map_max": fused.flatten(1).amax(1).numpy(),
                         "member_mix": torch.einsum("m,mb->b", torch.tensor(weights), self.norm_scores).numpy()}
        pix_by_group = [_quiet(pixel_auroc, fused[torch.from_numpy(g)].numpy(), self.masks[g]) for g in self.groups]
        pix_all = _quiet(pixel_auroc, fused.numpy(), self.masks)
        out = []
        for image_rule, s in image_options.items():
            per_group = np.array([validation_score(_quiet(image_auroc, s[g], self.labels[g]), p)
                                  for g, p in zip(self.groups, pix_by_group)])
            choice = FusionChoice(rule=rule if len(used) > 1 else "mean", weights=weights, sigma=sigma,
                                  image_rule=image_rule, image_weights=weights)
            out.append(Candidate(choice, list(used), per_group, _quiet(image_auroc, s, self.labels), pix_all, s))
        return out


def member_subsets(names: list[str]) -> list[list[str]]:
    return [list(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def ablation_sets(names: list[str], seed_members: list[str]) -> dict[str, list[str]]:
    """Fusions reported beside the kept ensemble: the seed members together, and all members together."""
    sets = {}
    for group in (seed_members, names):
        used = [m for m in names if m in group]
        if len(used) >= 2:
            sets[ABLATION_PREFIX + "+".join(used)] = used
    return sets


def choose_threshold(scores: np.ndarray, labels: np.ndarray, groups: list[np.ndarray]) -> tuple[float, str]:
    """F1-optimal threshold, or the robust default (highest normal score) when F1 does not transfer."""
    default = float(scores[labels == 0].max()) + 1e-6
    if len(groups) < 2:
        return f1_threshold(scores, labels), "f1"
    f1_held, default_held = [], []
    for k, g in enumerate(groups):
        rest = np.zeros_like(g)
        for j, other in enumerate(groups):
            if j != k:
                rest |= other
        t = f1_threshold(scores[rest], labels[rest])
        f1_held.append(f1_at(scores[g], labels[g], t))
        default_held.append(f1_at(scores[g], labels[g], default))
    if np.mean(f1_held) >= np.mean(default_held) + THRESHOLD_MARGIN:
        return f1_threshold(scores, labels), "f1"
    return default, "max_normal"


def fit_class_fusion(class_name: str, models: dict[str, Any], member_files: dict[str, str], validation,
                     resolution: int, device="cpu", seed_members: list[str] | None = None) -> ClassFusion:
    """Normalisers on validation normals, then the fusion chosen by held-out defect kinds (see the
    module's docstring). ``seed_members`` names the members whose fusion is reported as an
    ablation beside the all-member one (default: none)."""
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

    groups = defect_groups(list(validation.defects), labels)
    scorer = CandidateScorer(names, norm_maps, norm_scores, ranks, masks_np, labels, groups)
    by_members: dict[tuple[str, ...], list[Candidate]] = {}
    for used in member_subsets(names):
        for rule in (FUSED_RULES if len(used) > 1 else ("mean",)):
            for sigma in SIGMAS:
                by_members.setdefault(tuple(used), []).extend(scorer.candidates(used, rule, sigma))
    everything = [c for cs in by_members.values() for c in cs]
    singles = [c for c in everything if len(c.used) == 1]
    all_groups = list(range(len(groups)))

    held_single = held_out_estimate(singles, len(groups))
    # two fusion procedures: all members fused (3 rules x blurs x image rules), or any subset too
    fusion_families = {"all members": by_members[tuple(names)], "any subset of members": everything}
    held = {family: held_out_estimate(cs, len(groups)) for family, cs in fusion_families.items()}
    family = max(held, key=lambda f: held[f] + (1e-9 if f == "all members" else 0))  # ties: the simpler
    held_fusion = held[family]
    best_single = choose(singles, all_groups)
    if held_fusion >= held_single + FUSION_MARGIN and len(names) > 1:
        kept, reason = choose(fusion_families[family], all_groups), (
            f"fusion kept ({family}): held-out defect kinds {held_fusion:.3f} vs best member alone {held_single:.3f}")
    else:
        kept, reason = best_single, (
            f"best member alone kept: fusion on held-out defect kinds {held_fusion:.3f} does not beat "
            f"the best member's {held_single:.3f} by {FUSION_MARGIN}")
    threshold, threshold_rule = choose_threshold(kept.scores, labels, groups)

    def row(name: str, c: Candidate, **extra) -> dict[str, Any]:
        return {"name": name, "image_auroc": c.image_auroc, "pixel_auroc": c.pixel_auroc, "val_score": c.val_score,
                "held_out": float(c.per_group.mean()), **extra}

    report = [row(m, choose(by_members[(m,)], all_groups)) for m in names]
    ablations = {}
    for label, used in ablation_sets(names, seed_members or []).items():
        pick = choose([c for c in by_members[tuple(used)]], all_groups)
        ablations[label] = pick.choice
        report.append(row(label, pick))
    best_member = max(report[:len(names)], key=lambda r: r["held_out"])
    report.append(row("ensemble", kept, members_used=kept.used, best_member=best_member["name"],
                      beats_best_member=len(kept.used) > 1, reason=reason, held_out_fusion=held_fusion,
                      held_out_single=held_single, threshold_rule=threshold_rule))

    final_map = scorer.fused_map(kept.used, kept.choice.rule, kept.choice.sigma)[:, 0].numpy()
    map_range = [float(np.median(final_map[normal])), float(final_map[masks_np.astype(bool)].max())]
    return ClassFusion(
        class_name=class_name, members=names, member_files=member_files,
        weights_used={m: models[m].weights_used for m in names}, resolution=resolution,
        pixel_norm={m: pixel_norm[m].to_dict() for m in names}, image_norm={m: image_norm[m].to_dict() for m in names},
        ranks={m: ranks[m].quantiles for m in names}, rule=kept.choice.rule, weights=kept.choice.weights,
        sigma=kept.choice.sigma, image_rule=kept.choice.image_rule, image_weights=kept.choice.image_weights,
        threshold=threshold, map_range=map_range, validation=report,
        ablations={k: v.to_dict() for k, v in ablations.items()})
