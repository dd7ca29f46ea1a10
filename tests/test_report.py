"""The run's report in a real browser, and MLflow tracking against real stores (a local SQLite
store, and a tracking server started on loopback)."""

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from playwright.sync_api import sync_playwright
from ensembles.evaluate import gallery_order
from ensembles.report import importance_view
from test_distributed import SMALL, run_cli

SERVER_START_S = 90
BROWSER_TIMEOUT_MS = 60_000
# as the project's CI machine needs them: as root (no sandbox), no GPU, and no calls home (the
# network is closed: Chromium's background connections would be refused, many at a time)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, synthetic_root):
    """A tiny search (a fitted and a trained member, one class) tracked in a local MLflow store."""
    base = tmp_path_factory.mktemp("tracked")
    run, store = base / "run", f"sqlite:///{base / 'mlflow.db'}"
    out = run_cli(["-m", "distributed.tune", "--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "washer",
                   "--models", "patchcore,hvq_trans", "--trials", "2", "--epochs", "4", "--grace-epochs", "1",
                   "--checkpoint-minutes", "1e-6",
                   "--run-dir", str(run), "--mlflow", store, "--mlflow-experiment", "tiny", *SMALL])
    assert out.returncode == 0, out.stderr[-3000:]
    return run, store, out.stdout


def open_in_chromium(url: str, screenshot: Path, script: dict[str, str]) -> tuple[dict, list[str]]:
    """Open ``url`` in Debian's headless Chromium (driven by Playwright) with a fresh profile; the
    values of the ``script`` expressions, the console errors, and a full-page screenshot."""
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: apt-get install chromium (.ci/run installs it)"
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS, timeout=BROWSER_TIMEOUT_MS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url, wait_until="load", timeout=BROWSER_TIMEOUT_MS)
            values = {name: page.evaluate(expression) for name, expression in script.items()}
            page.screenshot(path=str(screenshot), full_page=True, timeout=BROWSER_TIMEOUT_MS)
        finally:
            browser.close()
    return values, errors


def test_the_report_of_a_run_renders_in_chromium(tracked_run, tmp_path):
    run, _, stdout = tracked_run
    report = run / "report.html"
    assert stdout.strip().splitlines()[-2] == f"[tune] report: {report}"   # then the MLflow line
    gallery = json.loads((run / "overlays" / "washer" / "gallery.json").read_text())["images"]
    shot = tmp_path / "report.png"
    page, errors = open_in_chromium(report.as_uri(), shot, {
        "headings": "[...document.querySelectorAll('h2,h3')].map(h => h.id || h.textContent)",
        "tables": "document.querySelectorAll('table').length",
        "rows": "[...document.querySelectorAll('#class-washer ~ table tr')].length",
        "decoded": "Promise.all([...document.images].map(i => i.decode().then("
                   "() => [i.alt, i.naturalWidth, i.naturalHeight], () => [i.alt, 0, 0])))"})
    headings, tables, rows, decoded = page["headings"], page["tables"], page["rows"], page["decoded"]
    assert {"class-washer", "study-patchcore-washer", "study-hvq_trans-washer", "run", "search"} <= set(headings)
    assert tables >= 7 and rows >= 8      # macro mean, time, weights, settings, class test + validation, trials
    alts = [alt for alt, _, _ in decoded]
    assert all(w > 0 and h > 0 for _, w, h in decoded), [d for d in decoded if d[1] == 0]
    assert sum("washer 0" in a for a in alts) == len(gallery) >= 3         # every gallery picture, decoded
    assert {"patchcore-washer search history", "hvq_trans-washer search history"} <= set(alts)
    assert sum(a.endswith("slice view") for a in alts) == 2
    assert errors == []
    picture = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert picture.shape[0] > 2000 and picture.shape[1] >= 1000 and picture.std() > 20   # a long page, not blank


def test_every_trial_is_an_mlflow_run_under_the_parent_with_the_results(tracked_run):
    run, store, _ = tracked_run
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = pd.read_csv(run / "trials.csv", dtype={"trial_id": str})
    assert len(children) == len(trials) == 4
    assert sorted(r.data.tags["study"] for r in children) == sorted(trials["model"] + "-" + trials["classes"])
    for child in children:
        trial = trials.set_index("trial_id").loc[child.info.run_name.rsplit("_", 1)[-1]]
        assert child.data.params["model"] == trial["model"]
        history = client.get_metric_history(child.info.run_id, "val_score")
        # where it validated (ASHA's rungs 1 and 2, the last epoch 4), the epoch as the step; not
        # its checkpoint to resume from after epoch 3
        assert [m.step for m in history] == [e for e in (1, 2, 4) if e <= int(trial["epoch"])]
        assert max(m.value for m in history) == pytest.approx(trial["best_val_score"])
    assert parent.info.status == "FINISHED"
    assert {"results.csv", "results.md", "report.html", "trials.csv"} <= {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    mean = pd.read_csv(run / "results.csv").set_index(["class", "member"]).loc[("mean", "ensemble")]
    assert parent.data.metrics["ensemble.image_auroc"] == pytest.approx(mean["image_auroc"])
    assert parent.data.params["trials"] == "2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"mlflow server did not answer on {uri} within {SERVER_START_S} s: "
                            f"{server.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.5)
    yield uri
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def test_a_run_logs_to_a_tracking_server_on_loopback(tracked_run, mlflow_server, tmp_path):
    from distributed.tracking import close_tracking, open_tracking, run_status

    run = tmp_path / "run"
    shutil.copytree(tracked_run[0], run, ignore=shutil.ignore_patterns("mlflow.json", "tune", "best"))
    tracking = open_tracking(mlflow_server, "served", run, {"trials": 2})
    assert json.loads((run / "mlflow.json").read_text())["parent_run_id"] == tracking.parent_run_id
    close_tracking(tracking, run, run_status(130))                      # interrupted
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(tracking.parent_run_id).info.status == "KILLED"
    assert open_tracking(mlflow_server, "served", run, {}).parent_run_id == tracking.parent_run_id  # a resume
    assert client.get_run(tracking.parent_run_id).info.status == "RUNNING"
    close_tracking(tracking, run, run_status(0))
    parent = client.get_run(tracking.parent_run_id)
    assert parent.info.status == "FINISHED" and "ensemble.pixel_auroc" in parent.data.metrics
    assert "fused_hvq_trans_patchcore.image_auroc" in parent.data.metrics
    local = Path(client.download_artifacts(tracking.parent_run_id, "report.html", str(tmp_path / "down")))
    assert local.read_bytes() == (run / "report.html").read_bytes()


def test_a_tracking_store_that_cannot_be_reached_fails_before_ray_starts(tmp_path, synthetic_root):
    run = tmp_path / "run"
    out = run_cli(["-m", "distributed.tune", "--dataset", "mvtec", "--root", str(synthetic_root), "--classes", "washer",
                   "--models", "patchcore", "--run-dir", str(run), "--mlflow", f"http://127.0.0.1:{free_port()}",
                   *SMALL], timeout=300)
    assert out.returncode == 2
    assert "--mlflow" in out.stderr and "no tracking server answers" in out.stderr
    assert not (run / "tune").exists() and "Started a local Ray instance" not in out.stdout + out.stderr


def test_the_report_of_a_run_without_results_says_so(tracked_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tracked_run[0], run, ignore=shutil.ignore_patterns("results.*", "overlays", "ensemble", "best"))
    out = run_cli(["-m", "ensembles.report", str(run)], timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == str(run / "report.html"), out.stderr[-2000:]
    page = (run / "report.html").read_text()
    assert "no test-split results" in page and "no gallery" in page
    assert "Study patchcore-washer" in page and page.count("<img") >= 2     # the search is still shown
    not_a_run = run_cli(["-m", "ensembles.report", str(tmp_path)], timeout=300)
    assert not_a_run.returncode == 2 and "config.json not found" in not_a_run.stderr


def test_the_gallery_shows_the_worst_misses_first():
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    scores = np.array([0.2, 0.9, 0.1, 0.8, 0.3, 0.95, 0.7])
    defects = ["crack", "crack", "hole", "good", "good", "good", "hole"]
    order = gallery_order(labels, scores, threshold=0.5, defects=defects, size=10)
    assert order == [(2, "missed"), (0, "missed"), (5, "false_alarm"), (3, "false_alarm"), (1, "caught"),
                     (6, "caught"), (4, "normal")]
    assert gallery_order(labels, scores, 0.5, defects, size=3) == order[:3]


def study_with(n_trials: int, conditional: bool) -> optuna.Study:
    study = optuna.create_study(study_name="s", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        a = trial.suggest_float("a", 0, 1)
        if conditional and a > 0.5:
            trial.suggest_int("b", 0, 3)
        return a + trial.suggest_float("c", 0, 1) * 0.1

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials)
    return study


def test_importances_say_when_they_are_noise_and_what_they_leave_out():
    few = importance_view(study_with(4, conditional=True))
    assert "only 4 finished trials" in few and "left out of the importances: b" in few
    many = importance_view(study_with(30, conditional=False))
    assert "noise" not in many and "left out" not in many
    assert many.count("<img") == 2      # the importances and the slice view
    assert "no importance" in importance_view(study_with(1, conditional=False))
