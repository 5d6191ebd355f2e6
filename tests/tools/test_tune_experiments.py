"""Experiments replayed from tables (``tools/tune_experiments.py``, a script beside the package, imported by path)
on the pure-torch cumsum problem with synthetic times: no backend, no measuring process."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from opgen.tune.encode import canonical
from opgen.tune.measure import Result, Status
from opgen.tune.testing import CumsumProblem

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from tune_experiments import (Table, TableMeasurer, TableMissError, first_within, measure_table,  # noqa: E402
                              repeatability, run_trace, summarize, transfer_experiment, trials_to_within)

BEST = {"algo": "blocked", "block": 512, "fault": "none"}      # neither the default nor the known-good config


def synthetic_ms(cfg) -> float:
    """A smooth landscape with its minimum at BEST: slower away from block 512, loop and torch penalised."""
    base = {"blocked": 1.0, "torch": 1.6, "loop": 3.0}[cfg["algo"]]
    return base * (1 + 0.25 * abs(math.log2(cfg["block"]) - 9))


class FakeMeasurer:
    def __init__(self, fail: dict | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def measure(self, spec, config, best_ms=None):
        self.calls += 1
        if self.fail is not None and dict(config) == self.fail:
            return Result(Status.COMPILE_ERROR, reason="planted")
        return Result(Status.OK, time_ms=synthetic_ms(config))


def make_table(problem: CumsumProblem, tmp_path=None) -> Table:
    path = None if tmp_path is None else tmp_path / f"t{problem.length}.json"
    return measure_table(problem, FakeMeasurer(), progress=False, path=path)


def test_measure_table_saves_resumes_and_replays(tmp_path):
    p = CumsumProblem(rows=8, length=4096)
    path = tmp_path / "table.json"
    fail = {"algo": "loop", "block": 64, "fault": "none"}
    m = FakeMeasurer(fail=fail)
    table = measure_table(p, m, progress=False, path=path)
    feasible = list(p.space().enumerate())
    assert m.calls == len(feasible) == len(table.entries) == 19
    assert table.entries[canonical(fail)] == "compile_error" and table.reasons[canonical(fail)] == "planted"
    assert table.best_config == BEST and table.best_ms == pytest.approx(1.0)
    s = table.stats()
    assert s["space_size"] == 21 and s["ok"] == 18 and s["failed"] == {"compile_error": 1}
    assert s["within_3pct"] == 1 and s["default_ms"] == pytest.approx(synthetic_ms(p.space().default))

    # keys are the tuner's canonical configs; values a time or a status
    raw = json.loads(path.read_text())
    assert canonical(BEST) in raw["entries"]
    # resumed: nothing measured again
    m2 = FakeMeasurer()
    again = measure_table(p, m2, progress=False, path=path)
    assert m2.calls == 0 and again.entries == table.entries
    # the replay space has the problem's knobs, default and feasible set
    space = Table.load(path).space()
    assert space.fingerprint == p.space().fingerprint
    assert sorted(map(canonical, space.enumerate())) == sorted(map(canonical, feasible))
    # another problem's table at the same path is refused
    with pytest.raises(ValueError):
        measure_table(CumsumProblem(rows=8, length=8192), FakeMeasurer(), progress=False, path=path)

    tm = TableMeasurer(table)
    assert tm.measure(p.spec, BEST).time_ms == pytest.approx(1.0)
    r = tm.measure(p.spec, fail)
    assert r.status is Status.COMPILE_ERROR and r.reason == "planted"
    with pytest.raises(TableMissError, match="not in the table"):
        tm.measure(p.spec, {"algo": "loop", "block": 16, "fault": "none"})      # infeasible: never measured
    assert tm.calls == 2


def test_repeatability_measures_the_fastest_again():
    p = CumsumProblem(rows=8, length=4096)
    table = make_table(p)
    m = FakeMeasurer()
    rows = repeatability(p, m, table, top=3)
    assert m.calls == 3 and json.loads(rows[0][0]) == BEST
    assert [a for _, a, _ in rows] == sorted(table.times().values())[:3]
    assert all(a == b for _, a, b in rows)


def test_passes_keep_the_least_time(tmp_path):
    p = CumsumProblem(rows=8, length=4096)
    path = tmp_path / "t.json"
    measure_table(p, FakeMeasurer(), progress=False, path=path)

    class Slower(FakeMeasurer):
        def measure(self, spec, config, best_ms=None):
            r = super().measure(spec, config)
            return Result(Status.OK, time_ms=r.time_ms * (2 if config == BEST else 0.5))
    m = Slower()
    t = measure_table(p, m, progress=False, path=path, passes=3)
    assert m.calls == 2 * 19 and t.passes == 3
    assert t.entries[canonical(BEST)] == pytest.approx(1.0)                  # the least of 1, 2, 2
    default = canonical(p.space().default)
    assert t.entries[default] == pytest.approx(0.5 * synthetic_ms(p.space().default))
    assert Table.load(path).samples[default] == t.samples[default] and len(t.samples[default]) == 3
    assert t.stats()["noise_median"] == pytest.approx(2.0)
    assert measure_table(p, FakeMeasurer(), progress=False, path=path, passes=3).passes == 3


def test_first_within_and_summary():
    assert first_within([5.0, math.inf, 3.0, 1.0], 3.0) == 3
    assert first_within([5.0, 4.0], 3.0) is None
    s = summarize([1, 3, None, 5], budget=10)
    assert s["reached"] == 3 and s["max"] == 11 and s["median"] == 4.0


def test_trials_to_within_replays_the_real_tuner():
    table = make_table(CumsumProblem(rows=8, length=4096))
    budget = 12                                    # < 19 feasible: no exhaustive enqueueing
    info: dict = {}
    trace = run_trace(table.problem(), table, seed=0, budget=budget, info=info)
    # the budget counts measured configs: repeats and infeasible trials come on top
    assert info["measured"] == budget == sum(info["measured_flags"]) and len(trace) == budget + info["repeats"] + \
        info["by_status"].get("infeasible", 0)
    assert trace[0] == pytest.approx(synthetic_ms({"algo": "blocked", "block": 64}))    # trial 1: the default
    assert trace[1] == pytest.approx(synthetic_ms({"algo": "torch", "block": 64}))      # then known_good

    for sampler in ("tpe", "random"):
        eff = trials_to_within(table, sampler=sampler, seeds=range(4), budget=budget, tol=0.03)
        assert len(eff.counts) == 4 and eff.target_ms == pytest.approx(1.03)
        for c, final, m in zip(eff.counts, eff.final_ratio, eff.measurements):
            assert c is None or 3 <= c              # neither the default nor known_good is within 3%
            assert (c is not None) == (final <= 1.03)
            assert (m is None) == (c is None) and (m is None or 3 <= m <= min(c, budget))
        assert eff.summary["n"] == 4
    # a tolerance everything meets is met by trial 1 (the default), for both samplers
    for sampler in ("tpe", "random"):
        assert trials_to_within(table, sampler=sampler, seeds=range(3), budget=5, tol=10.0).counts == [1, 1, 1]
    # the problem itself (its own space check) gives the same answer as the replayed table
    p = CumsumProblem(rows=8, length=4096)
    assert (trials_to_within(p, table, seeds=[1], budget=budget).counts
            == trials_to_within(table, seeds=[1], budget=budget).counts)
    with pytest.raises(ValueError, match="exhaustive"):
        trials_to_within(table, seeds=[0], budget=19)


def test_warm_start_reaches_the_transferred_best_at_once():
    table_a = make_table(CumsumProblem(rows=8, length=4096))
    table_b = make_table(CumsumProblem(rows=8, length=16384))      # another shape bucket, same best config
    assert table_a.best_config == table_b.best_config == BEST
    t = transfer_experiment(table_a, table_b, seeds=range(4), budget=10, budget_a=18, tol=0.05)
    # trial 1 default, 2 known_good, then A's best configs re-measured from B's table: where A's run found
    # BEST, it is trial 3 at B
    found = [r == 1.0 for r in t.a_best_at_b]
    assert sum(found) >= 3
    assert [c == 3 for c in t.warm_counts_exh] == found
    assert [canonical(n[0]) == canonical(BEST) for n in t.nearby] == found
    assert t.exhaustive_best_ms == pytest.approx(1.0)
    assert all(c is None or c >= 3 for c in t.cold_counts_exh)
    assert [m == 3 for m in t.warm_measurements] == [c == 3 for c in t.warm_counts]
    assert t.cold_best_ms >= t.exhaustive_best_ms
