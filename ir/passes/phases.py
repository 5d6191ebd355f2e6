"""Sub-pixel (phase) split of a strided convolution's data gradient into dense window reductions.

The grad transform writes the data gradient of a stride-``s`` convolution as
``dx[.., u] = sum_k g.pad[.., floor((u + c - k) / s)] * w[.., k]  where (u + c - k) % s == 0``
(``c`` the padding). Only one tap in ``s`` passes the predicate, so reading the zero-inserted gradient
(:func:`~.restage.upsample_strided_reads`) spends ``s - 1`` of every ``s`` multiply-adds per strided dim on zeros.

Writing ``u = s*q + r`` for a phase ``r`` in ``[0, s)``, the predicate holds exactly for the taps
``k = k0 + s*j`` with ``k0 = (r + c) mod s``, and the read becomes ``g[.., q + e - j]`` with
``e = (r + c - k0) / s``. Each phase is then a plain stride-1 window reduction over the gradient (a flipped
window of ``J = ceil((K - k0) / s)`` taps) with the weight's phase taps ``w[.., k0 + s*j]`` (materialized, the
weight's size), and ``dx`` interleaves the phases: ``dx[.., u] = phase[u mod s][.., u // s]``. The
multiply-adds drop from ``U * K`` to ``~U * K / s`` per strided dim; for a 3x3 stride-2 convolution the four
phases have 2x2, 2x1, 1x2 and 1x1 taps, 9 per four outputs instead of 36.

Every phase has ``ceil(U / s)`` rows (the last row of a phase past the end of an odd ``U`` is computed and not
read) and at least one tap (a phase with no tap, ``K < s``, has one zero-weight tap: a 1x1 stride-2 gradient).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import sympy

from ..expr import Access, Expr, ExprOp, index, load, where
from ..nodes import Map, Reduce, TensorParam
from ..op import Op
from ..symbols import Axis, axes_in
from .rewrite import conjuncts, fresh_axes, fresh_name, product_of_loads, replace_load, splice

__all__ = ["split_strided_phases", "MAX_PHASES"]

_ZERO = sympy.Integer(0)

# Most phases a split makes (the product of the strides). Each phase is one kernel to prove, render and compile
# (~1 s each): a 3x3 stride-16 gradient would make 256 (a 1x1 stride-14 one 196, 195 of them without a tap),
# minutes before the first call returns. Past this the gradient reads the zero-inserted factor
# (:func:`~.restage.upsample_strided_reads`), one kernel. 16 keeps the split up to stride 4x4.
MAX_PHASES = 16


@dataclass(frozen=True)
class _Strided:
    """One strided dim of the gradient reduction: output axis ``u``, window axis ``k``, the predicate
    ``(u + c - k) % s == 0``, and ``dim``, the data factor's dim read at ``floor((u + c - k) / s)``."""

    u: Axis
    k: Axis
    c: int
    s: int
    dim: int


def _strided_dims(node: Reduce) -> list[tuple[Axis, Axis, int]] | None:
    """(u, k, s) per conjunct ``Eq(Mod(u + c - k, s), 0)`` of the predicate, or None."""
    out = []
    outs, reds = set(node.axes), set(node.raxes)
    for cj in conjuncts(node.predicate.arg):
        if not (isinstance(cj, sympy.Eq) and cj.rhs == 0 and isinstance(cj.lhs, sympy.Mod)
                and cj.lhs.args[1].is_Integer and int(cj.lhs.args[1]) > 1):
            return None
        num, s = sympy.expand(cj.lhs.args[0]), int(cj.lhs.args[1])
        ax = axes_in(num)
        us, ks = [a for a in ax if a in outs], [a for a in ax if a in reds]
        if len(us) != 1 or len(ks) != 1 or len(ax) != 2 or not _offset(num, us[0], ks[0]).is_Integer:
            return None                      # a dilation other than 1, or a coefficient other than 1 on u
        out.append((us[0], ks[0], s))
    us, ks = [d[0] for d in out], [d[1] for d in out]
    if len(set(us)) != len(us) or len(set(ks)) != len(ks):
        return None
    return out


def _offset(num: sympy.Expr, u: Axis, k: Axis) -> sympy.Expr:
    """``c`` in ``num = u + c - k`` (an expression in other symbols when ``num`` has another form)."""
    return sympy.expand(num - u + k)


def _floor_read(ie: sympy.Expr, u: Axis, k: Axis, s: int) -> int | None:
    """``c`` when the index is ``floor((u + c - k) / s)`` with an integer ``c``, else None."""
    if not isinstance(ie, sympy.floor):
        return None
    num, den = sympy.fraction(sympy.together(ie.args[0]))
    if den != s or axes_in(num) != {u, k}:
        return None
    c = _offset(sympy.expand(num), u, k)
    return int(c) if c.is_Integer else None


def _match(node: Reduce, data: Expr, weight: Expr, found) -> list[_Strided] | None:
    """The strided dims when ``data`` reads each at exactly ``floor((u + c - k) / s)`` (with ``c`` congruent to
    the predicate's) and nothing else of its ``u`` or ``k``, and ``weight`` reads no ``u`` and each ``k`` as a
    plain index; None otherwise."""
    dims = []
    dacc: Access = data.arg
    wacc: Access = weight.arg
    if wacc.pad is not None:
        return None
    moved = {d[0] for d in found} | {d[1] for d in found}
    for u, k, s in found:
        hits = [(j, c) for j, ie in enumerate(dacc.index) for c in [_floor_read(ie, u, k, s)] if c is not None]
        if len(hits) != 1 or sum(1 for ie in wacc.index if ie == k) != 1:
            return None
        dims.append(_Strided(u, k, hits[0][1], s, hits[0][0]))
    claimed = {d.dim for d in dims}
    for j, ie in enumerate(dacc.index):
        if j not in claimed and axes_in(ie) & moved:
            return None
    for ie in wacc.index:
        if axes_in(ie) & moved and ie not in {d.k for d in dims}:
            return None
    return dims


def split_strided_phases(op: Op, k: int) -> Op | None:
    """Node ``k`` (a SUM of two loads under a predicate of ``Eq(Mod(u + c - kw, s), 0)`` terms, the data gradient
    of a strided convolution with dilation 1) replaced by one stride-1 window reduction per phase, each after
    the map that gathers its weight taps, and the map that interleaves the phases into the node's output;
    None when the node has another form or would split into more than :data:`MAX_PHASES` phases."""
    node = op.nodes[k]
    if not isinstance(node, Reduce) or node.predicate is None or node.predicate.op is not ExprOp.INDEX:
        return None
    fs = product_of_loads(node)
    found = _strided_dims(node) if fs is not None else None
    if found is None or math.prod(s for _, _, s in found) > MAX_PHASES:
        return None
    for data, weight in (fs, fs[::-1]):
        dims = _match(node, data, weight, found)
        if dims is not None:
            break
    else:
        return None
    ext = dict(op.extents)
    dsrc, wsrc = op.tensor(data.arg.tensor), op.tensor(weight.arg.tensor)
    out_t = op.tensor(node.out)
    names: list[str] = []
    axis_names: list[str] = []

    def new_axes(base: str, n: int) -> tuple[Axis, ...]:
        axs = fresh_axes(op, base, n, axis_names)
        axis_names.extend(a.name for a in axs)
        return axs

    def new_name(base: str) -> str:
        names.append(fresh_name(op, base, names))
        return names[-1]

    qs = new_axes(f"{node.out}_q", len(dims))
    new_ext: list[tuple[Axis, sympy.Expr]] = [(q, sympy.floor((ext[d.u] + d.s - 1) / d.s)) for q, d in zip(qs, dims)]
    temps: list[TensorParam] = []
    nodes: list = []
    phase_reads: list[tuple[tuple[int, ...], Expr]] = []
    for ph in itertools.product(*(range(d.s) for d in dims)):
        tag = "".join(str(r) for r in ph)
        js = new_axes(f"{node.out}_p{tag}_j", len(dims))
        subst_w: dict[Axis, sympy.Expr] = {}
        dindex = list(data.arg.index)
        dpad = [data.arg.padding(j) for j in range(dsrc.rank)]
        wpad = [(_ZERO, _ZERO)] * wsrc.rank
        for d, q, j, r in zip(dims, qs, js, ph):
            k0 = (r + d.c) % d.s
            e = (r + d.c - k0) // d.s
            taps = sympy.Max(1, sympy.floor((ext[d.k] - k0 + d.s - 1) / d.s))
            new_ext.append((j, taps))
            subst_w[d.k] = k0 + d.s * j
            dindex[d.dim] = q + e - j
            dpad[d.dim] = (sympy.Max(0, taps - 1 - e), sympy.Max(0, dict(new_ext)[q] + e - dsrc.shape[d.dim]))
            wdim = weight.arg.index.index(d.k)
            wpad[wdim] = (_ZERO, sympy.Max(0, k0 + d.s * (taps - 1) - ext[d.k] + 1))
        # the weight's phase taps at plain axes: output axes first, then reduction axes (window axes -> j)
        windex = tuple(i.xreplace(subst_w) for i in weight.arg.index)
        w_axes = [a for a in node.axes if any(a in axes_in(i) for i in windex)]
        for i in windex:
            w_axes += [a for a in tuple(node.raxes) + js if a in axes_in(i) and a not in w_axes]
        w_axes = [a for a in w_axes if a not in subst_w]
        w_ext = {**ext, **dict(new_ext)}
        wname = new_name(f"{weight.arg.tensor}_p{tag}")
        wshape = tuple(w_ext[a] for a in w_axes)
        temps.append(TensorParam(wname, wshape, wsrc.dtype, "temp"))
        nodes.append(Map(wname, tuple(w_axes), Expr(ExprOp.LOAD, wsrc.dtype, (), Access(
            weight.arg.tensor, windex, tuple(wpad)))))
        # the phase: a stride-1 (flipped) window reduction over the data
        p_axes = tuple(_q_of(a, dims, qs) for a in node.axes)
        p_raxes = tuple(_j_of(a, dims, js) for a in node.raxes)
        any_pad = any(lo != 0 or hi != 0 for lo, hi in dpad)
        new_data = Expr(ExprOp.LOAD, data.dtype, (), Access(data.arg.tensor, tuple(dindex),
                                                             tuple(dpad) if any_pad else None))
        new_weight = Expr(ExprOp.LOAD, weight.dtype, (), Access(wname, tuple(w_axes), None))
        value = replace_load(replace_load(node.value, data, new_data), weight, new_weight)
        pname = new_name(f"{node.out}_p{tag}")
        pshape = tuple(w_ext[a] for a in p_axes)
        temps.append(TensorParam(pname, pshape, out_t.dtype, "temp"))
        nodes.append(Reduce(pname, p_axes, p_raxes, value, node.monoid, None))
        strides = {d.u: d.s for d in dims}
        read = load(pname, [sympy.floor(a / strides[a]) if a in strides else a for a in node.axes], out_t.dtype)
        phase_reads.append((ph, read))
    # dx[.., u] = phase[u mod s][.., u // s]: the last phase is the fallthrough
    value = phase_reads[-1][1]
    for ph, read in reversed(phase_reads[:-1]):
        cond = sympy.And(*[sympy.Eq(sympy.Mod(d.u, d.s), r) for d, r in zip(dims, ph)])
        value = where(index(cond), read, value)
    nodes.append(Map(node.out, node.axes, value))
    return splice(op, k, temps, nodes, new_ext)


def _q_of(a: Axis, dims: list[_Strided], qs: tuple[Axis, ...]) -> Axis:
    """The phase row axis that replaces output axis ``a`` (``a`` itself when it is not strided)."""
    for d, q in zip(dims, qs):
        if d.u == a:
            return q
    return a


def _j_of(a: Axis, dims: list[_Strided], js: tuple[Axis, ...]) -> Axis:
    """The phase tap axis that replaces window axis ``a`` (``a`` itself when it is not strided)."""
    for d, j in zip(dims, js):
        if d.k == a:
            return j
    return a
