"""PatchCore: coreset selection, nearest neighbours, the re-weighted score, checkpoints, detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ConfigError, create_model, load_model, model_class
from models import patchcore as pc
from models.training import fit

SMALL = dict(image_size=64, weights="packaged", coreset_ratio=0.25, map_blur_sigma=2.0)


def batches(n: int = 2, batch: int = 4, size: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch, 3, size, size, generator=g)} for _ in range(n)]


def reference_k_centre(x: np.ndarray, size: int, first: int) -> list[int]:
    """Greedy k-centre, written the slow way: recompute every point's distance to the chosen set."""
    chosen = [first]
    while len(chosen) < size:
        d = np.sqrt(((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1)).min(1)
        chosen.append(int(d.argmax()))
    return chosen


def test_greedy_coreset_is_k_centre_selection():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    got = pc.greedy_coreset(x, 30, projection_dim=64, seed=3)     # projection_dim > dim: no projection
    assert got.tolist() == reference_k_centre(x.numpy().astype(np.float64), 30, int(got[0]))
    assert pc.greedy_coreset(x, 500, 8, 0).tolist() == list(range(300))      # asking for more keeps all
    # the covering radius of the coreset is far below that of a random subset of the same size
    def radius(idx):
        return torch.cdist(x, x[idx]).min(1).values.max()
    projected = pc.greedy_coreset(x, 30, projection_dim=8, seed=3)
    assert radius(projected) < radius(torch.randperm(300, generator=torch.Generator().manual_seed(1))[:30])


def test_nearest_distances_match_brute_force_across_chunks(monkeypatch):
    monkeypatch.setattr(pc, "DISTANCE_CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 5, generator=g), torch.randn(40, 5, generator=g)
    d, i = pc.nearest_distances(queries, bank, 3)
    full = torch.cdist(queries, bank)
    torch.testing.assert_close(d, full.sort(1).values[:, :3])
    torch.testing.assert_close(full.gather(1, i), d)
    assert pc.nearest_distances(queries, bank[:2], 5)[0].shape == (50, 2)   # k capped by the bank


def fitted(**overrides) -> pc.PatchCore:
    model = create_model("patchcore", **{**SMALL, **overrides}).eval()
    model.fit_statistics(batches())
    return model


def test_image_score_follows_the_papers_reweighting():
    model = fitted(reweight_neighbours=4)
    images = batches(1, seed=2)[0]["image"]
    scores, nearest, features = model.patch_scores(model.prepare(images))
    got = model.predict(images)[0]
    bank = model.memory_bank.double()
    for b in range(len(images)):
        where = int(scores[b].flatten().argmax())
        s_star = float(scores[b].flatten()[where])
        query = features[b, where].double()
        m_star = int(nearest[b, where])
        assert torch.isclose(torch.linalg.vector_norm(bank[m_star] - query), torch.tensor(s_star, dtype=torch.double))
        neighbours = torch.cdist(bank[m_star][None], bank)[0].argsort()[:4]      # N_b(m*), m* itself first
        e = torch.exp(torch.linalg.vector_norm(bank[neighbours] - query, dim=1))
        expected = (1 - torch.exp(torch.linalg.vector_norm(bank[m_star] - query)) / e.sum()) * s_star
        assert float(got[b]) == pytest.approx(float(expected), rel=1e-4)
    plain = fitted(reweight_neighbours=1)
    assert torch.equal(plain.predict(images)[0], plain.patch_scores(plain.prepare(images))[0].flatten(1).amax(1))


def test_map_at_input_size_and_unfitted_model_says_what_to_do():
    model = fitted()
    scores, maps = model.predict(batches(1, size=80)[0]["image"])
    assert maps.shape == (4, 1, 80, 80) and torch.isfinite(maps).all() and scores.shape == (4,)
    with pytest.raises(RuntimeError, match="call fit_statistics"):
        create_model("patchcore", **SMALL).predict(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("overrides, parameter", [
    ({"coreset_ratio": 0.0}, "coreset_ratio"), ({"neighbourhood": 2}, "neighbourhood"), ({"k": 0}, "k"),
    ({"out_indices": (2, 2)}, "out_indices"), ({"out_indices": (7,)}, "out_indices"),
    ({"backbone": "no_such_net"}, "backbone")])
def test_bad_config_raises(overrides, parameter):
    with pytest.raises(ConfigError, match=parameter):
        create_model("patchcore", **{**SMALL, **overrides})


def test_checkpoint_round_trip_keeps_the_memory_bank(tmp_path):
    model = fitted()
    images = batches(1, seed=4)[0]["image"]
    scores, maps = model.predict(images)
    model.save(tmp_path / "p.safetensors")
    loaded = load_model(tmp_path / "p.safetensors").eval()
    assert loaded.memory_bank.shape == model.memory_bank.shape and loaded.weights_used == "packaged"
    again_scores, again_maps = loaded.predict(images)
    torch.testing.assert_close(again_scores, scores, rtol=0, atol=0)
    torch.testing.assert_close(again_maps, maps, rtol=0, atol=0)


def test_fit_is_one_pass_and_localises_synthetic_defects(synthetic_root, pasted_only):
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader

    from anomaly_data import prepare_splits

    assert model_class("patchcore").trains is False
    splits = prepare_splits("mvtec", synthetic_root, classes=["brick"], image_size=64, val_fraction=0.25, seed=0)
    model = create_model("patchcore", **SMALL)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    history = fit(model, DataLoader(splits.train, batch_size=8), epochs=5, lr=1e-3)
    assert history == []                                      # no training epoch, one fit pass
    patches_per_image = (64 // 8) ** 2
    assert model.memory_bank.shape[0] == round(0.25 * len(splits.train) * patches_per_image)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    validation = DataLoader(pasted_only(splits.validation), batch_size=16)
    maps = torch.cat([model.predict(b["image"])[1] for b in validation])
    masks = torch.cat([b["mask"] for b in validation]) > 0.5
    auroc = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert auroc > 0.85, f"pixel AUROC {auroc:.3f} on brick's validation defects"
