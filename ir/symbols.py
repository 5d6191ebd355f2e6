"""Symbolic sizes (:class:`Dim`) and loop indices (:class:`Axis`), both integer sympy symbols.

Dims are positive integers (``B, L = dims("B L")``); axes range over ``[0, extent)``. Keeping them as distinct
sympy classes lets every pass tell a size from an index by ``isinstance`` while sympy does the algebra.
"""
from __future__ import annotations

from typing import Iterable

import sympy

from .names import check_name


class Dim(sympy.Symbol):
    """A symbolic size: a positive integer bound when an op is called."""

    def __new__(cls, name: str) -> "Dim":
        check_name("dim", name)
        return super().__new__(cls, name, integer=True, positive=True)


class Axis(sympy.Symbol):
    """A loop index ranging over ``[0, extent)``; its extent is declared or inferred from the tensors it indexes."""

    def __new__(cls, name: str) -> "Axis":
        check_name("axis", name)
        return super().__new__(cls, name, integer=True, nonnegative=True)


def _names(spec: str | Iterable[str]) -> list[str]:
    names = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    for n in names:
        if not n.isidentifier():
            raise ValueError(f"symbol name {n!r} is not a Python identifier")
    return names


def dims(spec: str | Iterable[str]) -> tuple[Dim, ...] | Dim:
    """Create dims: ``B, L = dims("B L")``; a single name returns one Dim."""
    out = tuple(Dim(n) for n in _names(spec))
    return out[0] if len(out) == 1 else out


def make_axes(spec: str | Iterable[str]) -> tuple[Axis, ...] | Axis:
    """Create axes: ``b, t = make_axes("b t")``; a single name returns one Axis."""
    out = tuple(Axis(n) for n in _names(spec))
    return out[0] if len(out) == 1 else out


def axes_in(expr: sympy.Basic) -> set[Axis]:
    """The axes occurring in a sympy expression."""
    return {s for s in expr.free_symbols if isinstance(s, Axis)}


def dims_in(expr: sympy.Basic) -> set[Dim]:
    """The dims occurring in a sympy expression."""
    return {s for s in expr.free_symbols if isinstance(s, Dim)}
