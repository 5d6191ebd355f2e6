"""Tensor parameters and the three compute node kinds: :class:`Map`, :class:`Reduce`, :class:`Scan`.

All nodes are frozen dataclasses. A compute node writes one tensor (``out``) over its ``axes``; the value it
computes reads inputs and earlier outputs through ``LOAD`` expressions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import sympy

from .dtypes import DType
from .expr import Expr, ExprOp, arg, binary
from .names import check_name
from .symbols import Axis
from .traversal import Traversal


@dataclass(frozen=True)
class TensorParam:
    """A named tensor of the op: an input, an output, or an intermediate (``kind``)."""

    name: str
    shape: tuple[sympy.Expr, ...]
    dtype: DType
    kind: str = "input"   # "input" | "output" | "temp"
    lookup: bool = False  # a table read at computed positions: its sizes never define axis extents

    def __post_init__(self) -> None:
        check_name("tensor", self.name)

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Monoid:
    """An associative combine with identity: ``combine`` is an Expr over ``ARG(0)`` (accumulator) and ``ARG(1)``.

    Backends pad ragged chains and tree reductions with ``identity``, so ``combine(identity, x) == x`` must hold
    for every x, the identity included (a log-add-exp must guard ``-inf + -inf`` with ``where``).
    """

    name: str
    identity: float
    combine: Expr

    def __post_init__(self) -> None:
        check_name("monoid", self.name)

    def __str__(self) -> str:
        return self.name


def _builtin(name: str, identity: float, op: ExprOp) -> Monoid:
    return Monoid(name, identity, binary(op, arg(0, DType.f32), arg(1, DType.f32)))


SUM = _builtin("sum", 0.0, ExprOp.ADD)
PROD = _builtin("prod", 1.0, ExprOp.MUL)
MAX = _builtin("max", -math.inf, ExprOp.MAX)
MIN = _builtin("min", math.inf, ExprOp.MIN)
BUILTIN_MONOIDS = {m.name: m for m in (SUM, PROD, MAX, MIN)}


def monoid(name: str, identity: float, combine) -> Monoid:
    """A custom monoid from a Python function of two Exprs, e.g. ``monoid("logaddexp", -inf, f)``."""
    return Monoid(name, float(identity), combine(arg(0, DType.f32), arg(1, DType.f32)))


@dataclass(frozen=True)
class Affine:
    """The affine recurrence ``h[t] = a[t] * h[t-1] + b[t]``."""

    a: Expr
    b: Expr


@dataclass(frozen=True)
class Associative:
    """A general associative recurrence ``h[t] = combine(h[t-1], value[t])`` with the monoid's identity as h[-1]."""

    monoid: Monoid
    value: Expr


@dataclass(frozen=True)
class Map:
    """``out[axes] = value``: pointwise over the output axes."""

    out: str
    axes: tuple[Axis, ...]
    value: Expr

    def exprs(self) -> tuple[Expr, ...]:
        return (self.value,)


@dataclass(frozen=True)
class Reduce:
    """``out[axes] = monoid over raxes of value`` where ``predicate`` holds (all positions if None)."""

    out: str
    axes: tuple[Axis, ...]
    raxes: tuple[Axis, ...]
    value: Expr
    monoid: Monoid
    predicate: Expr | None = None

    def exprs(self) -> tuple[Expr, ...]:
        return (self.value,) + ((self.predicate,) if self.predicate is not None else ())


@dataclass(frozen=True)
class Scan:
    """A recurrence along ``scan_axes`` visited in ``traversal`` order; other axes are independent lanes.

    ``state_axes`` name the lanes that form the recurrent state (vector / matrix states) and are reduced by a
    consumer; ``init`` is the state before the first step (zero / the monoid identity when None).
    """

    out: str
    axes: tuple[Axis, ...]
    scan_axes: tuple[Axis, ...]
    traversal: Traversal
    combine: Union[Affine, Associative]
    init: Expr | None = None
    state_axes: tuple[Axis, ...] = ()

    def exprs(self) -> tuple[Expr, ...]:
        c = self.combine
        es = (c.a, c.b) if isinstance(c, Affine) else (c.value,)
        return es + ((self.init,) if self.init is not None else ())

    @property
    def is_affine(self) -> bool:
        return isinstance(self.combine, Affine)


Node = Union[Map, Reduce, Scan]


def node_kind(n: Node) -> str:
    """``map`` / ``reduce`` / ``scan``."""
    return type(n).__name__.lower()
