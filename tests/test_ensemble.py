"""Fusion properties on constructed members, and the saved ensemble round trip."""

import json
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_data.datasets import ArrayDataset
from ensembles.ensemble import Ensemble, EnsembleError
from ensembles.fit import fit_class_fusion
from ensembles.fusion import QuantileNormalizer, RankTable, fuse_maps
from ensembles.metrics import pixel_auroc
from models.base import AnomalyModel
from models.config import ModelConfig


@dataclass(frozen=True)
class ProbeConfig(ModelConfig):
    kind: str = "perfect"
    scale: float = 1.0
    offset: float = 0.0
    image_size: int = 32
    weights: str = "none"


class Probe(AnomalyModel):
    """A constructed member: ``perfect`` sees the defect (red channel) through a little noise,
    ``noise`` sees nothing."""

    name = "probe"
    config_class = ProbeConfig
    backbone_field = None

    def __init__(self, config):
        super().__init__(config)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def map_of(self, images):
        seed = int(images.sum().item() * 1000) % (2**31)
        noise = torch.rand(images.shape[0], 1, *images.shape[-2:], generator=torch.Generator().manual_seed(seed))
        # the defect lifts the perfect member by about its own noise range: separable alone,
        # blurred when averaged with a noise member on an equal footing
        defect = (images[:, :1] - images[:, 1:2] > 0.2).float()
        m = 0.1 * defect + 0.1 * noise if self.config.kind == "perfect" else noise
        return m * self.config.scale + self.config.offset


def constructed_set(n=12, side=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 110, (n, side, side, 3)).astype(np.uint8)
    masks = np.zeros((n, side, side), bool)
    labels = np.zeros(n, np.int64)
    for i in range(n // 2, n):
        y, x = rng.integers(4, side - 10, 2)
        masks[i, y:y + 6, x:x + 6] = True
        images[i][masks[i], 0] = 200
        labels[i] = 1
    return ArrayDataset(images, masks, labels, np.zeros(n, np.int64), ["c"], ["good"] * n,
                        [f"img{i}.png" for i in range(n)])


def test_weighted_fusion_keeps_the_perfect_member():
    val = constructed_set(seed=0)
    models = {"perfect": Probe(ProbeConfig("perfect")), "noise": Probe(ProbeConfig("noise", scale=50.0))}
    fusion = fit_class_fusion("c", models, {"perfect": "a.pt", "noise": "b.pt"}, val, 32)
    ens = Ensemble({"c": fusion}, {"a.pt": models["perfect"], "b.pt": models["noise"]})
    test = constructed_set(seed=1)
    x = torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255
    out = ens.predict(x, "c")
    fused_auroc = pixel_auroc(out["maps"][:, 0].numpy(), test.masks)
    perfect_auroc = pixel_auroc(models["perfect"].anomaly_map(x)[:, 0].numpy(), test.masks)
    plain_mean = fuse_maps([QuantileNormalizer(**fusion.pixel_norm[m])(models[m].anomaly_map(x))
                            for m in ("perfect", "noise")], "mean")
    assert perfect_auroc > 0.99
    assert fused_auroc > 0.97 * perfect_auroc
    assert fused_auroc > pixel_auroc(plain_mean[:, 0].numpy(), test.masks)   # weights matter
    # a noise member adds nothing: the fitted "ensemble" is the perfect member alone, and says so
    assert fusion.validation[-1]["members_used"] == ["perfect"]
    assert fusion.validation[-1]["beats_best_member"] is False


class Scorer(Probe):
    """Ranks images perfectly (its score sees the defect) but its map is noise."""

    def score(self, x):
        defect = (x[:, 0] - x[:, 1] > 0.2).flatten(1).any(1).float()
        return defect + 0.1 * torch.rand(len(x), generator=torch.Generator().manual_seed(int(x.sum()) % 997)), \
            Probe.map_of(self.__class__(ProbeConfig("noise")), x)


class Localiser(Probe):
    """Localises the defect (the perfect map, but for one hot pixel in every other image, which
    decides the map's maximum) and its own image score is noise."""

    def score(self, x):
        maps = self.map_of(x).clone()
        maps[::2, :, 0, 0] = 1.0
        return torch.rand(len(x), generator=torch.Generator().manual_seed(int(x.sum()) % 991)), maps


class Fitted(Probe):
    """A member that is fitted, not trained (the robust default of the fusion)."""

    trains = False


def test_the_map_and_the_image_score_are_chosen_apart():
    val = constructed_set(n=24, seed=3)
    val.defects = ["good"] * 12 + ["kind_a", "kind_b"] * 6
    models = {"localiser": Localiser(ProbeConfig("perfect")), "scorer": Scorer(ProbeConfig("noise"))}
    fusion = fit_class_fusion("c", models, {"localiser": "a.pt", "scorer": "b.pt"}, val, 32)
    choice = fusion.choice
    assert choice.weights == [1.0, 0.0] and choice.image_rule == "member_mix" and choice.image_weights == [0.0, 1.0]
    assert fusion.members_used == ["localiser", "scorer"]
    assert "map localiser" in choice.describe(fusion.members) and "image score scorer" in choice.describe(fusion.members)


def test_the_fitted_member_is_the_default_that_others_must_beat_by_a_margin():
    val = constructed_set(n=24, seed=4)
    val.defects = ["good"] * 12 + ["kind_a", "kind_b"] * 6
    # equally good members: the fitted one stays, whatever the order
    for order in (("trained", "fitted"), ("fitted", "trained")):
        members = {"trained": Probe(ProbeConfig("perfect")), "fitted": Fitted(ProbeConfig("perfect", scale=2.0))}
        models = {name: members[name] for name in order}
        fusion = fit_class_fusion("c", models, {m: f"{m}.pt" for m in models}, val, 32)
        assert fusion.members_used == ["fitted"], fusion.validation[-1]["reason"]
        assert "robust default" in fusion.validation[-1]["reason"]
    # a fitted member that sees nothing is replaced by the one that sees the defects
    models = {"trained": Probe(ProbeConfig("perfect")), "fitted": Fitted(ProbeConfig("noise"))}
    fusion = fit_class_fusion("c", models, {m: f"{m}.pt" for m in models}, val, 32)
    assert fusion.choice.weights[0] > 0 and "one member (trained) kept" in fusion.validation[-1]["reason"]


class OtherNoise(Probe):
    """A member that sees nothing, with noise of its own (not the ``noise`` probe's)."""

    def map_of(self, images):
        return Probe.map_of(self, images.flip(-1))


def test_a_lead_the_validation_redraws_do_not_confirm_keeps_the_default():
    from ensembles.fit import CONFIDENCE, FUSION_MARGIN

    val = constructed_set(n=24, seed=5)
    val.defects = ["good"] * 12 + ["kind_a", "kind_b"] * 6
    models = {"trained": OtherNoise(ProbeConfig("noise")), "fitted": Fitted(ProbeConfig("noise"))}
    fusion = fit_class_fusion("c", models, {m: f"{m}.pt" for m in models}, val, 32)
    report = fusion.validation[-1]
    image_default, image_other = report["held_out_default"][1], report["held_out_other"][1]
    # two members that see nothing: the trained one's image score leads on held-out kinds by far
    # more than the margin, by chance, and the redraws of the validation images say so
    assert image_other >= image_default + FUSION_MARGIN
    assert report["confidence"][1] < CONFIDENCE
    assert fusion.members_used == ["fitted"], report["reason"]
    assert f"ahead in {report['confidence'][1]:.0%}" in report["reason"]


def test_the_redraws_confirm_a_real_lead_and_not_a_chance_one():
    from ensembles.confidence import confidence_ahead, per_image_counts

    rng = np.random.default_rng(0)

    def counts(scores, labels):
        return per_image_counts(scores[:, None], labels[:, None] == 1)

    def case(n_normal, n_defect, lift_a, lift_b):
        labels = np.r_[np.zeros(n_normal), np.ones(2 * n_defect)].astype(int)
        groups = [labels == 0, labels == 0]
        groups[0][n_normal:n_normal + n_defect] = True
        groups[1][n_normal + n_defect:] = True
        a = rng.normal(size=len(labels)) + lift_a * labels
        b = rng.normal(size=len(labels)) + lift_b * labels
        return confidence_ahead([counts(a, labels)] * 2, [counts(b, labels)] * 2, labels, groups)

    assert case(400, 200, 1.0, 0.5) > 0.99      # a real lead, many images: confirmed
    # two equally good members: a 95 % rule passes a chance lead about one time in twenty
    assert sum(case(12, 12, 1.0, 1.0) >= 0.95 for _ in range(20)) <= 3
    same = rng.normal(size=30)
    labels = (np.arange(30) >= 15).astype(int)
    groups = [np.ones(30, bool)]
    assert confidence_ahead([counts(same, labels)], [counts(same, labels)], labels, groups) == 0.0


def test_binned_auroc_matches_the_exact_one():
    from ensembles.confidence import auroc_of_counts, per_image_counts
    from ensembles.metrics import image_auroc

    rng = np.random.default_rng(3)
    maps = rng.normal(size=(16, 24, 24))
    masks = np.zeros(maps.shape, bool)
    masks[8:, 4:12, 4:12] = True
    maps[masks] += 0.7
    pos, neg = per_image_counts(maps, masks)
    assert abs(auroc_of_counts(pos.sum(0), neg.sum(0)) - pixel_auroc(maps, masks)) < 1e-3
    scores, labels = rng.normal(size=40), (np.arange(40) % 3 == 0).astype(int)
    pos, neg = per_image_counts(scores[:, None], labels[:, None] == 1)
    assert auroc_of_counts(pos.sum(0), neg.sum(0)) == pytest.approx(image_auroc(scores, labels), abs=1e-12)


def test_normalisation_makes_scale_irrelevant():
    val = constructed_set(seed=2)
    a = {"p": Probe(ProbeConfig("perfect")), "n": Probe(ProbeConfig("noise"))}
    b = {"p": Probe(ProbeConfig("perfect", scale=1000.0, offset=7.0)), "n": Probe(ProbeConfig("noise"))}
    files = {"p": "p.pt", "n": "n.pt"}
    fa, fb = fit_class_fusion("c", a, files, val, 32), fit_class_fusion("c", b, files, val, 32)
    assert (fa.rule, fa.weights, fa.sigma) == (fb.rule, fb.weights, fb.sigma)
    x = torch.from_numpy(val.images).permute(0, 3, 1, 2).float() / 255
    ma = QuantileNormalizer(**fa.pixel_norm["p"])(a["p"].anomaly_map(x))
    mb = QuantileNormalizer(**fb.pixel_norm["p"])(b["p"].anomaly_map(x))
    assert torch.allclose(ma, mb, atol=1e-4)


def test_rank_mean_is_invariant_to_monotone_transforms():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.rand(4, 1, 16, 16, generator=g), torch.rand(4, 1, 16, 16, generator=g)
    t2 = torch.exp(3 * m2) ** 2 - 5  # strictly increasing transform of member 2
    base = fuse_maps([m1, m2], "rank_mean", ranks=[RankTable.fit(m1.numpy()), RankTable.fit(m2.numpy())])
    moved = fuse_maps([m1, t2], "rank_mean", ranks=[RankTable.fit(m1.numpy()), RankTable.fit(t2.numpy())])
    assert torch.allclose(base, moved, atol=1e-5)
    # while a plain mean does change
    assert not torch.allclose(fuse_maps([m1, m2], "mean"), fuse_maps([m1, t2], "mean"), atol=1e-2)


def test_unknown_rule_and_bad_weights():
    m = [torch.zeros(1, 1, 2, 2)] * 2
    with pytest.raises(ValueError, match="unknown fusion rule 'median'"):
        fuse_maps(m, "median")
    with pytest.raises(ValueError, match="non-negative weights"):
        fuse_maps(m, "weighted", [1.0, -1.0])


def test_ensemble_folder_errors(tmp_path):
    with pytest.raises(EnsembleError, match="ensemble.json is missing"):
        Ensemble.load(tmp_path)
    (tmp_path / "ensemble.json").write_text(json.dumps({"format": 0, "classes": {}}))
    with pytest.raises(EnsembleError, match="has format 0; this version reads format 2"):
        Ensemble.load(tmp_path)


# ----- a real (tiny) ensemble, built without Ray (the tiny_run fixture, conftest.py) ------------
def test_evaluation_report_files(tiny_run, synthetic_root):
    from ensembles.evaluate import evaluate_ensemble

    run, ensemble = tiny_run
    frame = evaluate_ensemble(ensemble, "mvtec", synthetic_root, ["washer"], run / "report", overlays=3)
    assert list(frame.columns[:7]) == ["class", "member", "image_auroc", "pixel_auroc", "aupro", "image_f1max",
                                       "pixel_f1max"]
    # members keep their names, ablations are "fused:...", the kept fusion is "ensemble"
    assert set(frame["member"]) == {"hvq_trans", "patchcore", "transformaly", "fused:hvq_trans+transformaly",
                                    "fused:hvq_trans+patchcore+transformaly", "ensemble"}
    assert (frame[frame["class"] == "mean"]["image_auroc"].values == frame[frame["class"] == "washer"]["image_auroc"].values).all()
    washer = frame[frame["class"] == "washer"].set_index("member")
    assert washer["val_image_auroc"].notna().all() and washer["val_pixel_auroc"].notna().all()
    md = (run / "report" / "results.md").read_text()
    assert "| transformaly | random |" in md and "| hvq_trans | packaged |" in md
    assert "| fused:hvq_trans+transformaly | packaged+random |" in md and "gap I" in md
    assert "- kept: " in md and "held-out defect kinds" in md
    assert len(list((run / "report" / "overlays" / "washer").glob("*.png"))) == 3
    with pytest.raises(EnsembleError, match=r"no member for class\(es\) \['pill'\]"):
        evaluate_ensemble(ensemble, "mvtec", synthetic_root, ["pill"], run / "report")


def test_batch_scoring_with_ray_data_matches_the_query(tiny_run, synthetic_root, tmp_path):
    import ray

    from ensembles.batch import score_folder
    from ensembles.query import query_images

    run, _ = tiny_run
    folder = tmp_path / "incoming"
    sub = folder / "line2"
    sub.mkdir(parents=True)
    for i, src in enumerate(sorted((synthetic_root / "washer" / "test").rglob("*.png"))[:5]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    Image.open(folder / "0.png").convert("L").save(sub / "0.png")            # grayscale, same stem
    Image.open(folder / "1.png").resize((1500, 1100)).save(sub / "big.png")   # large and not square
    (sub / "broken.png").write_bytes(b"not an image")
    ensemble = Ensemble.load(run / "ensemble", "cpu")
    expected = list(query_images(ensemble, [folder], out_dir=tmp_path / "q"))
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        target = score_folder(run / "ensemble", [folder], tmp_path / "scored", actors=2, batch_size=3)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["path"] for r in rows] == [e["path"] for e in expected]             # every file, in order
    broken = [r for r in rows if "error" in r]
    assert len(broken) == 1 and broken[0]["path"].endswith("broken.png")
    for row, exp in zip(rows, expected):
        if "error" not in row:
            assert row["score"] == pytest.approx(exp["score"], abs=1e-5)
            assert Path(row["map"]).is_file()
    maps = {Path(r["map"]).relative_to(tmp_path / "scored").as_posix() for r in rows if "map" in r}
    assert {"incoming/0_map.png", "incoming/line2/0_map.png"} <= maps                  # no clash between stems
    assert Image.open(tmp_path / "scored" / "incoming/line2/big_map.png").size == (1500, 1100)
