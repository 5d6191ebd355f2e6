"""Restage the operands of a backward convolution so that its gradient reductions are window reductions.

The grad transform (:mod:`.grad`) writes the data gradient of a convolution as a transposed window reduction. Two
of its forms are not windows that :func:`~.window.fuse_window` recognizes, and used to run in the interpreter
(70x and 350x slower than torch for a small strided and a small grouped conv2d):

* a stride ``s > 1`` reads the output gradient at ``(u - k*d + p) // s`` under the predicate
  ``(u - k*d + p) % s == 0``. :func:`upsample_strided_reads` materializes the zero-inserted gradient
  ``up[.., y, ..] = g[.., y // s, ..] if y % s == 0 else 0`` (a pointwise map, ``s`` times the size per strided
  dim) and reads it at ``u - k*d + p``: a stride-1 window reduction, as for an unstrided convolution. The
  multiply-adds are the same in number (the original reduction visits the masked terms too).
* a grouped convolution reads its weight at ``[(u // C) * F + f, u % C, kh, kw]``. :func:`relayout_operands`
  materializes the weight at plain axes, ``w2[u, f, kh, kw]`` (a permutation, the weight's own size), so that
  the reduction is a grouped window reduction.

* a grouped convolution's weight gradient reads the data at ``x[n, (co // F) * C + ci, ...]``: its output axis ci is
  no plain batch index. :func:`regroup_data` materializes ``x2[ci, g * N + n, ...] = x[n, g * C + ci, ...]`` (a
  permutation, the data's own size) and reads it at ``[ci, (co // F) * N + n, ...]``: a grouped window reduction
  with the batch entries as its input channels, which the window kernels run as an implicit GEMM over N*OH*OW.

All rewrite a single SUM reduction of a product of two loads and leave every other node as it is; each applies
only where the node becomes a window reduction (:func:`restage_windows`).
"""
from __future__ import annotations

import sympy

from ..expr import Access, Expr, ExprOp, index, load, where
from ..nodes import Map, Reduce, TensorParam
from ..op import Op
from ..symbols import Axis, axes_in
from .phases import split_strided_phases
from .rewrite import conjuncts, fresh_axes, fresh_name, insert_before, product_of_loads, replace_load
from .window import fuse_window

__all__ = ["restage_windows", "upsample_strided_reads", "relayout_operands", "regroup_data"]


def restage_windows(op: Op) -> Op:
    """``op`` with every SUM reduction that is not a window reduction, but becomes one or several after
    :func:`~.phases.split_strided_phases` (a strided data gradient: one window reduction per phase), or else
    after :func:`upsample_strided_reads` and / or :func:`relayout_operands`, rewritten so (``op`` itself when
    none)."""
    from .split import node_op

    k = 0
    while k < len(op.nodes):
        if isinstance(op.nodes[k], Reduce) and fuse_window(node_op(op, k)) is None:
            split = split_strided_phases(op, k)
            if split is not None:
                added = len(split.nodes) - len(op.nodes)
                phases = [j for j in range(k, k + added + 1) if isinstance(split.nodes[j], Reduce)]
                if all(fuse_window(node_op(split, j)) is not None for j in phases):
                    op, k = split, k + added + 1
                    continue
            new, at = op, k
            for rewrite in (upsample_strided_reads, relayout_operands, regroup_data):
                done = rewrite(new, at)
                if done is not None:
                    new, at = done, at + 1           # each inserts one map node before the reduction
            if new is not op and fuse_window(node_op(new, at)) is not None:
                op, k = new, at
        k += 1
    return op


def upsample_strided_reads(op: Op, k: int) -> Op | None:
    """Node ``k`` (a SUM of two loads under a predicate made only of ``Eq(Mod(num, s), 0)`` terms, each matching
    an index ``rest + floor(num / s)`` of one factor) reading the zero-inserted factor at ``s * rest + num``
    instead, with no predicate; None when the node has another form."""
    node = op.nodes[k]
    if not isinstance(node, Reduce) or node.predicate is None or node.predicate.op is not ExprOp.INDEX:
        return None
    fs = product_of_loads(node)
    if fs is None:
        return None
    strides: dict[sympy.Expr, int] = {}
    for c in conjuncts(node.predicate.arg):
        if not (isinstance(c, sympy.Eq) and c.rhs == 0 and isinstance(c.lhs, sympy.Mod) and c.lhs.args[1].is_Integer
                and int(c.lhs.args[1]) > 1):
            return None
        strides[sympy.expand(c.lhs.args[0])] = int(c.lhs.args[1])
    for f in fs:
        acc: Access = f.arg
        hits = {}                            # dim -> (num, s, index into the zero-inserted tensor)
        for j, ie in enumerate(acc.index):
            # ie = rest + floor(num / s) (a dilation that is a multiple of the stride moves a term out of the floor)
            floors = [t for t in sympy.Add.make_args(ie) if isinstance(t, sympy.floor)]
            if len(floors) != 1:
                continue
            rest = sympy.expand(ie - floors[0])
            num, den = sympy.fraction(sympy.together(floors[0].args[0]))
            num = sympy.expand(num)
            if not rest.has(sympy.floor) and den.is_Integer and strides.get(num) == int(den):
                hits[j] = (num, int(den), sympy.expand(den * rest + num))
        if {h[0] for h in hits.values()} != set(strides) or len(hits) != len(strides):
            continue
        src = op.tensor(acc.tensor)
        shape = tuple(sympy.expand((src.shape[j] - 1) * hits[j][1] + 1) if j in hits else src.shape[j]
                      for j in range(src.rank))
        name = fresh_name(op, f"{acc.tensor}_up")
        ys = fresh_axes(op, f"{name}_", src.rank)
        inner = load(acc.tensor, [sympy.floor(ys[j] / hits[j][1]) if j in hits else ys[j] for j in range(src.rank)],
                     src.dtype)
        cond = sympy.And(*[sympy.Eq(sympy.Mod(ys[j], hits[j][1]), 0) for j in sorted(hits)])
        map_node = Map(name, ys, where(index(cond), inner, 0.0))
        pad = []
        for j in range(src.rank):
            lo, hi = acc.padding(j)
            if j in hits:
                s = hits[j][1]
                pad.append((sympy.expand(lo * s), sympy.expand(hi * s + s - 1)))
            else:
                pad.append((lo, hi))
        idx = tuple(hits[j][2] if j in hits else acc.index[j] for j in range(src.rank))
        any_pad = any(lo != 0 or hi != 0 for lo, hi in pad)
        new_load = Expr(ExprOp.LOAD, f.dtype, (), Access(name, idx, tuple(pad) if any_pad else None))
        value = replace_load(node.value, f, new_load)
        temp = TensorParam(name, shape, src.dtype, "temp")
        return insert_before(op, k, temp, map_node, zip(ys, shape), Reduce(node.out, node.axes, node.raxes, value,
                                                                       node.monoid, None))
    return None


def relayout_operands(op: Op, k: int) -> Op | None:
    """Node ``k`` (a SUM of two loads under no predicate) reading one factor, whose index is not plain axes but
    names exactly as many distinct axes of the node as it has dims (a permutation of its elements, such as a
    grouped weight read at ``[(u // C) * F + f, u % C, kh, kw]``), from a copy at plain axes (the node's output
    axes first, then its reduction axes); None when no factor has that form."""
    node = op.nodes[k]
    if not isinstance(node, Reduce) or node.predicate is not None:
        return None
    fs = product_of_loads(node)
    if fs is None:
        return None
    order = tuple(node.axes) + tuple(node.raxes)
    ext = dict(op.extents)
    for f in fs:
        acc: Access = f.arg
        if acc.pad is not None or all(isinstance(i, Axis) for i in acc.index):
            continue
        used: set[Axis] = set()
        for ie in acc.index:
            used |= axes_in(ie)
        src = op.tensor(acc.tensor)
        if len(used) != src.rank or not used <= set(order):
            continue
        axes = [a for a in node.axes if a in used]
        for ie in acc.index:                 # reduction axes in the order the factor's dims name them
            axes += [a for a in node.raxes if a in axes_in(ie) and a not in axes]
        axes = tuple(axes)
        shape = tuple(ext[a] for a in axes)
        if sympy.simplify(sympy.Mul(*shape) - sympy.Mul(*src.shape)) != 0:
            continue                         # not a permutation of the factor's elements
        name = fresh_name(op, f"{acc.tensor}_r")
        map_node = Map(name, axes, Expr(ExprOp.LOAD, src.dtype, (), acc))
        new_load = Expr(ExprOp.LOAD, f.dtype, (), Access(name, axes, None))
        value = replace_load(node.value, f, new_load)
        temp = TensorParam(name, shape, src.dtype, "temp")
        return insert_before(op, k, temp, map_node, (), Reduce(node.out, node.axes, node.raxes, value, node.monoid, None))
    return None


def regroup_data(op: Op, k: int) -> Op | None:
    """Node ``k`` (a SUM of two loads under no predicate) whose factor ``x`` has a dim indexed
    ``b + C * floor(a / F)`` (``a``, ``b`` output axes of the node, ``a`` also indexing the other factor) and another
    dim indexed by a plain reduction axis ``r`` that the other factor reads too (a grouped convolution's weight
    gradient): reading ``x2[b, r + R * floor(a / F), rest]`` instead, with ``x2[y0, y1, rest] = x[.., y1 mod R at
    r's dim, floor(y1 / R) * C + y0 at the grouped dim, ..]`` (R the extent of r; the rest of the dims, and their
    padding, in order); None when no factor has that form."""
    node = op.nodes[k]
    if not isinstance(node, Reduce) or node.predicate is not None:
        return None
    fs = product_of_loads(node)
    if fs is None:
        return None
    ext = dict(op.extents)
    outs, reds = set(node.axes), set(node.raxes)
    for f, other in ((fs[0], fs[1]), (fs[1], fs[0])):
        acc: Access = f.arg
        other_axes: set[Axis] = set()
        for ie in other.arg.index:
            other_axes |= axes_in(ie)
        gdim = rdim = None
        for j, ie in enumerate(acc.index):
            ie = sympy.expand(ie)
            if isinstance(ie, Axis) and ie in reds and ie in other_axes and rdim is None:
                rdim = j
                continue
            floors = [t for t in sympy.Add.make_args(ie) if t.has(sympy.floor)]
            if len(floors) != 1:
                continue
            coef, fl = (1, floors[0]) if isinstance(floors[0], sympy.floor) else floors[0].as_coeff_Mul()
            if isinstance(fl, sympy.Mul):            # C * floor(a / F): split the symbolic coefficient off
                parts = [t for t in fl.args if isinstance(t, sympy.floor)]
                if len(parts) != 1:
                    continue
                coef = sympy.Mul(coef, *[t for t in fl.args if not isinstance(t, sympy.floor)])
                fl = parts[0]
            if not isinstance(fl, sympy.floor):
                continue
            num, den = sympy.fraction(sympy.together(fl.args[0]))
            rest = sympy.expand(ie - floors[0])
            if (isinstance(num, Axis) and num in outs and num in other_axes and isinstance(rest, Axis)
                    and rest in outs and rest not in other_axes and not den.has(Axis) and not coef.has(Axis)):
                gdim = (j, rest, num, den, coef)
        if gdim is None or rdim is None:
            continue
        j, b, a, den, C = gdim
        if acc.pad is not None and any(lo != 0 or hi != 0 for lo, hi in (acc.padding(j), acc.padding(rdim))):
            continue
        src = op.tensor(acc.tensor)
        R = ext[acc.index[rdim]]
        G = sympy.simplify(src.shape[j] / C)
        if not G.is_Integer:
            continue
        rest_dims = [d for d in range(src.rank) if d not in (j, rdim)]
        shape = (C, sympy.expand(G * R)) + tuple(src.shape[d] for d in rest_dims)
        name = fresh_name(op, f"{acc.tensor}_g")
        ys = fresh_axes(op, f"{name}_", len(shape))
        idx = [None] * src.rank
        idx[rdim] = sympy.Mod(ys[1], R)
        idx[j] = sympy.floor(ys[1] / R) * C + ys[0]
        for d, y in zip(rest_dims, ys[2:]):
            idx[d] = y
        map_node = Map(name, ys, load(acc.tensor, idx, src.dtype))
        new_idx = (b, acc.index[rdim] + R * sympy.floor(a / den)) + tuple(acc.index[d] for d in rest_dims)
        pad = None
        if acc.pad is not None:
            z = sympy.Integer(0)
            pad = ((z, z), (z, z)) + tuple(acc.padding(d) for d in rest_dims)
            if all(lo == 0 and hi == 0 for lo, hi in pad):
                pad = None
        new_load = Expr(ExprOp.LOAD, f.dtype, (), Access(name, new_idx, pad))
        value = replace_load(node.value, f, new_load)
        temp = TensorParam(name, shape, src.dtype, "temp")
        return insert_before(op, k, temp, map_node, zip(ys, shape),
                             Reduce(node.out, node.axes, node.raxes, value, node.monoid, None))
    return None
