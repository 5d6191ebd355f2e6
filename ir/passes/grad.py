"""The grad transform: reverse-mode differentiation of a forward op into a backward op, in the same IR.

The backward op recomputes the forward nodes (no saved intermediates), then walks them in reverse. Rules:
a Map or sum-Reduce passes its adjoint to every load through the symbolic derivative of its value; an affine
Scan's adjoint is a *reverse* affine scan of the adjoint with the coefficient shifted by one step
(``lam[t] = g[t] + a[t+1] * lam[t+1]``), giving ``d a[t] = lam[t] * h[t-1]`` and ``d b[t] = lam[t]``. Adjoints
are scattered back to each tensor through its index: plain axes map directly, axes missing from the index are
summed, constant indices (a final-state read) select one position, and ``axis // D`` indices (grouped
projections) sum over the group.

Window reductions (convolutions, reads ``x.pad[..., o*s + k*d - p]``): a window index is solved for its output
axis, ``o = (u + p - k*d) / s``, so a data gradient is the transposed window reduction
``dx[..., u] = sum_k dy.pad[..., (u + p - k*d) / s] * w[..., k]`` (the adjoint read with the zero padding its new
range needs; stride ``s > 1`` adds the predicate ``(u + p - k*d) % s == 0``). A grouped channel
``(co // F) * C + ci`` is split as ``co = (u // C) * F + f``, ``ci = u % C``. Weight indices are plain axes, so
a weight gradient is the correlation ``dw[co, ci, k] = sum_{n, o} dy[n, co, o] * x.pad[n, chan, o*s + k*d - p]``.
Nodes no requested gradient reads are dropped, and an adjoint that passes through unchanged (a bias add) is
reused rather than copied, so a single stride-1 data or dense weight gradient is a plain window reduction
(:func:`~opgen.ir.passes.window.fuse_window` recognizes it).

Gather-style reads: an index that is a bijection of one frame axis onto the tensor dim (``n - 1 - a``, a circular
shift ``(a + c) % n``, a serpentine column ``Piecewise((w, r % 2 == 0), (W - 1 - w, True))``) scatters as a gather
through its inverse. Any other index falls back to the definition of the adjoint, a sum over the frame where
``index == u`` (:meth:`_Grad.scatter_general`: correct for every read, O(frame x tensor)). A scan in a traversal
order (row / column major, zigzag, strided, reversed) has the reverse scan in the same traversal as its adjoint
(:meth:`_Grad.traversal_scan`). Only nodes that depend on a requested input are differentiated; a node without
a rule (a max / min / prod reduction, a general-monoid scan) raises :class:`IRError` naming the node, its kind
and why.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import replace
from typing import Sequence

import sympy

from ..builder import OpBuilder, TensorRef
from ..dtypes import accum_dtype
from ..errors import IRError
from ..expr import Access, Expr, ExprOp, const, free_symbols, index, load, loads, substitute, where
from ..index import affine, bounds, proved
from ..nodes import SUM, Affine, Map, Reduce, Scan
from ..op import Op
from ..symbols import Axis, axes_in
from ..traversal import CHAIN, STEP, Traversal, column_major, row_major, strided, zigzag
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
        self.shapes: dict[str, tuple] = {}
        # the tensors that depend on a requested input: only they carry adjoints (a node nothing requested
        # reads, e.g. a max-reduction output of another input, is never differentiated)
        self.active = set(self.wrt)
        for n in op.nodes:
            if any(a.tensor in self.active for e in n.exprs() for a in loads(e)):
                self.active.add(n.out)

    def fresh_axis(self, extent) -> Axis:
        a = self.bld.axis(f"g{next(self.counter)}", extent)
        self.ext[a] = sympy.sympify(extent)
        return a

    def needs(self, tensor: str) -> bool:
        t = self.op.tensor(tensor)
        return t.dtype.is_float and tensor in self.active

    # scatter an adjoint contribution g * dv (over frame axes) to the tensor read by `acc` -----------------
    def scatter(self, acc: Access, frame: tuple[Axis, ...], g: Expr, dv: Expr | None = None) -> None:
        """Add ``g * dv`` (an Expr over ``frame``) to the adjoint of ``acc.tensor`` at ``acc.index``.

        Each index is inverted: a plain axis becomes an output axis; a constant selects one position; ``a // D``
        sums over the group; a grouped channel ``(co // F) * C + ci`` is split as ``co = (u // C) * F + f``,
        ``ci = u % C`` (f summed); a window index ``o*s + k*d + c`` (a convolution's sliding read, padded or not)
        is solved for its output axis, ``o = (u - k*d - c) / s``, giving the transposed window reduction: every
        read that depended on ``o`` gets the zero padding that makes positions outside its tensor read 0, and a
        stride ``|s| > 1`` adds the predicate ``(u - k*d - c) % s == 0``.
        """
        t = self.op.tensor(acc.tensor)
        dv = _drop_ones(dv) if dv is not None else None
        if dv is not None and dv.op is ExprOp.CONST and dv.arg == 1:
            dv = None
        c = g * dv if dv is not None else g
        out_axes, subst, preds, extra = [], {}, [], []
        used: set[Axis] = set()
        windowed: dict[Axis, tuple[sympy.Expr, Axis]] = {}   # eliminated output axis -> (its value, its extent src)
        frame_set = set(frame)

        def occurs_once(a: Axis, k: int) -> bool:
            return all(a not in axes_in(ie) for j, ie in enumerate(acc.index) if j != k)

        for k, ie in enumerate(acc.index):
            ax = axes_in(ie)
            if isinstance(ie, Axis) and ie in frame_set and ie not in used:
                out_axes.append(ie)
                used.add(ie)
                continue
            if not ax:
                x = self.fresh_axis(t.shape[k])
                out_axes.append(x)
                preds.append(sympy.Eq(x, ie))
                continue
            if isinstance(ie, sympy.floor) and len(ax) == 1:
                (a,) = ax
                num, den = sympy.fraction(sympy.together(ie.args[0]))
                if num != a or a in used or axes_in(den):
                    return self.scatter_general(acc, frame, c)
                x, r = self.fresh_axis(t.shape[k]), self.fresh_axis(den)
                subst[a] = x * den + r
                out_axes.append(x)
                extra.append(r)
                used.add(a)
                continue
            win = _window_axis(ie, frame, used, lambda a: occurs_once(a, k))
            if win is not None:
                o, a_coef = win
                u = self.fresh_axis(t.shape[k])
                rest = sympy.expand(ie - a_coef * o)
                num = sympy.expand(u - rest)
                if abs(a_coef) == 1:
                    val = sympy.expand(num * a_coef)
                else:
                    val = sympy.floor(num / a_coef)
                    preds.append(sympy.Eq(sympy.Mod(num, abs(a_coef)), 0))
                subst[o] = val
                windowed[o] = (val, o)
                out_axes.append(u)
                used.add(o)
                continue
            grp = _grouped_channel(ie, frame_set - used)
            if grp is not None and all(occurs_once(a, k) for a in (grp[0], grp[1])):
                co, ci, C, Fg = grp
                u = self.fresh_axis(t.shape[k])
                blk = sympy.floor(u / C)
                if Fg == 1:
                    subst[co] = blk
                else:
                    f = self.fresh_axis(Fg)
                    subst[co] = blk * Fg + f
                    extra.append(f)
                subst[ci] = u - C * blk
                out_axes.append(u)
                used |= {co, ci}
                continue
            inv = _inverse_read(ie, [a for a in frame if a not in used and occurs_once(a, k)], self.ext,
                                t.shape[k])
            if inv is not None:
                a, of_u = inv
                u = self.fresh_axis(t.shape[k])
                subst[a] = of_u(u)
                out_axes.append(u)
                used.add(a)
                continue
            return self.scatter_general(acc, frame, c)
        if any(axes_in(v) & set(subst) for v in subst.values()):
            # an inverse map that reads another substituted axis (a Piecewise condition on a window axis):
            # one simultaneous substitution would be wrong
            return self.scatter_general(acc, frame, c)
        if windowed:
            # a read that depended on an eliminated output axis o is zero outside o's range only if it is the
            # adjoint itself (padded below); anything else that depends on o needs o's bounds as a predicate
            if not _zero_outside(g, set(windowed)) or (dv is not None and set(windowed) & _expr_axes(dv)):
                for o, (val, _) in windowed.items():
                    preds += [sympy.Ge(val, 0), sympy.Le(val, self.ext[o] - 1)]
            c = self.substitute_padded(c, subst, set(windowed))
        elif subst:
            # reads of the scattered position itself are the output position (x[L-1-t] at t = L-1-u is x[u]):
            # say so directly rather than leave the composed inverse in the index
            c = substitute(_reindex(c, acc, tuple(out_axes)), subst)
        pred = index(sympy.And(*preds)) if preds else None
        rest = tuple(a for a in frame if a not in used) + tuple(extra)
        if (not rest and pred is None and c.op is ExprOp.LOAD and c.arg.pad is None
                and tuple(c.arg.index) == tuple(out_axes) and len(set(out_axes)) == len(out_axes)
                and c.dtype == accum_dtype(t.dtype)):
            # the adjoint passes through unchanged (a bias add, an identity epilogue): reuse it, no copy node
            ref = TensorRef(c.arg.tensor, len(out_axes), c.dtype)
            self.adj.setdefault(acc.tensor, []).append(_Contribution(ref, tuple(out_axes)))
            return
        self.add_contribution(acc.tensor, rest, c, pred, tuple(out_axes))

    def add_contribution(self, tensor: str, rest: tuple[Axis, ...], c: Expr, pred: Expr | None,
                         out_axes: tuple[Axis, ...]) -> None:
        """Add ``c`` (summed over ``rest``, zero where ``pred`` fails) over ``out_axes`` to ``tensor``'s adjoint."""
        if rest:
            ref = self.bld.reduce(rest, c, where=pred, axes=out_axes)
        else:
            ref = self.bld.map(where(pred, c, 0.0) if pred is not None else c, out_axes)
        self.shapes[ref.name] = tuple(self.ext[a] for a in out_axes)
        self.adj.setdefault(tensor, []).append(_Contribution(ref, out_axes))

    def scatter_general(self, acc: Access, frame: tuple[Axis, ...], c: Expr) -> None:
        """The adjoint of any read, by definition: ``adj[u] += sum over frame of c where index(frame) == u``.

        Used when no index rule of :meth:`scatter` applies and the index is not a bijection it can invert
        (``x[b, (t + k) % L]``, a Piecewise whose condition reads its own axis, ...). Every index that is not
        a plain frame axis (occurring once) gets an output axis ``u`` and the predicate ``index == u``; all
        other frame axes are summed. Always correct, also for reads that are not injective or read a position
        several times, but it costs O(frame x tensor) instead of O(frame): an O(n^2) reduction for a 1-D read.
        """
        t = self.op.tensor(acc.tensor)
        out_axes, preds = [], []
        for k, ie in enumerate(acc.index):
            if (isinstance(ie, Axis) and ie in frame and ie not in out_axes
                    and all(ie not in axes_in(o) for j, o in enumerate(acc.index) if j != k)):
                out_axes.append(ie)
                continue
            u = self.fresh_axis(t.shape[k])
            out_axes.append(u)
            preds.append(sympy.Eq(ie, u))
        rest = tuple(a for a in frame if a not in out_axes)
        pred = index(sympy.And(*preds)) if preds else None
        self.add_contribution(acc.tensor, rest, c, pred, tuple(out_axes))

    def shape_of(self, name: str) -> tuple[sympy.Expr, ...]:
        if name in self.shapes:
            return self.shapes[name]
        if name.startswith("grad_") and name not in {t.name for t in self.op.tensors}:
            return self.op.tensor(name[5:]).shape
        return self.op.tensor(name).shape

    def substitute_padded(self, e: Expr, mapping: dict, moved: set[Axis]) -> Expr:
        """``substitute(e, mapping)``, giving every index that depended on an axis of ``moved`` the zero padding
        its new range needs (positions outside the tensor then read 0)."""
        memo: dict[Expr, Expr] = {}
        for n in e.walk():
            if n.op is ExprOp.INDEX:
                memo[n] = index(n.arg.xreplace(mapping))
            elif n.op is ExprOp.LOAD:
                a = n.arg
                idx = tuple(i.xreplace(mapping) for i in a.index)
                pads = []
                shape = None
                for k, (old, new) in enumerate(zip(a.index, idx)):
                    lo_p, hi_p = (sympy.sympify(p).xreplace(mapping) for p in a.padding(k))
                    if axes_in(old) & moved:
                        shape = shape if shape is not None else self.shape_of(a.tensor)
                        lo, hi = bounds(new, self.ext)
                        if not proved(sympy.Ge(lo, -lo_p)):
                            lo_p = _max0(lo_p, -lo)
                        if not proved(sympy.Le(hi, shape[k] - 1 + hi_p)):
                            hi_p = _max0(hi_p, hi - (shape[k] - 1))
                    pads.append((lo_p, hi_p))
                padded = any(lo != 0 or hi != 0 for lo, hi in pads)
                memo[n] = Expr(ExprOp.LOAD, n.dtype, (), Access(a.tensor, idx, tuple(pads) if padded else None))
            elif n.src:
                memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
            else:
                memo[n] = n
        return memo[e]

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
                self.scatter(leaf.arg, frame, g, dv)

    # node rules ---------------------------------------------------------------------------------------
    def node(self, n) -> None:
        g = self.total(n.out, n.axes)
        if g is None or not self.needs(n.out):
            return
        try:
            self.node_rule(n, g)
        except IRError as e:
            if f"node {n.out} (" in str(e):
                raise
            raise IRError(f"grad of {self.op.name}: node {n.out} ({type(n).__name__}) is not differentiated: "
                          f"{e}") from e

    def undifferentiable(self, n, why: str) -> IRError:
        """The error for a node the transform has no rule for: names the node, its kind, why, and the requested
        inputs whose gradients flow through it."""
        need = ", ".join(sorted(x for x in self.wrt if x in self.upstream(n)))
        return IRError(f"grad of {self.op.name}: node {n.out} ({type(n).__name__}) is not differentiated: {why} "
                       f"(the gradient of {need or 'a requested input'} flows through it)")

    def upstream(self, n) -> set[str]:
        """The tensors node ``n`` depends on, transitively."""
        producers = {m.out: m for m in self.op.nodes}
        seen: set[str] = set()
        todo = [a.tensor for e in n.exprs() for a in loads(e)]
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            if x in producers:
                todo += [a.tensor for e in producers[x].exprs() for a in loads(e)]
        return seen

    def node_rule(self, n, g: Expr) -> None:
        if isinstance(n, Map):
            self.chain(n.value, n.axes, g)
        elif isinstance(n, Reduce):
            if n.monoid != SUM:
                raise self.undifferentiable(n, f"a {n.monoid} reduction over {', '.join(map(str, n.raxes))} has "
                                               f"no adjoint rule (only sum reductions do)")
            val = n.value if n.predicate is None else where(n.predicate, n.value, 0.0)
            self.chain(val, n.axes + n.raxes, g)
        elif (isinstance(n, Scan) and isinstance(n.combine, Affine) and len(n.scan_axes) == 1
              and n.traversal.name in ("forward", "reverse")):
            self.scan(n, g)
        elif isinstance(n, Scan) and isinstance(n.combine, Affine):
            self.traversal_scan(n, g)
        elif isinstance(n, Scan):
            raise self.undifferentiable(n, f"a scan with the {n.combine.monoid} combine has no adjoint rule (only "
                                           f"affine scans h = a * h[prev] + b do)")
        else:
            raise self.undifferentiable(n, "no adjoint rule for this node kind")

    def scan(self, n: Scan, g: Expr) -> None:
        (t,) = n.scan_axes
        steps = self.ext[t]
        reverse = n.traversal.coords[0] != STEP
        first, nxt, prev_ok, next_ok = ((steps - 1, t - 1, t < steps - 1, t > 0) if reverse
                                        else (sympy.Integer(0), t + 1, t > 0, t < steps - 1))
        prv = t + 1 if reverse else t - 1
        a, b = n.combine.a, n.combine.b
        a_next = where(index(next_ok), shifted_step(a, t, nxt, self.op, steps), 0.0)
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

    def traversal_scan(self, n: Scan, g: Expr) -> None:
        """An affine scan in any traversal order (row / column major, zigzag, strided, reversed or not).

        The traversal visits grid positions ``p`` at ordinals ``o(p)`` of a flat order, ``next(p) = pos(o(p) +
        d)``, ``prev(p) = pos(o(p) - d)`` (``d``: the stride between two steps of a chain, negated for a
        reversed traversal). The adjoint is the reverse scan in the same traversal, ``lam[p] = g[p] + a[next(p)]
        * lam[next(p)]``, giving ``d a[p] = lam[p] * h[prev(p)]`` and ``d b[p] = lam[p]``; the initial state's
        gradient is the sum of ``a[p] * lam[p]`` over the first position of every chain. Reads at ``next`` /
        ``prev`` are clamped into the grid and masked by the validity of the neighbour.
        """
        order = _traversal_order(n.traversal)
        if order is None:
            raise IRError(f"grad of {self.op.name}: node {n.out} (Scan) is not differentiated: its traversal "
                          f"{n.traversal.name!r} has no known inverse order (differentiable traversals: forward, "
                          f"reverse, row, column, zigzag, strided, and their reversals)")
        ordinal, pos_of, step, total, reverse_of = order
        axes = n.scan_axes
        o = ordinal(axes)

        def at(shift):
            q = o + shift
            ok = sympy.And(sympy.Ge(q, 0), sympy.Lt(q, total))
            clamped = sympy.Min(sympy.Max(q, 0), total - 1)
            return dict(zip(axes, pos_of(clamped))), ok

        nxt, next_ok = at(step)
        prv, prev_ok = at(-step)
        a, b = n.combine.a, n.combine.b
        a_next = where(index(next_ok), substitute(a, nxt), 0.0)
        lam = self.bld.scan(axes, a=a_next, b=g, traversal=reverse_of, axes=n.axes, name=f"adj_{n.out}")
        dt = accum_dtype(self.op.tensor(n.out).dtype)
        h_prev_read = load(n.out, tuple(prv.get(x, x) for x in n.axes), dt)
        init = n.init if n.init is not None else const(0.0, dt)
        lam_t = lam[tuple(n.axes)]
        self.chain(a, n.axes, lam_t * where(index(prev_ok), h_prev_read, init))
        self.chain(b, n.axes, lam_t)
        if n.init is not None and any(self.needs(x.tensor) for x in loads(n.init)):
            lanes = tuple(x for x in n.axes if x not in axes)
            g0 = self.bld.reduce(axes, a * lam_t, where=index(sympy.Not(prev_ok)), axes=lanes)
            self.shapes[g0.name] = tuple(self.ext[x] for x in lanes)
            self.chain(n.init, lanes, g0[lanes])

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
                parts = self.adj.get(name, [])
                if len(parts) == 1 and parts[0].axes is not None:
                    axes = parts[0].axes      # one contribution: the output is a pointwise copy on its axes
                else:
                    axes = tuple(self.fresh_axis(s) for s in t.shape)
                total = self.total(name, axes)
                val = total if total is not None else const(0.0, accum_dtype(t.dtype))
                outs[f"grad_{name}"] = bld.map(val, axes, name=f"grad_{name}", dtype=t.dtype)
            _prune(bld, {r.name for r in outs.values()})
            return bld.build(outs)


def _prune(bld: OpBuilder, live: set[str]) -> None:
    """Drop nodes nothing downstream reads (recomputed forward nodes a gradient does not need)."""
    keep = []
    for n in reversed(bld._nodes):
        if n.out in live:
            keep.append(n)
            for e in n.exprs():
                live |= {a.tensor for a in loads(e)}
    bld._nodes[:] = list(reversed(keep))


class _Contribution:
    """An adjoint term: a tensor over the target's dims (``axes`` None: an input indexed positionally)."""

    def __init__(self, ref: TensorRef, axes) -> None:
        self.ref, self.axes = ref, axes


def shifted_step(e: Expr, t: Axis, to, op: Op, steps) -> Expr:
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


def _reindex(e: Expr, acc: Access, to: tuple) -> Expr:
    """``e`` with every read of exactly ``acc`` made a read of ``acc.tensor[to]`` (no padding: ``to`` ranges over
    the tensor's positions)."""
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        if n.op is ExprOp.LOAD and n.arg == acc:
            memo[n] = load(acc.tensor, to, n.dtype)
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


def _drop_ones(e: Expr) -> Expr:
    """``e`` without multiplications by the constant 1 (the derivative of a product leaves ``1.0 * w``)."""
    if e.op is ExprOp.MUL:
        a, b = _drop_ones(e.lhs), _drop_ones(e.rhs)
        for one, other in ((a, b), (b, a)):
            if one.op is ExprOp.CONST and one.arg == 1 and one.dtype == other.dtype:
                return other
        return e if (a is e.lhs and b is e.rhs) else Expr(ExprOp.MUL, e.dtype, (a, b))
    return e


def _expr_axes(e: Expr) -> set[Axis]:
    return {s for s in free_symbols(e) if isinstance(s, Axis)}


def _max0(old: sympy.Expr, need: sympy.Expr) -> sympy.Expr:
    """The larger of an existing pad and the pad a new index range needs (never below 0)."""
    return sympy.Max(sympy.Integer(0), sympy.sympify(old), sympy.expand(need))


def _window_axis(ie: sympy.Expr, frame: tuple[Axis, ...], used: set[Axis], once) -> tuple[Axis, int] | None:
    """The axis to solve an affine index for (the first frame axis, i.e. an output axis of the node before its
    reduction axes, with a nonzero integer coefficient that occurs in no other index) and its coefficient."""
    ax = axes_in(ie)
    if not ax or not ax <= set(frame):
        return None
    dec = affine(ie, ax)
    if dec is None:
        return None
    coeffs, _ = dec
    for a in frame:
        c = sympy.sympify(coeffs.get(a, 0))
        if a in ax and a not in used and c.is_Integer and c != 0 and once(a):
            return a, int(c)
    return None


_ORDERS = {"row": row_major, "forward": row_major, "column": column_major, "zigzag": zigzag}


@functools.lru_cache(maxsize=64)
def _traversal_order(tr: Traversal):
    """``(ordinal, pos, step, total, reverse)`` for a traversal opgen knows how to invert: ``ordinal(axes)``, the
    position of grid point ``axes`` in the traversal's flat order; ``pos(o)`` its inverse; ``step`` the ordinal
    distance between consecutive steps of a chain (negative when the traversal is reversed); ``total`` the
    number of grid points; ``reverse`` the same traversal in the opposite direction. None for an unknown
    traversal. The inverse is checked against ``tr.coords`` on small concrete grids (never silently wrong)."""
    name = tr.name
    rev = name.endswith("_reversed") or name == "reverse"
    base = name[: -len("_reversed")] if name.endswith("_reversed") else ("forward" if name == "reverse" else name)
    g = tr.grid
    total = sympy.Mul(*g)
    if base in _ORDERS:
        make = _ORDERS[base]
        d = sympy.Integer(1)
        fwd = make(g)
        reverse_of = make(g, reverse=not rev)

        def pos_of(o, fwd=fwd):
            return tuple(c.xreplace({STEP: o}) for c in fwd.coords)
    elif base.startswith("strided") and base[len("strided"):].isdigit():
        d = sympy.Integer(int(base[len("strided"):]))
        fwd = row_major(g)
        reverse_of = strided(g, int(d), reverse=not rev)

        def pos_of(o, fwd=fwd):
            return tuple(c.xreplace({STEP: o}) for c in fwd.coords)
    else:
        return None

    def ordinal(axes, base=base):
        if base == "column":
            return axes[1] * g[0] + axes[0]
        flat = sympy.Integer(0)
        for k, x in enumerate(axes):
            inner = sympy.Mul(*g[k + 1:])
            if base == "zigzag" and k == 1:
                x = sympy.Piecewise((x, sympy.Eq(axes[0] % 2, 0)), (g[1] - 1 - x, True))
            flat = flat + x * inner
        return flat

    if not _order_matches(tr, ordinal, d if not rev else -d, total):
        return None
    return ordinal, pos_of, (-d if rev else d), total, reverse_of


def _order_matches(tr: Traversal, ordinal, step, total) -> bool:
    """Whether ``ordinal(coords(chain, s))`` advances by ``step`` per step along every chain, over all valid steps,
    on a few small grids (the sizes every dim of the grid takes)."""
    syms = sorted(set().union(*(sympy.sympify(x).free_symbols for x in tr.grid)), key=str)
    probe = sympy.symbols(f"p0:{len(tr.grid)}", integer=True, nonnegative=True)
    o_expr = ordinal(probe)
    for vals in ((3, 4, 2, 5), (2, 5, 3, 3), (1, 3, 4, 1), (4, 1, 2, 2)):
        env = {sym: sympy.Integer(vals[i % len(vals)]) for i, sym in enumerate(syms)}
        chains, steps = int(tr.chains.xreplace(env)), int(tr.steps.xreplace(env))
        tot = int(sympy.sympify(total).xreplace(env))
        seen = set()
        for c in range(chains):
            prev = None
            for s in range(steps):
                at = {STEP: sympy.Integer(s), CHAIN: sympy.Integer(c)}
                if not bool(sympy.sympify(tr.valid).xreplace(env).xreplace(at)):
                    continue
                p = [int(x.xreplace(env).xreplace(at)) for x in tr.coords]
                o = int(sympy.sympify(o_expr).xreplace({q: sympy.Integer(v) for q, v in zip(probe, p)}).xreplace(env))
                if prev is not None and o - prev != int(step):
                    return False
                prev = o
                seen.add(o)
        if seen != set(range(tot)):
            return False
    return True


def _same(x, y) -> bool:
    return sympy.simplify(sympy.sympify(x) - sympy.sympify(y)) == 0


def _inverse_read(ie: sympy.Expr, avail: list[Axis], ext, size):
    """``(a, inv)`` when the index ``ie``, as a function of the frame axis ``a`` (the other axes held fixed), is
    a bijection of ``[0, ext[a])`` onto ``[0, size)``: each position of the tensor dim is read exactly once. Then
    the adjoint is a gather through ``a = inv(u)``. Recognized: ``a``, ``n - 1 - a`` (a reversed read),
    ``(±a + c) % n`` (a circular shift, any integer ``c`` over other axes), and a ``Piecewise`` whose conditions
    do not read ``a`` and whose every branch is one of these (a serpentine / zigzag column)."""
    for a in avail:
        if a not in axes_in(ie):
            continue
        inv = _invert1(ie, a, ext[a], size)
        if inv is not None:
            return a, inv
    return None


def _invert1(e: sympy.Expr, a: Axis, n, size):
    if not _same(n, size):
        return None
    if isinstance(e, sympy.Piecewise):
        parts = []
        for val, cond in e.args:
            if a in getattr(cond, "free_symbols", set()):
                return None
            f = _invert1(val, a, n, size)
            if f is None:
                return None
            parts.append((f, cond))
        return lambda u: sympy.Piecewise(*((f(u), cond) for f, cond in parts))
    if isinstance(e, sympy.Mod):
        y, m = e.args
        if not _same(m, n):
            return None
        dec = affine(y, {a})
        if dec is None:
            return None
        coeffs, c = dec
        s = sympy.sympify(coeffs.get(a, 0))
        if s == 1:
            return lambda u: sympy.Mod(u - c, n)
        if s == -1:
            return lambda u: sympy.Mod(c - u, n)
        return None
    dec = affine(e, set(axes_in(e)))
    if dec is None:
        return None
    coeffs, c = dec
    if set(coeffs) != {a}:
        return None
    s = sympy.sympify(coeffs[a])
    if s == 1 and _same(c, 0):
        return lambda u: u
    if s == -1 and _same(c, n - 1):
        return lambda u: n - 1 - u
    return None


def _grouped_channel(ie: sympy.Expr, avail: set[Axis]):
    """``ie == (co // F) * C + ci`` (or ``co * C + ci``) over available axes: (co, ci, C, F), else None."""
    ax = axes_in(ie)
    if len(ax) != 2 or not ax <= avail:
        return None
    for ci in ax:
        (co,) = ax - {ci}
        rest = sympy.expand(ie - ci)
        if rest.has(ci) or rest == 0:
            continue
        C, Fg, seen = sympy.Integer(1), None, False
        ok = True
        for f in sympy.Mul.make_args(rest):
            if f == co and not seen:
                seen, Fg = True, sympy.Integer(1)
            elif isinstance(f, sympy.floor) and not seen:
                num, den = sympy.fraction(sympy.together(f.args[0]))
                if num != co or axes_in(den):
                    ok = False
                    break
                seen, Fg = True, den
            elif axes_in(f):
                ok = False
                break
            else:
                C = C * f
        if ok and seen and (C.is_positive or (C.is_Integer and C > 0)):
            return co, ci, C, Fg
    return None


def _zero_outside(g: Expr, moved: set[Axis]) -> bool:
    """Whether ``g`` is zero once its reads at an axis of ``moved`` (padded by the transposition) fall outside
    their tensors: a sum of terms each with such a read as a factor."""
    if g.op is ExprOp.LOAD:
        return any(isinstance(i, Axis) and i in moved for i in g.arg.index)
    if g.op is ExprOp.ADD:
        return all(_zero_outside(s, moved) for s in g.src)
    if g.op is ExprOp.MUL:
        return any(_zero_outside(s, moved) for s in g.src)
    if g.op in (ExprOp.CAST, ExprOp.NEG):
        return _zero_outside(g.operand, moved)
    return False


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
