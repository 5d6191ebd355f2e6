"""Fixtures of the tuner tests: one warm measuring worker shared by the whole run (a fresh one costs ~2 s)."""
from __future__ import annotations

import pytest

from opgen.tune.measure import MeasureOptions, Measurer

FAST = MeasureOptions(timeout=2.0, setup_timeout=60.0, warmup=1, min_reps=3, min_time_s=0.01)


@pytest.fixture(scope="session")
def measurer():
    m = Measurer(FAST)
    yield m
    m.close()
