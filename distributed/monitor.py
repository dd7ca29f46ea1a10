"""What the driver watches while the one Tune run goes: a progress line per study, the Train
placement groups of ended trials, and a watchdog for a run that stopped starting trials.

Why the driver removes Train groups: a Ray Train worker group's placement group is created by
the trial's Train controller but belongs to the job, not to the trial. When Tune kills a trial
(an ASHA stop), the controller dies without removing it, and only Train's own detached cleaner
may remove it later, which is racy: such groups have held a small cluster's every CPU. Trials
of one worker avoid it by training inside the trial process; for DDP trials the workers report
their group (``placement_group`` in each result) and ``PlacementGroupWatch`` removes it as soon as
Tune ends the trial, finished, stopped or failed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.stopper import Stopper
from ray.util.placement_group import PlacementGroup
from ray.util.state import list_actors, list_placement_groups

from anomaly_data.storage import StorageError, location_of
from distributed.checkpoints import strip_trial
from distributed.studies import EPOCH_ATTR, STUDY_KEY, is_validated
from distributed.trial import METRIC, PLACEMENT_GROUP_KEY
from ensembles.run_folder import PROGRESS_FILE, sync_run


def log(message: str) -> None:
    print(f"[tune] {message}", flush=True)


# ----- progress ---------------------------------------------------------------------------
@dataclass
class StudyLine:
    key: str
    trials: int
    done: int = 0
    running: int = 0
    pending: int = 0
    failed: int = 0
    best: float | None = None
    epochs: int = 0

    def text(self, width: int) -> str:
        best = f"{self.best:.3f}" if self.best is not None else "  -  "
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.key:<{width}}  done {self.done:>2}/{self.trials:<2} running {self.running:>2} "
                f"pending {self.pending:>2}  best val_score {best}  epochs {self.epochs}{failed}")


class StudyProgress(Callback):
    """One line per study, refreshed in place on a terminal and printed as plain lines (every
    ``every_s`` when something changed) in a log. Also measures how long each trial waited to
    start while a slot was free (fewer than ``slots`` running; a trial kept ready behind busy
    slots is not waiting on anything), written with the final lines to ``RUN/progress.json``."""

    def __init__(self, studies: dict[str, int], run_dir: Path, slots: int = 1, every_s: float = 60.0,
                 stream=None):
        self.studies = studies  # study key -> trials it will run
        self.run_dir = Path(run_dir)
        self.slots = slots
        self.every_s = every_s
        self.stream = stream
        self.best: dict[str, float] = {}
        self.waits: dict[str, float] = {}
        self.last_step: float | None = None
        self.started = time.time()
        self.last_print = 0.0
        self.last_text = ""
        self.lines_on_screen = 0

    def __getstate__(self):  # Tune pickles the run config: the stream stays behind
        return {**self.__dict__, "stream": None}

    @property
    def out(self):
        return self.stream or sys.stdout

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(METRIC)
        key = trial.config.get(STUDY_KEY)
        if key is not None and value is not None and value == value and is_validated(result):  # NaN: diverged
            self.best[key] = max(self.best.get(key, value), value)

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        step, self.last_step = now - (self.last_step or now), now
        if sum(t.status == Trial.RUNNING for t in trials) < self.slots:
            for trial in trials:
                if trial.status == Trial.PENDING:
                    self.waits[trial.trial_id] = self.waits.get(trial.trial_id, 0.0) + step
        interactive = self.out.isatty()
        if now - self.last_print < (1.0 if interactive else self.every_s):
            return
        self.show(trials, interactive)

    def on_experiment_end(self, trials, **info):
        self.show(trials, self.out.isatty(), final=True)
        lines = self.lines(trials)
        summary = {"wall_s": time.time() - self.started, "longest_trial_wait_s": max(self.waits.values(), default=0.0),
                   "trial_wait_s": self.waits, "studies": [vars(line) for line in lines]}
        (self.run_dir / PROGRESS_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    def lines(self, trials) -> list[StudyLine]:
        rows = {key: StudyLine(key, n, best=self.best.get(key)) for key, n in self.studies.items()}
        for trial in trials:
            row = rows.get(trial.config.get(STUDY_KEY))
            if row is None:
                continue
            if trial.status in (Trial.TERMINATED, Trial.ERROR):
                row.done += 1
                row.failed += trial.status == Trial.ERROR
            elif trial.status == Trial.RUNNING:
                row.running += 1
            else:
                row.pending += 1
            row.epochs += int((trial.last_result or {}).get(EPOCH_ATTR, 0))
        return list(rows.values())

    def show(self, trials, interactive: bool, final: bool = False) -> None:
        lines = self.lines(trials)
        width = max((len(k) for k in self.studies), default=10)
        done = sum(line.done for line in lines)
        total = sum(line.trials for line in lines)
        head = f"[tune] {done}/{total} trials done, {time.time() - self.started:.0f} s" + (" (final)" if final else "")
        text = "\n".join([head] + ["  " + line.text(width) for line in lines])
        self.last_print = time.time()
        if not interactive and not final and text.split("\n", 1)[1:] == self.last_text.split("\n", 1)[1:]:
            return  # a log gets a new block only when something changed
        if interactive and self.lines_on_screen:
            self.out.write(f"\x1b[{self.lines_on_screen}F\x1b[J")  # back to the block's first line
        self.out.write(text + "\n")
        self.out.flush()
        self.lines_on_screen = text.count("\n") + 1 if interactive and not final else 0
        self.last_text = text


# ----- placement groups and the watchdog -------------------------------------------------
@dataclass
class WatchSettings:
    stall_s: float = 300.0  # no trial started for this long while some wait: look for orphans
    orphan_grace_s: float = 60.0  # a group must hold no live actor for this long to be orphaned
    check_every_s: float = 5.0
    train_bundle: dict[str, float] | None = None  # one Train worker's bundle (DDP runs only)
    train_workers: int = 0
    slots: int = 1  # trials that fit at once: only fewer running while others wait is a stall
    resume_command: str = ""


@dataclass
class GroupInfo:
    id: str
    bundles: list[dict[str, float]]
    has_live_actor: bool


def job_groups() -> list[GroupInfo]:
    """This job's CREATED placement groups, with whether a live actor is in each (State API)."""
    context = ray.get_runtime_context()
    job, address = context.get_job_id(), context.gcs_address  # this run's cluster, even beside another
    groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")], detail=True,
                                   limit=10_000, raise_on_missing_output=False)
    live = {a.placement_group_id for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                                       detail=True, limit=10_000, raise_on_missing_output=False)}
    return [GroupInfo(g.placement_group_id, [b["unit_resources"] for b in g.bundles or []],
                      g.placement_group_id in live)
            for g in groups if g.creator_job_id == job]


def remove_group(group_id: str) -> bool:
    try:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
        return True
    except Exception:  # already removed by Train itself: nothing to do
        return False


def fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def total(groups: list[GroupInfo]) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in groups:
        for bundle in g.bundles:
            for k, v in bundle.items():
                out[k] = out.get(k, 0.0) + v
    return out


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") and v) or "nothing"


class PlacementGroupWatch(Callback, Stopper):
    """Removes each ended trial's Train placement group, and watches for a run that stopped
    starting trials (also the run's ``Stopper``: ``failure`` set means the run was stopped)."""

    def __init__(self, settings: WatchSettings):
        self.settings = settings
        self.trial_groups: dict[str, set[str]] = {}
        self.running_groups: set[str] = set()
        self.ended_groups: set[str] = set()
        self.unowned_since: dict[str, float] = {}
        self.last_start = time.time()
        self.last_check = 0.0
        self.last_wait_note = 0.0
        self.failure: str | None = None
        self.state_api_failed = False

    # -- tracking the groups reported by Train workers
    def on_trial_start(self, iteration, trials, trial, **info):
        self.last_start = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        group = result.get(PLACEMENT_GROUP_KEY)
        if group:
            self.trial_groups.setdefault(trial.trial_id, set()).add(group)
            self.running_groups.add(group)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.release(trial)

    def release(self, trial) -> None:
        for group in self.trial_groups.pop(trial.trial_id, set()):
            self.running_groups.discard(group)
            self.ended_groups.add(group)
            remove_group(group)

    # -- orphans: groups of ended Train runs that hold resources and no live actor
    def is_train_group(self, group: GroupInfo) -> bool:
        s = self.settings
        return (group.id in self.ended_groups
                or (s.train_bundle is not None and len(group.bundles) == s.train_workers
                    and all(b == s.train_bundle for b in group.bundles)))

    def orphans(self, now: float) -> list[GroupInfo]:
        found = []
        seen = set()
        for group in job_groups():
            if group.has_live_actor or group.id in self.running_groups or not self.is_train_group(group):
                continue
            seen.add(group.id)
            since = self.unowned_since.setdefault(group.id, now)
            if now - since >= self.settings.orphan_grace_s:
                found.append(group)
        self.unowned_since = {k: v for k, v in self.unowned_since.items() if k in seen}
        return found

    # -- the watchdog
    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if now - self.last_check < self.settings.check_every_s:
            return
        self.last_check = now
        pending = [t for t in trials if t.status == Trial.PENDING]
        running = [t for t in trials if t.status == Trial.RUNNING]
        waited = now - self.last_start
        if not pending or len(running) >= self.settings.slots:
            self.last_start = now  # the stall clock runs only while trials wait for a free slot
            return
        if waited < min(self.settings.stall_s, self.settings.orphan_grace_s):
            return
        try:
            orphans = self.orphans(now)
        except Exception as err:  # no State API (no dashboard): say so once, keep watching
            orphans = []
            if not self.state_api_failed:
                self.state_api_failed = True
                log(f"watchdog: cannot list placement groups ({type(err).__name__}: {err})")
        if waited < self.settings.stall_s:
            return
        need = pending[0].placement_group_factory.required_resources
        if orphans:
            for group in orphans:
                remove_group(group.id)
                self.ended_groups.add(group.id)
            log(f"watchdog: no trial started for {waited:.0f} s while {len(pending)} waited; removed "
                f"{len(orphans)} orphaned placement group(s) of ended Train runs, holding {describe(total(orphans))}")
            self.last_start = now
            return
        free = ray.available_resources()
        if not running and fits(need, free):
            self.failure = (f"no trial has started for {waited:.0f} s although the cluster has the resources a "
                            f"waiting trial needs ({describe(need)} of {describe(free)} free) and no trial is "
                            f"running: the run is stuck and was stopped. Check `ray status` and `ray list "
                            f"placement-groups`, then continue with {self.settings.resume_command}")
            log(f"watchdog: {self.failure}")
        elif now - self.last_wait_note >= self.settings.stall_s:
            self.last_wait_note = now
            log(f"waiting: {len(pending)} trial(s) ready, none started for {waited:.0f} s; each needs "
                f"{describe(need)}, {describe(free)} free, {len(running)} running "
                "(an autoscaler may be adding nodes; no orphaned placement groups)")

    def on_experiment_end(self, trials, **info):
        for trial in list(trials):
            self.release(trial)

    # -- Stopper
    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.failure is not None


class DropOptimizerState(Callback):
    """A trial that ended (finished, stopped by ASHA, failed) is never resumed: its checkpoints
    need no optimiser state."""

    def __init__(self, storage: str | Path):
        self.storage = storage  # the run folder, or the run's URI

    def on_trial_complete(self, iteration, trials, trial, **info):
        strip_trial(trial_location(trial), self.storage, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        strip_trial(trial_location(trial), self.storage, trial.trial_id)


def trial_location(trial) -> str | Path | None:
    """A Tune trial's folder in the run's storage: a local path or a URI."""
    path = getattr(trial, "path", None)
    if not path:
        return None
    return location_of(getattr(trial.storage, "storage_filesystem", None) or pafs.LocalFileSystem(), path)


class RunSync(Callback):
    """Uploads the run's own files (progress, Optuna history) to its bucket now and then while
    the search runs, so that a resume from another machine finds them."""

    def __init__(self, run_dir: Path, run_uri: str, every_s: float = 60.0):
        self.run_dir, self.run_uri, self.every_s = run_dir, run_uri, every_s
        self.last = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every_s:
            self.sync()

    def on_experiment_end(self, trials, **info):
        self.sync()

    def sync(self) -> None:
        self.last = time.monotonic()
        try:
            sync_run(self.run_dir, self.run_uri)
        except StorageError as err:  # the search goes on; the next sync tries again
            log(f"could not upload the run's files to {self.run_uri}: {err}")


def run_callbacks(ctx, todo: list, args) -> tuple[list[Callback], PlacementGroupWatch]:
    """The progress view, the placement-group watch and, for a run in a bucket, its uploads."""
    bundle = None
    if ctx.workers > 1:
        bundle = {"CPU": ctx.cpus_per_worker, **({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {})}
    watch = PlacementGroupWatch(WatchSettings(
        stall_s=args.stall_timeout, orphan_grace_s=min(60.0, args.stall_timeout / 2), train_bundle=bundle,
        train_workers=ctx.workers, slots=ctx.max_concurrent,
        resume_command=f"python -m distributed.tune --resume {ctx.location}"))
    progress = StudyProgress({s.key: args.trials for s in todo}, ctx.run_dir, slots=ctx.max_concurrent)
    callbacks = [progress, watch, DropOptimizerState(ctx.location)]
    if ctx.run_uri:
        callbacks.append(RunSync(ctx.run_dir, ctx.run_uri))
    return callbacks, watch
