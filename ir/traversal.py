"""Traversal maps: the order in which a scan visits a grid, as index expressions.

A traversal splits the grid into independent *chains* and gives, for chain ``c`` and step ``t``, the grid
coordinates visited, plus a validity predicate for ragged chains. Scans never permute data in memory: a kernel
computes addresses from :attr:`Traversal.coords`; the reference backend gathers with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .errors import IRError

STEP = sympy.Symbol("step", integer=True, nonnegative=True)
CHAIN = sympy.Symbol("chain", integer=True, nonnegative=True)


@dataclass(frozen=True)
class Traversal:
    """``coords(chain, step)`` over a grid of ``grid`` sizes; ``chains * steps`` positions, ``valid`` masks extras."""

    name: str
    grid: tuple[sympy.Expr, ...]
    chains: sympy.Expr
    steps: sympy.Expr
    coords: tuple[sympy.Expr, ...]
    valid: sympy.Basic = sympy.true

    def __str__(self) -> str:
        return self.name


def _grid(grid) -> tuple[sympy.Expr, ...]:
    g = tuple(sympy.sympify(x) for x in grid)
    if not g:
        raise IRError("a traversal needs at least one grid dimension")
    return g


def _reverse(tr: Traversal, name: str) -> Traversal:
    rev = tr.steps - 1 - STEP
    return Traversal(name, tr.grid, tr.chains, tr.steps, tuple(c.xreplace({STEP: rev}) for c in tr.coords),
                     tr.valid.xreplace({STEP: rev}) if tr.valid is not sympy.true else sympy.true)


def row_major(grid, reverse: bool = False) -> Traversal:
    """Visit the grid in row-major order (the last dim fastest): the usual flattening of an image."""
    g = _grid(grid)
    coords, rem = [], STEP
    for k in range(len(g)):
        inner = sympy.Mul(*g[k + 1:]) if k + 1 < len(g) else sympy.Integer(1)
        coords.append(rem // inner if k + 1 < len(g) else rem)
        rem = rem % inner if k + 1 < len(g) else rem
    one_d = len(g) == 1
    tr = Traversal("forward" if one_d else "row", g, sympy.Integer(1), sympy.Mul(*g), tuple(coords))
    return _reverse(tr, "reverse" if one_d else "row_reversed") if reverse else tr


def column_major(grid, reverse: bool = False) -> Traversal:
    """Visit a 2-D grid column by column (the first dim fastest), as VMamba's transposed scan direction."""
    g = _grid(grid)
    if len(g) != 2:
        raise IRError(f"column_major traversal needs a 2-D grid, got {len(g)} dims")
    h, _ = g
    tr = Traversal("column", g, sympy.Integer(1), sympy.Mul(*g), (STEP % h, STEP // h))
    return _reverse(tr, "column_reversed") if reverse else tr


def zigzag(grid, reverse: bool = False) -> Traversal:
    """Visit a 2-D grid row by row, alternating direction (boustrophedon), as the zigzag scans of PlainMamba."""
    g = _grid(grid)
    if len(g) != 2:
        raise IRError(f"zigzag traversal needs a 2-D grid, got {len(g)} dims")
    _, w = g
    row = STEP // w
    col = sympy.Piecewise((STEP % w, sympy.Eq(row % 2, 0)), (w - 1 - STEP % w, True))
    tr = Traversal("zigzag", g, sympy.Integer(1), sympy.Mul(*g), (row, col))
    return _reverse(tr, "zigzag_reversed") if reverse else tr


def strided(grid, stride: int, reverse: bool = False) -> Traversal:
    """Atrous scan (EfficientVMamba): ``stride`` interleaved chains over the row-major flattening.

    Chain ``c`` visits flat positions ``c, c + stride, c + 2*stride, ...``; each chain is an independent
    recurrence. Chains shorter than the longest are masked by ``valid``.
    """
    g = _grid(grid)
    if int(stride) < 1:
        raise IRError(f"strided traversal needs stride >= 1, got {stride}")
    s = sympy.Integer(int(stride))
    total = sympy.Mul(*g)
    steps = (total + s - 1) // s
    pos = STEP * s + CHAIN
    base = row_major(g)
    coords = tuple(c.xreplace({STEP: pos}) for c in base.coords)
    tr = Traversal(f"strided{int(stride)}", g, s, steps, coords, sympy.Lt(pos, total))
    return _reverse(tr, f"strided{int(stride)}_reversed") if reverse else tr


def forward(length) -> Traversal:
    """The plain forward order over one axis."""
    return row_major((length,))


def backward(length) -> Traversal:
    """The reversed order over one axis."""
    return row_major((length,), reverse=True)
