"""Recognition of lag correlations (the weight gradient of a 1-D convolution) as one kernel group.

A lag correlation is a SUM :class:`~opgen.ir.nodes.Reduce` over a time axis ``t`` (and optionally batch axes) of
the product of two loads of the same layout, one at ``t`` and one at ``t + dilation * lag + offset`` where ``lag``
is an output axis and ``dilation`` is +-1::

    out[chan..., lag] = sum over (batch..., t) of a[..., t, ...] * b.pad[..., t + d*lag + off, ...]

Every other index of both loads is the same plain axis at the same position: an output axis (a channel) or a
reduction axis (a batch). The grad transform writes the weight gradient of ``long_conv`` in this form
(``dk[h, j] = sum_{b, t} dy[b, h, t] * u.pad[b, h, t - j]``), which is not a window reduction (both factors are
data), so :func:`~opgen.ir.passes.window.fuse_window` does not take it. A pointwise epilogue is allowed, as for
window groups. :func:`fuse_correlation` returns None for anything else.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..expr import Access, Expr, ExprOp
from ..index import affine
from ..nodes import SUM, Map, Reduce
from ..op import Op
from ..symbols import Axis, axes_in
from .window import _epilogue, _factors, _int, _padded_dims, _strip_cast


@dataclass(frozen=True)
class CorrelationGroup:
    """``reduce`` computes ``out[axes] = sum over raxes of a * b`` as described in the module doc; ``time`` is the
    summed time axis, ``lag`` the output lag axis, ``a_time_dim`` / ``b_time_dim`` their positions (the same),
    ``dilation`` +-1 and ``offset`` an axis-free expression; ``epilogue`` as in a window group."""

    op: Op
    reduce: Reduce
    out: str
    a: Access
    b: Access
    axes: tuple[Axis, ...]
    time: Axis
    lag: Axis
    time_dim: int
    dilation: int
    offset: sympy.Expr
    epilogue: Expr | None
    epilogue_maps: tuple[Map, ...]

    def describe(self) -> str:
        """One line per part (the ``fused`` stage)."""
        return (f"correlation group {self.out}: {self.reduce.out}[{', '.join(map(str, self.axes))}] = sum over "
                f"({', '.join(map(str, self.reduce.raxes))}) of {self.a.tensor}[.., {self.time}, ..] * "
                f"{self.b.tensor}[.., {self.time} + {self.dilation}*{self.lag} + {self.offset}, ..]")


def fuse_correlation(op: Op) -> CorrelationGroup | None:
    """The correlation group of an op built around one lag correlation, or None."""
    reds = [n for n in op.nodes if isinstance(n, Reduce)]
    if len(reds) != 1 or any(not isinstance(n, (Map, Reduce)) for n in op.nodes):
        return None
    red = reds[0]
    if op.nodes[0] is not red or red.monoid != SUM or red.predicate is not None:
        return None
    tail = _epilogue(op, red)
    if tail is None:
        return None
    out, epi, maps = tail
    inputs = {t.name: t for t in op.inputs}
    fs = [_strip_cast(f) for f in _factors(red.value)]
    if len(fs) != 2 or any(f.op is not ExprOp.LOAD or f.arg.tensor not in inputs for f in fs):
        return None
    if any(not inputs[f.arg.tensor].dtype.is_float for f in fs):
        return None
    out_axes, raxes = set(red.axes), set(red.raxes)
    for a, b in ((fs[0].arg, fs[1].arg), (fs[1].arg, fs[0].arg)):
        found = _match(a, b, out_axes, raxes)
        if found is not None:
            time, lag, k, d, off = found
            if _padded_dims(a):
                continue
            return CorrelationGroup(op, red, out, a, b, tuple(red.axes), time, lag, k, d, off, epi, maps)
    return None


def _match(a: Access, b: Access, out_axes: set, raxes: set) -> tuple[Axis, Axis, int, int, sympy.Expr] | None:
    """(time, lag, dim, dilation, offset) when ``a`` is plain and ``b`` the same but lagged at one dim."""
    if len(a.index) != len(b.index) or any(not isinstance(i, Axis) for i in a.index):
        return None
    if len(set(a.index)) != len(a.index):
        return None
    lagged = [k for k, (ia, ib) in enumerate(zip(a.index, b.index)) if ia != ib]
    if len(lagged) != 1:
        return None
    k = lagged[0]
    time = a.index[k]
    if time not in raxes:
        return None
    ib = sympy.sympify(b.index[k])
    lags = (axes_in(ib) - {time}) & out_axes
    if len(lags) != 1 or axes_in(ib) - {time} - lags:
        return None
    (lag,) = lags
    dec = affine(ib, {time, lag})
    if dec is None:
        return None
    coeffs, off = dec
    if _int(coeffs.get(time, 0)) != 1 or _int(coeffs.get(lag, 0)) not in (1, -1) or axes_in(off):
        return None
    if lag in a.index or set(a.index) | {lag} != out_axes | raxes:
        return None
    if any(k2 in _padded_dims(b) for k2 in range(len(b.index)) if k2 != k):
        return None
    return time, lag, k, int(coeffs[lag]), sympy.sympify(off)
