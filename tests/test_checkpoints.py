"""Lean checkpoints: no frozen tensor on disk, the backbone rebuilt and checked on load."""

import warnings

import pytest
import torch

from models import ConfigError, checkpoint_files, create_model, load_model
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
    net.save(tmp_path / "m.safetensors")
    saved, meta = checkpoint_files.read(tmp_path / "m.safetensors")
    frozen = net.frozen_state_keys()
    assert frozen and not set(saved) & frozen
    assert set(saved) | frozen == set(net.state_dict())
    # stored contiguous, so a model computing on a strided view would score differently once reloaded
    assert [k for k, v in net.state_dict().items() if k not in frozen and not v.is_contiguous()] == []
    assert meta["model"] == model and meta["format"] == CHECKPOINT_FORMAT == 3
    assert type(net.config).from_preset(None, **meta["config"]) == net.config
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(maps(load_model(tmp_path / "m.safetensors").eval(), images), maps(net, images))


def test_a_random_frozen_backbone_is_rebuilt_from_its_seed():
    a, b = small("transformaly"), small("transformaly")    # weights "none": a random ViT teacher
    assert a.frozen_digest() == b.frozen_digest()
    torch.manual_seed(123)                                   # the caller's random state does not matter
    assert small("transformaly").frozen_digest() == a.frozen_digest()


def test_a_backbone_that_rebuilds_differently_is_a_clear_error(tmp_path):
    net = small("hvq_trans", weights="none")
    ckpt = net.checkpoint()
    ckpt["frozen"]["sha256"] = "0" * 64                    # as if saved by another torch version
    checkpoint_files.write(tmp_path / "m.safetensors", checkpoint_files.encode_model(ckpt))
    with pytest.raises(ConfigError, match="differs from the one this model was trained with.*torch"):
        load_model(tmp_path / "m.safetensors")


def test_a_checkpoint_of_another_format_or_kind_is_refused_by_name(tmp_path):
    net = small("haloae")
    checkpoint_files.write(tmp_path / "new.safetensors",
                           checkpoint_files.encode_model({**net.checkpoint(), "format": 99}))
    with pytest.raises(ConfigError, match=r"new.safetensors is not a model checkpoint this version reads \(format 3; found 99"):
        load_model(tmp_path / "new.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ConfigError, match="text.safetensors is not a checkpoint file"):
        load_model(tmp_path / "text.safetensors")
    data = checkpoint_files.encode_model(net.checkpoint())
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])     # a half-copied file
    with pytest.raises(ConfigError, match="cut.safetensors is damaged or incomplete"):
        load_model(tmp_path / "cut.safetensors")


def test_an_ended_trial_keeps_no_optimizer_state(tmp_path):
    from distributed.checkpoints import CHECKPOINT_STATE, drop_trial_checkpoints, read_trial_state, strip_optimizer_state

    folder = tmp_path / "trial" / "checkpoint_000001"
    folder.mkdir(parents=True)
    net = small("hvq_trans")
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    net.loss({"image": torch.rand(2, 3, 64, 64)})["loss"].backward()
    optimizer.step()
    rng = torch.get_rng_state()
    checkpoint_files.write(folder / CHECKPOINT_STATE,
                           checkpoint_files.encode_trial_state(optimizer.state_dict(), 3, {"val_score": 0.5}, {"m": 1}, rng))
    before = (folder / CHECKPOINT_STATE).stat().st_size
    resumed = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    resumed.load_state_dict(read_trial_state(folder / CHECKPOINT_STATE)["optimizer"])   # what a resume reads
    assert resumed.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, values in optimizer.state_dict()["state"].items():
        assert all(torch.equal(values[k], resumed.state_dict()["state"][key][k]) for k in values)
    assert strip_optimizer_state(folder) and not strip_optimizer_state(folder)
    state = read_trial_state(folder / CHECKPOINT_STATE)
    assert state["optimizer"] is None and state["epoch"] == 3 and state["metrics"] == {"val_score": 0.5}
    assert torch.equal(state["rng"], rng) and (folder / CHECKPOINT_STATE).stat().st_size < before / 10

    class Result:
        path, metrics, config = str(tmp_path / "trial"), {"trial_id": "abc"}, {}

    ddp = tmp_path / "train" / "train-abc" / "checkpoint_000000"
    ddp.mkdir(parents=True)
    assert drop_trial_checkpoints([Result()], tmp_path) == 2 and not folder.exists() and not ddp.exists()


def test_a_running_trial_keeps_optimizer_state_in_its_latest_checkpoint_only(tmp_path):
    from distributed.checkpoints import CHECKPOINT_STATE, read_trial_state, strip_all_but_latest

    for epoch in range(3):
        folder = tmp_path / f"checkpoint_{epoch:06d}"
        folder.mkdir()
        optimizer = {"state": {0: {"exp_avg": torch.zeros(100)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
        checkpoint_files.write(folder / CHECKPOINT_STATE,
                               checkpoint_files.encode_trial_state(optimizer, epoch, {}, {}, torch.get_rng_state()))
    strip_all_but_latest(tmp_path)
    kept = [read_trial_state(tmp_path / f"checkpoint_{e:06d}" / CHECKPOINT_STATE)["optimizer"] for e in range(3)]
    assert kept[0] is None and kept[1] is None and kept[2] is not None


def test_the_first_bytes_tell_a_checkpoint_from_a_pickle_whatever_its_header_length(tmp_path):
    import io
    import pickle

    lengths = set()
    for pad in range(300):   # header lengths of every low byte, 0x80 (a pickle's first byte) among them
        data = checkpoint_files.encode({"w": torch.zeros(2)}, {"pad": "x" * pad})
        lengths.add(data[0])
        assert checkpoint_files.kind_of(data[:9]) == "safetensors", pad
        assert checkpoint_files.decode(data, "f")[1] == {"pad": "x" * pad}
    assert 0x80 in lengths
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    assert checkpoint_files.kind_of(buffer.getvalue()[:9]) == "pickle"
    for protocol in (2, 3, 4, 5):
        assert checkpoint_files.kind_of(pickle.dumps({"a": 1}, protocol=protocol)[:9]) == "pickle"
    assert checkpoint_files.kind_of(b"hello, world") == "unknown"
