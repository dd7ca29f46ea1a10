"""What runs in a trial: one (model, classes) training run, in the Tune trial's own process or
with Ray Train DDP workers (``distributed.train`` and ``distributed.tune`` start these trials;
this module imports neither).

Each epoch the workers train on their shard of the training normals. At the epochs the job's
``ReportPlan`` names (the scheduler's rungs, ``--eval-every``, the last epoch) rank 0 fits the
model's statistics, scores the validation set (held-out normals + synthetic defects, never the
test split) and reports ``val_image_auroc``, ``val_pixel_auroc``, ``val_score``
(``ensembles.metrics.validation_score``: their mean) and the training loss together with a
checkpoint. In between, a checkpoint to resume from is reported at most every
``checkpoint_minutes`` (``RESUME_ONLY``, score -inf); nothing else is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from torch.utils.data import DataLoader, DistributedSampler

from anomaly_data import TrainingImages, prepare_splits
from anomaly_data.cache import DEFAULT_CACHE_ROOT
from anomaly_data.storage import local_root, write_bytes
from distributed.checkpoints import CHECKPOINT_MODEL, CHECKPOINT_STATE, read_trial_state, strip_all_but_latest
from distributed.studies import RESUME_ONLY, REUSE_WAIT_ENV, REUSE_WAIT_S, ReportPlan
from ensembles.metrics import image_auroc, pixel_auroc, validation_score
from ensembles.run_folder import TRAIN_RUN_PREFIX
from models import ModelConfig, load_model, model_class
from models.checkpoint_files import encode_trial_state
from models.config import Recipe
from models.training import (NonFiniteLossError, make_grad_scaler, make_lr_schedule, make_optimizer, resolve_precision,
                             score_loader, train_epoch, unwrap, use_fast_kernels)

METRIC = "val_score"
SPLITS_CACHE = DEFAULT_CACHE_ROOT / "splits"
MODE = "max"
DIVERGED_FILE = "DIVERGED"
ROUTING_CHECK_IMAGES = 32  # validation images on which prototype routing is checked each epoch
PLACEMENT_GROUP_KEY = "placement_group"  # reported by Ray Train workers: their worker group's


@dataclass(frozen=True)
class TrainJob:
    """Everything one training run needs. It travels to Tune trials and Train workers as it is
    (pickled), so the model config stays the checked ``ModelConfig`` the spec built."""

    model: str
    dataset: str
    root: str
    classes: tuple[str, ...]
    config: ModelConfig
    """Every field of the model's config (``distributed.spec``)."""
    recipe: Recipe
    """``epochs`` are passes over the training images."""
    val_fraction: float = 0.2
    seed: int = 0
    skip_bad_images: bool = False
    precision: str = "auto"
    """The training forward's precision (``models.training.resolve_precision``); validation is float32."""
    plan: ReportPlan = ReportPlan()
    """Where the run validates and checkpoints (default: every epoch)."""

    @classmethod
    def of(cls, model: str, dataset: str, root: str, classes, preset: str = "fast", recipe: dict | None = None,
           **config) -> "TrainJob":
        """``model``'s ``preset`` with ``config`` and ``recipe`` overrides (for tests and benches)."""
        model_cls = model_class(model)
        return cls(model, dataset, str(root), tuple(classes), model_cls.config_class.from_preset(preset, **config),
                   model_cls.recipe(preset).replace(**(recipe or {})))

    def with_trial(self, params: dict[str, Any]) -> "TrainJob":
        """A trial's sampled values: model-config fields into the config, recipe fields (``lr``)
        into the recipe, each checked; search-only helpers (HaloAE's ``depth``) are dropped.
        (Pinned fields are never sampled: ``search_spaces.PinnedTrial``.)"""
        fields, recipe_fields = self.config.field_types(), Recipe.field_types()
        return dataclasses.replace(self, config=self.config.replace(**{k: v for k, v in params.items() if k in fields}),
                                   recipe=self.recipe.replace(**{k: v for k, v in params.items() if k in recipe_fields}))

    def to_dict(self) -> dict[str, Any]:
        """For config.json and checkpoints (plain JSON)."""
        return dataclasses.asdict(self)

    def build_model(self):
        return model_class(self.model)(self.config)


def model_trains(model: str) -> bool:
    """False for a model that is fitted in one pass (no DDP, no Train worker group)."""
    return model_class(model).trains


def trains_in_trial(workers: int, model: str) -> bool:
    """One worker, or a model fitted in one pass: the run happens in the Tune trial's own process."""
    return workers <= 1 or not model_trains(model)


@lru_cache(maxsize=4)
def _cached_splits(dataset: str, root: str, classes: tuple[str, ...], image_size: int, val_fraction: float,
                   seed: int, skip_bad_images: bool):
    return prepare_splits(dataset, root, list(classes), image_size=image_size, val_fraction=val_fraction,
                          seed=seed, skip_bad_images=skip_bad_images, cache_dir=SPLITS_CACHE)


def load_splits(job: TrainJob, image_size: int):
    """Decoded once per node (the first trial fills the disk cache), kept in memory per process."""
    root = local_root(job.root, job.classes)  # a URI: this node's copy of what the classes need
    return _cached_splits(job.dataset, str(root), tuple(job.classes), int(image_size), job.val_fraction,
                          job.seed, job.skip_bad_images)


def validation_metrics(model, validation, device, batch_size: int) -> dict[str, float]:
    out = score_loader(model, DataLoader(validation, batch_size=batch_size), device)
    img = image_auroc(out["scores"], out["labels"])
    pix = pixel_auroc(out["maps"], out["masks"])
    metrics = {"val_image_auroc": img, "val_pixel_auroc": pix, METRIC: validation_score(img, pix)}
    if getattr(model.config, "num_classes", 1) > 1:  # a unified HVQ-Trans: cheap routing vs the full rule
        images = next(iter(DataLoader(validation, batch_size=ROUTING_CHECK_IMAGES, shuffle=False)))["image"]
        metrics["val_routing_agreement"] = model.routing_agreement(images.to(device))
    return metrics


def save_checkpoint(directory: Path, model, optimizer, epoch: int, metrics: dict[str, float], job: TrainJob):
    net = unwrap(model)
    net.save(directory / CHECKPOINT_MODEL)
    write_bytes(directory / CHECKPOINT_STATE,
                encode_trial_state(optimizer.state_dict() if optimizer is not None else None, epoch, metrics,
                                   job.to_dict(), torch.get_rng_state()))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))  # "epoch" counts from 1


def restore_checkpoint(checkpoint, model, optimizer) -> int:
    """Load model and optimizer state from a Ray checkpoint; returns the next epoch."""
    with checkpoint.as_directory() as d:
        saved = load_model(Path(d) / CHECKPOINT_MODEL)
        unwrap(model).load_state_dict(saved.state_dict())
        state = read_trial_state(Path(d) / CHECKPOINT_STATE)
    if state.get("optimizer") is not None:  # emptied once a trial ended (distributed.checkpoints)
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["epoch"]) + 1


MAX_LOADER_WORKERS = 8


def loader_workers(cpus: float | None = None) -> int:
    """DataLoader worker processes for a training run on ``cpus`` CPUs (default: those Ray gave
    this process): all but the one the training loop runs on, none below two CPUs."""
    if cpus is None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    return max(0, min(MAX_LOADER_WORKERS, int(cpus) - 1, (os.cpu_count() or 1) - 1))


class TrainSession:
    """Where the loop runs: a Ray Train worker (DDP when several), or the Tune trial itself."""

    def __init__(self, in_tune_trial: bool = False):
        self.in_tune_trial = in_tune_trial
        if in_tune_trial:
            self.rank, self.world = 0, 1
            self.trial_dir = Path(tune.get_context().get_trial_dir())  # where Tune keeps its checkpoints
            self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
            self._report, self._checkpoint_cls, self._get_checkpoint = tune.report, tune.Checkpoint, tune.get_checkpoint
        else:
            ctx = ray.train.get_context()
            self.trial_dir = None  # Train keeps the checkpoints: DropOptimizerState empties them at the end
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
            self.device = ray.train.torch.get_device()
            self._report, self._checkpoint_cls = ray.train.report, ray.train.Checkpoint
            self._get_checkpoint = ray.train.get_checkpoint
        self.node = ray.get_runtime_context().get_node_id()
        # the worker group's placement group (None inside a trial): the driver removes it when the trial ends
        self.placement_group = None if in_tune_trial else ray.get_runtime_context().get_placement_group_id()

    def checkpoint(self):
        return self._get_checkpoint()

    def rank0_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (its clock decides when to checkpoint): every rank
        must report the same epochs, or Train's report barrier would wait forever."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def prepare(self, model, dataset, batch_size: int, drop_last: bool):
        """The model on this worker's device (DDP-wrapped when several) and its training loader:
        uint8 images (``TrainingImages``), in pinned memory for a GPU, read by worker processes
        from this worker's CPUs that live across epochs; under DDP each rank reads its shard."""
        # the sampler pads the shards to one length, so every rank steps equally often
        sampler = None if self.world == 1 else DistributedSampler(dataset, self.world, self.rank, shuffle=True)
        workers = loader_workers()
        loader = DataLoader(TrainingImages(dataset), batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                            drop_last=drop_last, num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=self.device.type == "cuda")
        if self.in_tune_trial:
            return model.to(self.device), loader
        # buffers are not broadcast: EMA codebooks are all-reduced by the model itself, and
        # fitted statistics live on rank 0, which alone validates and checkpoints
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
        return model, loader

    def report(self, metrics: dict[str, Any], write_checkpoint) -> None:
        """Every rank reports; rank 0 attaches the checkpoint that ``write_checkpoint(dir)`` fills."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.placement_group:
                metrics = {**metrics, PLACEMENT_GROUP_KEY: self.placement_group}
            if self.rank == 0:
                write_checkpoint(Path(tmp))
                checkpoint = self._checkpoint_cls.from_directory(tmp)
            self._report(metrics, checkpoint=checkpoint)
        if self.trial_dir is not None:
            strip_all_but_latest(self.trial_dir)


def fit_loop(model, job: TrainJob, session: TrainSession, splits) -> bool:
    """A model that is fitted, not trained: one ``fit_statistics`` pass, validated and reported as
    epoch 1 (no optimiser, no DDP; Tune treats it as a one-iteration trial)."""
    started = time.perf_counter()
    model.eval()
    model.fit_statistics(DataLoader(splits.train, batch_size=job.recipe.batch_size))
    metrics = {"epoch": 1, "train_loss": 0.0, "epoch_seconds": time.perf_counter() - started,
               "node": session.node, "diverged": 0}
    started = time.perf_counter()
    metrics.update(validation_metrics(model, splits.validation, session.device, job.recipe.batch_size))
    metrics["validate_seconds"] = time.perf_counter() - started
    session.report(metrics, lambda d, m=dict(metrics): save_checkpoint(d, model, None, 0, m, job))
    return True


def train_loop(job: TrainJob, session: TrainSession) -> bool:
    """Train ``job``; rank 0 validates and checkpoints where ``job.plan`` says (the scheduler's
    rungs, ``--eval-every``, the last epoch), and checkpoints to resume from in between at most
    every ``checkpoint_minutes``. Resumes from a checkpoint.

    Returns False when the loss diverged (NaN/inf), True otherwise."""
    torch.manual_seed(job.seed)
    model = job.build_model()
    splits = load_splits(job, model.config.image_size)
    model.to(session.device)
    if not model.trains:
        return fit_loop(model, job, session, splits)
    recipe, plan = job.recipe, job.plan
    optimizer = make_optimizer(model, recipe.lr, recipe)
    schedule = make_lr_schedule(optimizer, recipe)
    precision = resolve_precision(job.precision, session.device)
    scaler = make_grad_scaler(precision, session.device)
    use_fast_kernels(session.device)
    start = 0
    checkpoint = session.checkpoint()
    if checkpoint is not None:
        start = restore_checkpoint(checkpoint, model, optimizer)
        if schedule is not None:  # the saved optimiser has the stepped learning rate already
            schedule.last_epoch = start
    torch.manual_seed(job.seed + 1000 * session.rank + start)
    drop_last = len(splits.train) >= 2 * job.recipe.batch_size * session.world
    model, loader = session.prepare(model, splits.train, job.recipe.batch_size, drop_last)
    last_report, train_seconds = time.perf_counter(), 0.0
    for epoch in range(start, recipe.epochs):
        if session.world > 1:
            loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        try:
            parts = train_epoch(model, loader, optimizer, session.device, recipe.grad_clip, precision, scaler)
        except NonFiniteLossError as err:
            # metrics are kept only with a checkpoint: attach a tiny one saying why
            session.report({"epoch": epoch + 1, "diverged": 1, METRIC: float("nan"), "train_loss": float("nan"),
                            "val_image_auroc": float("nan"), "val_pixel_auroc": float("nan"), "node": session.node},
                           lambda d, msg=str(err): (d / DIVERGED_FILE).write_text(msg + "\n"))
            return False
        if schedule is not None:
            schedule.step()
        train_seconds += time.perf_counter() - started
        done = epoch + 1
        validate = plan.validates(done, recipe.epochs)
        if not validate and not session.rank0_decides(plan.resume_due(time.perf_counter() - last_report)):
            continue
        metrics = {"epoch": done, "train_loss": parts["loss"], "epoch_seconds": time.perf_counter() - started,
                   "train_seconds": train_seconds, "node": session.node, "precision": precision,
                   "loader_workers": getattr(loader, "num_workers", 0)}
        if not validate:
            metrics.update({METRIC: float("-inf"), RESUME_ONLY: 1, "diverged": 0})
        elif session.rank == 0:
            started = time.perf_counter()
            net = unwrap(model)
            net.eval()
            net.fit_statistics(DataLoader(splits.train, batch_size=job.recipe.batch_size))
            metrics.update(validation_metrics(net, splits.validation, session.device, job.recipe.batch_size))
            metrics.update({"diverged": 0, "validate_seconds": time.perf_counter() - started})
        session.report(metrics, lambda d, e=epoch, m=dict(metrics): save_checkpoint(d, model, optimizer, e, m, job))
        last_report, train_seconds = time.perf_counter(), 0.0
    return True


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function of ``TorchTrainer`` (DDP when more than one worker)."""
    train_loop(config["job"], TrainSession())


@dataclass
class Resources:
    """How each training run is placed: one worker trains inside the trial process, more are a
    Ray Train DDP worker group."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def scaling_config(self):
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            res["GPU"] = self.gpus_per_worker
        return ray.train.ScalingConfig(num_workers=self.workers, use_gpu=self.gpus_per_worker > 0,
                                       resources_per_worker=res)


def run_training(job: TrainJob, storage: str, name: str, resources: Resources, callbacks=(),
                 max_failures: int = 2):
    """Fit one ``TorchTrainer``; the same ``storage`` + ``name`` resumes from its last checkpoint."""
    trainer = TorchTrainer(
        train_worker, train_loop_config={"job": job}, scaling_config=resources.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage), callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                         checkpoint_score_order=MODE),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)))
    return trainer.fit()


class TrialDiverged(RuntimeError):
    """The training loss became NaN/inf: the trial is reported as failed."""


def tune_trial(config: dict[str, Any], bases: dict[str, TrainJob], storage: str,
               resources: dict[str, float]) -> None:
    """A Ray Tune function trial: one training run of the study ``config["study"]``.

    One worker trains inside the trial process: no worker group, so no placement group of its
    own that could outlive a trial Tune kills (an ASHA stop). Several workers are a Ray Train
    DDP run; its workers report their placement group, which the driver removes when the
    trial ends (``distributed.monitor.PlacementGroupWatch``)."""
    os.environ[REUSE_WAIT_ENV] = str(REUSE_WAIT_S)
    job = bases[config["study"]].with_trial(config)
    resources = Resources(**resources)
    if trains_in_trial(resources.workers, job.model):
        diverged = not train_loop(job, TrainSession(in_tune_trial=True))
    else:
        name = f"{TRAIN_RUN_PREFIX}{tune.get_context().get_trial_id()}"  # stable: a retried trial resumes
        metrics = run_training(job, storage, name, resources, callbacks=[TuneReportCallback()]).metrics or {}
        diverged = bool(metrics.get("diverged"))
    if diverged:
        raise TrialDiverged(f"{job.model} on {','.join(job.classes)} diverged (NaN/inf loss) with lr={job.recipe.lr}")
