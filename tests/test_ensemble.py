"""Fusion properties on constructed members, and the saved ensemble round trip."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from anomaly_data.datasets import ArrayDataset
from ensembles.ensemble import Ensemble, EnsembleError
from ensembles.fit import fit_class_fusion
from ensembles.fusion import QuantileNormalizer, RankTable, fuse_maps
from ensembles.metrics import pixel_auroc
from models.base import AnomalyModel


@dataclass
class ProbeConfig:
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

    def __init__(self, config):
        super().__init__(config)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def anomaly_map(self, images):
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
    assert fusion.validation[-1]["name"] == "ensemble"
    assert fusion.validation[-1]["val_score"] >= max(r["val_score"] for r in fusion.validation[:-1])


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
    with pytest.raises(EnsembleError, match="has format 0; this version reads format 1"):
        Ensemble.load(tmp_path)
