"""Ray Train + Tune on real local clusters (loopback), the CLIs, resume and the ensemble end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
SMALL = ["--image-size", "64"]


def run_cli(args, timeout=600, **kw):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=kw.pop("cwd", REPO), **kw)


@pytest.fixture
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def test_tune_on_two_nodes_then_ensemble_evaluate_and_query(tmp_path, synthetic_root, two_node_cluster):
    from distributed.results import SEARCH_MARGIN
    from distributed.tune import main as tune_main
    from ensembles.ensemble import Ensemble
    from ensembles.evaluate import score_class
    from anomaly_data import read_mvtec

    run = tmp_path / "run"
    rc = tune_main(["--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "washer,pill",
                    "--models", "hvq_trans,transformaly", "--trials", "2", "--epochs", "2", "--grace-epochs", "1",
                    "--address", two_node_cluster.address, "--run-dir", str(run), *SMALL])
    assert rc == 0
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 8 and (trials["status"] == "ok").all()
    assert trials["node"].nunique() == 2                       # trials landed on both nodes
    by_study = trials.groupby(["model", "classes"])
    assert by_study.size().to_dict() == {(m, c): 2 for m in ("hvq_trans", "transformaly") for c in ("pill", "washer")}
    studies_per_node = trials.assign(study=trials["model"] + "-" + trials["classes"]).groupby("node")["study"]
    assert studies_per_node.nunique().min() >= 2               # one pool: each node ran trials of several studies
    # one Tune run: every trial in RUN/tune/search, each study's own Optuna history in the journal
    assert len(list((run / "tune" / "search").glob("*/result.json"))) == 8
    import optuna

    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "optuna.journal")))
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(journal)) == sorted(
        f"{m}-{c}" for m in ("hvq_trans", "transformaly") for c in ("pill", "washer"))
    for (model, classes), rows in by_study:
        history = optuna.load_study(study_name=f"{model}-{classes}", storage=journal).trials
        assert len(history) == 2 and {t.state.name for t in history} == {"COMPLETE"}
        # a trial ASHA stopped after one epoch scored below its own study's other trial there
        if rows["epoch"].min() < rows["epoch"].max():
            stopped, kept = rows.sort_values("epoch").iloc[0], rows.sort_values("epoch").iloc[-1]
            first = [json.loads(ln) for ln in (run / "tune" / "search").glob(f"*{kept.trial_id}*/result.json")
                     .__next__().read_text().splitlines()][0]
            assert stopped["val_score"] <= first["val_score"]
    assert json.loads((run / "progress.json").read_text())["longest_trial_wait_s"] < 120
    for model in ("hvq_trans", "transformaly"):
        info = json.loads((run / "best" / model / "washer" / "best.json").read_text())
        assert (run / "best" / model / "washer" / "model.safetensors").is_file()
        scores = trials[(trials.model == model) & (trials.classes == "washer")]["best_val_score"]
        chosen = info["metrics"]["val_score"]
        assert chosen in set(scores)
        if chosen < scores.max() - SEARCH_MARGIN:  # then the paper's setting was kept: the study's first trial
            paper = optuna.load_study(study_name=f"{model}-washer", storage=journal).trials[0].params
            assert paper and all(info["config"].get(k) == v for k, v in paper.items()), (paper, info["config"])
    results = pd.read_csv(run / "results.csv")
    assert {"class", "member", "image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max"} <= set(results)
    # members, the chosen ensemble, and the ablation that fuses every member whatever was chosen
    assert set(results["member"]) == {"hvq_trans", "transformaly", "ensemble", "fused:hvq_trans+transformaly"}
    assert set(results["class"]) == {"washer", "pill", "mean"}
    assert results[["image_auroc", "pixel_auroc", "aupro"]].notna().all().all()
    assert "ground-truth resolution" in (run / "results.md").read_text()
    assert len(list((run / "overlays" / "washer").glob("*.png"))) >= 2

    # a query scores an image exactly as the evaluation did
    records = read_mvtec(synthetic_root, ["washer"])["washer"].test
    ensemble = Ensemble.load(run / "ensemble", "cpu")
    _, outputs = score_class(ensemble, "washer", records)
    picked = [0, len(records) - 1]
    out = run_cli(["-m", "ensembles.query", "--ensemble", str(run / "ensemble"), "--class", "washer", "--out", str(tmp_path / "maps"),
                   *[str(records[i].path) for i in picked], str(tmp_path / "missing.png")])
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 1 and "does not exist" in lines[-1]["error"]      # bad file named, rest scored
    for i, row in zip(picked, lines):
        assert row["score"] == pytest.approx(float(outputs["ensemble"][0][i]), abs=1e-5)
        assert Path(row["map"]).is_file() and isinstance(row["anomalous"], bool)

    # a saved ensemble reloads and scores identically
    again = Ensemble.load(run / "ensemble", "cpu")
    x = __import__("torch").rand(2, 3, 64, 64)
    a, b = ensemble.predict(x, "washer"), again.predict(x, "washer")
    assert np.array_equal(a["scores"].numpy(), b["scores"].numpy()) and np.array_equal(a["maps"].numpy(), b["maps"].numpy())


def _kill_one_train_worker(storage: Path, killed: list, deadline: float):
    from ray.util.state import list_actors

    while time.time() < deadline and not killed:
        if list(storage.rglob("checkpoint_*")):
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if len(alive) == 2:
                os.kill(alive[-1].pid, signal.SIGKILL)
                killed.append(alive[-1].pid)
                return
        time.sleep(0.5)


def test_train_with_two_gloo_workers_survives_a_killed_worker(tmp_path, synthetic_root, local_ray):
    """Rank 0's clock decides the resume-only checkpoints of epochs 1 and 2 for both ranks; the
    killed run resumes from one of them and validates once, at its last epoch."""
    import dataclasses

    from distributed.studies import ReportPlan
    from distributed.trial import Resources, TrainJob, run_training

    job = TrainJob.of("hvq_trans", "mvtec", synthetic_root, ["washer"], recipe={"epochs": 3, "batch_size": 4},
                      image_size=64, levels=2, codebook_size=16)
    job = dataclasses.replace(job, plan=ReportPlan(rungs=(), every=0, checkpoint_minutes=1e-9))
    storage = tmp_path / "train"
    killed: list = []
    killer = threading.Thread(target=_kill_one_train_worker, args=(storage, killed, time.time() + 300), daemon=True)
    killer.start()
    result = run_training(job, str(storage), "killed", Resources(workers=2, cpus_per_worker=0.9), max_failures=2)
    killer.join(timeout=1)
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert result.error is None
    assert result.metrics["epoch"] == 3 and np.isfinite(result.metrics["val_score"])
    # Train keeps the two best checkpoints and the latest (metrics_dataframe lists them in score
    # order): a run restarted from scratch instead of its checkpoint would report an epoch twice
    epochs = list(result.metrics_dataframe["epoch"])
    assert len(epochs) == len(set(epochs)) and set(epochs) <= {1, 2, 3}


def test_a_search_validates_at_the_rungs_and_checkpoints_to_resume_in_between(tmp_path, synthetic_root):
    """Rungs after epochs 1 and 2 (grace 1, max 4), the last after 4; epoch 3 only checkpoints
    (a tiny --checkpoint-minutes). Trials of 2 CPUs read their batches with a loader worker."""
    from ensembles.run_folder import RESUME_ONLY

    run = tmp_path / "run"
    out = run_cli(["-m", "distributed.tune", "--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "pill",
                   "--models", "hvq_trans", "--trials", "2", "--epochs", "4", "--grace-epochs", "1",
                   "--checkpoint-minutes", "1e-6", "--cpus-per-worker", "2", "--no-ensemble", "--run-dir", str(run),
                   *SMALL])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hvq_trans: validates and checkpoints 3 time(s), after epoch 1, 2, 4 (ASHA's rungs and the last)" \
        in out.stdout
    reports = {}
    for result_file in (run / "tune").rglob("result.json"):
        lines = [json.loads(ln) for ln in result_file.read_text().splitlines() if ln.strip()]
        reports[result_file.parent.name] = [(r["epoch"], r.get(RESUME_ONLY, 0)) for r in lines]
        assert all(r["loader_workers"] == 1 for r in lines)
        assert all(np.isfinite(r["val_score"]) == (not r.get(RESUME_ONLY)) for r in lines)
    assert len(reports) == 2
    # the first trial runs to the end; the second may stop at a rung where it is the worse
    assert sorted(reports.values())[-1] == [(1, 0), (2, 0), (3, 1), (4, 0)]
    assert all(r in ([(1, 0)], [(1, 0), (2, 0)], [(1, 0), (2, 0), (3, 1), (4, 0)]) for r in reports.values())
    trials = pd.read_csv(run / "trials.csv")
    assert (trials["status"] == "ok").all() and np.isfinite(trials["val_score"]).all()
    best = json.loads((run / "best" / "hvq_trans" / "pill" / "best.json").read_text())
    assert best["metrics"]["epoch"] in (1, 2, 4) and np.isfinite(best["metrics"]["val_score"])


def test_a_gpu_worker_gets_its_nodes_cpus_per_gpu_and_its_loader_all_but_one():
    from distributed.cli import default_cpus_per_worker
    from distributed.trial import MAX_LOADER_WORKERS, loader_workers

    ray.init(num_cpus=16, num_gpus=2, log_to_driver=False)  # a g5.12xlarge-like node, declared
    try:
        assert default_cpus_per_worker(16, 1.0) == 8 and default_cpus_per_worker(16, 0.5) == 4
        assert default_cpus_per_worker(16, 0.0) == 1.0
    finally:
        ray.shutdown()
    ray.init(num_cpus=2, log_to_driver=False)  # no GPU node
    try:
        assert default_cpus_per_worker(2, 1.0) == 0.9 and default_cpus_per_worker(4, 0.0) == 1.0
    finally:
        ray.shutdown()
    cores = os.cpu_count()
    assert loader_workers(8) == min(7, cores - 1) and loader_workers(0.9) == 0 and loader_workers(1) == 0
    assert loader_workers(64) == min(MAX_LOADER_WORKERS, cores - 1)


def test_tune_resume_keeps_finished_trials(tmp_path, synthetic_root):
    run = tmp_path / "run"
    args = ["-m", "distributed.tune", "--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "pill",
            "--models", "hvq_trans", "--trials", "3", "--epochs", "4", "--max-concurrent", "1",
            "--no-ensemble", "--run-dir", str(run), "--image-size", "64"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first_done = None
    deadline = time.time() + 300
    while time.time() < deadline and first_done is None:
        for result_file in (run / "tune").rglob("result.json"):
            if '"done": true' in result_file.read_text():
                first_done = result_file
                break
        time.sleep(0.5)
    assert first_done is not None, "no trial finished in time"
    lines_before = first_done.read_text().count("\n")
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    assert not (run / "trials.csv").exists()  # the search did not finish
    assert [p.name for p in (run / "tune").iterdir()] == ["search"]   # one Tune run for the whole search

    out = run_cli(["-m", "distributed.tune", "--resume", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 3 and (trials["status"] == "ok").all()
    assert first_done.read_text().count("\n") == lines_before  # the finished trial was not run again
    assert (run / "best" / "hvq_trans" / "pill" / "model.safetensors").is_file()


def test_a_resume_keeps_the_classes_the_run_resolved(tmp_path, synthetic_root):
    """The demo records its data folder resolved and no --classes: a resume must not take up
    every class that folder holds by then (it tuned two)."""
    from distributed.tune import restore_args

    run = tmp_path / "run"
    run.mkdir()
    recorded = vars(restore_args(["--dataset", "synthetic"]))
    recorded.update(root=str(synthetic_root), classes=None, run_dir=str(run))
    (run / "config.json").write_text(json.dumps({"command": "tune", "args": recorded, "dataset": "synthetic",
                                                 "root": str(synthetic_root), "classes": ["brick", "washer"]}))
    assert restore_args(["--resume", str(run)]).classes == "brick,washer"
    recorded["classes"] = "washer"      # an explicit --classes is kept as given
    (run / "config.json").write_text(json.dumps({"command": "tune", "args": recorded, "classes": ["washer"]}))
    assert restore_args(["--resume", str(run)]).classes == "washer"


def ray_sessions() -> set[str]:
    """Ray's session folders: a new one appears whenever a Ray instance starts on this machine."""
    return {p.name for p in Path("/tmp/ray").glob("session_2*")}


def broken_copy(synthetic_root, tmp_path, name, damage):
    """A copy of the synthetic class washer, damaged by ``damage(class_dir)`` -> the damaged file."""
    root = tmp_path / name
    shutil.copytree(synthetic_root / "washer", root / "washer")
    return root, damage(root / "washer")


def mask_of_wrong_size(class_dir):
    mask = sorted((class_dir / "ground_truth").rglob("*.png"))[0]
    Image.open(mask).resize((10, 12)).save(mask)
    return mask


def truncated_training_image(class_dir):
    image = sorted((class_dir / "train" / "good").glob("*.png"))[3]
    image.write_bytes(image.read_bytes()[:200])
    return image


def test_cli_rejects_bad_input_before_ray_starts(tmp_path, synthetic_root, capsys, monkeypatch):
    from distributed.train import main as train_main
    from distributed.tune import main as tune_main

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    bad_mask_root, bad_mask = broken_copy(synthetic_root, tmp_path, "masks", mask_of_wrong_size)
    bad_image_root, bad_image = broken_copy(synthetic_root, tmp_path, "images", truncated_training_image)
    data = ["--dataset", "mvtec", "--root", str(synthetic_root)]
    cases = [
        ([*data, "--preset", "papr"], "--preset 'papr'"),
        ([*data, "--set", "haloae.blocks=3"], "haloae has no key 'blocks'"),
        ([*data, "--set", "haloae.halo=big"], "--set haloae.halo=\"big\": expected an integer"),
        ([*data, "--set", "halo=3"], "expected MODEL.KEY=VALUE"),
        ([*data, "--set", "haloae.halo=9", "--set", "haloae.block=4"], "halo=9 exceeds block=4"),
        (["--dataset", "mvtec", "--root", str(bad_mask_root)], str(bad_mask)),
        (["--dataset", "mvtec", "--root", str(bad_image_root)], str(bad_image)),
        (["--models", "padim"], "unknown model(s) ['padim']"),
        (["--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "teapot"], "unknown class(es) ['teapot']"),
        (["--dataset", "mvtec", "--root", str(tmp_path)], "no class folder found"),
        (["--dataset", "visa", "--root", str(tmp_path)], "is not a VisA root"),
        (["--dataset", "mvtec", "--root", str(synthetic_root), "--address", "127.0.0.1:1"], "cannot reach the Ray head"),
        (["--dataset", "mvtec", "--root", str(synthetic_root), "--workers", "0"], "--workers must be >= 1"),
        (["--max-concurrent-per-study", "0"], "--max-concurrent-per-study must be >= 1"),
        (["--stall-timeout", "0"], "--stall-timeout must be > 0"),
        (["--dataset", "mvtec", "--root", str(synthetic_root), "--run-dir", str(used)], "already holds a run"),
    ]
    # in this process (the checks are the same code the command runs; an exception other than
    # the clear error would fail the test): the message, exit status 2, and Ray never started
    for main, argv, message in [*[(tune_main, extra, message) for extra, message in cases],
                                *[(train_main, ["--model", "haloae", *data, *extra], message) for extra, message in
                                  [(["--set", "halo=3"], "expected MODEL.KEY=VALUE"),
                                   (["--preset", "papr"], "--preset 'papr'"),
                                   (["--set", "haloae.halo=big"], "expected an integer")]]]:
        sessions, connected = ray_sessions(), ray.is_initialized()
        run_dir = [] if "--run-dir" in argv else ["--run-dir", str(tmp_path / "r")]
        started = time.time()
        code = main([*run_dir, *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err[-2000:])
        assert ray.is_initialized() == connected and ray_sessions() == sessions, argv
        assert time.time() - started < 60
    # the command itself: exit status 2 and the message, no traceback; what one trial needs is
    # checked against the cluster Ray reports, so that one may start Ray
    for extra, message, ray_may_start in [([*data, "--preset", "papr"], "--preset 'papr'", False),
                                          ([*data, "--workers", "5"], "lower --workers", True)]:
        sessions = ray_sessions()
        out = run_cli(["-m", "distributed.tune", "--run-dir", str(tmp_path / "r"), *extra], timeout=120)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
        assert ray_may_start or ray_sessions() == sessions, extra


def test_help_documents_every_option():
    out = run_cli(["-m", "distributed.tune", "--help"])
    for option in ("--dataset", "--root", "--classes", "--models", "--trials", "--time-budget", "--max-concurrent",
                   "--workers", "--gpus-per-worker", "--address", "--run-dir", "--seed", "--resume", "--no-ensemble",
                   "--max-concurrent-per-study", "--stall-timeout", "--tune-verbose"):
        assert option in out.stdout, option
    out = run_cli(["-m", "distributed.train", "--help"])
    for option in ("--model", "--dataset", "--root", "--classes", "--workers", "--address", "--unified"):
        assert option in out.stdout, option


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-efs.yaml"])
def test_cluster_yaml_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / name).read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    gpus = sorted(t["resources"].get("GPU", 0) for t in types.values())
    assert gpus[0] == 0 and 1 in gpus and gpus[-1] > 1          # CPU head, 1-GPU and multi-GPU workers
    assert any("ray[default,tune,train]==2.60" in c for c in config["setup_commands"])
    mounts = any("mount" in c for c in config["setup_commands"])
    if name == "cluster.yaml":  # the bucket variant: no shared file system, an instance profile on every node
        assert not mounts and all("IamInstanceProfile" in t["node_config"] for t in types.values())
        assert "--run-dir s3://" in (REPO / name).read_text()
    else:
        assert mounts


class RecordingSession:
    """A stand-in for Ray's session that keeps what the loop reports (the loop itself is real)."""

    rank, world, node = 0, 1, "local"

    def __init__(self):
        import torch

        self.device = torch.device("cpu")
        self.reports = []

    def checkpoint(self):
        return None

    def rank0_decides(self, flag):
        return flag

    def prepare(self, model, dataset, batch_size, drop_last):
        from torch.utils.data import DataLoader

        return model, DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)

    def report(self, metrics, write_checkpoint):
        folder = Path(__import__("tempfile").mkdtemp())
        write_checkpoint(folder)
        self.reports.append((metrics, sorted(p.name for p in folder.iterdir())))


def diverging_job(synthetic_root, lr):
    from distributed.trial import TrainJob

    return TrainJob.of("hvq_trans", "mvtec", synthetic_root, ["washer"], recipe={"epochs": 2, "batch_size": 4, "lr": lr},
                       image_size=64, levels=2, codebook_size=16)


def test_train_loop_stops_and_reports_a_diverged_run(synthetic_root):
    from distributed.trial import train_loop

    session = RecordingSession()
    assert train_loop(diverging_job(synthetic_root, 1e30), session) is False
    (metrics, files), = session.reports
    assert metrics["diverged"] == 1 and np.isnan(metrics["val_score"]) and files == ["DIVERGED"]
    session = RecordingSession()
    assert train_loop(diverging_job(synthetic_root, 1e-3), session) is True
    assert [m["epoch"] for m, _ in session.reports] == [1, 2]
    assert all(m["diverged"] == 0 and "model.safetensors" in f for m, f in session.reports)


def test_train_loop_validates_where_its_plan_says_and_checkpoints_to_resume_in_between(synthetic_root):
    import dataclasses

    from distributed.studies import ReportPlan
    from distributed.trial import train_loop
    from ensembles.run_folder import RESUME_ONLY

    job = dataclasses.replace(diverging_job(synthetic_root, 1e-3), plan=ReportPlan(rungs=(1,), every=0,
                                                                                   checkpoint_minutes=0))
    job = dataclasses.replace(job, recipe=job.recipe.replace(epochs=4))
    session = RecordingSession()
    assert train_loop(job, session)
    assert [m["epoch"] for m, _ in session.reports] == [1, 4]            # the rung and the last epoch only
    assert all(np.isfinite(m["val_score"]) and "validate_seconds" in m for m, _ in session.reports)
    assert session.reports[1][0]["train_seconds"] > session.reports[0][0]["train_seconds"]  # 3 epochs vs 1

    session = RecordingSession()
    assert train_loop(dataclasses.replace(job, plan=ReportPlan(rungs=(1,), every=0, checkpoint_minutes=1e-9)),
                      session)
    assert [(m["epoch"], m.get(RESUME_ONLY, 0)) for m, _ in session.reports] == [(1, 0), (2, 1), (3, 1), (4, 0)]
    resume = [m for m, _ in session.reports if m.get(RESUME_ONLY)]
    assert all(m["val_score"] == float("-inf") and "val_image_auroc" not in m for m in resume)
    assert all({"model.safetensors", "state.safetensors"} <= set(f) for _, f in session.reports)


def test_a_unified_hvq_trans_reports_how_often_cheap_routing_agrees_with_the_full_rule(synthetic_root):
    from distributed.spec import build_spec, spec_job
    from distributed.trial import train_loop

    spec = build_spec("u", "hvq_trans", ("washer", "pill"), "fast",
                      {"image_size": 64, "levels": 2, "codebook_size": 16}, n_train=40, epochs_cap=1)
    assert spec.config.num_classes == 2                          # one codebook set per class
    session = RecordingSession()
    assert train_loop(spec_job(spec, "mvtec", str(synthetic_root)), session)
    (metrics, _), = session.reports
    assert 0.0 <= metrics["val_routing_agreement"] <= 1.0


def test_a_run_in_which_every_trial_failed_exits_1_with_the_first_cause(tmp_path, synthetic_root):
    out = run_cli(["-m", "distributed.tune", "--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "washer",
                   "--models", "hvq_trans", "--trials", "1", "--epochs", "1", "--set", "hvq_trans.lr=1e30", *SMALL,
                   "--run-dir", str(tmp_path / "run")], timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "no trial of any study succeeded" in last and "hvq_trans on washer" in last and "TrialDiverged" in last, last


def test_a_diverged_trial_fails_and_the_search_goes_on(tmp_path, synthetic_root, local_ray):
    from ray import tune

    from distributed.monitor import DropOptimizerState
    from distributed.results import trial_rows
    from distributed.checkpoints import CHECKPOINT_STATE, read_trial_state
    from distributed.trial import tune_trial

    base = diverging_job(synthetic_root, 1e-3)
    trainable = tune.with_resources(tune.with_parameters(tune_trial, bases={"s": base}, storage=str(tmp_path / "train"),
                                                         resources={"workers": 1}), {"CPU": 1})
    grid = tune.Tuner(trainable, param_space={"study": "s", "lr": tune.grid_search([1e30, 1e-3])},
                      tune_config=tune.TuneConfig(max_concurrent_trials=2),
                      run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), callbacks=[DropOptimizerState(tmp_path)],
                                                failure_config=tune.FailureConfig(max_failures=0))).fit()
    states = list((tmp_path / "tune").rglob(CHECKPOINT_STATE))
    assert states and all(read_trial_state(s)["optimizer"] is None for s in states)  # trials ended
    rows = sorted(trial_rows(grid, "hvq_trans"), key=lambda r: r["config/lr"])
    assert rows[0]["status"] == "ok" and rows[0]["best_val_score"] > 0
    assert rows[1]["status"] == "error" and "TrialDiverged" in rows[1]["error"]


def test_the_watchdog_lists_and_removes_a_real_orphaned_group(local_ray):
    from ray.util import placement_group

    from distributed.monitor import job_groups, remove_group

    group = placement_group([{"CPU": 0.5}] * 2)
    ray.get(group.ready(), timeout=60)
    found = [g for g in job_groups() if g.id == group.id.hex()]
    assert found and found[0].bundles == [{"CPU": 0.5}] * 2 and not found[0].has_live_actor
    assert remove_group(group.id.hex())
    deadline = time.time() + 30
    while time.time() < deadline and any(g.id == group.id.hex() for g in job_groups()):
        time.sleep(0.5)
    assert not any(g.id == group.id.hex() for g in job_groups())


PAPER_MODELS = ("haloae", "hvq_trans", "transformaly", "patchcore")


def test_every_model_runs_at_its_paper_preset_to_the_ensemble_table(tmp_path):
    """The README's cluster job in miniature: --preset paper (random weights: offline), the
    papers' input sizes (256, 224, 384, 224 px), one trial of one epoch per model."""
    from anomaly_data.synthetic import generate_dataset
    from distributed.spec import build_spec
    from models import checkpoint_files, load_model

    root = generate_dataset(tmp_path / "data", classes=["brick"], seed=0, image_size=384, n_train=5,
                            n_test_good=1, n_test_per_defect=1)
    run = tmp_path / "run"
    weights = [arg for m in PAPER_MODELS for arg in ("--set", f"{m}.weights=none")]
    out = run_cli(["-m", "distributed.tune", "--dataset", "mvtec", "--root", str(root), "--preset", "paper",
                   *weights, "--trials", "1", "--epochs", "1", "--run-dir", str(run)], timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = pd.read_csv(run / "results.csv")
    assert set(PAPER_MODELS) | {"ensemble"} <= set(results["member"])
    trials = pd.read_csv(run / "trials.csv")
    for model in PAPER_MODELS:
        spec = build_spec(f"{model}-brick", model, ("brick",), "paper", {"weights": "none"}, n_train=4)
        first = trials[trials["model"] == model].iloc[0]
        for name, value in spec.first_point().items():        # the trial ran the paper's point
            got = first[f"config/{name}"]
            assert (got == value) if isinstance(value, str) else float(got) == pytest.approx(float(value)), name
        net = load_model(run / "best" / model / "brick" / "model.safetensors")
        expected = spec.config.to_dict()
        if model == "transformaly":                              # "2-11" was built as blocks 2..11
            expected["layers"] = list(range(2, 12))
        assert net.config.to_dict() == expected                     # ... and built the paper's model
        saved, _ = checkpoint_files.read(run / "best" / model / "brick" / "model.safetensors")
        assert not set(saved) & net.frozen_state_keys()   # no frozen tensor was written
    ensemble = json.loads((run / "ensemble" / "ensemble.json").read_text())
    files = {m: f for c in ensemble["classes"].values() for m, f in c["member_files"].items()}
    # trained members: one copy, referred to; the memory bank: refitted on every training normal
    assert files and all(f.startswith("../best/") for m, f in files.items() if m != "patchcore")
    if "patchcore" in files:
        assert files["patchcore"] == "members/patchcore/brick.safetensors"
        assert len(load_model(run / "ensemble" / files["patchcore"]).memory_bank) > \
            len(load_model(run / "best" / "patchcore" / "brick" / "model.safetensors").memory_bank)
    assert {f.parent.name for f in (run / "ensemble").rglob("*.safetensors")} <= {"patchcore"}
    assert not list((run / "tune").rglob("checkpoint_*"))             # finished studies keep best/ only


def test_the_train_command_trains_each_class_once_and_keeps_its_best_model(tmp_path, synthetic_root):
    from models import load_model

    run = tmp_path / "run"
    out = run_cli(["-m", "distributed.train", "--model", "hvq_trans", "--dataset", "mvtec", "--root",
                   str(synthetic_root), "--classes", "brick,washer", "--epochs", "1", "--set",
                   "hvq_trans.codebook_size=16", *SMALL, "--run-dir", str(run)], timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    index = json.loads((run / "best.json").read_text())
    assert sorted(i["classes"][0] for i in index) == ["brick", "washer"]
    config = json.loads((run / "config.json").read_text())
    assert {job["config"]["codebook_size"] for job in config["jobs"].values()} == {16}   # --set reached each job
    for classes in ("brick", "washer"):
        net = load_model(run / "best" / "hvq_trans" / classes / "model.safetensors")
        assert net.config.codebook_size == 16 and net.config.image_size == 64
