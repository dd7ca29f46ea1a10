"""What ``distributed.train`` and ``distributed.tune`` share: options, checks made before Ray
starts, the Ray connection, resource arithmetic and the run folder (its layout:
``ensembles.run_folder``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from anomaly_data import DATASET_KINDS, DatasetError, read_dataset
from anomaly_data.cache import DEFAULT_CACHE_ROOT
from anomaly_data.checks import check_dataset
from anomaly_data.storage import (StorageError, check_reachable, is_file, is_uri, join, local_mirror, mirror_folder,
                                   parse_location, resolve_root)
from anomaly_data.synthetic import ensure_dataset
from distributed.studies import DEFAULT_CHECKPOINT_MINUTES
from distributed.trial import trains_in_trial
from ensembles.run_folder import CONFIG_FILE, TRAIN_DIR, TUNE_DIR
from models.training import PRECISIONS
from models import model_names

DRIVER_CPU = 0.1  # a trial only drives Train workers: a fraction of a CPU is enough
# the offline demo's data: every synthetic class is generated (a few seconds), two are tuned
DEMO_DATASET = {"seed": 0, "image_size": 128, "n_train": 32, "n_test_good": 8, "n_test_per_defect": 4}
DEMO_CLASSES = ["brick", "washer"]


class CliError(ValueError):
    """A bad command-line value, found before Ray starts."""


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_KINDS, default="synthetic",
                   help="layout of --root (synthetic: generated offline into a cache folder when --root is not given)")
    g.add_argument("--root", default=None, help="dataset root: a folder, or s3://BUCKET/PREFIX / gs://BUCKET/PREFIX "
                                               "(each node keeps a local copy of what it reads)")
    g.add_argument("--classes", default=None, help="comma-separated classes (default: all found)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable training images with a warning instead of stopping")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, synthetic defects, models and the search")
    g.add_argument("--image-size", type=int, default=None,
                   help="input side in px for every model (default: each preset's; --set can still override)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=1,
                   help="workers per training run: 1 (default) trains inside the Tune trial's own process; "
                        "more start a Ray Train DDP worker group per run")
    g.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per Train worker (default: 1, or 0.9 on a machine with at most 2 CPUs)")
    g.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Train worker (default: 1 when the cluster has GPUs, else 0)")
    g.add_argument("--max-concurrent", type=int, default=None,
                   help="runs at the same time (default: as many as the cluster's resources fit)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the trained members' training forward and backward: auto (default) is bf16 autocast on "
                        "a GPU that has it, fp16 with a gradient scaler on one that has not, fp32 on CPUs; "
                        "distances, statistics and validation stay float32")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also validate and checkpoint every N epochs (default 0: only where ASHA compares trials "
                        "and at a trial's last epoch; 1 validates every epoch)")
    g.add_argument("--checkpoint-minutes", type=float, default=DEFAULT_CHECKPOINT_MINUTES, metavar="M",
                   help="between validations, a checkpoint to resume from at most every M minutes of training "
                        f"(default {DEFAULT_CHECKPOINT_MINUTES:g}; 0: none, an interrupted trial restarts from its "
                        "last validation)")
    g.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto or HOST:PORT); "
                                                   "default: start a local Ray instance")
    g.add_argument("--run-dir", default=None,
                   help="run folder: a local path (default: runs/<timestamp>) or s3://BUCKET/PREFIX / "
                        "gs://BUCKET/PREFIX (Tune and Train write there directly; this machine stages the "
                        "run's own files and uploads them)")


def split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def check_address(address: str | None) -> None:
    """Fail fast, before Ray starts, when ``--address`` cannot be reached."""
    if address in (None, "", "local"):
        return
    if address == "auto":
        if os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists():
            return
        raise CliError("--address auto: no running Ray cluster found on this machine "
                       "(start one with `ray start --head` or `ray up cluster.yaml`, or drop --address)")
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--address {address!r}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as err:
        raise CliError(f"--address {address}: cannot reach the Ray head ({err}); is the cluster up?") from None


def resolve_dataset(args) -> tuple[str, str | Path, Path, dict]:
    """Dataset kind, root (a path or a URI), the local folder to read it from, and the classes,
    checked on disk (the synthetic demo data is made here; a URI's objects are mirrored here)."""
    kind, root, classes = args.dataset, args.root, split_list(args.classes)
    if kind == "synthetic" and root is None:
        params = dict(DEMO_DATASET, seed=args.seed)
        root = ensure_dataset(DEFAULT_CACHE_ROOT / f"synthetic-{params['image_size']}px-seed{args.seed}", **params)
        classes = classes or DEMO_CLASSES
    if root is None:
        raise CliError(f"--dataset {kind} needs --root DIR (or --root s3://BUCKET/PREFIX)")
    try:
        root, local = resolve_root(str(root), classes)
        found = read_dataset(kind, local, classes, seed=args.seed)
        checked = check_dataset(found, skip_bad=args.skip_bad_images)
    except DatasetError as err:
        raise CliError(str(err)) from None
    print(f"[data] {root}{'' if local == root else f' (local copy {local})'}: {checked.summary()}", flush=True)
    return kind, root, local, found


@dataclass
class RunContext:
    dataset: str
    root: str | Path
    """As given: a local path, or a URI each node mirrors for itself."""
    local_root: Path
    """Where this process reads the dataset: ``root`` itself, or this node's copy of a URI."""
    classes: list[str]
    models: list[str]
    run_dir: Path
    address: str | None
    workers: int
    cpus_per_worker: float | None
    gpus_per_worker: float | None
    max_concurrent: int | None
    seed: int
    records: dict[str, Any] = field(default_factory=dict, repr=False)
    """Per class, its ``anomaly_data.ClassRecords`` (paths only, nothing decoded)."""
    run_uri: str | None = None
    """The run's bucket URI; ``run_dir`` is then this machine's staging copy of the run's own files."""
    cluster: dict[str, Any] = field(default_factory=dict)
    """What the cluster has (CPUs, GPUs, nodes), as ``fill_resources`` found it."""
    precision: str = "auto"
    """The trained members' training precision (``models.training.resolve_precision``)."""
    eval_every: int = 0
    checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES

    @property
    def location(self) -> str:
        """The run as the user names it (``--resume`` takes it), where Ray Tune and Ray Train write:
        its URI, or the run folder."""
        return self.run_uri or str(self.run_dir)

    def resources(self) -> dict[str, float]:
        return {"workers": self.workers, "cpus_per_worker": self.cpus_per_worker,
                "gpus_per_worker": self.gpus_per_worker}


def prepare_run(args, models: list[str]) -> RunContext:
    """Every check that can fail on user input, done before Ray starts."""
    unknown = [m for m in models if m not in model_names()]
    if unknown:
        raise CliError(f"unknown model(s) {unknown}; choose from {model_names()}")
    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers} (1 trains inside the trial process)")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise CliError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.eval_every < 0 or not args.checkpoint_minutes >= 0:
        raise CliError(f"--eval-every and --checkpoint-minutes must be >= 0, got {args.eval_every} and "
                       f"{args.checkpoint_minutes}")
    check_address(args.address)
    kind, root, local, records = resolve_dataset(args)
    classes = list(records)
    run_dir, run_uri = resolve_run_dir(args.run_dir, resuming=getattr(args, "resume", None) is not None)
    return RunContext(kind, root, local, classes, models, run_dir, args.address, args.workers, args.cpus_per_worker,
                      args.gpus_per_worker, args.max_concurrent, args.seed, records, run_uri,
                      precision=args.precision, eval_every=args.eval_every,
                      checkpoint_minutes=args.checkpoint_minutes)


def resolve_run_dir(given: str | None, resuming: bool) -> tuple[Path, str | None]:
    """The local run folder, and the run's URI when it is in a bucket (the local folder is then
    this machine's staging copy: fetched from the bucket on a resume, emptied for a new run)."""
    try:
        location = parse_location(given or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        holds_run = is_file(join(location, CONFIG_FILE))
    except StorageError as err:
        raise CliError(f"--run-dir: {err}") from None
    if holds_run and not resuming:
        raise CliError(f"run folder {location} already holds a run: continue it with --resume {location}, "
                       "or choose another --run-dir")
    if not is_uri(location):
        run_dir = location.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, None
    run_dir = mirror_folder(location)
    try:
        check_reachable(location, must_exist=False)
        if resuming:
            local_mirror(location, exclude=(TUNE_DIR, TRAIN_DIR))
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # a stale copy of an earlier run under this URI
    except StorageError as err:
        raise CliError(f"--run-dir: {err}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, location


def storage_runtime_env() -> dict | None:
    """The object-store settings every node's workers need (an S3-compatible endpoint, the
    region), if any is set; never credentials: each node takes those from its own chain (its
    instance profile)."""
    names = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
    found = {k: os.environ[k] for k in names if os.environ.get(k)}
    return {"env_vars": found} if found else None


def start_ray(ctx: RunContext) -> None:
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if ray.is_initialized():
        return
    if ctx.address:
        ray.init(address=ctx.address, log_to_driver=False, runtime_env=storage_runtime_env())
    else:
        ray.init(include_dashboard=True, log_to_driver=False, configure_logging=False)


def cluster_capacity() -> tuple[float, float]:
    """CPUs and GPUs the cluster can have: an autoscaling cluster's maximum (its GPU nodes may
    not be up yet when the run starts), else what is there now."""
    now = ray.cluster_resources()
    cpus, gpus = now.get("CPU", 1.0), now.get("GPU", 0.0)
    try:
        # here, inside the try: a private API, which a Ray release may move or drop
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # private API: absent or changed -> what is there now
        most = {}
    big = 1e6  # "unlimited" node counts come back as sys.maxsize
    return max(cpus, min(most.get("CPU", 0), big)), max(gpus, min(most.get("GPU", 0), big))


def default_cpus_per_worker(cpus: float, gpus_per_worker: float) -> float:
    """A GPU worker gets its share of its node's CPUs (the smallest GPU node's that is up: the
    training loader's worker processes use them), a CPU worker one CPU (0.9 on a machine with at
    most two, so that Ray's own processes keep a share)."""
    per_gpu = [math.floor(node["Resources"].get("CPU", 0) / node["Resources"]["GPU"])
               for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0]
    if gpus_per_worker > 0 and per_gpu:
        return max(1.0, math.floor(min(per_gpu) * gpus_per_worker))
    return 1.0 if cpus > 2 else 0.9


def fill_resources(ctx: RunContext) -> None:
    """Defaults that depend on the cluster: GPUs per worker, CPUs per worker, concurrency.

    Raises ``CliError`` when one run can never fit, instead of waiting for ever."""
    cpus, gpus = cluster_capacity()
    ctx.cluster = {"cpus": cpus, "gpus": gpus, "nodes": sum(node["Alive"] for node in ray.nodes())}
    if ctx.gpus_per_worker is None:
        ctx.gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if ctx.cpus_per_worker is None:
        ctx.cpus_per_worker = default_cpus_per_worker(cpus, ctx.gpus_per_worker)
    if ctx.precision == "fp16" and ctx.gpus_per_worker == 0:
        raise CliError("--precision fp16 trains on GPUs only (its gradient scaler is CUDA's), and this run's "
                       "workers have none: use bf16 or fp32, or give the workers GPUs (--gpus-per-worker)")
    per_trial_cpu = trial_cpus(ctx)
    per_trial_gpu = ctx.workers * ctx.gpus_per_worker
    fits = math.floor(cpus / per_trial_cpu + 1e-9)
    if per_trial_gpu > 0:
        fits = min(fits, math.floor(gpus / per_trial_gpu + 1e-9))
    if fits < 1:
        raise CliError(f"one run needs {per_trial_cpu:g} CPUs and {per_trial_gpu:g} GPUs "
                       f"({ctx.workers} worker(s)), but the cluster has at most {cpus:g} CPUs and {gpus:g} GPUs: "
                       "lower --workers, --cpus-per-worker or --gpus-per-worker")
    ctx.max_concurrent = min(ctx.max_concurrent or fits, fits)


def trial_cpus(ctx: RunContext) -> float:
    """CPUs of one trial with Train workers: its own process drives them with a fraction."""
    return ctx.cpus_per_worker if ctx.workers <= 1 else DRIVER_CPU + ctx.workers * ctx.cpus_per_worker


def trial_placement(ctx: RunContext, config: dict[str, Any]):
    """What a Tune trial of ``config["model"]`` holds: the whole compute when the run happens
    inside the trial (one worker, or a model that is fitted, not trained), else a driver
    fraction beside the Train workers' own placement group."""
    if trains_in_trial(ctx.workers, config["model"]):
        bundle = {"CPU": ctx.cpus_per_worker}
        if ctx.gpus_per_worker:
            bundle["GPU"] = ctx.gpus_per_worker
        return tune.PlacementGroupFactory([bundle])
    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}])


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
