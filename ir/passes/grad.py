"""The grad transform: reverse-mode differentiation of a forward op into a backward op, in the same IR.

The backward op recomputes the forward nodes (no saved intermediates), then walks them in reverse. Rules:
a Map or sum-Reduce passes its adjoint to every load through the symbolic derivative of its value; an affine
Scan's adjoint is a *reverse* affine scan of the adjoint with the coefficient shifted by one step
(``lam[t] = g[t] + a[t+1] * lam[t+1]``), giving ``d a[t] = lam[t] * h[t-1]`` and ``d b[t] = lam[t]``. Adjoints
are scattered back to each tensor through its index: plain axes map directly, axes missing from the index are
summed, constant indices (a final-state read) select one position, and ``axis // D`` indices (grouped
projections) sum over the group.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Sequence

import sympy

from ..builder import OpBuilder, TensorRef
from ..dtypes import accum_dtype
from ..errors import IRError
from ..expr import Access, Expr, ExprOp, const, index, load, substitute, where
from ..nodes import SUM, Affine, Map, Reduce, Scan
from ..op import Op
from ..symbols import Axis, axes_in
from ..traversal import STEP
from .diff import derivative


def _leaves(e: Expr) -> list[Expr]:
    return [n for n in e.walk() if n.op is ExprOp.LOAD]


class _Grad:
    def __init__(self, op: Op, wrt: Sequence[str]) -> None:
        self.op, self.wrt = op, tuple(wrt)
        self.bld = OpBuilder(f"{op.name}_backward", attrs=dict(op.attrs))
        self.adj: dict[str, list[TensorRef]] = {}
        self.counter = itertools.count()
        self.ext = dict(op.extents)

    def fresh_axis(self, extent) -> Axis:
        return self.bld.axis(f"g{next(self.counter)}", extent)

    def needs(self, tensor: str) -> bool:
        t = self.op.tensor(tensor)
        return t.dtype.is_float and (t.kind != "input" or tensor in self.wrt)

    # scatter an adjoint contribution c (over frame axes) to the tensor read by `acc` ----------------------
    def scatter(self, acc: Access, frame: tuple[Axis, ...], c: Expr) -> None:
        t = self.op.tensor(acc.tensor)
        if acc.pad is not None and any(lo != 0 or hi != 0 for lo, hi in acc.pad):
            raise IRError(f"grad of {self.op.name}: padded reads of {acc.tensor} (window reductions) are not "
                          f"differentiated yet")
        out_axes, subst, preds, extra = [], {}, [], []
        used = set()
        for k, ie in enumerate(acc.index):
            ax = axes_in(ie)
            if isinstance(ie, Axis) and ie in frame and ie not in used:
                out_axes.append(ie)
                used.add(ie)
            elif not ax:
                x = self.fresh_axis(t.shape[k])
                out_axes.append(x)
                preds.append(sympy.Eq(x, ie))
            elif isinstance(ie, sympy.floor) and len(ax) == 1:
                (a,) = ax
                num, den = sympy.fraction(sympy.together(ie.args[0]))
                if num != a or a in used or axes_in(den):
                    raise IRError(f"grad of {self.op.name}: unsupported index {ie} of {acc.tensor}")
                x, r = self.fresh_axis(t.shape[k]), self.fresh_axis(den)
                subst[a] = x * den + r
                out_axes.append(x)
                extra.append(r)
                used.add(a)
            else:
                raise IRError(f"grad of {self.op.name}: cannot scatter the gradient through index {ie} of "
                              f"{acc.tensor} (supported: axes, constants, axis // dim)")
        c = substitute(c, subst) if subst else c
        pred = index(sympy.And(*preds)) if preds else None
        rest = tuple(a for a in frame if a not in used) + tuple(extra)
        if rest:
            ref = self.bld.reduce(rest, c, where=pred, axes=tuple(out_axes))
        else:
            ref = self.bld.map(where(pred, c, 0.0) if pred is not None else c, tuple(out_axes))
        self.adj.setdefault(acc.tensor, []).append(_Contribution(ref, tuple(out_axes)))

    def total(self, name: str, axes: tuple[Axis, ...]) -> Expr | None:
        """The summed adjoint of tensor ``name`` read at ``axes`` (None when nothing flows into it)."""
        parts = self.adj.get(name, [])
        if not parts:
            return None
        out = None
        for p in parts:
            term = p.ref[tuple(axes)]
            out = term if out is None else out + term
        return out

    def chain(self, e: Expr, frame: tuple[Axis, ...], g: Expr) -> None:
        """Send ``g * de/dleaf`` to every differentiable load of ``e``."""
        for leaf in dict.fromkeys(_leaves(e)):
            if not self.needs(leaf.arg.tensor):
                continue
            dv = derivative(e, leaf)
            if dv is not None:
                self.scatter(leaf.arg, frame, g * dv)

    # node rules ---------------------------------------------------------------------------------------
    def node(self, n) -> None:
        g = self.total(n.out, n.axes)
        if g is None:
            return
        if isinstance(n, Map):
            self.chain(n.value, n.axes, g)
        elif isinstance(n, Reduce):
            if n.monoid != SUM:
                raise IRError(f"grad of {self.op.name}: {n.monoid} reductions are not differentiated yet")
            val = n.value if n.predicate is None else where(n.predicate, n.value, 0.0)
            self.chain(val, n.axes + n.raxes, g)
        elif isinstance(n, Scan) and isinstance(n.combine, Affine) and len(n.scan_axes) == 1:
            self.scan(n, g)
        else:
            raise IRError(f"grad of {self.op.name}: node {n.out} ({type(n).__name__}) is not differentiated yet")

    def scan(self, n: Scan, g: Expr) -> None:
        (t,) = n.scan_axes
        steps = self.ext[t]
        reverse = n.traversal.coords[0] != STEP
        first, nxt, prev_ok, next_ok = ((steps - 1, t - 1, t < steps - 1, t > 0) if reverse
                                        else (sympy.Integer(0), t + 1, t > 0, t < steps - 1))
        prv = t + 1 if reverse else t - 1
        a, b = n.combine.a, n.combine.b
        a_next = where(index(next_ok), _shifted(a, t, nxt, self.op, steps), 0.0)
        lam = self.bld.scan(t, a=a_next, b=g, reverse=not reverse, axes=n.axes, name=f"adj_{n.out}")
        h = self.bld_ref(n.out)
        h_prev_read = _padded_read(n.out, n.axes, t, prv, self.op, steps)
        init = n.init if n.init is not None else const(0.0, accum_dtype(self.op.tensor(n.out).dtype))
        h_prev = where(index(prev_ok), h_prev_read, init)
        lam_t = lam[tuple(n.axes)]
        self.chain(a, n.axes, lam_t * h_prev)
        self.chain(b, n.axes, lam_t)
        del h
        if n.init is not None:
            lanes = tuple(x for x in n.axes if x != t)
            at_first = {t: first}
            g0 = substitute(a, at_first) * lam[tuple(first if x == t else x for x in n.axes)]
            self.chain(n.init, lanes, g0)

    def bld_ref(self, name: str) -> TensorRef:
        t = self.op.tensor(name)
        return TensorRef(name, t.rank, accum_dtype(t.dtype) if t.kind != "input" else t.dtype)

    def run(self) -> Op:
        bld = self.bld
        with bld:
            for t in self.op.inputs:
                bld.input(t.name, t.shape, t.dtype, t.lookup)
            for t in self.op.outputs:
                ref = bld.input(f"grad_{t.name}", t.shape, t.dtype)
                self.adj[t.name] = [_Contribution(ref, None)]
            for d, e in self.op.derived:
                bld.derive(d, e)
            for rel, msg in self.op.constraints:
                bld.require(rel, msg)
            for a, e in self.op.extents:
                bld.axis(a.name, e)
            for n in self.op.nodes:
                bld._nodes.append(n)
                bld._names.add(n.out)
                t = self.op.tensor(n.out)
                bld._dtypes[n.out] = t.dtype
                bld._out_dtypes[n.out] = accum_dtype(t.dtype)
            for n in reversed(self.op.nodes):
                self.node(n)
            outs = {}
            for name in self.wrt:
                t = self.op.tensor(name)
                axes = tuple(self.fresh_axis(s) for s in t.shape)
                total = self.total(name, axes)
                val = total if total is not None else const(0.0, accum_dtype(t.dtype))
                outs[f"grad_{name}"] = bld.map(val, axes, name=f"grad_{name}", dtype=t.dtype)
            return bld.build(outs)


class _Contribution:
    """An adjoint term: a tensor over the target's dims (``axes`` None: an input indexed positionally)."""

    def __init__(self, ref: TensorRef, axes) -> None:
        self.ref, self.axes = ref, axes


def _shifted(e: Expr, t: Axis, to, op: Op, steps) -> Expr:
    """``e`` with the step axis moved to ``to``; reads indexed by the step get zero padding so the shifted
    position one past either end is a valid (zero) read."""
    moved = substitute(e, {t: to})
    memo: dict[Expr, Expr] = {}
    for n in moved.walk():
        if n.op is ExprOp.LOAD and any(to in (i,) or t in i.free_symbols for i in n.arg.index):
            acc = n.arg
            pad = tuple((sympy.Integer(1), sympy.Integer(1)) if t in i.free_symbols else acc.padding(k)
                        for k, i in enumerate(acc.index))
            memo[n] = Expr(ExprOp.LOAD, n.dtype, (), Access(acc.tensor, acc.index, pad))
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[moved]


def _padded_read(name: str, axes: tuple[Axis, ...], t: Axis, to, op: Op, steps) -> Expr:
    tt = op.tensor(name)
    dt = accum_dtype(tt.dtype)
    pad = tuple((1, 1) if a == t else (0, 0) for a in axes)
    return load(name, tuple(to if a == t else a for a in axes), dt, pad)


def grad_op(op: Op, wrt: Sequence[str]) -> Op:
    """The backward op of ``op``: inputs are ``op``'s inputs plus ``grad_<output>`` for every output; outputs are
    ``grad_<name>`` for each name in ``wrt`` (floating inputs)."""
    for name in wrt:
        t = op.tensor(name)
        if t.kind != "input" or not t.dtype.is_float:
            raise IRError(f"grad of {op.name}: {name!r} is not a floating input")
    return _Grad(op, wrt).run()


__all__ = ["grad_op"]
_ = replace
