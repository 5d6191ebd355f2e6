"""Golden snapshots of the printed IR (declared and verified stages) of every library op."""
from __future__ import annotations

import pytest

from opgen.library import LIBRARY


@pytest.mark.parametrize("entry", LIBRARY, ids=lambda e: e.name)
def test_printed_ir_matches_snapshot(entry, golden):
    op = entry.declare()
    golden(f"ir/{entry.name}.txt", op.pretty())
    golden(f"verified/{entry.name}.txt", op.pretty(verified=True) + f"\n  fingerprint {op.fingerprint}")
