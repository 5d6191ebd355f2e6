"""The tuning loop on the pure-torch cumsum problem: planted failures, warm start, repeats, restarts, budgets."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from opgen.schedules.space import Knob, Space
from opgen.tune import lookup
from opgen.tune.encode import to_params
from opgen.tune.key import study_key
from opgen.tune.store import StaleLockWarning, default_store_path, open_storage
from opgen.tune.testing import CumsumProblem, sparse_space
from opgen.tune.tuner import HOST, TuneError, fail_stale_trials, nearby_configs, tune

PLANTED = {"wrong": "wrong", "compile_error": "compile_error", "segfault": "crash", "hang": "timeout",
           "infeasible": "infeasible"}


def _study(problem, cache_dir, space=None):
    key = study_key(problem.key_parts(), (space or problem.space()).fingerprint)
    store = open_storage(None, cache_dir=cache_dir, key=key)
    return optuna.load_study(study_name=key.name, storage=store), store


def test_planted_failures_are_recorded_never_chosen_and_the_tuner_survives(tmp_path, measurer):
    p = CumsumProblem(faults=True)
    planted = [{"algo": "blocked", "block": 64, "fault": f} for f in PLANTED]
    r = tune(p, trials=6, cache_dir=tmp_path, seed=0, progress=False, warm_start=planted, measurer=measurer)
    study, _ = _study(p, tmp_path)
    ts = study.get_trials(deepcopy=False)
    assert ts[0].user_attrs["source"] == "default" and ts[0].user_attrs["config"] == p.space().default
    assert ts[0].user_attrs["status"] == "ok" and ts[0].value == r.default_time_ms
    for t in ts[1:6]:
        fault = t.user_attrs["config"]["fault"]
        assert t.state == TrialState.COMPLETE and t.user_attrs["status"] == PLANTED[fault], t.user_attrs
        assert t.value == float("inf") and t.system_attrs["constraints:invalid"] == 1.0
        assert t.user_attrs["reason"]
    reasons = {t.user_attrs["config"]["fault"]: t.user_attrs["reason"] for t in ts[1:6]}
    assert reasons["wrong"].startswith("wrong result: max err")
    assert "SIGSEGV" in reasons["segfault"] and "timeout" in reasons["hang"]
    assert "planted compile error" in reasons["compile_error"]
    # default, 5 planted, known-good: 6 measured, the infeasible one rejected before compiling does not count
    assert r.trials == 7 and r.measured == 6 and sum(r.by_status.values()) == 7
    assert r.by_status["ok"] >= 2 and all(r.by_status.get(s, 0) >= 1 for s in PLANTED.values())
    assert r.best_config["fault"] == "none" and r.best_time_ms <= r.default_time_ms
    ok = [t.value for t in ts if t.user_attrs.get("status") == "ok"]
    assert r.best_time_ms == min(ok)
    assert lookup.best_config(r.key, cache_dir=tmp_path) == r.best_config
    # the measurer outlived a segfault and a hang, and still measures
    assert measurer.measure(p.spec, p.space().default).ok


def test_a_repeated_config_is_answered_from_the_study(tmp_path, measurer):
    p = CumsumProblem()
    first = tune(p, trials=2, cache_dir=tmp_path, progress=False, measurer=measurer)   # default, known-good
    study, _ = _study(p, tmp_path)
    study.enqueue_trial(to_params(p.space(), p.space().default))       # ask for the default again
    r = tune(p, trials=1, cache_dir=tmp_path, progress=False, measurer=measurer)
    t = study.get_trials(deepcopy=False)[2]
    # the repeat is answered without a measurement and does not use up the budget of one measured config
    assert r.repeats == 1 and r.measured == 1 and r.trials == 2 and t.user_attrs["dup_of"] == 0
    assert t.value == first.default_time_ms and t.user_attrs["status"] == "ok"


def test_small_space_is_searched_exhaustively_and_stops_when_done(tmp_path, measurer):
    p = CumsumProblem()
    space = Space("tiny", (Knob("algo", ("blocked", "torch")), Knob("block", (64, 128)), Knob("fault", ("none",))),
                  {"algo": "blocked", "block": 64, "fault": "none"})
    r = tune(p, space, trials=10, cache_dir=tmp_path, progress=False, measurer=measurer)
    assert r.trials == 4 and r.exhausted and r.repeats == 0 and r.by_status == {"ok": 4}
    again = tune(p, space, trials=10, cache_dir=tmp_path, progress=False, measurer=measurer)
    assert again.trials == 0 and again.best_config == r.best_config


def test_the_study_resumes_across_calls_and_stale_trials_are_failed(tmp_path, measurer):
    p = CumsumProblem()
    r1 = tune(p, trials=2, cache_dir=tmp_path, seed=1, progress=False, measurer=measurer)
    study, store = _study(p, tmp_path)
    # a trial left RUNNING by a tuner process that died
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = study.ask()
    stale.set_user_attr("owner", {"host": HOST, "pid": int(dead.stdout), "start": "0"})
    r2 = tune(p, trials=3, cache_dir=tmp_path, seed=1, progress=False, measurer=measurer)
    assert r1.trials == 2 and r2.trials == 3
    ts = study.get_trials(deepcopy=False)
    assert len(ts) == 6 and not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    gone = ts[stale.number]
    assert gone.state == TrialState.FAIL and gone.user_attrs["status"] == "abandoned"
    assert r2.study_trials == 6 and r2.best_time_ms <= r1.best_time_ms


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from opgen.tune.measure import MeasureOptions
    from opgen.tune.testing import CumsumProblem, sparse_space
    from opgen.tune.tuner import tune
    tune(CumsumProblem(faults=True), trials=3, cache_dir=sys.argv[1], progress=False,
         warm_start=[{"algo": "blocked", "block": 64, "fault": "hang"}], options=MeasureOptions(timeout=600))
""")


def _workers_of(pid: int) -> list[int]:
    """Measuring workers started by process ``pid`` (their last argument is the parent's pid)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"_worker_main" in a for a in args) and args[-2:-1] == [str(pid).encode()]:
            out.append(int(d.name))
    return out


def test_a_killed_tuner_leaves_a_readable_store_and_no_orphan(tmp_path, measurer):
    p = CumsumProblem(faults=True)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)])
    try:
        path = default_store_path(tmp_path, study_key(p.key_parts(), p.space().fingerprint))
        deadline, hanging = time.time() + 60, None
        while time.time() < deadline and hanging is None and proc.poll() is None:
            time.sleep(0.2)
            if path.exists():
                try:
                    study, _ = _study(p, tmp_path)
                except KeyError:
                    continue
                hanging = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                                if t.user_attrs.get("config", {}).get("fault") == "hang"), None)
        assert hanging is not None, "the tuner never reached the hanging config"
        assert _workers_of(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    for _ in range(50):                                      # the worker dies with its parent
        if not _workers_of(proc.pid):
            break
        time.sleep(0.1)
    assert not _workers_of(proc.pid)
    r = tune(p, trials=1, cache_dir=tmp_path, progress=False, measurer=measurer)
    study, _ = _study(p, tmp_path)
    ts = study.get_trials(deepcopy=False)
    assert ts[0].user_attrs["status"] == "ok"                             # the first run's result survived
    assert ts[hanging.number].state == TrialState.FAIL
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    assert r.trials == 1


DIE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import optuna
    from opgen.tune.store import open_storage
    store = open_storage(sys.argv[1])
    study = optuna.create_study(study_name="s", storage=store)
    study.enqueue_trial({"x": 1})
    study.ask()                     # pops the queued trial: RUNNING, before any objective code runs
    study.ask()                     # a new trial: RUNNING
    store._backend._lock.acquire()  # and dies inside an append, holding the journal lock
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_tuner_killed_right_after_starting_a_trial_and_inside_an_append(tmp_path):
    """Killed between Optuna marking a trial RUNNING and the objective's first line, and while holding the journal
    lock: the next process neither waits for the lock nor leaves those trials RUNNING."""
    path = tmp_path / f"s{time.time_ns()}.journal"
    proc = subprocess.run([sys.executable, "-c", DIE_SCRIPT, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    t0 = time.perf_counter()
    store = open_storage(str(path))
    study = optuna.load_study(study_name="s", storage=store)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING, TrialState.RUNNING]
    with pytest.warns(StaleLockWarning, match=f"released the journal lock .* left by process .*{proc.stdout.strip()}"):
        assert fail_stale_trials(store, study._study_id, retry=False) == 2
    optuna.create_study(study_name="next", storage=store)
    assert time.perf_counter() - t0 < 10                                # no 30 s wait for the dead holder's lock
    reread = optuna.load_study(study_name="s", storage=open_storage(str(path))).get_trials(deepcopy=False)
    assert [t.state for t in reread] == [TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["owner"]["pid"] for t in reread] == [int(proc.stdout)] * 2
    assert {t.user_attrs["status"] for t in reread} == {"abandoned"}


def test_budgets_in_trials_and_seconds(tmp_path, measurer):
    p = CumsumProblem(rows=8)
    r = tune(p, trials=3, seconds=100, cache_dir=tmp_path, progress=False, measurer=measurer)
    assert r.trials == 3
    for trials in (None, 1000):
        t0 = time.perf_counter()
        r = tune(p, trials=trials, seconds=0.2, cache_dir=tmp_path / str(trials), progress=False, measurer=measurer)
        elapsed = time.perf_counter() - t0
        # checked between trials: at most one trial (timeout 2 s) over; the 19 configs take longer than 0.2 s
        assert 1 <= r.trials < 19 and elapsed < 0.2 + measurer.options.timeout + 1.5


def test_a_budget_in_measured_configs(tmp_path, measurer):
    """``measured`` counts configs measured by this call: repeats answered from the study and infeasible configs
    cost nothing and do not count; ``trials`` still caps the call."""
    p = CumsumProblem(rows=8)
    r = tune(p, trials=None, measured=4, cache_dir=tmp_path, seed=0, progress=False, measurer=measurer)
    assert r.measured == 4 and r.trials == 4 + r.repeats + r.by_status.get("infeasible", 0)
    again = tune(p, trials=None, measured=3, cache_dir=tmp_path, seed=0, progress=False, measurer=measurer)
    assert again.measured == 3 and again.study_trials == r.trials + again.trials
    capped = tune(p, trials=2, measured=50, cache_dir=tmp_path, seed=0, progress=False, measurer=measurer)
    assert capped.trials == 2 and capped.measured <= 2
    with pytest.raises(TuneError, match="measured must be at least 1"):
        tune(p, trials=None, measured=0, cache_dir=tmp_path, progress=False, measurer=measurer)


def test_a_new_shape_is_warm_started_from_the_nearest_bucket(tmp_path, measurer):
    small = CumsumProblem(length=1024)
    r = tune(small, trials=4, cache_dir=tmp_path, seed=0, progress=False, measurer=measurer)
    big = CumsumProblem(length=4096)
    key = study_key(big.key_parts(), big.space().fingerprint)
    store = open_storage(None, cache_dir=tmp_path, key=key)
    assert r.best_config in nearby_configs(store, key, big.space())
    tune(big, trials=1, cache_dir=tmp_path, progress=False, measurer=measurer)
    study, _ = _study(big, tmp_path)
    assert r.best_config in [t.user_attrs["config"] for t in study.get_trials(deepcopy=False)]


def test_progress_bar_shows_the_best_time(tmp_path, measurer, capsys):
    tune(CumsumProblem(rows=4), trials=2, cache_dir=tmp_path, progress=True, measurer=measurer)
    err = capsys.readouterr().err
    assert "tune test_cumsum" in err and "best " in err and " ms" in err


@pytest.mark.gpu
def test_tuning_on_cuda_times_with_do_bench(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    r = tune(CumsumProblem(device="cuda"), trials=4, cache_dir=tmp_path, progress=False, timeout=60)
    assert r.by_status.get("ok", 0) >= 2 and r.best_time_ms > 0 and r.best_config["fault"] == "none"



def test_startup_configs_are_feasible_and_distinct_and_repeats_cost_no_budget(tmp_path, measurer):
    import random

    p, space = CumsumProblem(rows=4, length=96), sparse_space(4, 96)
    assert len(list(space.enumerate())) == 6
    r = tune(p, space, trials=4, cache_dir=tmp_path, seed=random.randrange(1 << 30), progress=False,
             measurer=measurer)
    study, _ = _study(p, tmp_path, space)
    ts = study.get_trials(deepcopy=False)
    configs = [json.dumps(t.user_attrs["config"], sort_keys=True) for t in ts]
    assert [t.user_attrs["status"] for t in ts] == ["ok"] * 4 and len(set(configs)) == 4
    assert r.measured == 4 and r.trials == 4 and r.by_status == {"ok": 4} and not r.exhausted
    assert {t.user_attrs.get("source") for t in ts[1:]} == {"random"}
    study.enqueue_trial(to_params(space, ts[1].user_attrs["config"]))      # a repeat: answered, not counted
    more = tune(p, space, trials=5, cache_dir=tmp_path, seed=1, progress=False, measurer=measurer)
    assert more.repeats == 1 and more.measured == 2 and more.exhausted       # only 2 feasible configs were left
    assert "stopped early: the space has 6 feasible configs and all are measured" in more.summary()

