"""Files from a shared run folder or bucket are data, never code: a malicious pickle put in place
of a member, a trial checkpoint or an optimiser state is refused by name and runs nothing;
an ensemble loads only files of its own run, unchanged since it was written."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ensembles.ensemble import CONFIG_FILE, Ensemble, EnsembleError, file_sha256
from models import ConfigError, checkpoint_files, create_model, load_model


class WritesMarker:
    """Unpickling it creates the file ``marker``: the code a shared file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def malicious_pickle(path: Path, marker: Path) -> Path:
    torch.save({"format": 2, "model": "haloae", "payload": WritesMarker(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path):
    """A marker file path, and proof that the probe is live: a plain unpickling does create it."""
    marker = tmp_path / "ran"
    probe = malicious_pickle(tmp_path / "probe.pt", marker)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    probe.unlink()
    return marker


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny run (members at its top, the ensemble in ``ensemble/``)."""
    run, _ = tiny_run
    return Path(shutil.copytree(run, tmp_path / "run"))


def ensemble_config(run: Path) -> dict:
    return json.loads((run / "ensemble" / CONFIG_FILE).read_text())


def write_config(run: Path, config: dict) -> None:
    (run / "ensemble" / CONFIG_FILE).write_text(json.dumps(config))


def small_model(name: str = "hvq_trans"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = create_model(name, "fast", image_size=64).eval()
    if not net.trains:
        net.fit_statistics([{"image": torch.rand(4, 3, 64, 64), "label": torch.zeros(4)}])
    return net


def test_a_pickled_member_is_refused_by_every_cli_and_runs_nothing(run_copy, marker, synthetic_root, tmp_path,
                                                                    capsys):
    from ensembles import batch, evaluate, export, query, serve

    member = run_copy / "transformaly.safetensors"
    malicious_pickle(member, marker)
    image = str(next((synthetic_root / "washer" / "test").rglob("*.png")))
    ens = str(run_copy / "ensemble")
    clis = {
        "query": lambda: query.main(["--ensemble", ens, "--out", str(tmp_path / "maps"), image]),
        "evaluate": lambda: evaluate.main(["--ensemble", ens, "--dataset", "mvtec", "--root", str(synthetic_root)]),
        "batch": lambda: batch.main(["--ensemble", ens, "--out", str(tmp_path / "batch"), image]),
        "export": lambda: export.main(["--ensemble", ens, "--format", "onnx", "--out", str(tmp_path / "onnx")]),
        "serve": lambda: serve.main(["--ensemble", ens, "--port", "1"]),
    }
    for name, cli in clis.items():
        assert cli() == 2, name
        err = capsys.readouterr().err
        assert str(member) in err and "changed since the ensemble was written" in err, (name, err)
    with pytest.raises(EnsembleError, match="transformaly.safetensors changed since"):
        Ensemble.load(ens)
    # the attacker also rewrites the recorded digest: the file is still never unpickled
    config = ensemble_config(run_copy)
    config["files"]["../transformaly.safetensors"] = file_sha256(member)
    write_config(run_copy, config)
    with pytest.raises(EnsembleError, match=r"transformaly.safetensors is a pickled checkpoint .* ensembles.convert"):
        Ensemble.load(ens)
    assert query.main(["--ensemble", ens, image]) == 2 and "is a pickled checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_member_path_outside_the_run_is_refused_by_name(run_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(run_copy / "hvq_trans.safetensors", outside)
    original = ensemble_config(run_copy)
    for bad in ("../../elsewhere.safetensors", str(outside), "s3://another-bucket/m.safetensors", "../../../etc/passwd"):
        config = json.loads(json.dumps(original))
        config["classes"]["washer"]["member_files"]["hvq_trans"] = bad
        config["files"][bad] = file_sha256(outside)
        write_config(run_copy, config)
        with pytest.raises(EnsembleError, match="outside the ensemble's run folder") as err:
            Ensemble.load(run_copy / "ensemble")
        assert repr(bad) in str(err.value)
    (run_copy / "ensemble" / "link.safetensors").symlink_to(outside)   # a link leaving the run: followed, refused
    config = json.loads(json.dumps(original))
    config["classes"]["washer"]["member_files"]["hvq_trans"] = "link.safetensors"
    config["files"]["link.safetensors"] = file_sha256(outside)
    write_config(run_copy, config)
    with pytest.raises(EnsembleError, match="'link.safetensors', outside the ensemble's run folder"):
        Ensemble.load(run_copy / "ensemble")


def test_a_changed_or_unrecorded_member_file_is_refused(run_copy):
    member = run_copy / "ensemble" / "members" / "patchcore" / "washer.safetensors"
    tensors, meta = checkpoint_files.read(member)
    tensors["memory_bank"] = tensors["memory_bank"] + 1.0            # a valid file, other values
    checkpoint_files.write(member, checkpoint_files.encode(tensors, meta))
    with pytest.raises(EnsembleError, match=f"{member} changed since the ensemble was written"):
        Ensemble.load(run_copy / "ensemble")
    config = ensemble_config(run_copy)
    del config["files"]["members/patchcore/washer.safetensors"]
    write_config(run_copy, config)
    with pytest.raises(EnsembleError, match="no SHA-256 is recorded for 'members/patchcore/washer.safetensors'"):
        Ensemble.load(run_copy / "ensemble")


def test_a_pickled_trial_checkpoint_and_optimizer_state_are_refused(tmp_path, marker):
    from ray.train import Checkpoint

    from distributed.checkpoints import (CHECKPOINT_MODEL, CHECKPOINT_STATE, read_trial_state, strip_optimizer_state)
    from distributed.trial import restore_checkpoint
    from models.training import make_optimizer

    net = small_model()
    optimizer = make_optimizer(net, 1e-3)
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    net.save(folder / CHECKPOINT_MODEL)
    checkpoint_files.write(folder / CHECKPOINT_STATE, checkpoint_files.encode_trial_state(
        optimizer.state_dict(), 0, {}, {}, torch.get_rng_state()))
    assert restore_checkpoint(Checkpoint.from_directory(str(folder)), net, optimizer) == 1   # the genuine files resume
    malicious_pickle(folder / CHECKPOINT_STATE, marker)
    for read in (lambda: read_trial_state(folder / CHECKPOINT_STATE), lambda: strip_optimizer_state(folder),
                 lambda: restore_checkpoint(Checkpoint.from_directory(str(folder)), net, optimizer)):
        with pytest.raises(ConfigError, match=f"{folder / CHECKPOINT_STATE} is a pickled checkpoint"):
            read()
    malicious_pickle(folder / CHECKPOINT_MODEL, marker)
    with pytest.raises(ConfigError, match=f"{folder / CHECKPOINT_MODEL} is a pickled checkpoint"):
        restore_checkpoint(Checkpoint.from_directory(str(folder)), net, optimizer)
    assert not marker.exists()


def test_resume_refuses_a_run_with_pickled_checkpoints_before_ray_starts(tmp_path, marker, capsys):
    from distributed.tune import main

    run = tmp_path / "run"
    trial = run / "tune" / "search" / "trial_1" / "checkpoint_000003"
    trial.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"args": {"models": "hvq_trans"}}))
    malicious_pickle(trial / "state.safetensors", marker)           # a pickle under the new name
    sessions = set(Path("/tmp/ray").glob("session_2*")) if Path("/tmp/ray").exists() else set()
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(trial / "state.safetensors") in err and "python -m ensembles.convert" in err
    (trial / "state.safetensors").unlink()
    (run / "best").mkdir()
    malicious_pickle(run / "best" / "model.pt", marker)
    assert main(["--resume", str(run)]) == 2 and "best/model.pt" in capsys.readouterr().err
    assert not marker.exists()
    assert (set(Path("/tmp/ray").glob("session_2*")) if Path("/tmp/ray").exists() else set()) == sessions


def legacy_run(run: Path) -> None:
    """``run`` as an earlier version wrote it: members pickled with torch.save (format 2, weights
    only), ``ensemble.json`` of format 1 without digests."""
    config = ensemble_config(run)
    renamed = {}
    for rel in config.pop("files"):
        path = run / "ensemble" / rel
        tensors, meta = checkpoint_files.read(path)
        meta.pop("kind")
        torch.save({**meta, "format": 2, "torch": torch.__version__, "state_dict": tensors}, path.with_suffix(".pt"))
        path.unlink()
        renamed[rel] = str(Path(rel).with_suffix(".pt"))
    for fusion in config["classes"].values():
        fusion["member_files"] = {m: renamed[rel] for m, rel in fusion["member_files"].items()}
    write_config(run, {**config, "format": 1})


def test_an_earlier_run_is_refused_with_how_to_convert_it_and_converts_to_the_same_ensemble(
        run_copy, tiny_run, synthetic_root, capsys):
    from ensembles.convert import main as convert

    legacy_run(run_copy)
    with pytest.raises(EnsembleError, match="format 1: pickled member files.*python -m ensembles.convert"):
        Ensemble.load(run_copy / "ensemble")
    with pytest.raises(ConfigError, match="is a pickled checkpoint.*python -m ensembles.convert"):
        load_model(run_copy / "hvq_trans.pt")
    assert convert([str(run_copy)]) == 0
    assert "3 file(s) rewritten as .safetensors" in capsys.readouterr().out   # the members of the ensemble
    assert not list(run_copy.rglob("*.pt"))
    _, ensemble = tiny_run
    converted = Ensemble.load(run_copy / "ensemble", "cpu")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((synthetic_root / "washer" / "test").rglob("*.png"))[:4]]
    want, got = ensemble.predict(images, "washer"), converted.predict(images, "washer")
    assert torch.equal(want["scores"], got["scores"]) and torch.equal(want["maps"], got["maps"])
    assert convert([str(run_copy)]) == 0 and "0 file(s) rewritten" in capsys.readouterr().out   # done once


def test_convert_turns_format_1_checkpoints_and_trial_states_into_the_present_format(tmp_path):
    from distributed.checkpoints import read_trial_state
    from ensembles.convert import convert_run

    net = small_model("haloae")
    torch.save({"format": 1, "model": "haloae", "config": net.config.to_dict(), "weights_used": net.weights_used,
                "state_dict": dict(net.state_dict())}, tmp_path / "model.pt")
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    torch.save({"optimizer": optimizer.state_dict(), "epoch": 4, "metrics": {"val_score": 0.5}, "job": {"seed": 0},
                "rng": torch.get_rng_state()}, tmp_path / "state.pt")
    (tmp_path / "studies.json").write_text(json.dumps({"haloae-c": {"best": str(tmp_path / "model.pt"), "trials": 1}}))
    (tmp_path / "best.json").write_text(json.dumps([{"model": "haloae", "checkpoint": str(tmp_path / "model.pt")}]))
    assert convert_run(tmp_path, log=lambda _: None) == {"files": 2, "best": 2, "ensembles": 0}
    assert json.loads((tmp_path / "studies.json").read_text())["haloae-c"]["best"] == str(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "best.json").read_text())[0]["checkpoint"] == str(tmp_path / "model.safetensors")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "model.safetensors").eval().anomaly_map(images), net.anomaly_map(images))
    state = read_trial_state(tmp_path / "state.safetensors")
    assert state["epoch"] == 4 and state["metrics"] == {"val_score": 0.5} and state["optimizer"]["param_groups"]


def test_convert_refuses_what_the_weights_only_loader_refuses_unless_trusted(tmp_path, marker, capsys):
    from distributed.checkpoints import read_trial_state
    from ensembles.convert import main as convert

    malicious_pickle(tmp_path / "model.pt", marker)
    assert convert([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.pt: the weights-only loader refused it" in err and "builtins.exec" in err and "--trust-pickles" in err
    assert not marker.exists() and not (tmp_path / "model.safetensors").exists()
    (tmp_path / "model.pt").unlink()
    # a file of one's own that holds a NumPy scalar: converted once trusted
    torch.save({"epoch": 1, "rng": torch.get_rng_state(), "metrics": {"val_score": np.float64(0.5)}},
               tmp_path / "state.pt")
    assert convert([str(tmp_path)]) == 2 and "numpy" in capsys.readouterr().err
    assert convert([str(tmp_path), "--trust-pickles"]) == 0
    assert read_trial_state(tmp_path / "state.safetensors")["metrics"] == {"val_score": 0.5}


def test_an_export_names_only_graphs_inside_itself(tmp_path):
    from ensembles.runtime import EXPORT_FILE, ExportedEnsemble, ExportError

    entry = {"resolution": 64, "members": ["m"], "threshold": 0.5, "map_range": [0, 1]}
    for bad in ("../outside.onnx", "/etc/passwd", "s3://bucket/x.onnx"):
        (tmp_path / EXPORT_FILE).write_text(json.dumps({"format": 1, "runtime": "onnx",
                                                        "classes": {"c": {**entry, "file": bad}}}))
        with pytest.raises(ExportError, match=f"names the graph {bad!r}, outside the export folder"):
            ExportedEnsemble.load(tmp_path)
    (tmp_path / EXPORT_FILE).write_text(json.dumps({"format": 1, "runtime": "onnx",
                                                    "classes": {"c": {**entry, "file": "c.onnx"}}}))
    assert ExportedEnsemble.load(tmp_path).class_names == ["c"]


def test_a_pickled_backbone_weights_file_with_code_is_refused(tmp_path, marker):
    from models.backbones import WeightsError

    malicious_pickle(tmp_path / "weights.pth", marker)
    with pytest.raises(WeightsError, match="weights.pth holds more than tensors and plain values"):
        create_model("hvq_trans", "fast", image_size=64, weights=str(tmp_path / "weights.pth"))
    assert not marker.exists()
