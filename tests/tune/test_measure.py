"""Measuring in a child process: each planted failure becomes a result with a reason; the caller survives."""
from __future__ import annotations

import pytest
import torch

from opgen.tune.measure import ProblemSetupError, Status, compare
from opgen.tune.problem import ProblemSpec
from opgen.tune.testing import CumsumProblem

SPEC = CumsumProblem(faults=True).spec


def cfg(fault="none", algo="blocked", block=64):
    return {"algo": algo, "block": block, "fault": fault}


def test_every_outcome_and_the_worker_is_replaced_after_a_crash(measurer):
    ok = measurer.measure(SPEC, cfg())
    assert ok.status is Status.OK and 0 < ok.time_ms < 1e3 and ok.reason == ""
    starts = measurer.starts

    wrong = measurer.measure(SPEC, cfg("wrong"))
    assert wrong.status is Status.WRONG and wrong.time_ms is None
    assert wrong.reason.startswith("wrong result: max err")

    bad = measurer.measure(SPEC, cfg("compile_error"))
    assert bad.status is Status.COMPILE_ERROR and "planted compile error" in bad.reason

    inf = measurer.measure(SPEC, cfg("infeasible"))
    assert inf.status is Status.INFEASIBLE and inf.reason == "planted infeasible config"
    assert measurer.starts == starts                        # none of these cost a worker

    seg = measurer.measure(SPEC, cfg("segfault"))
    assert seg.status is Status.CRASH and "SIGSEGV" in seg.reason and "Segmentation fault" in seg.reason
    assert measurer.measure(SPEC, cfg(algo="torch")).ok and measurer.starts == starts + 1   # a fresh worker
    # a hang (timeout, worker killed) is covered by the tuner test, which pays for it once


def test_a_problem_that_cannot_be_created_is_an_error_not_a_trial(measurer):
    with pytest.raises(ProblemSetupError, match="planted setup failure"):
        measurer.measure(ProblemSpec("opgen.tune.testing:make_broken"), cfg())


def test_spec_must_name_a_function():
    with pytest.raises(ValueError, match="module:function"):
        ProblemSpec("opgen.tune.testing.make_cumsum")


def test_compare():
    ref = (torch.arange(4.0), {"y": torch.ones(2)})
    assert compare((torch.arange(4.0) + 1e-7, {"y": torch.ones(2)}), ref, 1e-4, 1e-5) is None
    assert "max err 0.5" in compare((torch.arange(4.0) + 0.5, {"y": torch.ones(2)}), ref, 1e-4, 1e-5)
    assert "shape" in compare((torch.arange(3.0), {"y": torch.ones(2)}), ref, 1e-4, 1e-5)
    assert "NaN" in compare((torch.tensor([0.0, 1, 2, float("nan")]), {"y": torch.ones(2)}), ref, 1e-4, 1e-5)
    assert "outputs" in compare(torch.arange(4.0), ref, 1e-4, 1e-5)
