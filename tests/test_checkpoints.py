"""Lean checkpoints: no frozen tensor on disk, the backbone rebuilt and checked on load."""

import warnings

import pytest
import torch

from models import ConfigError, create_model, load_model
from models.base import CHECKPOINT_FORMAT

MODELS = ["haloae", "hvq_trans", "transformaly", "patchcore"]


def small(model, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_model(model, "fast", image_size=64, **overrides).eval()
    if not net.trains:
        net.fit_statistics([{"image": torch.rand(4, 3, 64, 64), "label": torch.zeros(4)}])
    return net


def maps(net, images):
    with torch.no_grad():
        return net.anomaly_map(images)


@pytest.mark.parametrize("model", MODELS)
def test_a_checkpoint_holds_no_frozen_tensor_and_reloads_the_same_model(model, tmp_path):
    net = small(model)
    net.save(tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=False)
    frozen = net.frozen_state_keys()
    assert frozen and not set(saved["state_dict"]) & frozen
    assert set(saved["state_dict"]) | frozen == set(net.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(maps(load_model(tmp_path / "m.pt").eval(), images), maps(net, images))


def test_a_random_frozen_backbone_is_rebuilt_from_its_seed():
    a, b = small("transformaly"), small("transformaly")    # weights "none": a random ViT teacher
    assert a.frozen_digest() == b.frozen_digest()
    torch.manual_seed(123)                                   # the caller's random state does not matter
    assert small("transformaly").frozen_digest() == a.frozen_digest()


def test_a_backbone_that_rebuilds_differently_is_a_clear_error(tmp_path):
    net = small("hvq_trans", weights="none")
    ckpt = net.checkpoint()
    ckpt["frozen"]["sha256"] = "0" * 64                    # as if saved by another torch version
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="differs from the one this model was trained with.*torch"):
        load_model(tmp_path / "m.pt")


def test_a_format_1_checkpoint_with_every_tensor_still_loads(tmp_path):
    net = small("haloae")
    old = {"format": 1, "model": "haloae", "config": net.config.to_dict(), "weights_used": net.weights_used,
           "state_dict": {k: v.clone() for k, v in net.state_dict().items()}}
    torch.save(old, tmp_path / "old.pt")
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(maps(load_model(tmp_path / "old.pt").eval(), images), maps(net, images))
    torch.save({"format": 99, "model": "haloae"}, tmp_path / "new.pt")
    with pytest.raises(ConfigError, match="formats 1 and 2"):
        load_model(tmp_path / "new.pt")
    assert CHECKPOINT_FORMAT == 2


def test_an_ended_trial_keeps_no_optimizer_state(tmp_path):
    from distributed.checkpoints import CHECKPOINT_STATE, drop_trial_checkpoints, strip_optimizer_state

    folder = tmp_path / "trial" / "checkpoint_000001"
    folder.mkdir(parents=True)
    net = small("hvq_trans")
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    net.loss({"image": torch.rand(2, 3, 64, 64)})["loss"].backward()
    optimizer.step()
    torch.save({"optimizer": optimizer.state_dict(), "epoch": 3}, folder / CHECKPOINT_STATE)
    before = (folder / CHECKPOINT_STATE).stat().st_size
    assert strip_optimizer_state(folder) and not strip_optimizer_state(folder)
    state = torch.load(folder / CHECKPOINT_STATE, weights_only=False)
    assert state == {"optimizer": None, "epoch": 3} and (folder / CHECKPOINT_STATE).stat().st_size < before / 10

    class Result:
        path, metrics, config = str(tmp_path / "trial"), {"trial_id": "abc"}, {}

    ddp = tmp_path / "train" / "train-abc" / "checkpoint_000000"
    ddp.mkdir(parents=True)
    assert drop_trial_checkpoints([Result()], tmp_path) == 2 and not folder.exists() and not ddp.exists()


def test_a_running_trial_keeps_optimizer_state_in_its_latest_checkpoint_only(tmp_path):
    from distributed.checkpoints import CHECKPOINT_STATE, strip_all_but_latest

    for epoch in range(3):
        folder = tmp_path / f"checkpoint_{epoch:06d}"
        folder.mkdir()
        torch.save({"optimizer": {"state": {0: torch.zeros(100)}}, "epoch": epoch}, folder / CHECKPOINT_STATE)
    strip_all_but_latest(tmp_path)
    kept = [torch.load(tmp_path / f"checkpoint_{e:06d}" / CHECKPOINT_STATE, weights_only=False)["optimizer"]
            for e in range(3)]
    assert kept[0] is None and kept[1] is None and kept[2] is not None
