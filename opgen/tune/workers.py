"""Tuning with many worker processes on one shared store (PostgreSQL across machines, or the journal on one).

Three roles, one module:

- :func:`prepare` (the coordinator, once): creates the schema and the study **before** any worker starts
  (workers creating an empty database at the same moment crash each other: notes/optuna.md section 5),
  enqueues the default, warm-start, known-good and nearby configs, and records the study's trial cap
  (user attr ``opgen.cap`` = finished trials so far + this run's budget) so every worker shares one budget.
- :func:`work` (one per GPU or core; ``opgen tune-worker``): loads the study (never creates it), then runs
  trials one at a time until the study holds ``cap`` finished trials. A worker does not start a new trial
  while finished + running trials reach the cap, but it always runs WAITING trials (retries), and before it
  leaves it waits for RUNNING trials of other workers to finish or go stale, so no trial is left RUNNING.
  Transient storage errors (a lost connection, a trial failed by others while this worker was stalled:
  ``Cannot tell a FAIL trial``) are retried with back-off; only a problem that cannot be built ends it.
- :func:`launch` (``opgen tune --workers K``): prepares, starts K ``opgen tune-worker`` processes with the
  same op, shape and store, restarts a worker that dies (up to ``max_restarts`` per slot), shows a progress
  bar of the study's finished trials, and summarizes the study when they are done.

Fault tolerance: on an RDB URL each trial keeps a heartbeat (``heartbeat`` seconds); a trial whose worker
died (SIGKILL, preemption, OOM) is failed after ``grace`` seconds by the next trial start of any worker and
re-queued once (``RetryHeartbeatStaleTrialCallback(max_retry=1)``; its retry carries system attrs
``failed_trial`` and ``retry_history``). On the journal, which has no heartbeat, a trial whose tuner process
on this host is gone is failed and re-queued at once (user attr ``retry_of``). Kernels are measured in a
child process of each worker (:mod:`opgen.tune.measure`): a config that segfaults or hangs is a recorded
trial, not a dead worker.

Data only: a worker rebuilds its problem from its own command line (op, shape, backend, dtype) and checks
that the study exists under the key it computes; nothing read from the store is imported or executed.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from opgen.schedules.space import Space

from . import lookup
from .key import StudyKey, study_key
from .measure import MeasureOptions, Measurer
from .problem import Problem, as_problem
from .store import GRACE_PERIOD, HEARTBEAT_INTERVAL, describe, open_storage, prepare_lock
from .tuner import Objective, TuneError, _config_of, enqueue_candidates, fail_stale_trials, open_study

CAP_ATTR = "opgen.cap"


@dataclass(frozen=True)
class WorkerOptions:
    """How workers share a study. ``heartbeat`` / ``grace``: seconds between heartbeats of a running trial and
    without one before the trial is failed and retried (RDB storages; keep ``grace`` above the longest
    compile + measurement). ``max_restarts``: restarts of one worker slot by :func:`launch`.
    ``max_errors``: consecutive storage errors a worker rides out before it gives up."""

    heartbeat: float = HEARTBEAT_INTERVAL
    grace: float = GRACE_PERIOD
    max_restarts: int = 2
    max_errors: int = 5
    timeout: float = 120.0


@dataclass(frozen=True)
class Prepared:
    """A study made ready for workers."""

    key: StudyKey
    storage: str
    cap: int
    finished_before: int
    enqueued: int


@dataclass
class WorkerReport:
    """What one :func:`work` call did."""

    study_name: str
    trials: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    waited_s: float = 0.0


@dataclass
class StudySummary:
    """The state of a study after a distributed run (whole study, all workers)."""

    study_name: str
    storage: str
    cap: int | None
    states: dict[str, int]
    by_status: dict[str, int]
    best_config: dict[str, Any] | None
    best_time_ms: float | None
    default_time_ms: float | None
    retried: list[int]
    restarts: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g} ms"
        sp = (f" ({self.default_time_ms / self.best_time_ms:.2f}x the default)"
              if self.best_time_ms and self.default_time_ms else "")
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(self.states.items()))
        status = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return (f"{self.study_name}: best {ms(self.best_time_ms)}{sp} with {self.best_config}; default "
                f"{ms(self.default_time_ms)}; trials: {states} (results: {status}); retried {self.retried or 'none'};"
                f" worker restarts {self.restarts}; {self.seconds:.1f} s; store: {self.storage}")


def _store(storage: Any, key: StudyKey, cache_dir: Any, options: WorkerOptions) -> Any:
    return open_storage(storage, cache_dir=cache_dir, key=key, heartbeat_interval=options.heartbeat,
                        grace_period=options.grace)


def _states(study: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def prepare(problem: Problem, space: Space | None = None, *, trials: int, storage: Any = None,
            cache_dir: Any = None, warm_start: Iterable[Mapping[str, Any]] = (),
            options: WorkerOptions = WorkerOptions()) -> Prepared:
    """Create the store's schema and the study of ``problem``, enqueue its candidates and set the cap to the
    finished trials so far plus ``trials``. Idempotent: preparing again raises the cap for a further run."""
    import optuna
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    if trials < 1:
        raise TuneError(f"trials must be at least 1, got {trials}")
    problem = as_problem(problem)
    space = space or problem.space()
    key = study_key(problem.key_parts(), space.fingerprint)
    store = _store(storage, key, cache_dir, options)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with prepare_lock(store):
            study = open_study(problem, space, key, store)
            if not is_heartbeat_enabled(store):
                fail_stale_trials(store, study._study_id)
            finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            objective = Objective(study, problem, space, measurer=None)     # type: ignore[arg-type]  (cache only)
            before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            enqueue_candidates(study, space, problem, key, store, warm_start, objective.cache, objective.feasible,
                               trials)
            enqueued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) - before
            study.set_user_attr(CAP_ATTR, finished + trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return Prepared(key, describe(store), finished + trials, finished, enqueued)


def _load(problem: Problem, space: Space, key: StudyKey, store: Any, seed: int | None) -> Any:
    try:
        return open_study(problem, space, key, store, seed=seed, create=False)
    except KeyError:
        raise TuneError(f"the study {key.name} does not exist in {describe(store)}: workers never create it (several "
                        "at once would race). Create it first with `opgen tune OP --shape ... --storage URL "
                        "--trials N --prepare-only` (or run `opgen tune ... --workers K`)") from None


def work(problem: Problem, space: Space | None = None, *, storage: Any = None, cache_dir: Any = None,
         options: WorkerOptions = WorkerOptions(), seed: int | None = None, measurer: Measurer | None = None,
         log: Callable[[str], None] | None = None) -> WorkerReport:
    """Run trials of the prepared study of ``problem`` until it holds its cap of finished trials (see module doc)."""
    import optuna
    from optuna.storages import fail_stale_trials as fail_heartbeat_stale
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    problem = as_problem(problem)
    space = space or problem.space()
    key = study_key(problem.key_parts(), space.fingerprint)
    store = _store(storage, key, cache_dir, options)
    say = log or (lambda msg: None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _load(problem, space, key, store, seed)
    cap = study.user_attrs.get(CAP_ATTR)
    if not isinstance(cap, int):
        raise TuneError(f"the study {key.name} has no trial cap ({CAP_ATTR}); prepare it with `opgen tune ... "
                        "--prepare-only`")
    own_measurer = measurer is None
    measurer = measurer or Measurer(MeasureOptions(timeout=options.timeout))
    objective = Objective(study, problem, space, measurer)
    report = WorkerReport(key.name)
    heartbeat = is_heartbeat_enabled(store)
    errors = 0
    try:
        while True:
            if heartbeat:                       # one mechanism per store: heartbeats work across hosts
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    fail_heartbeat_stale(study)
            else:
                fail_stale_trials(store, study._study_id)
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state == TrialState.COMPLETE for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            objective.cache.refresh(study)
            if objective.exhausted and not waiting:
                break
            if waiting or done + running < cap:
                try:
                    study.optimize(objective, n_trials=1, callbacks=[objective.after_trial], catch=())
                    errors = 0
                except TuneError:
                    raise
                except KeyboardInterrupt:
                    raise
                except Exception as exc:        # storage trouble; the trial was failed by others meanwhile...
                    errors += 1
                    report.errors.append(f"{type(exc).__name__}: {exc}")
                    say(f"storage error {errors}/{options.max_errors}: {type(exc).__name__}: {exc}")
                    if errors >= options.max_errors:
                        raise
                    time.sleep(min(2.0 ** errors, 30.0))
                continue
            if running:                         # others' trials: wait until they finish or go stale
                pause = min(1.0, options.heartbeat)
                time.sleep(pause)
                report.waited_s += pause
                continue
            break
    finally:
        if own_measurer:
            measurer.close()
        lookup.clear_cache()
    report.trials = objective.tally["trials"]
    report.by_status = dict(objective.counts)
    return report


def summarize(problem: Problem, space: Space | None = None, *, storage: Any = None, cache_dir: Any = None,
              options: WorkerOptions = WorkerOptions(), restarts: int = 0, seconds: float = 0.0) -> StudySummary:
    """The whole study after a run: trial states, result counts, best and default, retried trials."""
    from optuna.trial import TrialState

    from .encode import canonical

    problem = as_problem(problem)
    space = space or problem.space()
    key = study_key(problem.key_parts(), space.fingerprint)
    store = _store(storage, key, cache_dir, options)
    study = _load(problem, space, key, store, None)
    by_status: dict[str, int] = {}
    best = None
    default_ms = None
    retried: list[int] = []
    for t in study.get_trials(deepcopy=False):
        retry_of = t.system_attrs.get("failed_trial", t.user_attrs.get("retry_of"))
        if retry_of is not None and t.state == TrialState.COMPLETE:
            retried.append(int(retry_of))
        if t.state != TrialState.COMPLETE:
            continue
        status = t.user_attrs.get("status", "?")
        by_status[status] = by_status.get(status, 0) + 1
        if status == "ok" and t.value is not None and math.isfinite(t.value):
            if best is None or t.value < best.value:
                best = t
            if canonical(t.user_attrs.get("config", {})) == canonical(space.default):
                default_ms = t.value
    return StudySummary(key.name, describe(store), study.user_attrs.get(CAP_ATTR), _states(study), by_status,
                        dict(sorted(_config_of(study, best.number).items())) if best else None,
                        best.value if best else None, default_ms, sorted(retried), restarts, seconds)


# -- the supervisor ----------------------------------------------------------------------------------

def worker_command(args: Sequence[str]) -> list[str]:
    """The command line of one worker: ``python -m opgen.cli tune-worker <args>``."""
    return [sys.executable, "-m", "opgen.cli", "tune-worker", *args]


def launch(worker_args: Sequence[str], workers: int, *, options: WorkerOptions = WorkerOptions(),
           progress: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
           env: Mapping[str, str] | None = None) -> tuple[list[int], int]:
    """Run ``workers`` worker processes to completion, restarting a slot whose worker dies (by a signal or an
    unexpected exit code) up to ``options.max_restarts`` times. Exit code 2 (bad arguments) and 3 (the study
    cannot be run: missing, or its problem cannot be built) are not restarted. ``progress`` is called about
    every half second. Returns the last exit code of each slot and the number of restarts."""
    if workers < 1:
        raise TuneError(f"--workers must be at least 1, got {workers}")
    say = log or (lambda msg: None)
    cmd = worker_command(worker_args)
    child_env = dict(os.environ if env is None else env)
    procs: list[subprocess.Popen] = []
    left = [options.max_restarts] * workers
    codes: list[int | None] = [None] * workers
    restarts = 0

    def start(i: int) -> subprocess.Popen:
        return subprocess.Popen(cmd + ["--worker-index", str(i)], env=child_env, stdin=subprocess.DEVNULL)

    try:
        procs = [start(i) for i in range(workers)]
        while True:
            alive = 0
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None:
                    alive += 1
                    continue
                if codes[i] is not None:
                    continue
                if code in (0, 2, 3) or left[i] == 0:
                    codes[i] = code
                    if code != 0:
                        say(f"worker {i} (pid {p.pid}) ended with exit code {code}")
                    continue
                left[i] -= 1
                restarts += 1
                say(f"worker {i} (pid {p.pid}) {_describe(code)}; restarting it ({left[i]} restarts left)")
                procs[i] = start(i)
                alive += 1
            if progress is not None:
                progress()
            if not alive:
                break
            time.sleep(0.5)
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    return [int(c) for c in codes], restarts


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


__all__ = ["CAP_ATTR", "WorkerOptions", "Prepared", "WorkerReport", "StudySummary", "prepare", "work", "summarize",
           "launch", "worker_command"]
