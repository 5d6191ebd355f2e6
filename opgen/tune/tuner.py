"""The tuning loop: one Optuna study per :class:`~opgen.tune.key.StudyKey`, TPE over the knobs of a space.

:func:`tune` does, in order:

1. opens the store (:mod:`opgen.tune.store`) and creates or resumes the study named by the key;
2. marks FAIL the trials left RUNNING by a tuning process of this host that no longer exists (the journal
   has no heartbeat; notes/optuna.md section 6), so a killed run leaves nothing RUNNING once resumed;
3. enqueues, skipping configs the study already has (in any state): the space's default (so in a fresh study
   the default is trial 0), ``warm_start`` configs (these two even when infeasible: the reason is recorded),
   the problem's ``known_good()`` configs, the best configs of the nearest studies of the same op (other
   shape buckets first, then other generator, space or device versions; they are measured again, never
   copied); and when every feasible config fits in the budget, all of them (the space is then searched
   exhaustively and the run stops when it is done);
4. runs ``study.optimize`` with ``TPESampler(group=True)``; each trial asks one param per knob
   (:mod:`opgen.tune.encode`), answers a config already measured in this study from the stored result
   (user attr ``dup_of``; no measurement), rejects infeasible configs before compiling, and otherwise
   measures in the worker process (:mod:`opgen.tune.measure`);
5. returns a :class:`TuneResult`.

Every trial is COMPLETE unless the tuner itself was interrupted: its value is the time in ms, or ``inf``
with ``set_constraint("invalid", 1.0)`` for any failure, so TPE learns from failures (FAIL trials would be
invisible to it) and ``best`` never picks one. User attrs per trial: ``config``, ``status`` (a
:class:`~opgen.tune.measure.Status` value), ``reason`` (when not ok), ``time_ms`` (when ok), ``dims``,
``measure_s``, ``owner`` (host, pid), ``dup_of`` for repeats and ``source`` for enqueued configs.

Sampling: the random startup configs (the first ``STARTUP`` measured in the study) and, later, the next config
after a run of ``REPEATS_BEFORE_RANDOM`` trials that measured nothing (TPE proposing repeats or infeasible
configs) are drawn by the tuner itself, uniformly among the feasible configs not yet measured, running or queued
in the study (the enumerated space, or rejection sampling where it is too large to enumerate) by the sampler
wrapper :class:`FeasibleFirst` (user attr ``source`` ``random``): so startup trials are all feasible and distinct,
and two processes tuning one study at once measure different configs.

Budgets: ``trials`` (or ``measured``; the smaller when both) counts the configs this call measures: distinct,
feasible configs sent to the worker (a failed measurement counts; a repeat answered from the study or an
infeasible config rejected before compiling does not). The call stops early when every feasible config of the
space has been measured (``exhausted``), and in any case after ``10 x budget + 20`` trials (TPE proposing only
repeats on a space it has nearly covered). ``seconds`` is checked between trials, so a call can overrun it by one
trial (at most the measurement ``timeout``, plus a worker start). Whichever is reached first ends the call.
Trials enqueued but not reached stay WAITING in the study and run first in the next call.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from opgen.schedules.space import Space

from . import lookup
from .encode import canonical, suggest, to_params
from .key import StudyKey, bucket_distance, study_key
from .measure import MeasureOptions, Measurer, ProblemSetupError, Result, Status
from .problem import Problem, ProblemSpec, as_problem
from .store import GRACE_PERIOD, HOST, alive, describe, open_storage, owner, prepare_lock

STARTUP = 10                # random feasible configs measured in a study before TPE proposes (its n_startup)
REPEATS_BEFORE_RANDOM = 2   # after this many trials in a row that measured nothing, draw a random feasible config
REJECTION_TRIES = 2000      # random draws to find a feasible unmeasured config in a space too large to enumerate
EXHAUSTIVE_LIMIT = 4096     # enumerate spaces with at most this many configs (product of the choice counts)
EXHAUSTIVE_UNBOUNDED = 256  # with a budget in seconds only, enqueue every feasible config if there are no more
NEARBY_STUDIES = 3          # warm start: how many other studies to borrow from
NEARBY_TOP = 3              # ... and how many of each one's best configs


class TuneError(RuntimeError):
    """Tuning could not run (the problem cannot be created in the measuring process, bad arguments)."""


@dataclass
class TuneResult:
    """The outcome of one :func:`tune` call. Best and default refer to the whole study (earlier runs and
    other workers included); the counts to this call."""

    study_name: str
    storage: str
    key: StudyKey
    best_config: dict[str, Any] | None
    best_time_ms: float | None
    default_config: dict[str, Any]
    default_time_ms: float | None
    trials: int                                   # trials run by this call
    by_status: dict[str, int] = field(default_factory=dict)   # this call's trials, repeats included
    repeats: int = 0                              # trials answered from an earlier measurement
    measured: int = 0                             # configs sent to the worker by this call
    study_trials: int = 0                         # finished trials in the study after this call
    seconds: float = 0.0
    exhausted: bool = False                       # every feasible config has been measured
    feasible: int | None = None                   # feasible configs in the space (when it was enumerated)

    @property
    def speedup(self) -> float | None:
        """Default time / best time, when both are known."""
        if self.best_time_ms and self.default_time_ms:
            return self.default_time_ms / self.best_time_ms
        return None

    def summary(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g} ms"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        sp = f" ({self.speedup:.2f}x)" if self.speedup else ""
        done = (f"; stopped early: the space has {self.feasible} feasible configs and all are measured"
                if self.exhausted else "")
        return (f"{self.study_name}: best {ms(self.best_time_ms)}{sp} with {self.best_config}; default "
                f"{ms(self.default_time_ms)}; {self.measured} configs measured in {self.trials} trials in "
                f"{self.seconds:.1f} s ({counts}; {self.repeats} repeats){done}; store: {self.storage}")


# -- process identity (to fail the RUNNING trials of dead tuner processes) ---------------------------

_owner = owner
_alive = alive


def fail_stale_trials(storage: Any, study_id: int, retry: bool = True) -> int:
    """Mark FAIL the RUNNING trials whose tuner process (on this host) is gone; returns how many.

    The owner of a trial (user attr ``owner``) is written before the trial becomes RUNNING (see
    :mod:`opgen.tune.journal`); a RUNNING trial without one (a store written by an older opgen or a plain Optuna
    process) is failed once it started more than ``GRACE_PERIOD`` seconds ago. With ``retry``, the config of
    each failed trial is enqueued once more (user attr ``retry_of``), unless the trial was itself a retry: a
    config that kills its tuner twice is not tried a third time. (RDB storages do the same through their
    heartbeat; this covers the journal, which has none.) Raises :class:`TuneError` when a trial stays RUNNING."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    n = 0
    now = datetime.datetime.now()
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("owner")
        if who:
            if who.get("host") != HOST or who.get("pid") == os.getpid() or _alive(who):
                continue
            reason = f"tuner process {who.get('pid')} ended during this trial"
        else:
            started = t.datetime_start
            if started is None or (now - started).total_seconds() < GRACE_PERIOD:
                continue
            reason = f"no owner recorded and RUNNING since {started:%Y-%m-%d %H:%M:%S}"
        try:
            storage.set_trial_user_attr(t._trial_id, "status", "abandoned")
            storage.set_trial_user_attr(t._trial_id, "reason", reason)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:              # finished meanwhile by someone else
            continue
        state = storage.get_trial(t._trial_id).state
        if state == TrialState.RUNNING:
            raise TuneError(f"trial {t.number} of a dead tuner process is still RUNNING after it was marked FAIL "
                            f"in {describe(storage)}")
        n += 1
        if retry and "retry_of" not in t.user_attrs and t.params:
            import optuna

            attrs = {k: v for k, v in t.user_attrs.items() if k in ("config", "source")}
            storage.create_new_trial(study_id, template_trial=optuna.trial.create_trial(
                state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                user_attrs={**attrs, "retry_of": t.number}))
    return n


def _has_heartbeat(store: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(store)


# -- the measured-config cache -----------------------------------------------------------------------

@dataclass
class _Measured:
    number: int
    status: str
    value: float
    reason: str


class _Cache:
    """Canonical config -> first finished measurement in the study (incremental over the study's trials)."""

    def __init__(self) -> None:
        self.by_config: dict[str, _Measured] = {}
        self._seen: set[int] = set()

    def refresh(self, study: Any) -> None:
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._seen:
                continue
            self._seen.add(t.number)
            cfg, status = t.user_attrs.get("config"), t.user_attrs.get("status")
            if cfg is None or status is None or t.user_attrs.get("dup_of") is not None:
                continue
            self.by_config.setdefault(canonical(cfg), _Measured(t.number, status, float(t.value),
                                                                t.user_attrs.get("reason", "")))

    def size(self) -> int:
        return len(self._seen)

    def best(self) -> tuple[str, _Measured] | None:
        ok = [(k, m) for k, m in self.by_config.items() if m.status == Status.OK.value]
        return min(ok, key=lambda km: (km[1].value, km[1].number)) if ok else None


# -- warm start --------------------------------------------------------------------------------------

def _top_configs(storage: Any, study_id: int, k: int) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    ok = [t for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
          if t.user_attrs.get("status") == Status.OK.value and "config" in t.user_attrs]
    ok.sort(key=lambda t: t.value)
    out: list[dict[str, Any]] = []
    for t in ok:
        if t.user_attrs["config"] not in out:
            out.append(t.user_attrs["config"])
        if len(out) == k:
            break
    return out


def nearby_configs(storage: Any, key: StudyKey, space: Space) -> list[dict[str, Any]]:
    """Best configs of the nearest other studies of the same op, dtypes and target kind, valid in ``space``:
    same family (other shape buckets) by bucket distance first, then other versions or devices."""
    ranked = []
    for s in storage.get_all_studies():
        d = s.user_attrs.get("opgen.key")
        if not d or s.study_name == key.name:
            continue
        try:
            other = StudyKey.from_dict(d)
        except (KeyError, TypeError, ValueError):
            continue
        if (other.op_fingerprint, other.dtypes, other.target) != (key.op_fingerprint, key.dtypes, key.target):
            continue
        ranked.append(((other.family != key.family, bucket_distance(other.bucket, key.bucket), s.study_name),
                       s._study_id))
    out: list[dict[str, Any]] = []
    for _, sid in sorted(ranked)[:NEARBY_STUDIES]:
        for cfg in _top_configs(storage, sid, NEARBY_TOP):
            if space.infeasible(cfg) is None and cfg not in out:
                out.append(cfg)
    return out


def _space_size(space: Space) -> int:
    return math.prod(len(k.choices) for k in space.knobs)


# -- the loop ----------------------------------------------------------------------------------------

def _progress_bar(enabled: bool, total: int | None, label: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"tune {label}", unit="trial", file=sys.stderr, dynamic_ncols=True, leave=True)


def problem_key(problem: Problem | ProblemSpec, space: Space | None = None) -> StudyKey:
    """The study key :func:`tune` uses for ``problem`` (and :func:`opgen.tune.lookup.best_config` reads)."""
    problem = as_problem(problem)
    return study_key(problem.key_parts(), (space or problem.space()).fingerprint)


def open_study(problem: Problem, space: Space, key: StudyKey, store: Any, *, seed: int | None = None,
               sampler: Any = None, create: bool = True) -> Any:
    """Create (or, with ``create=False``, only load) the study of ``key`` in ``store``, record what it tunes
    (user attrs ``opgen.key``, ``opgen.family``, ``opgen.problem``, ``opgen.space``) and set its sampler:
    ``sampler`` when given, else ``TPESampler(group=True)`` seeded from ``seed`` and the study's trial count (so
    a resumed study does not replay the first run's random startup configs)."""
    import optuna

    if create:
        study = optuna.create_study(study_name=key.name, storage=store, direction="minimize", load_if_exists=True)
    else:
        study = optuna.load_study(study_name=key.name, storage=store)
    start_count = len(study.get_trials(deepcopy=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if "opgen.key" not in study.user_attrs:
            study.set_user_attr("opgen.key", key.as_dict())
            study.set_user_attr("opgen.family", key.family)
            study.set_user_attr("opgen.problem", problem.spec.as_dict())
            study.set_user_attr("opgen.space", [[k.name, list(k.choices)] for k in space.knobs])
            study.set_metric_names(["time_ms"])
        if sampler is None:
            sampler_seed = None if seed is None else (int(seed) * 1_000_003 + start_count) % (2**32)
            sampler = optuna.samplers.TPESampler(seed=sampler_seed, group=True)
        study.sampler = sampler
    return study


class Objective:
    """The trial function of a study and its after-trial callback.

    A trial asks one param per knob; a config already measured in the study is answered from the stored
    result (user attr ``dup_of``; no measurement); an infeasible config is rejected before compiling; the
    rest is measured in the worker process. Counts are of the trials this process ran."""

    def __init__(self, study: Any, problem: Problem, space: Space, measurer: Measurer, bar: Any = None) -> None:
        self.study, self.space, self.measurer, self.bar = study, space, measurer, bar
        self.spec = problem.spec
        self.dims = dict(problem.key_parts().dims)
        self.default = dict(space.default)
        self.cache = _Cache()
        self.cache.refresh(study)
        self.feasible: set[str] | None = None
        if _space_size(space) <= EXHAUSTIVE_LIMIT:
            self.feasible = {canonical(c) for c in space.enumerate()}
        self.counts: dict[str, int] = {}
        self.tally = {"repeats": 0, "measured": 0, "trials": 0}
        self.measure_budget: int | None = None        # stop once this many configs were measured
        self.max_trials: int | None = None            # ... or after this many trials
        self.rng: random.Random | None = None         # set: draw random feasible configs (see module doc)
        self._idle = 0                                # trials in a row that measured nothing
        self._counted = 0                             # measured configs seen by after_trial

    def _taken(self) -> set[str]:
        """Configs measured, running or queued in the study."""
        from optuna.trial import TrialState

        taken = set(self.cache.by_config)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
            cfg = t.user_attrs.get("config")
            if cfg is None and t.params:
                cfg = _config_from_params(self.space, t.params)
            if cfg is not None:
                taken.add(canonical(cfg))
        return taken

    def random_feasible(self) -> dict[str, Any] | None:
        """A uniformly random feasible config that is not measured, running or queued in the study, or None."""
        assert self.rng is not None
        taken = self._taken()
        if self.feasible is not None:
            left = sorted(self.feasible - taken)
            return json.loads(self.rng.choice(left)) if left else None
        for _ in range(REJECTION_TRIES):
            cfg = {k.name: self.rng.choice(k.choices) for k in self.space.knobs}
            if self.space.infeasible(cfg) is None and canonical(cfg) not in taken:
                return cfg
        return None

    def wants_random(self) -> bool:
        """Whether the next trial (not a queued one) should be a random feasible config: the study has fewer than
        ``STARTUP`` measured configs, or this process's last trials measured nothing."""
        if self.rng is None:
            return False
        measured = sum(1 for m in self.cache.by_config.values() if m.status != Status.INFEASIBLE.value)
        return measured < STARTUP or self._idle >= REPEATS_BEFORE_RANDOM

    @property
    def exhausted(self) -> bool:
        """Every feasible config of the space has a finished measurement in the study."""
        return self.feasible is not None and self.feasible <= set(self.cache.by_config)

    def __call__(self, trial: Any) -> float:
        trial.set_user_attr("owner", _owner())
        if isinstance(self.study.sampler, FeasibleFirst) and self.study.sampler.chose(trial.number):
            trial.set_user_attr("source", "random")
        cfg = suggest(trial, self.space)
        trial.set_user_attr("config", cfg)
        self.cache.refresh(self.study)
        hit = self.cache.by_config.get(canonical(cfg))
        if hit is not None:
            self.tally["repeats"] += 1
            trial.set_user_attr("dup_of", hit.number)
            _record(trial, hit.status, hit.reason, hit.value if hit.status == Status.OK.value else None)
            return hit.value
        why = self.space.infeasible(cfg)
        if why is not None:
            res = Result(Status.INFEASIBLE, reason=why)
        else:
            best = self.cache.best()
            self.tally["measured"] += 1
            try:
                res = self.measurer.measure(self.spec, cfg, best_ms=best[1].value if best else None)
            except ProblemSetupError as exc:
                raise TuneError(str(exc)) from None
        trial.set_user_attr("dims", self.dims)
        trial.set_user_attr("measure_s", round(res.seconds, 4))
        _record(trial, res.status.value, res.reason, res.time_ms)
        return res.time_ms if res.ok else math.inf

    def after_trial(self, study: Any, ft: Any) -> None:
        """Optuna callback: count, refresh the cache, update the bar, stop when the space is exhausted."""
        from optuna.trial import TrialState

        self.tally["trials"] += 1
        status = ft.user_attrs.get("status") if ft.state == TrialState.COMPLETE else ft.state.name.lower()
        self.counts[status] = self.counts.get(status, 0) + 1
        measured = self.tally["measured"] > self._counted
        self._counted = self.tally["measured"]
        self._idle = 0 if measured else self._idle + 1
        self.cache.refresh(study)
        if self.bar is not None:
            self.bar.set_postfix_str(self.progress_text(), refresh=False)
            self.bar.update(1 if measured else 0)
            if not measured:
                self.bar.refresh()
        if self.measure_budget is not None and self.tally["measured"] >= self.measure_budget:
            study.stop()
        elif self.exhausted:
            if self.bar is not None:
                self.bar.total = self.bar.n
                self.bar.refresh()
            study.stop()
        elif self.max_trials is not None and self.tally["trials"] >= self.max_trials:
            study.stop()

    def progress_text(self) -> str:
        """``best 1.2 ms, default 3.4 ms, infeasible 2 / failed 1, repeats 3`` for a progress bar (this process's
        trials; the bar itself counts measured configs)."""
        best = self.cache.best()
        d = self.cache.by_config.get(canonical(self.default))
        text = f"best {best[1].value:.4g} ms" if best else "best -"
        if d is not None and d.status == Status.OK.value:
            text += f", default {d.value:.4g} ms"
        infeasible = self.counts.get(Status.INFEASIBLE.value, 0)
        failed = sum(v for k, v in self.counts.items() if k not in (Status.OK.value, Status.INFEASIBLE.value))
        return text + f", infeasible {infeasible} / failed {failed}, repeats {self.tally['repeats']}"

    def result(self, key: StudyKey, store: Any, seconds: float) -> "TuneResult":
        """The :class:`TuneResult` of the study as it stands, with this process's counts."""
        from optuna.trial import TrialState

        self.cache.refresh(self.study)
        best = self.cache.best()
        d = self.cache.by_config.get(canonical(self.default))
        finished = self.study.get_trials(deepcopy=False,
                                         states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED))
        return TuneResult(
            study_name=key.name, storage=describe(store), key=key,
            best_config=dict(sorted(_config_of(self.study, best[1].number).items())) if best else None,
            best_time_ms=best[1].value if best else None,
            default_config=self.default,
            default_time_ms=d.value if d is not None and d.status == Status.OK.value else None,
            trials=self.tally["trials"], by_status=dict(self.counts), repeats=self.tally["repeats"],
            measured=self.tally["measured"], study_trials=len(finished), seconds=seconds, exhausted=self.exhausted,
            feasible=None if self.feasible is None else len(self.feasible))


class FeasibleFirst:
    """An Optuna sampler wrapper: a trial that is not queued, started while ``objective.wants_random()``, gets a
    uniformly random feasible config not yet measured, running or queued (:meth:`Objective.random_feasible`);
    every other trial is sampled by ``base``. Only the public sampler interface is used."""

    def __init__(self, base: Any, objective: "Objective") -> None:
        self.base, self.objective = base, objective
        self._chosen: dict[int, dict[str, Any]] = {}

    def chose(self, number: int) -> bool:
        """Whether this wrapper picked the config of trial ``number``."""
        return number in self._chosen

    def before_trial(self, study: Any, trial: Any) -> None:
        self.base.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs or not self.objective.wants_random():
            return
        cfg = self.objective.random_feasible()
        if cfg is not None:
            self._chosen[trial.number] = to_params(self.objective.space, cfg)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        if trial.number in self._chosen:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        if trial.number in self._chosen:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
        chosen = self._chosen.get(trial.number)
        if chosen is not None and name in chosen:
            return chosen[name]
        return self.base.sample_independent(study, trial, name, distribution)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._chosen.pop(trial.number, None)
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def __getattr__(self, name: str) -> Any:            # anything else a sampler offers
        return getattr(self.base, name)


def tune(problem: Problem | ProblemSpec, space: Space | None = None, *, trials: int | None = 50,
         seconds: float | None = None, measured: int | None = None, storage: Any = None, cache_dir: str | os.PathLike | None = None,
         progress: bool = True, seed: int | None = None, timeout: float = 60.0,
         warm_start: Iterable[Mapping[str, Any]] = (), measurer: Measurer | None = None,
         options: MeasureOptions | None = None, sampler: Any = None) -> TuneResult:
    """Tune ``problem`` over ``space`` (default: ``problem.space()``); see the module doc.

    ``trials`` / ``measured`` / ``seconds``: the budget of this call (whichever comes first; any may be None,
    not all): ``trials`` and ``measured`` both count distinct feasible configs measured by this call (repeats and
    infeasible configs not counted; the smaller wins), ``seconds`` the wall time.
    ``storage``: None (the embedded journal under ``cache_dir``/tune, ``cache_dir`` defaulting to
    :func:`opgen.config.from_env`'s), a URL, ``journal:PATH``, or an Optuna storage object.
    ``timeout``: seconds for build + check + time of one config (ignored when ``options`` is given).
    ``warm_start``: configs to measure early (after the default). ``measurer``: a running
    :class:`Measurer` to reuse (not closed here); by default one is started and stopped.
    ``seed``: makes the sampler reproducible (mixed with the study's trial count, so a resumed study does
    not replay the first run's random startup configs). ``sampler``: an Optuna sampler replacing TPE
    (experiments compare samplers with it).
    """
    import optuna

    if trials is None and seconds is None and measured is None:
        raise TuneError("give a budget: trials, measured configs, seconds, or several")
    for name, v in (("trials", trials), ("measured", measured)):
        if v is not None and v < 1:
            raise TuneError(f"{name} must be at least 1, got {v}")
    budgets = [v for v in (trials, measured) if v is not None]
    budget = min(budgets) if budgets else None
    t_begin = time.perf_counter()
    problem = as_problem(problem)
    space = space or problem.space()
    key = study_key(problem.key_parts(), space.fingerprint)
    if cache_dir is None and storage is None:
        from opgen.config import from_env

        cache_dir = from_env().cache_dir
    store = open_storage(storage, cache_dir=cache_dir, key=key)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    own_measurer = measurer is None
    bar = None
    try:
        with prepare_lock(store):                       # one process at a time creates and queues
            study = open_study(problem, space, key, store, seed=seed, sampler=sampler)
            if not _has_heartbeat(store):               # RDB stores fail stale trials by heartbeat
                fail_stale_trials(store, study._study_id)
            objective = Objective(study, problem, space, None)      # type: ignore[arg-type]
            enqueue_candidates(study, space, problem, key, store, warm_start, objective.cache, objective.feasible,
                               budget)
        if own_measurer:
            measurer = Measurer(options or MeasureOptions(timeout=timeout))
        objective.measurer = measurer
        objective.measure_budget = budget
        objective.max_trials = None if budget is None else 10 * budget + 20
        objective.rng = random.Random(None if seed is None else (int(seed) * 7919 + objective.cache.size()))
        objective.bar = bar = _progress_bar(progress, budget, problem.key_parts().op_name)
        try:
            if not objective.exhausted:                     # else: nothing left to measure
                study.sampler = FeasibleFirst(study.sampler, objective)
                left_s = None if seconds is None else max(seconds - (time.perf_counter() - t_begin), 1e-3)
                study.optimize(objective, n_trials=objective.max_trials, timeout=left_s,
                               callbacks=[objective.after_trial], catch=())
        finally:
            if own_measurer and measurer is not None:
                measurer.close()
    finally:
        if bar is not None:
            bar.close()
        optuna.logging.set_verbosity(verbosity)
        lookup.clear_cache()
    return objective.result(key, store, time.perf_counter() - t_begin)


def _record(trial: Any, status: str, reason: str, time_ms: float | None) -> None:
    trial.set_user_attr("status", status)
    if reason:
        trial.set_user_attr("reason", reason)
    if time_ms is not None:
        trial.set_user_attr("time_ms", time_ms)
    trial.set_constraint("invalid", 0.0 if status == Status.OK.value else 1.0)


def _config_of(study: Any, number: int) -> dict[str, Any]:
    return dict(study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
        study._study_id, number)).user_attrs["config"])


def enqueue_candidates(study: Any, space: Space, problem: Problem, key: StudyKey, store: Any,
                       warm_start: Iterable[Mapping[str, Any]], cache: _Cache, feasible: set[str] | None,
                       trials: int | None) -> None:
    """Enqueue default, warm start, known-good, nearby and (when it fits the budget) every feasible config,
    skipping configs the study already has in any state."""
    from optuna.trial import TrialState

    default = dict(space.default)
    have: set[str] = set(cache.by_config)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        if "config" in t.user_attrs:
            have.add(canonical(t.user_attrs["config"]))
        elif t.params:
            have.add(canonical(_config_from_params(space, t.params)))
    known = getattr(problem, "known_good", None)
    sources: list[tuple[str, Sequence[Mapping[str, Any]]]] = [
        ("default", [default]), ("warm_start", list(warm_start)), ("known_good", list(known() if known else [])),
        ("nearby", nearby_configs(store, key, space))]
    left = len(feasible - have) if feasible is not None else None
    if left is not None and (left <= trials if trials is not None else left <= EXHAUSTIVE_UNBOUNDED):
        sources.append(("exhaustive", list(space.enumerate())))
    for source, configs in sources:
        for cfg in configs:
            cfg = dict(cfg)
            if space.infeasible(cfg) is not None and source not in ("default", "warm_start"):   # asked for: recorded
                continue
            ck = canonical(cfg)
            if ck in have:
                continue
            have.add(ck)
            study.enqueue_trial(to_params(space, cfg), user_attrs={"source": source, "config": cfg})


def _config_from_params(space: Space, params: Mapping[str, Any]) -> dict[str, Any]:
    from .encode import params_of_space

    out = {}
    for p in params_of_space(space):
        if p.name in params:
            v = params[p.name]
            out[p.knob] = 1 << int(v) if p.kind == "log2" else v
    return out
