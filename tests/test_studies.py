"""The partitioned searcher and scheduler, the progress view and the watchdog, without Ray."""

import io
import json
import pickle
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from distributed import monitor
from distributed.studies import ReportPlan, SearchOptions, Study, StudyScheduler, make_search, rung_epochs
from ensembles.run_folder import PROGRESS_FILE, RESUME_ONLY


def toy_space(trial, offset):
    trial.suggest_float("x", 0.0, 1.0)
    return {"offset": offset}


STUDIES = [Study("m-a", "m", ("a",)), Study("m-b", "m", ("b",)), Study("n-a", "n", ("a",))]


def make(trials=4, cap=2, storage=None, studies=STUDIES):
    import functools

    spaces = {s.key: (functools.partial(toy_space, offset=i), [{"x": 0.5}]) for i, s in enumerate(studies)}
    options = SearchOptions(trials=trials, epochs=4, grace_epochs=1, seed=0, max_concurrent_per_study=cap,
                            optuna_storage=storage)
    return make_search(studies, spaces, options, "val_score", "max")


def test_searcher_gives_each_study_its_paper_point_first_then_takes_turns_within_caps():
    searcher, _ = make(trials=3, cap=2)
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["study"] for c in first] == ["m-a", "m-b", "n-a"]            # one per study, in order
    assert all(c["x"] == 0.5 for c in first)                               # each study's paper point
    assert first[2]["model"] == "n" and first[2]["classes"] == ["a"] and first[2]["offset"] == 2
    second = [searcher.suggest(f"t{i}") for i in range(3, 6)]
    assert [c["study"] for c in second] == ["m-a", "m-b", "n-a"]
    assert searcher.suggest("t6") is None                                  # every study at its cap of 2
    searcher.on_trial_complete("t1", {"val_score": 0.7, "training_iteration": 1})
    assert searcher.suggest("t7")["study"] == "m-b"                        # the freed slot goes to m-b
    assert searcher.suggest("t8") is None
    for t in ("t0", "t2"):
        searcher.on_trial_complete(t, {"val_score": 0.6, "training_iteration": 1})
    assert {searcher.suggest("t9")["study"], searcher.suggest("t10")["study"]} == {"m-a", "n-a"}
    assert searcher.suggest("t11") == Searcher.FINISHED                    # 3 trials started per study


def test_each_study_keeps_its_own_optuna_history_in_the_journal(tmp_path):
    journal = tmp_path / "optuna.journal"
    searcher, _ = make(trials=4, cap=4, storage=str(journal))
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(12)}
    for trial_id, config in configs.items():
        score = config["x"] if config["study"] == "m-a" else 1 - config["x"]
        searcher.on_trial_complete(trial_id, {"val_score": score, "training_iteration": 1})
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    for study in STUDIES:
        loaded = optuna.load_study(study_name=study.key, storage=storage)
        mine = {t: c for t, c in configs.items() if c["study"] == study.key}
        assert len(loaded.trials) == 4 and len(mine) == 4
        assert sorted(t.params["x"] for t in loaded.trials) == sorted(c["x"] for c in mine.values())
        assert max(t.value for t in loaded.trials) == max(
            (c["x"] if study.key == "m-a" else 1 - c["x"]) for c in mine.values())


def test_searcher_state_survives_save_and_restore(tmp_path):
    searcher, _ = make(trials=3, cap=3)
    for i in range(4):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"val_score": 0.9, "training_iteration": 1})
    searcher.save(str(tmp_path / "s.pkl"))
    again, _ = make(trials=3, cap=3)
    again.restore(str(tmp_path / "s.pkl"))
    assert {k: c.started for k, c in again.counts.items()} == {"m-a": 2, "m-b": 1, "n-a": 1}
    assert again.counts["m-a"].live == {"t3"}
    del searcher.last_validated                    # a searcher an earlier version pickled (Tune's tuner.pkl)
    older = pickle.loads(pickle.dumps(searcher))
    older.on_trial_result("t3", result(1, 0.5))
    assert older.last_validated["t3"]["val_score"] == 0.5
    assert again.suggest("t4")["study"] == "m-b"


class FakeTrial:
    def __init__(self, trial_id, study, status=Trial.RUNNING, path=None, last_result=None):
        self.trial_id, self.config, self.status = trial_id, {"study": study}, status
        self.local_path = self.path = path
        self.last_result = last_result or {}


def result(epoch, score, report=None):
    return {"epoch": epoch, "val_score": score, "training_iteration": report or epoch}


def resume_only(epoch):
    return {"epoch": epoch, "val_score": float("-inf"), RESUME_ONLY: 1, "training_iteration": epoch}


def test_scheduler_stops_a_trial_only_against_its_own_study():
    _, scheduler = make(trials=4)
    assert isinstance(scheduler, StudyScheduler)
    good_a, bad_a, bad_b = FakeTrial("ga", "m-a"), FakeTrial("ba", "m-a"), FakeTrial("bb", "m-b")
    for trial in (good_a, bad_a, bad_b):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good_a, result(1, 0.9)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad_a, result(1, 0.3)) == TrialScheduler.STOP    # below m-a's rung
    assert scheduler.on_trial_result(None, bad_b, result(1, 0.3)) == TrialScheduler.CONTINUE  # m-b's rung is empty
    assert set(scheduler.schedulers) == {"m-a", "m-b"}


def test_scheduler_rebuilds_a_studys_rungs_from_finished_trials_on_restore(tmp_path):
    _, scheduler = make(trials=4)
    done = tmp_path / "done"
    done.mkdir()
    (done / "result.json").write_text("\n".join(json.dumps(result(e, 0.9)) for e in (1, 2, 3, 4)) + "\n")
    scheduler.on_trial_add(None, FakeTrial("old", "m-a", status=Trial.TERMINATED, path=str(done)))
    new = FakeTrial("new", "m-a")
    scheduler.on_trial_add(None, new)
    assert scheduler.on_trial_result(None, new, result(1, 0.5)) == TrialScheduler.STOP  # the old trial's rung
    other = FakeTrial("other", "m-b")
    scheduler.on_trial_add(None, other)
    assert scheduler.on_trial_result(None, other, result(1, 0.5)) == TrialScheduler.CONTINUE


@pytest.mark.parametrize("epochs,grace", [(3922, 3), (3, 1), (8, 1), (50, 3), (27, 3), (1, 1), (9, 3), (1000, 7),
                                          (5, 10)])
def test_trials_validate_exactly_at_the_rungs_of_the_scheduler_the_search_builds(epochs, grace):
    _, scheduler = make_search([Study("m-a", "m", ("a",))], {"m-a": (lambda t: None, [])},
                               SearchOptions(trials=2, epochs=epochs, grace_epochs=grace), "val_score", "max")
    asha = scheduler.scheduler_of(FakeTrial("t", "m-a"))
    milestones = sorted(m for m, _ in asha._brackets[0]._rungs if m < epochs)  # noqa: SLF001 -- Ray's own rungs
    assert list(rung_epochs(epochs, grace)) == milestones
    plan = SearchOptions(trials=2, epochs=epochs, grace_epochs=grace).report_plan("m-a")
    assert [e for e in range(1, epochs + 1) if plan.validates(e, epochs)] == milestones + [epochs]


def test_a_report_plan_adds_eval_every_and_a_random_search_validates_at_the_end_only():
    plan = SearchOptions(trials=2, epochs=20, grace_epochs=2, eval_every=5).report_plan("k")
    assert [e for e in range(1, 21) if plan.validates(e, 20)] == [2, 4, 5, 8, 10, 15, 16, 20]
    random = SearchOptions(trials=2, epochs=20, grace_epochs=2, search="random").report_plan("k")
    assert random.validations(20) == 1 and ReportPlan().validations(20) == 20     # the default: every epoch
    assert ReportPlan(checkpoint_minutes=1.0).resume_due(61.0) and not ReportPlan(checkpoint_minutes=1.0).resume_due(59.0)
    assert not ReportPlan(checkpoint_minutes=0).resume_due(1e9)
    assert "after epoch 2, 4, 5, 8, 10, 15, 16, 20 (ASHA's rungs and every 5 and the last)" in plan.describe(20)


def test_resume_only_reports_neither_stop_a_trial_nor_reach_its_searcher():
    searcher, scheduler = make(trials=4)
    good, bad = FakeTrial("good", "m-a"), FakeTrial("bad", "m-a")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    assert searcher.suggest("good")["study"] == "m-a"
    assert scheduler.on_trial_result(None, good, result(1, 0.9)) == TrialScheduler.CONTINUE
    # -inf at a rung would stop the trial if ASHA saw it
    assert scheduler.on_trial_result(None, bad, resume_only(1)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, result(1, 0.3)) == TrialScheduler.STOP
    searcher.on_trial_result("good", result(1, 0.9))
    searcher.on_trial_result("good", resume_only(2))
    searcher.on_trial_complete("good", resume_only(3))           # stopped between validations
    told = searcher.searchers["m-a"]._ot_study.trials[0]        # noqa: SLF001 -- what Optuna was told
    assert told.value == 0.9 and told.intermediate_values == {1: 0.9}


def progress_trial(trial_id, study, status, epochs=0):
    return SimpleNamespace(trial_id=trial_id, config={"study": study}, status=status,
                           last_result={"epoch": epochs} if epochs else {})


def test_progress_prints_one_line_per_study_and_only_changes_in_a_log(tmp_path):
    out = io.StringIO()
    progress = monitor.StudyProgress({"m-a": 2, "m-b": 2}, tmp_path, slots=2, every_s=0.0, stream=out)
    trials = [progress_trial("1", "m-a", Trial.RUNNING), progress_trial("2", "m-b", Trial.PENDING)]
    progress.on_step_end(0, trials)
    progress.on_step_end(1, trials)                                   # nothing changed: no new block
    progress.on_trial_result(1, trials, trials[0], {"val_score": 0.8})
    trials[0].status, trials[0].last_result = Trial.TERMINATED, {"epoch": 3}
    progress.on_step_end(2, trials)
    progress.on_experiment_end(trials)
    blocks = out.getvalue().split("[tune] ")[1:]
    assert len(blocks) == 3 and "(final)" in blocks[-1]
    assert all(len(b.strip().splitlines()) == 3 for b in blocks)      # header + one line per study
    assert "m-a" in blocks[1] and "done  1/2" in blocks[1] and "best val_score 0.800" in blocks[1]
    assert "epochs 3" in blocks[1]
    summary = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert set(summary["trial_wait_s"]) == {"2"} and summary["longest_trial_wait_s"] >= 0


class WatchedTrial(SimpleNamespace):
    pass


def watched(status, need=None):
    return WatchedTrial(trial_id=str(id(object())), status=status, config={"study": "m-a"},
                        placement_group_factory=SimpleNamespace(required_resources=need or {"CPU": 1.0}))


@pytest.fixture
def fake_cluster(monkeypatch):
    state = SimpleNamespace(groups=[], removed=[], free={"CPU": 0.0}, clock=[1000.0])
    monkeypatch.setattr(monitor, "job_groups", lambda: [g for g in state.groups if g.id not in state.removed])
    monkeypatch.setattr(monitor, "remove_group", lambda gid: state.removed.append(gid) or True)
    monkeypatch.setattr(monitor.time, "time", lambda: state.clock[0])
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: dict(state.free))
    return state


def make_watch(stall=100.0, grace=30.0):
    settings = monitor.WatchSettings(stall_s=stall, orphan_grace_s=grace, check_every_s=1.0,
                                     train_bundle={"CPU": 0.9}, train_workers=2, slots=2, resume_command="RESUME")
    return monitor.PlacementGroupWatch(settings)


def step(watch, state, trials, seconds):
    for _ in range(int(seconds)):
        state.clock[0] += 1.0
        watch.on_step_end(0, trials)


def test_watchdog_removes_orphaned_train_groups_only_when_trials_stall(fake_cluster, capsys):
    state = fake_cluster
    watch = make_watch()
    state.groups = [monitor.GroupInfo("orphan", [{"CPU": 0.9}] * 2, False),       # Train-shaped, no actor
                    monitor.GroupInfo("live", [{"CPU": 0.9}] * 2, True),          # a running Train group
                    monitor.GroupInfo("tune", [{"CPU": 0.1}], False)]             # a Tune trial's own group
    running, pending = watched(Trial.RUNNING), watched(Trial.PENDING)
    step(watch, state, [running], 500)                      # long epochs, nothing waits: never fires
    step(watch, state, [running, running, pending], 500)    # every slot busy, one queued: never fires
    assert state.removed == [] and watch.failure is None
    step(watch, state, [running, pending], 99)
    assert state.removed == []                              # not yet stalled
    step(watch, state, [running, pending], 5)
    assert state.removed == ["orphan"] and watch.failure is None
    assert "removed 1 orphaned placement group(s)" in capsys.readouterr().out


def test_watchdog_reports_an_autoscaler_wait_and_stops_a_real_hang(fake_cluster, capsys):
    state = fake_cluster
    watch = make_watch()
    pending = watched(Trial.PENDING, need={"CPU": 1.0, "GPU": 1.0})
    state.free = {"CPU": 4.0}                               # no GPU yet: waiting for a node, not a hang
    step(watch, state, [pending], 400)
    assert watch.failure is None and not watch.stop_all()
    assert "waiting: 1 trial(s) ready" in capsys.readouterr().out
    state.free = {"CPU": 4.0, "GPU": 1.0}                   # the resources are there and nothing starts
    step(watch, state, [pending], 5)
    assert watch.stop_all() and "RESUME" in watch.failure and "stuck" in watch.failure


def test_watchdog_removes_each_ended_trials_reported_group(fake_cluster):
    state = fake_cluster
    watch = make_watch()
    trial = watched(Trial.RUNNING)
    watch.on_trial_result(0, [trial], trial, {"placement_group": "pg1"})
    assert "pg1" in watch.running_groups
    watch.on_trial_complete(0, [trial], trial)              # finished or stopped by ASHA alike
    assert state.removed == ["pg1"] and "pg1" in watch.ended_groups
