"""Fitting the fusion of one class on its validation set (never the test split).

The validation defects are synthetic and of a few kinds; test defects are of other kinds. A
choice that is only good on the kinds it was chosen on does not transfer, so every choice here
is judged on a kind it was *not* chosen on:

1. normalisers are fitted on validation normals only (no defect involved);
2. the map and the image score are chosen apart, each by its own metric (pixel AUROC for the
   map, image AUROC for the score): a member that localises well need not rank images well,
   and one joint choice made each half pay for the other;
3. the candidates are few and have no free weights. A map is a subset of members fused by
   ``mean``, ``max`` or ``rank_mean``, blurred by one of ``SIGMAS``. An image score is the
   equal-weight mean of a subset of members' own normalised scores, or the maximum of the kept
   map (``map_max``);
4. leave-one-kind-out: for each defect kind, the candidate that is best on the *other* kinds is
   scored on the held-out kind; the mean of those held-out scores estimates how a selection
   procedure ("one member", "all members fused", "any subset fused") does on defects it never saw;
5. for the map and for the image score alike, a fusion is kept only when its procedure's
   held-out estimate beats the robust default (the member fitted, not trained) by
   ``FUSION_MARGIN`` and the validation images confirm it: redrawn with replacement
   (``ensembles/confidence.py``), the procedure must be ahead in ``CONFIDENCE`` of the redraws;
   otherwise that half of the ensemble is the default's, and the report says so;
6. the image threshold: the F1-optimal one is kept only when, chosen on the other kinds, it beats
   the robust default (the highest validation-normal score) in held-out F1; otherwise the default.

The candidate finally kept is the procedure's choice on all kinds together. Ties (frequent when
image AUROC saturates on a small validation set) go to the candidate whose members localise
best on validation, then to fewer members.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ensembles.confidence import RESAMPLES, confidence_ahead, per_image_counts
from ensembles.ensemble import ClassFusion, FusionChoice, run_members
from ensembles.fusion import QuantileNormalizer, RankTable, blur, fuse_maps
from models.training import score_outputs
from ensembles.metrics import f1_threshold, image_auroc, pixel_auroc, validation_score

SIGMAS = (0.0, 1 / 32)             # blur sigma as a fraction of the side
FUSED_RULES = ("mean", "max", "rank_mean")
FUSION_MARGIN = 0.005              # held-out AUROC a fusion must gain over the best member alone
CONFIDENCE = 0.95                  # ... in at least this share of redraws of the validation images
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


@dataclass
class Cells:
    """The validation set cut for held-out estimates: cell ``k`` is every normal image with the
    defects of kind ``k`` (two alternating folds of the defects when there is one kind); a cell's
    candidate is chosen on its ``folds`` entry, the other kinds. (Splitting the normals between
    choice and scoring as well was measured: with 3 normals a side, the estimates got noisier and
    the selection worse on the surfaces family.)"""

    masks: list[np.ndarray]
    folds: list[list[int]]

    @property
    def everyone(self) -> list[int]:
        return list(range(len(self.masks)))


def validation_cells(defects: list[str], labels: np.ndarray) -> Cells:
    normal = labels == 0
    kinds = sorted({d for d, y in zip(defects, labels) if y == 1})
    if len(kinds) >= 2:
        parts = [np.array([d == k and y == 1 for d, y in zip(defects, labels)]) for k in kinds]
    else:
        defective = np.flatnonzero(labels == 1)
        parts = [np.isin(np.arange(len(labels)), defective[i::2]) for i in range(2)]
    n = len(parts)
    return Cells([normal | part for part in parts], [[j for j in range(n) if j != k] for k in range(n)])


@dataclass
class Candidate:
    """One way to make a map (``rule``, ``sigma``) or an image score (``image_rule``) from members."""

    used: list[str]
    per_group: np.ndarray        # the metric on each validation cell (pixel AUROC of a map, image AUROC of a score)
    overall: float               # the metric on the whole validation set
    tie: float = 0.0             # second key among equal candidates (higher is better)
    rule: str = "mean"
    sigma: float = 0.0
    image_rule: str = "member_mix"
    scores: np.ndarray = field(default=None, repr=False)   # image scores on the validation set


def choose(candidates: list[Candidate], cells: list[int]) -> Candidate:
    """The candidate with the best mean metric over ``cells`` (ties: ``tie``, then fewer members, listed first)."""
    return max(candidates, key=lambda c: (round(float(c.per_group[cells].mean()), 12), round(c.tie, 12), -len(c.used)))


def held_out_picks(candidates: list[Candidate], cells: Cells) -> list[Candidate]:
    """For each cell, the candidate chosen on its fold (the other kinds)."""
    return [choose(candidates, fold) for fold in cells.folds]


def held_out_estimate(picks: list[Candidate]) -> float:
    """Mean over cells of the held-out score of the candidate chosen without them."""
    return float(np.mean([p.per_group[k] for k, p in enumerate(picks)]))


@dataclass
class Selection:
    kept: Candidate
    fused: bool                  # a fusion of members was kept (not one member alone)
    reason: str
    held_default: float          # held-out estimate of the robust default
    held_other: float            # of the best other procedure
    confidence: float            # share of validation redraws in which that procedure is ahead of the default


def select(candidates: list[Candidate], names: list[str], cells: Cells, what: str,
           anchors: list[str], counts_of: Callable[[Candidate], tuple[np.ndarray, np.ndarray]],
           labels: np.ndarray) -> Selection:
    """The robust default (the best of the ``anchors`` alone: members fitted, not trained, when
    there are any, else every member alone), unless another procedure beats it on held-out
    kinds by ``FUSION_MARGIN`` and does so in at least ``CONFIDENCE`` of the redraws of the
    validation images (``counts_of`` gives a candidate's per-image histograms for them): one
    member alone, all members fused, or any subset fused."""
    everyone = cells.everyone
    default = [c for c in candidates if len(c.used) == 1 and c.used[0] in anchors]
    default_picks = held_out_picks(default, cells)
    held_default = held_out_estimate(default_picks)
    families = {"one member": [c for c in candidates if len(c.used) == 1],
                "all members": [c for c in candidates if sorted(c.used) == sorted(names)],
                "any subset of members": candidates}
    picks = {family: held_out_picks(cs, cells) for family, cs in families.items() if cs}
    held = {family: held_out_estimate(p) for family, p in picks.items()}
    order = list(families)  # ties: the simpler procedure
    family = max(held, key=lambda f: (round(held[f], 12), -order.index(f)))
    confidence, verdict = 0.0, "within the margin"
    if held[family] >= held_default + FUSION_MARGIN:
        counted: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def counts(cs: list[Candidate]) -> list[tuple[np.ndarray, np.ndarray]]:
            for c in cs:
                if id(c) not in counted:
                    counted[id(c)] = counts_of(c)
            return [counted[id(c)] for c in cs]
        confidence = confidence_ahead(counts(picks[family]), counts(default_picks), labels, cells.masks)
        verdict = f"ahead in {confidence:.0%}"
    kept = choose(default, everyone)
    reason = (f"{what}: {kept.used[0]} kept (the robust default), no other procedure beats its "
              f"{held_default:.3f} on held-out defect kinds by {FUSION_MARGIN} in {CONFIDENCE:.0%} of "
              f"{RESAMPLES} redraws of the validation images (best: {family}, {held[family]:.3f}, {verdict})")
    if confidence >= CONFIDENCE:
        kept = choose(families[family], everyone)
        reason = (f"{what}: {family} ({'+'.join(kept.used)}) kept, held-out defect kinds {held[family]:.3f} "
                  f"vs the robust default's {held_default:.3f}, ahead in {confidence:.0%} of {RESAMPLES} "
                  f"redraws of the validation images")
    return Selection(kept, len(kept.used) > 1, reason, held_default, held[family], confidence)


class CandidateScorer:
    """Scores map and image-score candidates on the validation set, per defect group and in total."""

    def __init__(self, names, norm_maps, norm_scores, ranks, masks, labels, cells: Cells):
        self.names, self.norm_maps, self.norm_scores, self.ranks = names, norm_maps, norm_scores, ranks
        self.masks, self.labels, self.groups = masks, labels, cells.masks

    def fused_map(self, used: list[str], rule: str, sigma: float) -> torch.Tensor:
        idx = [self.names.index(m) for m in used]
        maps = [self.norm_maps[i] for i in idx]
        fused = maps[0] if len(maps) == 1 else \
            fuse_maps(maps, rule, ranks=[self.ranks[self.names[i]] for i in idx] if rule == "rank_mean" else None)
        return blur(fused, sigma)

    def weights(self, used: list[str]) -> list[float]:
        return [1.0 / len(used) if m in used else 0.0 for m in self.names]

    def map_candidate(self, used: list[str], rule: str, sigma: float) -> Candidate:
        """A fused map, scored by pixel AUROC; its maximum per image is kept for ``map_max``."""
        fused = self.fused_map(used, rule, sigma)[:, 0]
        per_group = np.array([_quiet(pixel_auroc, fused[torch.from_numpy(g)].numpy(), self.masks[g])
                              for g in self.groups])
        return Candidate(list(used), per_group, _quiet(pixel_auroc, fused.numpy(), self.masks),
                         rule=rule if len(used) > 1 else "mean", sigma=sigma, image_rule="map_max",
                         scores=fused.flatten(1).amax(1).numpy())

    def image_candidate(self, used: list[str], scores: np.ndarray, image_rule: str, tie: float) -> Candidate:
        per_group = np.array([_quiet(image_auroc, scores[g], self.labels[g]) for g in self.groups])
        return Candidate(list(used), per_group, _quiet(image_auroc, scores, self.labels), tie=tie,
                         image_rule=image_rule, scores=scores)

    def member_mix(self, used: list[str], tie: float) -> Candidate:
        """The equal-weight mean of ``used``'s own normalised image scores."""
        scores = torch.einsum("m,mb->b", torch.tensor(self.weights(used)), self.norm_scores).numpy()
        return self.image_candidate(used, scores, "member_mix", tie)

    def map_counts(self, c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        """Per-image histograms of a map candidate's defective and normal pixels (for redraws)."""
        return per_image_counts(self.fused_map(c.used, c.rule, c.sigma)[:, 0].numpy(), self.masks)

    def score_counts(self, c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        """The same for an image-score candidate: one value per image."""
        return per_image_counts(c.scores[:, None], self.labels[:, None] == 1)

    def map_max(self, kept_map: Candidate, tie: float) -> Candidate:
        return self.image_candidate(kept_map.used, kept_map.scores, "map_max", tie)

    def choice(self, kept_map: Candidate, image: Candidate) -> FusionChoice:
        return FusionChoice(rule=kept_map.rule, weights=self.weights(kept_map.used), sigma=kept_map.sigma,
                            image_rule=image.image_rule, image_weights=self.weights(image.used))


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


def choose_threshold(scores: np.ndarray, labels: np.ndarray, cells: Cells) -> tuple[float, str]:
    """F1-optimal threshold, or the robust default (just above the highest normal score) when, chosen
    on each cell's fold, F1 does not transfer to the cell."""
    def above_normals(chosen_on: np.ndarray) -> float:
        return float(scores[chosen_on & (labels == 0)].max(initial=-np.inf)) + 1e-6

    f1_held, default_held = [], []
    for cell, fold in zip(cells.masks, cells.folds):
        rest = np.logical_or.reduce([cells.masks[j] for j in fold]) if fold else ~cell
        if not (rest & (labels == 1)).any() or not (rest & (labels == 0)).any():
            return f1_threshold(scores, labels), "f1"
        f1_held.append(f1_at(scores[cell], labels[cell], f1_threshold(scores[rest], labels[rest])))
        default_held.append(f1_at(scores[cell], labels[cell], above_normals(rest)))
    if np.mean(f1_held) >= np.mean(default_held) + THRESHOLD_MARGIN:
        return f1_threshold(scores, labels), "f1"
    return above_normals(np.ones_like(labels, dtype=bool)), "max_normal"


def fit_class_fusion(class_name: str, models: dict[str, Any], member_files: dict[str, str], validation,
                     resolution: int, device="cpu", seed_members: list[str] | None = None) -> ClassFusion:
    """Normalisers on validation normals, then the map and the image score chosen by held-out
    defect kinds (see the module's docstring). ``seed_members`` names the members whose fusion is
    reported as an ablation beside the all-member one (default: none)."""
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

    cells = validation_cells(list(validation.defects), labels)
    everyone = cells.everyone
    scorer = CandidateScorer(names, norm_maps, norm_scores, ranks, masks_np, labels, cells)
    maps_of: dict[tuple[str, ...], list[Candidate]] = {
        tuple(used): [scorer.map_candidate(used, rule, sigma)
                      for rule in (FUSED_RULES if len(used) > 1 else ("mean",)) for sigma in SIGMAS]
        for used in member_subsets(names)}
    all_maps = [c for cs in maps_of.values() for c in cs]
    localises = {m: choose(maps_of[(m,)], everyone).overall for m in names}  # tie-break for image scores

    def image_options(used: list[str], kept_map: Candidate) -> list[Candidate]:
        """The mix of ``used``'s own scores, and the maximum of the kept map when it is made of them."""
        tie = float(np.mean([localises[m] for m in used]))
        mixes = [scorer.member_mix(used, tie)]
        return mixes + ([scorer.map_max(kept_map, tie)] if sorted(kept_map.used) == sorted(used) else [])

    # the robust default: a member without training (the memory bank) has nothing that could have
    # fitted the validation defects' look; measured, the trained members' validation ranks did
    # not carry over to other defects (python -m bench.peers on the surfaces family)
    anchors = [m for m in names if not models[m].trains] or names
    map_pick = select(all_maps, names, cells, "map", anchors, scorer.map_counts, labels)
    image_candidates = [c for used in member_subsets(names) for c in image_options(used, map_pick.kept)]
    image_pick = select(image_candidates, names, cells, "image score", anchors, scorer.score_counts, labels)
    kept_map, kept_image = map_pick.kept, image_pick.kept
    threshold, threshold_rule = choose_threshold(kept_image.scores, labels, cells)

    def row(name: str, map_c: Candidate, image_c: Candidate) -> dict[str, Any]:
        per_group = (map_c.per_group + image_c.per_group) / 2
        return {"name": name, "image_auroc": image_c.overall, "pixel_auroc": map_c.overall,
                "val_score": validation_score(image_c.overall, map_c.overall), "held_out": float(per_group.mean()),
                "map_members": map_c.used, "image_members": image_c.used, "image_rule": image_c.image_rule}

    def best_of(used: list[str]) -> tuple[Candidate, Candidate]:
        """A subset's own map and image score: its best map, then its best image option."""
        best_map = choose(maps_of[tuple(used)], everyone)
        return best_map, choose(image_options(used, best_map), everyone)

    report = [row(m, *best_of([m])) for m in names]
    ablations = {}
    for label, used in ablation_sets(names, seed_members or []).items():
        map_c, image_c = best_of(used)
        ablations[label] = scorer.choice(map_c, image_c)
        report.append(row(label, map_c, image_c))
    best_member = max(report[:len(names)], key=lambda r: r["held_out"])
    used = sorted(set(kept_map.used) | set(kept_image.used), key=names.index)
    report.append({**row("ensemble", kept_map, kept_image), "members_used": used, "best_member": best_member["name"],
                   "beats_best_member": map_pick.fused or image_pick.fused,
                   "reason": f"{map_pick.reason}; {image_pick.reason}",
                   "held_out_default": [map_pick.held_default, image_pick.held_default],   # [map, image score]
                   "held_out_other": [map_pick.held_other, image_pick.held_other],
                   "confidence": [map_pick.confidence, image_pick.confidence],
                   "threshold_rule": threshold_rule})

    choice = scorer.choice(kept_map, kept_image)
    final_map = scorer.fused_map(kept_map.used, kept_map.rule, kept_map.sigma)[:, 0].numpy()
    map_range = [float(np.median(final_map[normal])), float(final_map[masks_np.astype(bool)].max())]
    return ClassFusion(
        class_name=class_name, members=names, member_files=member_files,
        weights_used={m: models[m].weights_used for m in names}, resolution=resolution,
        pixel_norm={m: pixel_norm[m].to_dict() for m in names}, image_norm={m: image_norm[m].to_dict() for m in names},
        ranks={m: ranks[m].quantiles for m in names}, rule=choice.rule, weights=choice.weights,
        sigma=choice.sigma, image_rule=choice.image_rule, image_weights=choice.image_weights,
        threshold=threshold, map_range=map_range, validation=report,
        ablations={k: v.to_dict() for k, v in ablations.items()})
