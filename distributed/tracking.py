"""MLflow tracking of a run: ``python -m distributed.tune --mlflow URI``.

- One MLflow experiment per run (``--mlflow-experiment``, default: the run folder's name).
- A parent MLflow run for the whole run: the options as params; at the end the ensemble's and
  each member's macro test figures as metrics, and ``results.csv``, ``results.md``,
  ``report.html``, ``trials.csv`` and ``best.json`` as artifacts.
- Every trial as a child MLflow run, logged by Ray Tune's ``MLflowLoggerCallback`` (its config
  as params, every epoch's metrics with the epoch as step), tagged with its study.

The parent run's id is kept in ``RUN/mlflow.json``, so ``--resume`` logs into the same run.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from distributed.cli import CliError
from distributed.studies import EPOCH_ATTR, STUDY_KEY, is_validated
from ensembles.evaluate import RESULTS_FILE, RESULTS_MARKDOWN
from ensembles.report import REPORT_FILE
from ensembles.run_folder import BEST_INDEX_FILE, TRIALS_FILE

MLFLOW_FILE = "mlflow.json"
CONNECT_TIMEOUT_S = 10.0  # MLflow's own client retries an unreachable server for minutes
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
SQLITE = "sqlite:///"
ARTIFACTS = (RESULTS_FILE, RESULTS_MARKDOWN, REPORT_FILE, TRIALS_FILE, BEST_INDEX_FILE)
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class Tracking:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    parent_run_id: str

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def trial_callback(self):
        """Ray Tune's MLflow logger, with every trial nested under the parent run and tagged with its study."""
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class StudyTaggedLogger(MLflowLoggerCallback):
            def log_trial_start(self, trial):
                self.tags = {**base_tags, "study": str(trial.config.get(STUDY_KEY, ""))}
                super().log_trial_start(trial)

            def log_trial_result(self, iteration, trial, result):
                # a trial reports where it validates: the epoch is the step; a checkpoint to
                # resume from has no metrics to log
                if is_validated(result):
                    self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=result,
                                                 step=result.get(EPOCH_ATTR) or result.get("training_iteration"))

        base_tags = {PARENT_TAG: self.parent_run_id}
        return StudyTaggedLogger(tracking_uri=self.tracking_uri, experiment_name=self.experiment_name,
                                 tags=dict(base_tags))


def metric_key(member: str, metric: str) -> str:
    """``fused:a+b`` and ``image_auroc`` -> ``fused_a_b.image_auroc`` (MLflow keys allow no ``:`` or ``+``)."""
    return re.sub(r"[^\w\-./ ]", "_", member) + "." + metric


def artifact_location(uri: str) -> str | None:
    """For a local ``sqlite:///`` store, artifacts in ``mlartifacts/`` beside the database (else
    MLflow puts them under whatever folder the run started in); a server decides for itself."""
    return (Path(uri[len(SQLITE):]).parent / "mlartifacts").as_uri() if uri.startswith(SQLITE) else None


def absolute_uri(uri: str) -> str:
    """A relative ``sqlite:///`` path made absolute: trials log from the driver, which may run elsewhere."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(Path(uri[len(SQLITE):]).resolve())
    return uri


def check_server_reachable(uri: str) -> None:
    """For an ``http(s)://`` tracking server, one TCP connection within ``CONNECT_TIMEOUT_S``."""
    parts = urllib.parse.urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise CliError(f"--mlflow {uri}: no tracking server answers at {parts.hostname}:{port} ({err}); start "
                       "one (mlflow server --host 0.0.0.0 --port 5000) or give a local store such as "
                       "sqlite:///mlflow.db") from None


def open_tracking(uri: str, experiment_name: str, run_dir: Path, params: dict[str, Any]) -> Tracking:
    """The run's experiment and parent run (made, or found in ``RUN/mlflow.json`` on a resume);
    a ``CliError`` naming ``--mlflow`` when MLflow is missing or the store cannot be reached."""
    try:
        import mlflow
    except ImportError:
        raise CliError("--mlflow needs MLflow: pip install 'anomaly-ensemble[mlflow]'") from None
    saved = run_dir / MLFLOW_FILE
    if saved.is_file():
        tracking = Tracking(**json.loads(saved.read_text()))
        if tracking.tracking_uri == absolute_uri(uri):
            tracking.client().update_run(tracking.parent_run_id, status="RUNNING")  # it was ended as KILLED/FAILED
            return tracking
    uri = absolute_uri(uri)
    check_server_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            experiment_name, artifact_location=artifact_location(uri))
        parent = client.create_run(experiment_id, run_name=f"run {run_dir.name}",
                                   tags={"run_folder": str(run_dir.resolve())})
        for key, value in sorted(params.items()):
            client.log_param(parent.info.run_id, key, json.dumps(value) if isinstance(value, (list, dict)) else value)
    except Exception as err:  # MLflow raises its own, requests' and SQLAlchemy's errors alike
        raise CliError(f"--mlflow {uri}: cannot log there ({type(err).__name__}: {str(err)[:300]}); give a "
                       "reachable tracking server (http://HOST:5000) or a local store such as "
                       "sqlite:///mlflow.db") from None
    tracking = Tracking(uri, experiment_name, experiment_id, parent.info.run_id)
    saved.write_text(json.dumps(asdict(tracking), indent=1))
    return tracking


def run_status(exit_code: int) -> str:
    """The parent run's MLflow status for the run's exit code (130: interrupted, resumable)."""
    return {0: "FINISHED", 130: "KILLED"}.get(exit_code, "FAILED")


def close_tracking(tracking: Tracking, run_dir: Path, status: str) -> None:
    """Macro test figures and the run's files on the parent run, which is then ended with ``status``."""
    client = tracking.client()
    results = run_dir / RESULTS_FILE
    if results.is_file():
        frame = pd.read_csv(results)
        for _, row in frame[frame["class"] == "mean"].iterrows():
            for metric in SUMMARY_METRICS:
                if pd.notna(row[metric]):
                    client.log_metric(tracking.parent_run_id, metric_key(row["member"], metric), float(row[metric]))
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(tracking.parent_run_id, str(run_dir / name))
    client.set_terminated(tracking.parent_run_id, status)
