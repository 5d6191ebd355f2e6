"""Tuner experiments replayed from exhaustive tables: search efficiency (TPE against random search) and
transfer (a new shape warm-started from the nearest tuned shape of the same op).

Each feasible config of a problem is measured once per pass (:func:`measure_table`; the table keeps the least
time over the passes and is saved as JSON, so an experiment can be re-run without measuring again); the
experiments then run the real :func:`opgen.tune.tuner.tune` many times with a :class:`TableMeasurer` that
answers from the table, so a seed costs a fraction of a second, not minutes, and every sampler sees the same
times (no noise between runs).

- :func:`trials_to_within`: per seed, the trial count (1-based, trial 0 = the space's default counted as
  trial 1, for every sampler) at which the best-so-far first comes within ``tol`` of the table's best;
- :func:`transfer_experiment`: tune shape A cold into a store, then shape B in that store (the tuner's
  ``nearby`` warm start enqueues A's best configs, measured again from B's table) against B in a fresh store.

``python tools/tune_experiments.py --op selective_scan --shape B=1,D=256,N=16,L=2048 --shape-b
B=1,D=512,N=16,L=2048`` measures the missing tables (under ``--table-dir``) and prints markdown tables.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from opgen.schedules.space import Knob, Space
from opgen.cli.args import parse_shape

from opgen.tune.encode import canonical
from opgen.tune.key import KeyParts
from opgen.tune.measure import Result, Status
from opgen.tune.problem import ProblemSpec

TABLE_VERSION = 1


class TableMissError(KeyError):
    """A config the table has no measurement for was asked for."""

    def __str__(self) -> str:          # KeyError quotes its argument; this is a sentence
        return str(self.args[0])


# -- the table ---------------------------------------------------------------------------------------

@dataclass
class Table:
    """Every feasible config of one problem measured (once per pass): ``entries`` maps the canonical config
    (:func:`opgen.tune.encode.canonical`) to its time in ms (the least over the passes: on a shared machine
    noise only slows a kernel down), or to a status string when no pass ran it. ``samples`` keeps every
    pass's result per config."""

    op_name: str
    dims: dict[str, int]
    key: dict[str, Any]                       # KeyParts fields (op/target fingerprints, dims, dtypes...)
    space_name: str
    knobs: list[list[Any]]                    # [[name, [choices...]], ...]
    default: dict[str, Any]
    entries: dict[str, float | str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    known_good: list[dict[str, Any]] = field(default_factory=list)   # the problem's ``known_good()``, replayed
    meta: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[float | str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.entries.items():          # a table saved before samples were kept: one pass
            self.samples.setdefault(k, [v])

    def record(self, ck: str, res: Result) -> None:
        """Add one measurement of ``ck``; ``entries`` becomes the least time so far."""
        self.samples.setdefault(ck, []).append(float(res.time_ms) if res.ok else res.status.value)
        ok = [v for v in self.samples[ck] if not isinstance(v, str)]
        if ok:
            self.entries[ck] = min(ok)
        else:
            self.entries[ck] = res.status.value
            self.reasons[ck] = res.reason[:500]

    @property
    def passes(self) -> int:
        return min((len(v) for v in self.samples.values()), default=0)

    # construction / IO
    @staticmethod
    def for_problem(problem: Any, meta: Mapping[str, Any] | None = None) -> "Table":
        parts: KeyParts = problem.key_parts()
        space: Space = problem.space()
        key = {"op_name": parts.op_name, "op_fingerprint": parts.op_fingerprint, "dims": [list(d) for d in parts.dims],
               "dtypes": list(parts.dtypes), "target": parts.target, "target_fingerprint": parts.target_fingerprint,
               "exact": sorted(parts.exact)}
        known = getattr(problem, "known_good", None)
        return Table(parts.op_name, dict(parts.dims), key, space.name, [[k.name, list(k.choices)] for k in space.knobs],
                     dict(space.default), known_good=[dict(c) for c in (known() if known else [])],
                     meta=dict(meta or {}))

    @staticmethod
    def load(path: str | os.PathLike) -> "Table":
        d = json.loads(Path(path).read_text())
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"{path}: table version {d.get('version')}, expected {TABLE_VERSION}")
        d.pop("version")
        return Table(**d)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        d = {"version": TABLE_VERSION, **self.__dict__}
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True))
        os.replace(tmp, path)

    # views
    def space(self) -> Space:
        """The knobs and default of the measured space; a config without an entry is infeasible here."""
        entries = self.entries

        def check(cfg: Mapping[str, Any]) -> str | None:
            return None if canonical(cfg) in entries else "not a feasible config of the measured table"
        return Space(self.space_name, tuple(Knob(n, tuple(c)) for n, c in self.knobs), dict(self.default), check)

    def key_parts(self) -> KeyParts:
        k = self.key
        return KeyParts.of(k["op_name"], k["op_fingerprint"], {n: v for n, v in k["dims"]}, k["dtypes"], k["target"],
                           k["target_fingerprint"], k.get("exact", ()))

    def problem(self) -> "ReplayProblem":
        return ReplayProblem(self)

    def times(self) -> dict[str, float]:
        """Canonical config -> time in ms, for the configs that ran."""
        return {k: float(v) for k, v in self.entries.items() if not isinstance(v, str)}

    @property
    def best_ms(self) -> float:
        t = self.times()
        if not t:
            raise ValueError(f"table of {self.op_name} {self.dims}: no config ran")
        return min(t.values())

    @property
    def best_config(self) -> dict[str, Any]:
        t = self.times()
        return json.loads(min(t, key=t.__getitem__))

    def within(self, tol: float, ref_ms: float | None = None) -> int:
        """How many configs are within ``tol`` (0.03 = 3%) of ``ref_ms`` (default: the best)."""
        ref = self.best_ms if ref_ms is None else ref_ms
        return sum(v <= ref * (1 + tol) for v in self.times().values())

    def stats(self) -> dict[str, Any]:
        t = sorted(self.times().values())
        failed: dict[str, int] = {}
        for v in self.entries.values():
            if isinstance(v, str):
                failed[v] = failed.get(v, 0) + 1
        space_size = math.prod(len(c) for _, c in self.knobs)
        spread = sorted(max(v) / min(v) for v in (
            [x for x in xs if not isinstance(x, str)] for xs in self.samples.values()) if len(v) > 1)
        noise = ({"noise_median": statistics.median(spread), "noise_p90": spread[int(0.9 * (len(spread) - 1))]}
                 if spread else {})
        return {"space_size": space_size, "feasible": len(self.entries), "ok": len(t), "failed": failed,
                "passes": self.passes, **noise,
                "best_ms": t[0], "median_ms": statistics.median(t), "worst_ms": t[-1],
                "within_3pct": self.within(0.03), "within_5pct": self.within(0.05),
                "default_ms": self.entries.get(canonical(self.default))}


class ReplayProblem:
    """A problem made from a table alone (no backend needed): the table's key parts, space and known-good
    configs, so :func:`tune` enqueues exactly what it would for the real problem. Only a
    :class:`TableMeasurer` can measure it (its spec names no real factory the worker could build)."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.spec = ProblemSpec("tune_experiments:_no_factory", {"op": table.op_name, "dims": table.dims})
        self._space = table.space()

    def key_parts(self) -> KeyParts:
        return self.table.key_parts()

    def known_good(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.table.known_good]

    def space(self) -> Space:
        return self._space

    def build(self, config: Mapping[str, Any]) -> Any:     # pragma: no cover - never measured for real
        raise RuntimeError("a replayed problem is measured from its table (TableMeasurer), not built")

    def reference(self) -> Any:                           # pragma: no cover
        raise RuntimeError("a replayed problem has no reference")


def _no_factory(**kwargs: Any) -> Any:
    raise RuntimeError(f"replayed problem {kwargs}: measure it with a TableMeasurer")


class TableMeasurer:
    """A measurer (``measure(spec, config, best_ms)``) answering from a :class:`Table`; ``calls`` counts them."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.calls = 0

    def measure(self, spec: Any, config: Mapping[str, Any], best_ms: float | None = None) -> Result:
        ck = canonical(config)
        v = self.table.entries.get(ck)
        if v is None:
            raise TableMissError(f"config {ck} is not in the table of {self.table.op_name} {self.table.dims} "
                                 f"({len(self.table.entries)} configs); measure it first")
        self.calls += 1
        if isinstance(v, str):
            return Result(Status(v), reason=self.table.reasons.get(ck, v))
        return Result(Status.OK, time_ms=float(v))

    def close(self) -> None:
        pass


def environment() -> dict[str, str]:
    """Versions and machine, for the record of a table."""
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for pkg in ("torch", "optuna", "apache-tvm", "tvm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        out[var] = os.environ.get(var, "")
    return out


def measure_table(problem: Any, measurer: Any, progress: bool = True, path: str | os.PathLike | None = None,
                  save_every: int = 1, passes: int = 1) -> Table:
    """Measure every feasible config of ``problem`` ``passes`` times (no early stop: ``best_ms`` is never
    passed), each pass after the previous one in a shuffled order, into a :class:`Table`. With ``path``: an
    existing table there is resumed (a config is measured only in the passes it lacks) and the table is
    saved after every ``save_every`` measurements and at the end."""
    import random

    space: Space = problem.space()
    table = Table.for_problem(problem, meta={"env": environment()})
    if path is not None and Path(path).exists():
        old = Table.load(path)
        if old.key != table.key or old.knobs != table.knobs:
            raise ValueError(f"{path} holds a table of another problem or space ({old.op_name} {old.dims})")
        table.entries, table.reasons, table.meta = old.entries, old.reasons, {**old.meta, **table.meta}
        table.samples = old.samples
    configs = list(space.enumerate())
    todo = []
    for p in range(passes):
        rest = [c for c in configs if len(table.samples.get(canonical(c), ())) <= p]
        if p:
            random.Random(p).shuffle(rest)
        todo += rest
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"table {table.op_name}", unit="config", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i, cfg in enumerate(todo):
            table.record(canonical(cfg), measurer.measure(problem.spec, cfg, best_ms=None))
            if bar is not None:
                bar.set_postfix_str(f"best {table.best_ms:.4g} ms" if table.times() else "", refresh=False)
                bar.update(1)
            if path is not None and (i + 1) % save_every == 0:
                table.save(path)
    finally:
        if bar is not None:
            bar.close()
        table.meta["measure_s"] = round(table.meta.get("measure_s", 0.0) + time.perf_counter() - t0, 1)
        if path is not None:
            table.save(path)
    return table


def repeatability(problem: Any, measurer: Any, table: Table, top: int = 10) -> list[tuple[str, float, float]]:
    """Measure the ``top`` fastest configs of ``table`` again: ``(config, table ms, new ms)`` each (how much
    of a "within 3%" is noise)."""
    t = table.times()
    out = []
    for ck in sorted(t, key=t.__getitem__)[:top]:
        res = measurer.measure(problem.spec, json.loads(ck), best_ms=None)
        out.append((ck, t[ck], float(res.time_ms) if res.ok else math.nan))
    return out


# -- replayed tuning runs ----------------------------------------------------------------------------

def _make_sampler(kind: str, seed: int) -> Any:
    """None for the tuner's own TPE (seeded by ``tune``), else an Optuna sampler."""
    import optuna

    if kind == "tpe":
        return None
    if kind == "random":    # seeded as tune() seeds TPE in a fresh study: both draw the same startup configs
        return optuna.samplers.RandomSampler(seed=(int(seed) * 1_000_003) % (2**32))
    raise ValueError(f"unknown sampler {kind!r}; expected 'tpe' or 'random'")


def _in_memory() -> Any:
    import optuna

    return optuna.storages.InMemoryStorage()


def run_trace(problem: Any, table: Table, *, sampler: str = "tpe", seed: int = 0, budget: int = 60,
              storage: Any = None, info: dict | None = None) -> list[float]:
    """One real :func:`tune` run of ``budget`` trials answered from ``table``; returns the time of every trial
    of this run in order (``inf`` for infeasible or failed configs, repeats included). ``info``, when given,
    receives ``by_status``, ``repeats`` and ``measured`` of the run's :class:`~opgen.tune.tuner.TuneResult`
    and ``measured_flags``: per trial, whether it sent a config to the measurer (not a repeat, not infeasible)."""
    import optuna

    from opgen.tune.tuner import tune

    store = storage if storage is not None else _in_memory()
    kwargs: dict[str, Any] = {}
    smp = _make_sampler(sampler, seed)
    if smp is not None:
        kwargs["sampler"] = smp
    res = tune(problem, trials=budget, storage=store, progress=False, seed=seed, measurer=TableMeasurer(table),
               **kwargs)
    if info is not None:
        info.update(by_status=dict(res.by_status), repeats=res.repeats, measured=res.measured)
    study = optuna.load_study(study_name=res.study_name, storage=store)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    trials = trials[len(trials) - res.trials:]            # this call's trials (the study may hold earlier ones)
    if info is not None:
        info["measured_flags"] = [t.user_attrs.get("dup_of") is None and t.user_attrs.get("status") not in
                                  (None, Status.INFEASIBLE.value) for t in trials]
    return [float(t.value) if t.value is not None else math.inf for t in trials]


def first_within(trace: Sequence[float], target_ms: float) -> int | None:
    """The 1-based trial count at which the best-so-far first reaches ``target_ms``, or None."""
    for i, v in enumerate(trace):
        if v <= target_ms:
            return i + 1
    return None


def summarize(counts: Sequence[int | None], budget: int) -> dict[str, Any]:
    """Median and percentiles of trial counts; a seed that never got there counts as ``budget + 1`` (so the
    median is an honest lower bound of the truth when some seeds fail)."""
    vals = sorted(budget + 1 if c is None else c for c in counts)
    def pct(p: float) -> float:
        if not vals:
            return math.nan
        k = (len(vals) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)
    return {"n": len(vals), "reached": sum(c is not None for c in counts), "median": pct(0.5), "p25": pct(0.25),
            "p75": pct(0.75), "p90": pct(0.9), "max": vals[-1] if vals else math.nan}


@dataclass
class Efficiency:
    sampler: str
    tol: float
    budget: int
    target_ms: float
    counts: list[int | None]
    final_ratio: list[float]                  # best found at the end of the budget / table best, per seed
    measured: list[int] = field(default_factory=list)     # distinct feasible configs measured, per seed
    infeasible: list[int] = field(default_factory=list)   # trials spent on infeasible configs, per seed
    repeats: list[int] = field(default_factory=list)      # trials answered from an earlier trial, per seed
    measurements: list[int | None] = field(default_factory=list)   # configs measured up to ``counts`` (the cost)

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.counts, self.budget)


def trials_to_within(problem_or_table: Any, table: Table | None = None, sampler: str = "tpe",
                     seeds: Iterable[int] = range(10), budget: int = 60, tol: float = 0.03) -> Efficiency:
    """Per seed, the trials a fresh :func:`tune` run (in-memory store) needs before its best-so-far is within
    ``tol`` of the table's best. ``problem_or_table``: a problem (measured from ``table``) or a :class:`Table`
    (replayed alone). Trial 1 is the space's default, for every sampler."""
    problem, table = _problem_and_table(problem_or_table, table)
    n_feasible = len(table.entries)
    if budget >= n_feasible:
        raise ValueError(f"budget {budget} >= {n_feasible} feasible configs: the tuner would enumerate the space "
                         "(exhaustive enqueueing), which is no test of the sampler")
    target = table.best_ms * (1 + tol)
    eff = Efficiency(sampler, tol, budget, target, [], [])
    for s in seeds:
        info: dict[str, Any] = {}
        trace = run_trace(problem, table, sampler=sampler, seed=s, budget=budget, info=info)
        c = first_within(trace, target)
        eff.counts.append(c)
        eff.measurements.append(None if c is None else sum(info["measured_flags"][:c]))
        eff.final_ratio.append(min(trace) / table.best_ms)
        eff.measured.append(info["measured"])
        eff.infeasible.append(info["by_status"].get(Status.INFEASIBLE.value, 0))
        eff.repeats.append(info["repeats"])
    return eff


def _problem_and_table(problem_or_table: Any, table: Table | None) -> tuple[Any, Table]:
    if isinstance(problem_or_table, Table):
        return problem_or_table.problem(), problem_or_table
    if table is None:
        raise TypeError("give the table to replay")
    return problem_or_table, table


@dataclass
class Transfer:
    budget: int
    tol: float
    cold_best_ms: float                       # median over seeds of the best a cold run finds in the budget
    exhaustive_best_ms: float
    warm_counts: list[int | None]             # to within tol of cold_best_ms
    cold_counts: list[int | None]
    warm_counts_exh: list[int | None]         # to within tol of the exhaustive best
    cold_counts_exh: list[int | None]
    warm_first: list[float]                   # best of the first trials (default + nearby) / exhaustive best
    nearby: list[list[dict[str, Any]]]        # per seed: the configs the warm run borrowed from A
    a_best_at_b: list[float]                  # per seed: time at B of A's best config / exhaustive best at B
    warm_measurements: list[int | None] = field(default_factory=list)   # configs measured up to warm_counts
    cold_measurements: list[int | None] = field(default_factory=list)


def transfer_experiment(table_a: Table, table_b: Table, *, seeds: Iterable[int] = range(5), budget: int = 50,
                        tol: float = 0.05, sampler: str = "tpe", problem_a: Any = None,
                        problem_b: Any = None, budget_a: int | None = None) -> Transfer:
    """Per seed: tune A cold (``budget`` trials, answered from ``table_a``) into a fresh store, then B in that
    store (warm: the tuner's ``nearby`` source enqueues A's best configs, measured from ``table_b``) and B in
    a fresh store (cold), both ``budget`` trials with the same seed. ``budget_a``: trials of A (default
    ``budget``)."""
    from opgen.tune import tuner as tuner_mod

    pa = problem_a or table_a.problem()
    pb = problem_b or table_b.problem()
    seeds = list(seeds)
    warm_traces, cold_traces, nearby, a_at_b, warm_flags, cold_flags = [], [], [], [], [], []
    n_near = tuner_mod.NEARBY_STUDIES * tuner_mod.NEARBY_TOP
    for s in seeds:
        store = _in_memory()
        a_trace = run_trace(pa, table_a, sampler=sampler, seed=s, budget=budget_a or budget, storage=store)
        a_best = _best_config_of_store(store, pa)
        a_at_b.append(_time_of(table_b, a_best) / table_b.best_ms if a_best else math.inf)
        assert min(a_trace) < math.inf
        near = _borrowed(store, pb)
        nearby.append(near[:n_near])
        info_w: dict[str, Any] = {}
        info_c: dict[str, Any] = {}
        warm_traces.append(run_trace(pb, table_b, sampler=sampler, seed=s, budget=budget, storage=store, info=info_w))
        cold_traces.append(run_trace(pb, table_b, sampler=sampler, seed=s, budget=budget, info=info_c))
        warm_flags.append(info_w["measured_flags"])
        cold_flags.append(info_c["measured_flags"])
    cold_best = statistics.median(min(t) for t in cold_traces)
    target, target_exh = cold_best * (1 + tol), table_b.best_ms * (1 + tol)
    k = 1 + max(len(n) for n in nearby)          # default + borrowed configs
    warm = [first_within(t, target) for t in warm_traces]
    cold = [first_within(t, target) for t in cold_traces]
    cost = lambda c, f: None if c is None else sum(f[:c])  # noqa: E731
    return Transfer(budget, tol, cold_best, table_b.best_ms, warm, cold,
                    [first_within(t, target_exh) for t in warm_traces],
                    [first_within(t, target_exh) for t in cold_traces],
                    [min(t[:k]) / table_b.best_ms for t in warm_traces], nearby, a_at_b,
                    [cost(c, f) for c, f in zip(warm, warm_flags)], [cost(c, f) for c, f in zip(cold, cold_flags)])


def _best_config_of_store(store: Any, problem: Any) -> dict[str, Any] | None:
    from opgen.tune.tuner import problem_key
    import optuna

    study = optuna.load_study(study_name=problem_key(problem).name, storage=store)
    ok = [t for t in study.get_trials(deepcopy=False) if t.value is not None and math.isfinite(t.value)]
    return dict(min(ok, key=lambda t: t.value).user_attrs["config"]) if ok else None


def _borrowed(store: Any, problem: Any) -> list[dict[str, Any]]:
    from opgen.tune.tuner import nearby_configs, problem_key

    return nearby_configs(store, problem_key(problem), problem.space())


def _time_of(table: Table, cfg: Mapping[str, Any]) -> float:
    v = table.entries.get(canonical(cfg))
    return math.inf if v is None or isinstance(v, str) else float(v)


# -- reporting ---------------------------------------------------------------------------------------

def _fmt_counts(counts: Sequence[int | None]) -> str:
    return " ".join("-" if c is None else str(c) for c in counts)


def table_markdown(name: str, table: Table) -> str:
    s = table.stats()
    d = s["default_ms"]
    dtxt = f"{d:.4g}" if isinstance(d, float) else str(d)
    failed = ", ".join(f"{k} {v}" for k, v in sorted(s["failed"].items())) or "none"
    return (f"| {name} | {s['space_size']} | {s['feasible']} | {failed} | {s['best_ms']:.4g} | {s['median_ms']:.4g} | "
            f"{s['worst_ms']:.4g} | {dtxt} | {s['within_3pct']} | {s['within_5pct']} | {s['passes']} | "
            f"{_noise(s)} |")


def _noise(s: Mapping[str, Any]) -> str:
    return f"{s['noise_median']:.3f}, {s['noise_p90']:.3f}" if "noise_median" in s else "-"


TABLE_HEADER = ("| shape | space (product) | feasible | failed | best ms | median ms | worst ms | default ms | "
                "within 3% | within 5% | passes | slowest/fastest pass per config (median, p90) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def efficiency_markdown(results: Sequence[Efficiency]) -> str:
    lines = ["| sampler | tol | reached | median trials | p25 | p75 | p90 | median measurements to get there | "
             "best/exhaustive at budget (median) | configs measured per run (median) | infeasible trials (median) | "
             "repeats (median) | trials per seed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary
        med = lambda xs: f"{statistics.median(xs):g}" if xs else "-"  # noqa: E731
        lines.append(f"| {r.sampler} | {r.tol:.0%} | {s['reached']}/{s['n']} | {s['median']:g} | {s['p25']:g} | "
                     f"{s['p75']:g} | {s['p90']:g} | {_median_cost(r)} | {statistics.median(r.final_ratio):.3f} | "
                     f"{med(r.measured)} | "
                     f"{med(r.infeasible)} | {med(r.repeats)} | {_fmt_counts(r.counts)} |")
    return "\n".join(lines)


def _median_cost(r: Efficiency) -> str:
    """Median measurements to get within tol; an unreached seed counts as every config its run measured + 1."""
    vals = [m if m is not None else n + 1 for m, n in zip(r.measurements, r.measured)]
    return f"{statistics.median(vals):g}" if vals else "-"


def transfer_markdown(t: Transfer) -> str:
    sw, sc = summarize(t.warm_counts, t.budget), summarize(t.cold_counts, t.budget)
    swe, sce = summarize(t.warm_counts_exh, t.budget), summarize(t.cold_counts_exh, t.budget)
    goal = max(1, int(0.2 * t.budget))
    lines = [f"cold-tuned best at B (median over seeds of the cold run's best after {t.budget} trials): "
             f"{t.cold_best_ms:.4g} ms; exhaustive best {t.exhaustive_best_ms:.4g} ms.",
             "",
             "| run | target | reached | median trials | p75 | max | <= 20% of budget | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s, c, tgt in (("warm", sw, t.warm_counts, "cold-tuned best"), ("cold", sc, t.cold_counts,
                                                                              "cold-tuned best"),
                            ("warm", swe, t.warm_counts_exh, "exhaustive best"),
                            ("cold", sce, t.cold_counts_exh, "exhaustive best")):
        ok = sum(x is not None and x <= goal for x in c)
        lines.append(f"| {name} | {tgt} +{t.tol:.0%} | {s['reached']}/{s['n']} | {s['median']:g} | {s['p75']:g} | "
                     f"{s['max']:g} | {ok}/{s['n']} (<= {goal}) | {_fmt_counts(c)} |")
    lines += ["", f"Configs measured (not repeats, not infeasible) until within {t.tol:.0%} of the cold-tuned best, "
              f"per seed: warm {_fmt_counts(t.warm_measurements)}; cold {_fmt_counts(t.cold_measurements)}.",
              "", f"A's best config run at B / exhaustive best at B, per seed: "
              f"{' '.join(f'{x:.3f}' for x in t.a_best_at_b)}; best of the warm run's default + borrowed trials / "
              f"exhaustive best: {' '.join(f'{x:.3f}' for x in t.warm_first)}; configs borrowed per seed: "
              f"{' '.join(str(len(n)) for n in t.nearby)}."]
    return "\n".join(lines)


# -- CLI ---------------------------------------------------------------------------------------------

def _table_path(table_dir: Path, op: str, dims: Mapping[str, int], backend: str) -> Path:
    return table_dir / f"{op}-{backend}-{'-'.join(f'{k}{v}' for k, v in dims.items())}.json"


def _get_table(op: str, dims: dict[str, int], backend: str, table_dir: Path, measurer: Any,
               repeat_top: int = 0, passes: int = 1) -> Table:
    path = _table_path(table_dir, op, dims, backend)
    from opgen.tune.library import LibraryProblem

    problem = LibraryProblem(op, dims, backend)
    table = measure_table(problem, measurer, progress=True, path=path, passes=passes)
    print(f"table {path}: {len(table.entries)} configs", file=sys.stderr)
    if repeat_top:
        again = repeatability(problem, measurer, table, repeat_top)
        table.meta["repeat"] = [list(r) for r in again]
        table.save(path)
    return table


def repeat_markdown(name: str, table: Table) -> str:
    rows = table.meta.get("repeat") or []
    if not rows:
        return ""
    best = table.best_ms
    lines = [f"Top {len(rows)} configs of {name} measured again (ms): table -> again (ratio)", ""]
    lines.append("; ".join(f"{a:.4g} -> {b:.4g} ({b / a:.3f})" for _, a, b in rows))
    again_best = min(b for _, _, b in rows)
    lines.append(f"\nbest of the re-measurements / table best: {again_best / best:.3f}; the table's best is "
                 f"{'still' if rows[0][2] == again_best else 'no longer'} the fastest of them.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python tools/tune_experiments.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="selective_scan")
    ap.add_argument("--shape", default="B=1,D=256,N=16,L=2048", help="shape A (search efficiency; transfer source)")
    ap.add_argument("--shape-b", default=None, help="shape B (transfer target); omit to skip the transfer run")
    ap.add_argument("--backend", default="tvm")
    ap.add_argument("--seeds", type=int, default=10, help="seeds of the search-efficiency runs")
    ap.add_argument("--transfer-seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=60, help="trials per search-efficiency run")
    ap.add_argument("--transfer-budget", type=int, default=50)
    ap.add_argument("--tol", default="0.03", help="tolerances of the search-efficiency runs, comma-separated")
    ap.add_argument("--transfer-tol", type=float, default=0.05)
    ap.add_argument("--table-dir", default="/tmp/opgen-exp-tables")
    ap.add_argument("--threads", type=int, default=1,
                    help="TVM_NUM_THREADS / OMP_NUM_THREADS of the measuring worker")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--passes", type=int, default=1, help="measure every config this many times (the least counts)")
    ap.add_argument("--repeat-top", type=int, default=0, help="measure the N fastest configs of each table again")
    args = ap.parse_args(argv)

    if args.threads:
        for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    from opgen.tune.measure import MeasureOptions, Measurer

    table_dir = Path(args.table_dir)
    dims_a = parse_shape(args.shape)
    with Measurer(MeasureOptions(timeout=args.timeout, min_reps=5, min_time_s=0.2)) as m:
        table_a = _get_table(args.op, dims_a, args.backend, table_dir, m, args.repeat_top, args.passes)
        table_b = (_get_table(args.op, parse_shape(args.shape_b), args.backend, table_dir, m, args.repeat_top,
                              args.passes) if args.shape_b else None)

    print(f"## {args.op} ({args.backend})\n")
    print(TABLE_HEADER)
    print(table_markdown(args.shape, table_a))
    if table_b is not None:
        print(table_markdown(args.shape_b, table_b))
    for name, t in ((args.shape, table_a), (args.shape_b, table_b)):
        if t is not None and args.repeat_top:
            print("\n" + repeat_markdown(name, t))
    print(f"\n### Search efficiency at {args.shape}: trials to within tol of the exhaustive best "
          f"(budget {args.budget}, {args.seeds} seeds, trial 1 = the default; a seed that never gets there counts "
          f"as {args.budget + 1})\n")
    seeds = range(args.seeds)
    res = [trials_to_within(table_a, sampler=s, seeds=seeds, budget=args.budget, tol=float(tol))
           for tol in args.tol.split(",") for s in ("tpe", "random")]
    print(efficiency_markdown(res))
    if table_b is not None:
        print(f"\n### Transfer {args.shape} -> {args.shape_b} (budget {args.transfer_budget}, "
              f"{args.transfer_seeds} seeds)\n")
        t = transfer_experiment(table_a, table_b, seeds=range(args.transfer_seeds), budget=args.transfer_budget,
                                tol=args.transfer_tol)
        print(transfer_markdown(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
