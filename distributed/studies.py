"""Many studies in one Ray Tune run: a searcher and a scheduler partitioned by study.

A study is one (model, classes) search. Every trial carries its study key in
``config["study"]``. ``StudySearcher`` keeps one searcher per study (an Optuna TPE study each, so
the results of one class never shape the samples of another) and decides which study gets a
free slot; ``StudyScheduler`` keeps one early-stopping scheduler per study (ASHA compares a
trial only with trials of its own study). Ray ships neither: both wrap Ray's own per study.

Slot order: the study with the fewest trials started so far gets the next slot, ties in the
order the studies were given (models, then classes). Each study's first trial is its paper
point, so every study evaluates the paper's setting before any study gets a second trial. A
study has at most ``max_concurrent_per_study`` trials running or pending: TPE needs finished
trials to learn from.
"""

from __future__ import annotations

import json
import math
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ensembles.run_folder import RESUME_ONLY

logger = logging.getLogger(__name__)
STUDY_KEY = "study"
# Trials of one worker reuse their Tune actor (a new Ray worker process per trial cost half
# the slot time in bench/cluster.py). To reuse it, Tune waits for the previous trial's thread,
# which a stopped trial ends only at its next report, i.e. after its current epoch; Tune's 2 s
# default would fail the next trial. Read by Tune inside this actor.
REUSE_WAIT_ENV, REUSE_WAIT_S = "TUNE_FUNCTION_THREAD_TIMEOUT_S", 24 * 3600
REDUCTION_FACTOR = 2  # ASHA keeps the best half of a rung
EPOCH_ATTR = "epoch"  # ASHA's clock: a trial's completed passes, which it reports only at validations
DEFAULT_CHECKPOINT_MINUTES = 10.0


def is_validated(result: dict) -> bool:
    """False for a resume-only report (``RESUME_ONLY``; NaN where a table row lacks it)."""
    return result.get(RESUME_ONLY) != 1


def rung_epochs(max_epochs: int, grace: int, reduction_factor: int = REDUCTION_FACTOR) -> tuple[int, ...]:
    """The epochs at which ASHA compares a study's trials: ``grace * reduction_factor**k`` below
    ``max_epochs`` (the rungs of ``ASHAScheduler``'s one bracket, same arithmetic)."""
    grace = max(1, min(grace, max_epochs))
    count = int(math.log(max_epochs / grace) / math.log(reduction_factor) + 1)
    return tuple(e for e in (grace * reduction_factor ** k for k in range(count)) if e < max_epochs)


@dataclass(frozen=True)
class ReportPlan:
    """When a trial validates (refitting what validation needs) and checkpoints: at ``rungs``
    (where the scheduler compares trials), at every multiple of ``every`` (``--eval-every``; 0:
    none) and at its last epoch. Between them, a checkpoint to resume from at most every
    ``checkpoint_minutes`` (0: never). The default validates every epoch."""

    rungs: tuple[int, ...] = ()
    every: int = 1
    checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES

    def validates(self, epoch: int, last_epoch: int) -> bool:
        """Whether the trial validates after ``epoch`` (counted from 1) of ``last_epoch``."""
        return epoch >= last_epoch or epoch in self.rungs or (self.every > 0 and epoch % self.every == 0)

    def validations(self, last_epoch: int) -> int:
        return sum(self.validates(e, last_epoch) for e in range(1, last_epoch + 1))

    def describe(self, last_epoch: int) -> str:
        """For the log: where a trial of ``last_epoch`` epochs validates and checkpoints."""
        epochs = [e for e in range(1, last_epoch + 1) if self.validates(e, last_epoch)]
        shown = ", ".join(map(str, epochs if len(epochs) <= 12 else epochs[:10] + ["...", epochs[-1]]))
        why = " and ".join(filter(None, ["ASHA's rungs" if self.rungs else "",
                                         f"every {self.every}" if self.every > 0 else "", "the last"]))
        resume = (f"; a checkpoint to resume from at most every {self.checkpoint_minutes:g} min between them"
                  if self.checkpoint_minutes > 0 else "")
        return f"validates and checkpoints {len(epochs)} time(s), after epoch {shown} ({why}){resume}"

    def resume_due(self, seconds_since_checkpoint: float) -> bool:
        return self.checkpoint_minutes > 0 and seconds_since_checkpoint >= 60.0 * self.checkpoint_minutes


@dataclass(frozen=True)
class Study:
    key: str
    model: str
    classes: tuple[str, ...]

    def tags(self) -> dict[str, Any]:
        """What every trial config of this study carries besides its sampled values."""
        return {STUDY_KEY: self.key, "model": self.model, "classes": list(self.classes)}


def study_of(config: dict[str, Any]) -> str:
    return config[STUDY_KEY]


@dataclass
class StudyCounts:
    started: int = 0
    live: set[str] = field(default_factory=set)


class StudySearcher(Searcher):
    """Dispatches ``suggest`` and results to one searcher per study."""

    def __init__(self, studies: list[Study], searchers: dict[str, Searcher], trials_per_study: int,
                 max_concurrent_per_study: int, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        missing = [s.key for s in studies if s.key not in searchers]
        if missing:
            raise ValueError(f"no searcher for studies {missing}")
        self.studies = list(studies)
        self.searchers = searchers
        self.trials_per_study = trials_per_study
        self.max_concurrent_per_study = max(1, max_concurrent_per_study)
        self.counts = {s.key: StudyCounts() for s in studies}
        self.trial_study: dict[str, str] = {}
        self.last_validated: dict[str, dict] = {}

    @property
    def total_trials(self) -> int:
        return self.trials_per_study * len(self.studies)

    def open_studies(self) -> list[Study]:
        """Studies that may start a trial now, in slot order."""
        ready = [s for s in self.studies if self.counts[s.key].started < self.trials_per_study
                 and len(self.counts[s.key].live) < self.max_concurrent_per_study]
        order = {s.key: i for i, s in enumerate(self.studies)}
        return sorted(ready, key=lambda s: (self.counts[s.key].started, order[s.key]))

    def is_finished(self) -> bool:
        return all(c.started >= self.trials_per_study for c in self.counts.values())

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def suggest(self, trial_id: str):
        if self.is_finished():
            return Searcher.FINISHED
        for study in self.open_studies():
            config = self.searchers[study.key].suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                continue
            counts = self.counts[study.key]
            counts.started += 1
            counts.live.add(trial_id)
            self.trial_study[trial_id] = study.key
            return {**config, **study.tags()}
        return None  # every open study is at its cap: wait for a trial to end

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        key = self.trial_study.get(trial_id)
        if key is not None and is_validated(result):
            self.last_validated[trial_id] = result
            self.searchers[key].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.trial_study.get(trial_id)
        if key is None:
            return
        self.counts[key].live.discard(trial_id)
        if result is not None and not is_validated(result):  # stopped between validations: its last score counts
            result = self.last_validated.get(trial_id)
        self.last_validated.pop(trial_id, None)
        self.searchers[key].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("last_validated", {})  # a searcher saved by an earlier version


class StudyScheduler(FIFOScheduler):
    """One early-stopping scheduler per study, made on first sight of the study by
    ``make_scheduler(study_key)``. Pending trials start in the order the searcher created them.

    Tune does not save a scheduler: on restore, each finished trial is replayed into its
    study's scheduler from the results it recorded (``result.json``), which rebuilds the rungs."""

    def __init__(self, make_scheduler: Callable[[str], TrialScheduler]):
        super().__init__()
        self.make_scheduler = make_scheduler
        self.schedulers: dict[str, TrialScheduler] = {}

    def scheduler_of(self, trial) -> TrialScheduler:
        key = study_of(trial.config)
        if key not in self.schedulers:
            self.schedulers[key] = self.make_scheduler(key)
        return self.schedulers[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric, self._mode = metric, mode
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        scheduler = self.scheduler_of(trial)
        scheduler.on_trial_add(tune_controller, trial)
        if trial.status == Trial.TERMINATED:  # restored from an interrupted run
            history = [r for r in recorded_results(trial) if is_validated(r)]
            for result in history:
                scheduler.on_trial_result(tune_controller, trial, result)
            scheduler.on_trial_complete(tune_controller, trial, history[-1] if history else {})

    def on_trial_result(self, tune_controller, trial, result) -> str:
        if not is_validated(result):
            return TrialScheduler.CONTINUE
        return self.scheduler_of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self.scheduler_of(trial).on_trial_complete(tune_controller, trial, result if is_validated(result or {}) else {})

    def on_trial_error(self, tune_controller, trial) -> None:
        self.scheduler_of(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.scheduler_of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"one scheduler per study ({len(self.schedulers)} studies)"


def recorded_results(trial) -> list[dict]:
    """The results a trial reported, from its ``result.json`` (one JSON object per line)."""
    for folder in (getattr(trial, "local_path", None), getattr(trial, "path", None)):
        path = Path(folder) / "result.json" if folder else None
        if path is not None and path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            return [json.loads(ln) for ln in lines]
    return [trial.last_result] if trial.last_result else []


# ----- the search the CLI and bench/cluster.py run -----------------------------------------
@dataclass
class SearchOptions:
    trials: int
    epochs: int | dict[str, int]
    """Maximum epochs of a trial (ASHA's max_t): one for all studies, or per study key."""
    grace_epochs: int
    search: str = "tpe"
    seed: int = 0
    max_concurrent_per_study: int | None = None
    optuna_storage: str | None = None  # a journal file: each study's Optuna history
    eval_every: int = 0
    """Validate at every multiple of this too (``--eval-every``); 0: at the rungs and the last epoch only."""
    checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES

    def grace_of(self, key: str) -> int:
        return max(1, min(self.grace_epochs, self.epochs_of(key)))

    def report_plan(self, key: str) -> ReportPlan:
        """Where study ``key``'s trials validate: ASHA's rungs (none for a random search, which
        stops no trial early), ``eval_every``, and the last epoch."""
        rungs = () if self.search == "random" else rung_epochs(self.epochs_of(key), self.grace_of(key))
        return ReportPlan(rungs, self.eval_every, self.checkpoint_minutes)

    def startup_trials(self) -> int:
        # TPE's default 10 random start-up trials would be most of a small budget
        return min(10, max(3, self.trials // 3))

    def epochs_of(self, key: str) -> int:
        return max(1, self.epochs[key] if isinstance(self.epochs, dict) else self.epochs)

    def per_study_cap(self) -> int:
        """Default cap: the random start-up trials may all run at once, later ones learn from them."""
        return max(1, min(self.trials, self.max_concurrent_per_study or self.startup_trials()))


def live_trial_limit(slots: int, fixed_by_user: bool) -> int:
    """Trials Tune keeps created at once: the slots plus a few ready to start the moment a slot
    frees (else every slot idles through a suggest-and-schedule round after each trial), unless
    the user fixed the number running (``--max-concurrent``)."""
    return slots if fixed_by_user else slots + max(1, math.ceil(slots / 4))


def optuna_storage(path: str | None):
    if path is None:
        return None
    return JournalStorage(JournalFileBackend(str(path)))


def make_search(studies: list[Study], spaces: dict[str, tuple[Callable, list[dict]]], options: SearchOptions,
                metric: str, mode: str) -> tuple[StudySearcher, TrialScheduler]:
    """The partitioned searcher and scheduler for ``studies``; ``spaces[key]`` is the study's
    define-by-run space and its points to evaluate first."""
    storage = optuna_storage(options.optuna_storage)
    searchers = {}
    for study in studies:
        space, points = spaces[study.key]
        if options.search == "random":
            sampler = optuna.samplers.RandomSampler(seed=options.seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=options.startup_trials())
        searchers[study.key] = OptunaSearch(space=space, metric=metric, mode=mode, points_to_evaluate=points,
                                            sampler=sampler, study_name=study.key, storage=storage)
    searcher = StudySearcher(studies, searchers, options.trials, options.per_study_cap(), metric, mode)
    if options.search == "random":
        return searcher, FIFOScheduler()

    def asha(key: str) -> TrialScheduler:
        # the trials report only where they validate (``SearchOptions.report_plan``): ASHA's clock
        # is their epoch, not the count of reports
        return ASHAScheduler(metric=metric, mode=mode, time_attr=EPOCH_ATTR, max_t=options.epochs_of(key),
                             reduction_factor=REDUCTION_FACTOR, grace_period=options.grace_of(key))

    return searcher, StudyScheduler(asha)
