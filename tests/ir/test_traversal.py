"""Traversal maps visit every grid cell exactly once, in the documented order (property-based)."""
from __future__ import annotations

import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from opgen.ir import column_major, row_major, strided, zigzag
from opgen.ir.traversal import CHAIN, STEP


def _visits(tr) -> list[list[tuple[int, ...]]]:
    chains, steps = int(tr.chains), int(tr.steps)
    out = []
    for c in range(chains):
        seq = []
        for s in range(steps):
            env = {CHAIN: c, STEP: s}
            if tr.valid.subs(env) in (True, sympy.true):
                seq.append(tuple(int(x.subs(env)) for x in tr.coords))
        out.append(seq)
    return out


grids = st.tuples(st.integers(1, 6), st.integers(1, 7))


@settings(max_examples=30, deadline=None)
@given(grids, st.booleans())
def test_row_column_zigzag_are_bijections_in_order(grid, reverse):
    h, w = grid
    cells = {(r, c) for r in range(h) for c in range(w)}
    row = [(r, c) for r in range(h) for c in range(w)]
    col = [(r, c) for c in range(w) for r in range(h)]
    zig = [(r, c if r % 2 == 0 else w - 1 - c) for r in range(h) for c in range(w)]
    for make, want in ((row_major, row), (column_major, col), (zigzag, zig)):
        (seq,) = _visits(make(grid, reverse=reverse))
        assert set(seq) == cells and len(seq) == len(cells)
        assert seq == (want[::-1] if reverse else want)


@settings(max_examples=30, deadline=None)
@given(grids, st.integers(1, 5), st.booleans())
def test_strided_chains_partition_the_grid(grid, stride, reverse):
    h, w = grid
    chains = _visits(strided(grid, stride, reverse=reverse))
    assert len(chains) == stride
    flat = [r * w + c for seq in chains for r, c in seq]
    assert sorted(flat) == list(range(h * w))
    for c, seq in enumerate(chains):
        want = list(range(c, h * w, stride))
        got = [r * w + col for r, col in seq]
        assert got == (want[::-1] if reverse else want)
