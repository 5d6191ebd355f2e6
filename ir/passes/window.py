"""Recognition of window reductions (convolutions) as one kernel group (:class:`WindowGroup`).

A window reduction is a SUM :class:`~opgen.ir.nodes.Reduce` whose value is the product of two loads, a *data*
load whose indices slide over output positions (``x.pad[n, chan, oh*sh + kh*dh - pt, ow*sw + kw*dw - pl]``) and a
*weight* load indexed by plain axes (``w[co, ci, kh, kw]``), optionally followed by pointwise epilogue Maps (bias,
activation, gating with another tensor) that read the reduction at the same output point. Everything is derived
from the affine index expressions, not from the op's name:

* every output axis is a *batch* axis (a plain index of the data, absent from the weight), the *channel* axis (an
  output axis that indexes the weight) or a *spatial* axis (``out_axis*stride + win_axis*dilation + offset`` in one
  data index, with a window axis of the weight);
* the channel structure comes from the data's channel index: ``ci`` (dense), ``(co // F) * C + ci`` (grouped),
  ``co`` (depthwise), ``co // M`` (depthwise with a channel multiplier).

``fuse_window(op)`` returns None for anything else (scans, attention, plain reductions): it never raises for an op
that merely has another form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import sympy

from ..expr import Access, Expr, ExprOp, loads
from ..index import affine
from ..nodes import SUM, Map, Reduce
from ..op import Op
from ..printer import expr_str, index_str
from ..symbols import Axis, axes_in
from .fuse import inline_maps

_ZERO = sympy.Integer(0)
_ONE = sympy.Integer(1)


@dataclass(frozen=True)
class SpatialDim:
    """One sliding dimension: data index ``out_axis * stride + win_axis * dilation + offset`` at ``data_dim``.

    ``pad`` is the zero padding (lo, hi) the data access declares on that dim (reads outside the tensor give 0);
    the usual convolution has ``offset == -pad[0]``. ``dilation`` is negative for a flipped window
    (``t - j`` in a causal long convolution).
    """

    out_axis: Axis
    win_axis: Axis
    data_dim: int
    stride: int
    dilation: int
    offset: sympy.Expr
    pad: tuple[sympy.Expr, sympy.Expr]
    in_size: sympy.Expr
    out_size: sympy.Expr
    window: sympy.Expr

    def describe(self) -> str:
        """``oh <- kh: stride 2, dilation 1, offset -1, pad (1, 2), in H, out ..., window KH``."""
        return (f"{self.out_axis} <- {self.win_axis} (data dim {self.data_dim}): stride {self.stride}, dilation "
                f"{self.dilation}, offset {index_str(self.offset)}, pad ({index_str(self.pad[0])}, "
                f"{index_str(self.pad[1])}), in {index_str(self.in_size)}, out {index_str(self.out_size)}, "
                f"window {index_str(self.window)}")


@dataclass(frozen=True)
class Channels:
    """How input channels feed output channels: ``data channel = (co // out_per_group) * in_per_group + ci``.

    ``kind`` is structural: ``dense`` (data channel ``ci``), ``grouped`` (the general form), ``depthwise``
    (data channel ``co`` or ``co // M``: one input channel per output channel), ``none`` (no channel axis; the
    weight is shared by every data channel, which are batch axes then).
    """

    kind: str
    out_axis: Axis | None = None
    in_axis: Axis | None = None
    data_dim: int | None = None
    in_per_group: sympy.Expr = _ONE
    out_per_group: sympy.Expr = _ONE
    groups: sympy.Expr = _ONE

    def kind_at(self, values: Mapping) -> str:
        """The kind with sizes bound (``values``: dims -> ints): grouped with one channel per group is depthwise,
        grouped with one group is dense."""
        if self.kind != "grouped":
            return self.kind
        sub = {k: sympy.Integer(v) for k, v in values.items()}
        cg, fg, g = (sympy.sympify(e).xreplace(sub) for e in (self.in_per_group, self.out_per_group, self.groups))
        if cg == 1 and fg == 1:
            return "depthwise"
        if g == 1:
            return "dense"
        return "grouped"

    def describe(self) -> str:
        if self.kind == "none":
            return "channels: none (weight shared by all data channels)"
        ci = f", in axis {self.in_axis}" if self.in_axis is not None else ""
        return (f"channels: {self.kind}, out axis {self.out_axis}{ci} (data dim {self.data_dim}); "
                f"{index_str(self.groups)} groups of {index_str(self.in_per_group)} in -> "
                f"{index_str(self.out_per_group)} out")


@dataclass(frozen=True)
class WindowGroup:
    """A window reduction and its pointwise epilogue, fused into one kernel.

    ``reduce`` computes ``acc[axes] = sum over raxes of data * weight``; ``epilogue`` is the value of the final
    output ``out`` as an Expr over loads of ``reduce.out`` at ``axes`` and of inputs (None: the reduction is the
    output). ``batch`` are the batch output axes with their data dims.
    """

    op: Op
    reduce: Reduce
    out: str
    data: Access
    weight: Access
    axes: tuple[Axis, ...]
    batch: tuple[tuple[Axis, int], ...]
    channels: Channels
    spatial: tuple[SpatialDim, ...]
    epilogue: Expr | None
    epilogue_maps: tuple[Map, ...]

    @property
    def window_axes(self) -> tuple[Axis, ...]:
        return tuple(s.win_axis for s in self.spatial)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input tensor names in the op's order."""
        return tuple(t.name for t in self.op.inputs)

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Inputs read by the epilogue only (bias, gate)."""
        return tuple(n for n in self.inputs if n not in (self.data.tensor, self.weight.tensor))

    def describe(self) -> str:
        """A printout of the group (the ``fused`` stage)."""
        r = self.reduce
        lines = [f"window group {self.out}: {r.out}[{', '.join(map(str, self.axes))}] = sum over "
                 f"({', '.join(map(str, r.raxes))}) of {self.data.tensor} * {self.weight.tensor}",
                 f"  data {self.data.tensor}[{', '.join(index_str(i) for i in self.data.index)}]",
                 f"  weight {self.weight.tensor}[{', '.join(index_str(i) for i in self.weight.index)}]",
                 f"  batch ({', '.join(f'{a} (data dim {k})' for a, k in self.batch)})",
                 f"  {self.channels.describe()}"]
        lines += [f"  spatial {s.describe()}" for s in self.spatial]
        if self.epilogue is not None:
            lines.append(f"  epilogue {self.out}[{', '.join(map(str, self.axes))}] = {expr_str(self.epilogue)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- recognition


def _factors(e: Expr) -> list[Expr]:
    return _factors(e.lhs) + _factors(e.rhs) if e.op is ExprOp.MUL else [e]


def _strip_cast(e: Expr) -> Expr:
    while e.op is ExprOp.CAST and e.dtype.is_float and e.operand.dtype.is_float:
        e = e.operand
    return e


def _int(e: sympy.Expr) -> int | None:
    e = sympy.sympify(e)
    return int(e) if e.is_Integer else None


def _padded_dims(acc: Access) -> set[int]:
    if acc.pad is None:
        return set()
    return {k for k, (lo, hi) in enumerate(acc.pad) if sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0}


def _parse_channel(e: sympy.Expr, co: Axis | None, ci: Axis | None) -> tuple[sympy.Expr, sympy.Expr] | None:
    """``e == (co // F) * C + ci`` (ci optional): (C, F), or None. ``co`` alone gives (1, 1)."""
    rest = sympy.expand(e)
    if ci is not None:
        rest = sympy.expand(rest - ci)
        if rest.has(ci):
            return None
    if rest == 0:
        return None if co is not None else (_ONE, _ONE)
    if co is None:
        return None
    cg, fg, seen = _ONE, None, False
    for f in sympy.Mul.make_args(rest):
        if f == co:
            if seen:
                return None
            seen, fg = True, _ONE
        elif isinstance(f, sympy.floor):
            num, den = sympy.fraction(sympy.together(f.args[0]))
            if seen or num != co or axes_in(den):
                return None
            seen, fg = True, den
        elif axes_in(f):
            return None
        else:
            cg = cg * f
    if not seen or not (cg.is_positive or cg.is_Integer and cg > 0):
        return None
    return cg, fg


def _epilogue(op: Op, red: Reduce) -> tuple[str, Expr | None, tuple[Map, ...]] | None:
    """The final output and the epilogue Expr over ``red.out`` and inputs, or None when the tail is not pointwise."""
    idx = op.nodes.index(red)
    inputs = {t.name for t in op.inputs}
    done: dict[str, Map] = {}
    maps: list[Map] = []
    for n in op.nodes[idx + 1:]:
        if not isinstance(n, Map) or tuple(n.axes) != tuple(red.axes):
            return None
        for acc in loads(n.value):
            if acc.tensor in inputs:
                continue
            if acc.tensor != red.out and acc.tensor not in done:
                return None
            if tuple(acc.index) != tuple(red.axes) or _padded_dims(acc):
                return None
        done[n.out] = n
        maps.append(n)
    outputs = [t.name for t in op.outputs]
    last = maps[-1].out if maps else red.out
    if outputs != [last]:
        return None
    if not maps:
        return last, None, ()
    value = inline_maps(maps[-1].value, {m.out: m for m in maps[:-1]})
    if any(a.tensor not in inputs and a.tensor != red.out for a in loads(value)):
        return None
    return last, value, tuple(maps)


@dataclass(frozen=True)
class ProductSum:
    """An op that is one SUM (first node, no predicate) of the product of two float input loads, and a pointwise
    epilogue: the common form of window reductions and lag correlations."""

    reduce: Reduce
    out: str
    epilogue: Expr | None
    epilogue_maps: tuple[Map, ...]
    factors: tuple[Access, Access]


def product_sum(op: Op) -> ProductSum | None:
    """The :class:`ProductSum` of ``op``, or None when it has another form."""
    reds = [n for n in op.nodes if isinstance(n, Reduce)]
    if len(reds) != 1 or any(not isinstance(n, (Map, Reduce)) for n in op.nodes):
        return None
    red = reds[0]
    if op.nodes[0] is not red or red.monoid != SUM or red.predicate is not None:
        return None
    tail = _epilogue(op, red)
    if tail is None:
        return None
    inputs = {t.name: t for t in op.inputs}
    fs = [_strip_cast(f) for f in _factors(red.value)]
    if len(fs) != 2 or any(f.op is not ExprOp.LOAD or f.arg.tensor not in inputs for f in fs):
        return None
    if any(not inputs[f.arg.tensor].dtype.is_float for f in fs):
        return None
    return ProductSum(red, *tail, (fs[0].arg, fs[1].arg))


def fuse_window(op: Op) -> WindowGroup | None:
    """The window group of an op built around one window reduction (a convolution), or None."""
    ps = product_sum(op)
    if ps is None:
        return None
    red, out, epi, maps = ps.reduce, ps.out, ps.epilogue, ps.epilogue_maps
    f0, f1 = ps.factors
    out_axes, raxes = set(red.axes), set(red.raxes)

    def mixes(acc: Access) -> bool:
        return any(axes_in(i) & out_axes and axes_in(i) & raxes for i in acc.index)

    if mixes(f0) == mixes(f1):
        return None
    data, weight = (f0, f1) if mixes(f0) else (f1, f0)
    if data.tensor == weight.tensor or _padded_dims(weight):
        return None
    # the weight: plain, distinct axes covering every reduction axis
    if any(not isinstance(i, Axis) for i in weight.index) or len(set(weight.index)) != len(weight.index):
        return None
    w_axes = set(weight.index)
    if not raxes <= w_axes:
        return None
    co_cands = [a for a in weight.index if a in out_axes]
    if len(co_cands) > 1:
        return None
    co = co_cands[0] if co_cands else None
    ext = dict(op.extents)
    shape = op.tensor(data.tensor).shape
    spatial: list[SpatialDim] = []
    batch: list[tuple[Axis, int]] = []
    chan_dims: list[int] = []
    used_out: set[Axis] = set()
    used_win: set[Axis] = set()
    for k, ie in enumerate(data.index):
        ax = axes_in(ie)
        oa, ra = ax & out_axes, ax & raxes
        if oa and ra and co not in oa:
            if len(oa) != 1 or len(ra) != 1:
                return None
            (o,), (w,) = oa, ra
            dec = affine(ie, {o, w})
            if dec is None:
                return None
            coeffs, off = dec
            s, d = _int(coeffs.get(o, _ZERO)), _int(coeffs.get(w, _ZERO))
            if s is None or d is None or s < 1 or d == 0 or axes_in(off) or o in w_axes:
                return None
            if o in used_out or w in used_win:
                return None
            used_out.add(o)
            used_win.add(w)
            spatial.append(SpatialDim(o, w, k, s, d, sympy.sympify(off), data.padding(k), shape[k], ext[o], ext[w]))
        elif oa and not ra and len(oa) == 1 and ie in oa and ie != co:
            if ie in used_out:
                return None
            used_out.add(ie)
            batch.append((ie, k))
        elif ax and (co in ax or (ra and not oa)):
            chan_dims.append(k)
        elif not ax:
            if sympy.sympify(ie) != 0:
                return None
            # a constant index (a size-1 dim indexed 0) carries nothing
        else:
            return None
    if not spatial or used_out | ({co} if co is not None else set()) != out_axes:
        return None
    cis = raxes - used_win
    if len(cis) > 1:
        return None
    ci = next(iter(cis)) if cis else None
    if any(k in _padded_dims(data) for k in chan_dims) or any(k in _padded_dims(data) for _, k in batch):
        return None
    channels = _channels(co, ci, chan_dims, data, ext)
    if channels is None:
        return None
    return WindowGroup(op, red, out, data, weight, tuple(red.axes), tuple(batch), channels, tuple(spatial), epi,
                       maps)


def _channels(co: Axis | None, ci: Axis | None, chan_dims: list[int], data: Access,
              ext: Mapping[Axis, sympy.Expr]) -> Channels | None:
    if not chan_dims:
        if ci is not None:
            return None                      # a reduction axis the data does not depend on
        if co is None:
            return Channels("none")
        return None                          # an output channel that reads no data channel: not a convolution
    if len(chan_dims) != 1:
        return None
    k = chan_dims[0]
    if ci is not None and sympy.expand(data.index[k] - ci) == 0:
        if co is None:
            # data channel = ci with no output channel axis: one filter summed over every channel
            return Channels("dense", None, ci, k, ext[ci], _ONE, _ONE)
        return Channels("dense", co, ci, k, ext[ci], ext[co], _ONE)
    parsed = _parse_channel(data.index[k], co, ci)
    if parsed is None:
        return None
    cg, fg = parsed
    if ci is not None and sympy.simplify(ext[ci] - cg) != 0:
        return None
    if co is None:
        return None
    groups = sympy.simplify(ext[co] / fg)
    if axes_in(groups) or not (groups.is_integer or groups.is_Integer):
        return None
    if ci is None:
        if cg != 1:
            return None
        return Channels("depthwise", co, None, k, _ONE, fg, groups)
    kind = "dense" if groups == 1 else "grouped"
    return Channels(kind, co, ci, k, cg, fg, groups)
