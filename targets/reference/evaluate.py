"""The reference interpreter: evaluates any verified op with torch, vectorized over every non-scan axis.

It is the oracle for compiled kernels and the fallback backend. Values are computed in the accumulation dtype
(f32 for f16/bf16 inputs, f64 stays f64) and outputs are cast to their declared dtypes at the end. Scans run
step by step (exact; never the cumprod/cumsum closed form). Sum-of-products reductions go through
``torch.einsum`` so attention scores or convolution windows never materialize the full iteration space; other
reductions are chunked along a reduction axis to stay within a memory budget. Autograd flows through it.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import sympy
import torch
import torch.nn.functional as F

from opgen.ir import (SUM, Access, Affine, Binding, DType, Expr, ExprOp, Map, Monoid, Op, Reduce, Scan,
                      accum_dtype, access_report)
from opgen.ir.dtypes import to_torch
from opgen.ir.traversal import CHAIN, STEP

from .index_eval import eval_index

DEFAULT_MAX_ELEMENTS = 1 << 26


@dataclass
class _Frame:
    axes: tuple
    shape: tuple[int, ...]
    env: dict
    device: torch.device
    starts: tuple[int, ...] = ()     # each axis's first value (0 unless a range was given)


def _frame(axes, binding: Binding, device, ranges: Mapping | None = None) -> _Frame:
    env: dict = {d: v for d, v in binding.dims.items()}
    shape, starts = [], []
    for k, a in enumerate(axes):
        start, n = (ranges or {}).get(a, (0, binding.extents[a]))
        view = [1] * len(axes)
        view[k] = n
        env[a] = torch.arange(start, start + n, device=device).view(view)
        shape.append(n)
        starts.append(int(start))
    return _Frame(tuple(axes), tuple(shape), env, device, tuple(starts))


@functools.lru_cache(maxsize=256)
def _masked_accesses(op: Op) -> frozenset[tuple[str, Access]]:
    return frozenset((out, acc) for out, acc, st in access_report(op) if st.padded or st.guarded)


def _compute_dtype(d: DType) -> torch.dtype:
    return to_torch(accum_dtype(d)) if d.is_float else to_torch(d)


class _Evaluator:
    def __init__(self, op: Op, tensors: dict[str, torch.Tensor], binding: Binding, device, max_elements: int,
                 node_runner=None):
        self.op, self.tensors, self.binding, self.device = op, tensors, binding, device
        self.masked = _masked_accesses(op)
        self.max_elements = max_elements
        self.node_runner = node_runner

    # expressions ----------------------------------------------------------------------------------------
    def expr(self, e: Expr, fr: _Frame, node_out: str, args: tuple = ()) -> torch.Tensor:
        memo: dict[Expr, torch.Tensor] = {}
        for n in e.walk():
            memo[n] = self._node(n, memo, fr, node_out, args)
        return memo[e]

    def _node(self, n: Expr, memo, fr: _Frame, node_out: str, args) -> torch.Tensor:
        op = n.op
        dt = _compute_dtype(n.dtype)
        if op is ExprOp.CONST:
            return torch.tensor(n.arg, dtype=dt, device=self.device)
        if op is ExprOp.INDEX:
            return torch.as_tensor(eval_index(n.arg, fr.env), device=self.device).to(dt)
        if op is ExprOp.ARG:
            return args[n.arg]
        if op is ExprOp.LOAD:
            return self._load(n.arg, fr, node_out).to(dt)
        s = [memo[x] for x in n.src]
        if op is ExprOp.CAST:
            return s[0].to(to_torch(n.dtype)).to(dt)
        return _APPLY[op](*s)

    def _load(self, acc: Access, fr: _Frame, node_out: str) -> torch.Tensor:
        src = self.tensors[acc.tensor]
        rank = len(fr.shape)
        masked = (node_out, acc) in self.masked
        view = _direct_view(src, acc, fr, masked)
        if view is not None:
            return view
        idx, valid = [], None
        for k, ie in enumerate(acc.index):
            i = eval_index(ie, fr.env)
            i = torch.as_tensor(i, device=self.device, dtype=torch.int64)
            if i.dim() < rank:
                i = i.reshape([1] * (rank - i.dim()) + list(i.shape))
            if masked:
                ok = (i >= 0) & (i < src.shape[k])
                valid = ok if valid is None else valid & ok
                i = i.clamp(0, src.shape[k] - 1)
            idx.append(i)
        out = src[tuple(idx)] if idx else src.reshape([1] * rank)
        if valid is not None:
            out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=self.device))
        return out

    # nodes ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, torch.Tensor]:
        for k, node in enumerate(self.op.nodes):
            done = self.node_runner(k, self.tensors) if self.node_runner is not None else None
            if done is SKIPPED:
                continue
            if done is not None:
                self.tensors[node.out] = done
                continue
            if isinstance(node, Map):
                fr = _frame(node.axes, self.binding, self.device)
                val = self._interleave(node, fr)
                if val is None:
                    val = self.expr(node.value, fr, node.out).expand(fr.shape)
            elif isinstance(node, Reduce):
                val = self._reduce(node)
            else:
                val = self._scan(node)
            self.tensors[node.out] = val
        return {t.name: self.tensors[t.name].to(to_torch(t.dtype)).contiguous() for t in self.op.outputs}

    def _interleave(self, node: Map, fr: _Frame) -> torch.Tensor | None:
        """A map that takes each position from one of several tensors, chosen by the residues of some axes
        modulo their strides and read at ``floor(axis / s)`` (the phase interleave of
        :mod:`opgen.ir.passes.phases`), as one strided copy per tensor; None for any other map."""
        branches = _phase_branches(node.value, fr.axes)
        if branches is None or any(fr.starts):
            return None
        out = torch.empty(fr.shape, dtype=_compute_dtype(node.value.dtype), device=self.device)
        for residues, acc in branches:
            src = self.tensors[acc.tensor]
            dst, part = [], []
            for p, a in enumerate(fr.axes):
                if a in residues:
                    s, r = residues[a]
                    n = len(range(r, fr.shape[p], s))
                    if src.shape[p] < n:
                        return None
                    dst.append(slice(r, None, s))
                    part.append(slice(0, n))
                else:
                    if src.shape[p] != fr.shape[p]:
                        return None
                    dst.append(slice(None))
                    part.append(slice(None))
            out[tuple(dst)] = src[tuple(part)]
        return out

    def _reduce(self, node: Reduce) -> torch.Tensor:
        if node.monoid == SUM and node.value.op is ExprOp.MUL and self._factors_fit(node):
            return self._contract(node)
        ax = node.axes + node.raxes
        numel = math.prod(self.binding.extents[a] for a in ax)
        out_shape = tuple(self.binding.extents[a] for a in node.axes)
        if numel <= self.max_elements or not node.raxes:
            return self._reduce_range(node, {})
        first = node.raxes[0]
        ext = self.binding.extents[first]
        chunk = max(1, ext * self.max_elements // numel)
        acc = None
        for start in range(0, ext, chunk):
            part = self._reduce_range(node, {first: (start, min(chunk, ext - start))})
            acc = part if acc is None else _combine(node.monoid, acc, part, self)
        return acc.reshape(out_shape)

    def _reduce_range(self, node: Reduce, ranges) -> torch.Tensor:
        fr = _frame(node.axes + node.raxes, self.binding, self.device, ranges)
        val = self.expr(node.value, fr, node.out).expand(fr.shape)
        if node.predicate is not None:
            pred = self.expr(node.predicate, fr, node.out).expand(fr.shape)
            ident = torch.tensor(node.monoid.identity, dtype=val.dtype, device=self.device)
            val = torch.where(pred, val, ident)
        dims = tuple(range(len(node.axes), len(fr.shape)))
        if not dims:
            return val
        return _reduce_dims(node.monoid, val, dims, self)

    def _factors_fit(self, node: Reduce) -> bool:
        """Whether every factor of a sum of products fits the memory budget on its own axes."""
        from opgen.ir.verify import axes_in_expr

        for f in _mul_factors(node.value) + ([node.predicate] if node.predicate is not None else []):
            if math.prod(self.binding.extents[a] for a in axes_in_expr(f)) > self.max_elements:
                return False
        return True

    def _contract(self, node: Reduce) -> torch.Tensor:
        fr = _frame(node.axes + node.raxes, self.binding, self.device)
        factors = _mul_factors(node.value)
        tensors = [self.expr(f, fr, node.out) for f in factors]
        if node.predicate is not None:
            tensors.append(self.expr(node.predicate, fr, node.out))
        dt = _compute_dtype(node.value.dtype)
        letters = [chr(ord("a") + i) if i < 26 else chr(ord("A") + i - 26) for i in range(len(fr.shape))]
        ops, subs, present = [], [], set()
        for t in tensors:
            t = t.to(dt)
            t = t.reshape([1] * (len(fr.shape) - t.dim()) + list(t.shape))
            keep = [k for k in range(len(fr.shape)) if t.shape[k] != 1]
            ops.append(t.reshape([t.shape[k] for k in keep]))
            subs.append("".join(letters[k] for k in keep))
            present |= set(keep)
        n_out = len(node.axes)
        out_letters = "".join(letters[k] for k in range(n_out) if k in present)
        res = torch.einsum(",".join(subs) + "->" + out_letters, *ops)
        for k in range(n_out, len(fr.shape)):
            if k not in present and fr.shape[k] != 1:
                res = res * fr.shape[k]
        full = [fr.shape[k] if k in present else 1 for k in range(n_out)]
        return res.reshape(full).expand(fr.shape[:n_out])

    def _scan(self, node: Scan) -> torch.Tensor:
        fr = _frame(node.axes, self.binding, self.device)
        comb = node.combine
        if isinstance(comb, Affine):
            parts = [self.expr(comb.a, fr, node.out).expand(fr.shape), self.expr(comb.b, fr, node.out).expand(fr.shape)]
            idents = (1.0, 0.0)
        else:
            parts = [self.expr(comb.value, fr, node.out).expand(fr.shape)]
            idents = (comb.monoid.identity,)
        dt = torch.promote_types(*(p.dtype for p in parts)) if len(parts) > 1 else parts[0].dtype
        lane_pos = [k for k, a in enumerate(node.axes) if a not in node.scan_axes]
        grid_pos = [node.axes.index(a) for a in node.scan_axes]
        lanes = [fr.shape[k] for k in lane_pos]
        grid = [fr.shape[k] for k in grid_pos]
        perm = lane_pos + grid_pos
        flat = [p.to(dt).permute(perm).reshape(lanes + [math.prod(grid)]) for p in parts]
        pos, valid = self._positions(node, grid)
        if len(grid) == 1 and pos.shape[0] == 1 and bool(valid.all()):
            ar = torch.arange(grid[0], device=self.device)
            if torch.equal(pos[0], ar) or torch.equal(pos[0], ar.flip(0)):
                return self._scan_1d(node, comb, flat, idents, perm, lanes, grid, dt, reverse=bool(pos[0, 0] != 0))
        gathered = []
        for p, ident in zip(flat, idents):
            g = p[..., pos.clamp(0, max(0, p.shape[-1] - 1))]
            gathered.append(torch.where(valid, g, torch.tensor(ident, dtype=dt, device=self.device)))
        h0 = self._init(node, lanes, dt)
        states = _sequential(comb, gathered, None if h0 is None else h0.unsqueeze(-1), idents, self)
        out = torch.zeros(lanes + [math.prod(grid)], dtype=dt, device=self.device)
        vpos = pos[valid]
        out[..., vpos] = states[..., valid]
        return out.reshape(lanes + grid).permute(_inverse(perm))

    def _scan_1d(self, node: Scan, comb, flat, idents, perm, lanes, grid, dt, reverse: bool) -> torch.Tensor:
        """Forward or reversed scan over one axis: no gather, no scatter."""
        parts = [p.flip(-1) if reverse else p for p in flat]
        h0 = self._init(node, lanes, dt)
        states = _sequential(comb, parts, h0, idents, self)
        out = (states.flip(-1) if reverse else states).reshape(lanes + grid)
        return out.permute(_inverse(perm))

    def _init(self, node: Scan, lanes, dt):
        if node.init is None:
            return None
        lane_axes = tuple(a for a in node.axes if a not in node.scan_axes)
        lf = _frame(lane_axes, self.binding, self.device)
        return self.expr(node.init, lf, node.out).to(dt).expand(lanes)

    def _positions(self, node: Scan, grid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tr = node.traversal
        env = dict(self.binding.dims)
        chains, steps = self.binding.value(tr.chains), self.binding.value(tr.steps)
        env[CHAIN] = torch.arange(chains, device=self.device).view(chains, 1)
        env[STEP] = torch.arange(steps, device=self.device).view(1, steps)
        flat = torch.zeros((chains, steps), dtype=torch.int64, device=self.device)
        stride = 1
        for k in reversed(range(len(grid))):
            c = torch.as_tensor(eval_index(tr.coords[k], env), device=self.device).expand(chains, steps)
            flat = flat + c * stride
            stride *= grid[k]
        valid = torch.as_tensor(eval_index(tr.valid, env), device=self.device).expand(chains, steps)
        return flat, valid


@functools.lru_cache(maxsize=256)
def _phase_branches(value: Expr, axes: tuple) -> list[tuple[dict, Access]] | None:
    """``[(residues, access)]`` when ``value`` is ``where(c1, t1[..], where(c2, t2[..], .. tn[..]))`` with each
    condition a conjunction of ``Eq(Mod(axis, s), r)`` over the same axes and strides, every residue combination
    covered once (the last branch takes the one left), and each tensor read unpadded at the frame's axes in
    order, ``floor(axis / s)`` for the strided ones; None for anything else."""
    found: list[tuple[dict, Access]] = []
    e = value
    while e.op is ExprOp.WHERE:
        cond, a, e = e.src
        if cond.op is not ExprOp.INDEX or a.op is not ExprOp.LOAD:
            return None
        res = {}
        for cj in (cond.arg.args if isinstance(cond.arg, sympy.And) else (cond.arg,)):
            if not (isinstance(cj, sympy.Eq) and isinstance(cj.lhs, sympy.Mod) and cj.lhs.args[0] in axes
                    and cj.lhs.args[1].is_Integer and cj.rhs.is_Integer):
                return None
            res[cj.lhs.args[0]] = (int(cj.lhs.args[1]), int(cj.rhs))
        found.append((res, a.arg))
    if e.op is not ExprOp.LOAD or not found:
        return None
    strides = {ax: s for ax, (s, _) in found[0][0].items()}
    combos = set(itertools.product(*(range(s) for s in strides.values())))
    for res, _ in found:
        key = tuple(res.get(ax, (0, -1))[1] for ax in strides)
        if {ax: s for ax, (s, _) in res.items()} != strides or key not in combos:
            return None
        combos.discard(key)
    if len(combos) != 1:
        return None
    (last,) = combos
    found.append(({ax: (strides[ax], r) for ax, r in zip(strides, last)}, e.arg))
    for res, acc in found:
        if acc.pad is not None or len(acc.index) != len(axes):
            return None
        for ie, ax in zip(acc.index, axes):
            if ie != (sympy.floor(ax / res[ax][0]) if ax in res else ax):
                return None
    return found


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


@functools.lru_cache(maxsize=1024)
def _index_forms(index: tuple) -> tuple | None:
    """Per dim ``(axis, k, m, c)``: the index is ``floor(axis / k)`` (k > 1; m = 1, c = 0) or ``m*axis + c``
    (k = 1; the plain axis when m = 1, c = 0), each dim a distinct axis; None for any other index."""
    forms, seen = [], set()
    for ie in index:
        fd = _floor_div(ie)
        sh = _shifted(ie) if fd is None else None
        form = (fd[0], fd[1], 1, 0) if fd is not None else (sh[0], 1, sh[1], sh[2]) if sh is not None else (ie, 1, 1, 0)
        if form[0] in seen:
            return None
        seen.add(form[0])
        forms.append(form)
    return tuple(forms)


def _floor_div(ie) -> tuple[Any, int] | None:
    """(axis, k) when the index is ``floor(axis / k)`` with an integer k > 1."""
    if isinstance(ie, sympy.floor):
        num, den = sympy.fraction(sympy.together(ie.args[0]))
        if den.is_Integer and int(den) > 1 and num.is_Symbol:
            return num, int(den)
    return None


def _shifted(ie) -> tuple[Any, int, int] | None:
    """(axis, m, c) when the index is ``m*axis + c`` with integers m >= 1 and c, not the plain axis."""
    c, rest = ie.as_coeff_Add() if isinstance(ie, sympy.Add) else (sympy.Integer(0), ie)
    m, ax = rest.as_coeff_Mul() if isinstance(rest, sympy.Mul) else (sympy.Integer(1), rest)
    if c.is_Integer and m.is_Integer and int(m) >= 1 and ax.is_Symbol and (c != 0 or m != 1):
        return ax, int(m), int(c)
    return None


def _shift_dim(src: torch.Tensor, k: int, m: int, c: int, extent: int) -> torch.Tensor:
    """``out[.., t, ..] = src[.., m*t + c, ..]`` along dim k for t < extent, 0 where m*t + c falls outside."""
    lo = max(0, -(c // m))                                  # first t with m*t + c >= 0
    hi = min(extent, (src.shape[k] - 1 - c) // m + 1)       # one past the last t with m*t + c < size
    sl = [slice(None)] * src.dim()
    if hi > lo:
        start = m * lo + c
        sl[k] = slice(start, start + m * (hi - lo - 1) + 1, m)
    if lo == 0 and hi == extent:
        return src[tuple(sl)]                               # nothing falls outside: a strided view
    if hi <= lo:
        shape = list(src.shape)
        shape[k] = extent
        return src.new_zeros(shape)
    pad = [0, 0] * (src.dim() - k)                          # F.pad lists the last dim first
    pad[-2:] = [lo, extent - hi]
    return F.pad(src[tuple(sl)], pad)


def _direct_view(src: torch.Tensor, acc: Access, fr: _Frame, masked: bool = False) -> torch.Tensor | None:
    """``src`` as a broadcast view when every index is a distinct frame axis spanning its whole dim. An index
    ``floor(axis / k)`` (a zero-inserted or nearest-upsampled read) repeats each element k times along its dim,
    and an index ``m*axis + c`` takes every m-th element from c, with zeros where a masked (zero-padded) load
    falls outside (one vectorized copy each instead of a gather)."""
    forms = _index_forms(tuple(acc.index))
    if forms is None:
        return None
    pos = []
    for k, (ax, div, m, c) in enumerate(forms):
        if ax not in fr.axes:
            return None
        p = fr.axes.index(ax)
        if fr.starts[p]:
            return None
        if m != 1 or c != 0:
            src = _shift_dim(src, k, m, c, fr.shape[p])
        elif div == 1 and fr.shape[p] != src.shape[k]:
            return None
        if div != 1:
            if not (src.shape[k] - 1) * div < fr.shape[p] <= src.shape[k] * div:
                return None
            src = src.repeat_interleave(div, dim=k).narrow(k, 0, fr.shape[p])
        pos.append(p)
    order = sorted(range(len(pos)), key=lambda k: pos[k])
    v = src.permute(order) if order != list(range(len(pos))) else src
    shape = [1] * len(fr.shape)
    for k in range(len(pos)):
        shape[pos[k]] = src.shape[k]
    return v.reshape(shape) if v.is_contiguous() else v.contiguous().reshape(shape)


def _sequential(comb, gathered: list[torch.Tensor], h0, idents, ev: _Evaluator) -> torch.Tensor:
    """Step-by-step recurrence along the last dim of ``gathered`` (shape [..., chains, steps])."""
    cols = [g.movedim(-1, 0) for g in gathered]
    steps = cols[0].shape[0]
    h = h0
    outs = []
    for s in range(steps):
        if isinstance(comb, Affine):
            a, b = cols[0][s], cols[1][s]
            h = b if h is None else a * h + b
        else:
            x = cols[0][s]
            h = x if h is None else _combine(comb.monoid, h, x, ev)
        outs.append(h)
    return torch.stack(outs, dim=-1)


def _combine(m: Monoid, acc: torch.Tensor, x: torch.Tensor, ev: _Evaluator) -> torch.Tensor:
    fast = {"sum": torch.add, "prod": torch.mul, "max": torch.maximum, "min": torch.minimum}
    if m.name in fast and m.combine == _builtin_combine(m.name):
        return fast[m.name](acc, x)
    fr = _Frame((), (), {}, ev.device, ())
    return ev.expr(m.combine, fr, "", (acc, x))


@functools.lru_cache(maxsize=None)
def _builtin_combine(name: str) -> Expr:
    from opgen.ir.nodes import BUILTIN_MONOIDS

    return BUILTIN_MONOIDS[name].combine


def _reduce_dims(m: Monoid, val: torch.Tensor, dims: tuple[int, ...], ev: _Evaluator) -> torch.Tensor:
    if m.name == "sum" and m.combine == _builtin_combine("sum"):
        return val.sum(dim=dims)
    if m.name == "max" and m.combine == _builtin_combine("max"):
        return val.amax(dim=dims)
    if m.name == "min" and m.combine == _builtin_combine("min"):
        return val.amin(dim=dims)
    keep = val.shape[: dims[0]]
    x = val.reshape(list(keep) + [-1])
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            pad = torch.full(list(keep) + [1], m.identity, dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad], dim=-1)
        x = _combine(m, x[..., 0::2], x[..., 1::2], ev)
    return x[..., 0]


def _mul_factors(e: Expr) -> list[Expr]:
    if e.op is ExprOp.MUL:
        return _mul_factors(e.lhs) + _mul_factors(e.rhs)
    return [e]


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)


_APPLY = {
    ExprOp.NEG: torch.neg, ExprOp.EXP: torch.exp, ExprOp.LOG: torch.log, ExprOp.SQRT: torch.sqrt,
    ExprOp.ABS: torch.abs, ExprOp.SIGMOID: torch.sigmoid, ExprOp.SOFTPLUS: _softplus, ExprOp.SILU: F.silu,
    ExprOp.TANH: torch.tanh, ExprOp.NOT: torch.logical_not,
    ExprOp.ADD: torch.add, ExprOp.SUB: torch.sub, ExprOp.MUL: torch.mul, ExprOp.DIV: torch.div,
    ExprOp.MAX: torch.maximum, ExprOp.MIN: torch.minimum, ExprOp.POW: torch.pow,
    ExprOp.LT: torch.lt, ExprOp.LE: torch.le, ExprOp.GT: torch.gt, ExprOp.GE: torch.ge, ExprOp.EQ: torch.eq,
    ExprOp.NE: torch.ne, ExprOp.AND: torch.logical_and, ExprOp.OR: torch.logical_or,
    ExprOp.WHERE: torch.where,
}


class _Skipped:
    """The type of :data:`SKIPPED`."""

    def __repr__(self) -> str:
        return "SKIPPED"


#: what a node runner returns for a node computed inside a fused group whose result is not kept
SKIPPED = _Skipped()


def evaluate(op: Op, inputs: Mapping[str, torch.Tensor], binding: Binding,
             max_elements: int = DEFAULT_MAX_ELEMENTS, node_runner=None) -> dict[str, torch.Tensor]:
    """Run ``op`` on ``inputs`` (by name) with sizes ``binding``; returns the outputs by name.

    ``node_runner(index, tensors)`` may compute node ``index`` itself (e.g. on a compiled backend) from the
    tensors computed so far and return its result, or return None to let the interpreter evaluate it, or
    :data:`SKIPPED` for a node whose result nothing outside a fused group reads (the runner computed the group's
    results into ``tensors`` itself).
    """
    tensors = {}
    device = None
    for t in op.inputs:
        x = inputs[t.name]
        device = x.device if device is None else device
        tensors[t.name] = x
    return _Evaluator(op, tensors, binding, device or torch.device("cpu"), max_elements, node_runner).run()
