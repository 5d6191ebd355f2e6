"""Recognition of lag correlations (the weight gradient of a depthwise convolution) as one kernel group.

A lag correlation is a SUM :class:`~opgen.ir.nodes.Reduce` over time axes ``t_i`` (and optionally batch axes) of
the product of two loads of the same layout, one at ``t_i`` and one at ``t_i + dilation_i * lag_i + offset_i``
in the same dims, where the ``lag_i`` are output axes and each ``dilation_i`` is +-1::

    out[chan..., lag_1, ...] = sum over (batch..., t_1, ...) of a[..., t_1, ...] * b.pad[..., t_1 + d_1*lag_1 + o_1, ...]

Every other index of both loads is the same plain axis at the same position: an output axis (a channel) or a
reduction axis (a batch). The grad transform writes the weight gradients of ``long_conv`` (``dk[h, j] =
sum_{b, t} dy[b, h, t] * u.pad[b, h, t - j]``) and of a depthwise conv2d (``dw[c, kh, kw] = sum_{n, oh, ow}
dy[n, c, oh, ow] * x.pad[n, c, oh + kh - p, ow + kw - p]``) in this form, which is not a window reduction (both
factors are data), so :func:`~opgen.ir.passes.window.fuse_window` does not take it. A pointwise epilogue is
allowed, as for window groups. :func:`fuse_correlation` returns None for anything else.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..expr import Access, Expr
from ..index import affine
from ..nodes import Map, Reduce
from ..op import Op
from ..symbols import Axis, axes_in
from .window import _int, _padded_dims, product_sum


@dataclass(frozen=True)
class CorrelationGroup:
    """``reduce`` computes ``out[axes] = sum over raxes of a * b`` as described in the module doc. Per lagged dim
    ``i`` (in dim order): ``times[i]`` the summed axis, ``lags[i]`` the output lag axis, ``dims[i]`` the position
    in both loads, ``dilations[i]`` +-1 and ``offsets[i]`` an axis-free expression; ``epilogue`` as in a
    window group."""

    op: Op
    reduce: Reduce
    out: str
    a: Access
    b: Access
    axes: tuple[Axis, ...]
    times: tuple[Axis, ...]
    lags: tuple[Axis, ...]
    dims: tuple[int, ...]
    dilations: tuple[int, ...]
    offsets: tuple[sympy.Expr, ...]
    epilogue: Expr | None
    epilogue_maps: tuple[Map, ...]

    def describe(self) -> str:
        """One line (the ``fused`` stage)."""
        lagged = ", ".join(f"{t} + {d}*{j} + {o}" for t, j, d, o in zip(self.times, self.lags, self.dilations,
                                                                         self.offsets))
        return (f"correlation group {self.out}: {self.reduce.out}[{', '.join(map(str, self.axes))}] = sum over "
                f"({', '.join(map(str, self.reduce.raxes))}) of {self.a.tensor} * {self.b.tensor} lagged at "
                f"({lagged})")


def fuse_correlation(op: Op) -> CorrelationGroup | None:
    """The correlation group of an op built around one lag correlation, or None."""
    ps = product_sum(op)
    if ps is None:
        return None
    red = ps.reduce
    out_axes, raxes = set(red.axes), set(red.raxes)
    f0, f1 = ps.factors
    for a, b in ((f0, f1), (f1, f0)):
        found = _match(a, b, out_axes, raxes)
        if found is not None and not _padded_dims(a):
            return CorrelationGroup(op, red, ps.out, a, b, tuple(red.axes), *found, ps.epilogue, ps.epilogue_maps)
    return None


def _match(a: Access, b: Access, out_axes: set, raxes: set) -> tuple[tuple, tuple, tuple, tuple, tuple] | None:
    """(times, lags, dims, dilations, offsets) when ``a`` is plain and ``b`` the same but lagged at some dims."""
    if len(a.index) != len(b.index) or any(not isinstance(i, Axis) for i in a.index):
        return None
    if len(set(a.index)) != len(a.index):
        return None
    lagged = [k for k, (ia, ib) in enumerate(zip(a.index, b.index)) if ia != ib]
    if not lagged:
        return None
    times, lags, dils, offs = [], [], [], []
    for k in lagged:
        time = a.index[k]
        if time not in raxes:
            return None
        ib = sympy.sympify(b.index[k])
        found = (axes_in(ib) - {time}) & out_axes
        if len(found) != 1 or axes_in(ib) - {time} - found:
            return None
        (lag,) = found
        dec = affine(ib, {time, lag})
        if dec is None:
            return None
        coeffs, off = dec
        if _int(coeffs.get(time, 0)) != 1 or _int(coeffs.get(lag, 0)) not in (1, -1) or axes_in(off):
            return None
        if lag in a.index or lag in lags:
            return None
        times.append(time)
        lags.append(lag)
        dils.append(int(coeffs[lag]))
        offs.append(sympy.sympify(off))
    if set(a.index) | set(lags) != out_axes | raxes:
        return None
    if any(k not in lagged for k in _padded_dims(b)):
        return None
    return tuple(times), tuple(lags), tuple(lagged), tuple(dils), tuple(offs)
