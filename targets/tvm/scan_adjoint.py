"""Render and run a scan's fused backward (:class:`opgen.ir.passes.scan_adjoint.ScanAdjointGroup`) on TVM.

One kernel computes every gradient the backward op reduces from the scan, lane by lane::

    for lane in T.parallel(kept lanes x split chunks):      # split: the lane axes the cross reductions sum over
        for each lane of the chunk (serial):
            if the steps need more than one chunk:         # pass 1: the state at every chunk boundary
                st = init; for chunk: ckp[lane, chunk] = st; for step in chunk: st = a * st + b
            adj = 0
            for chunk, last first:
                hb[0] = ckp[lane, chunk] (init for one chunk); ab = a
                for step in chunk: hb[step + 1] = a * hb[step] + b           # recompute the forward state
                for step in chunk, backwards:
                    for state: adj = a(step + 1) * adj + g                    # a(step + 1) carried from ab
                               point / lane / cross accumulators += value   # reads adj, hb, ab, inputs
                    point reductions -> outputs
            lane accumulators -> partial[lane, kept state]; tails (step 0) -> outputs

The chunk length (``chunk`` steps, static) bounds the per-lane scratch to ``(chunk + 1) x state`` elements; a
sequence that fits in one chunk runs no first pass. Nothing of the scan's full size is ever written: the
partials are ``[lanes, kept state]`` and ``[splits, kept lanes, kept state, steps]``, summed by the caller
(``splits`` is the number of parallel chunks of the split lanes, 1 on one thread).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import sympy

from opgen.ir import DType, ExprOp, promote
from opgen.ir.expr import Access, Expr, load, loads
from opgen.ir.nodes import TensorParam
from opgen.ir.passes.scan_adjoint import (ScanAdjointGroup, finish_partial, fuse_scan_adjoint, split_lane,
                                          unused_name)
from opgen.ir.symbols import Axis, Dim

from .expr import (Code, ExprEmitter, IndexRenderer, LoadOverride, Scope, compute_dtype, const_text, scratch_buffer,
                   tree_sum, tvm_dtype, write_func_head)

#: scratch elements per lane for the recomputed states (and their coefficients): 32 Ki fp32 = 128 KiB each, in L2
SCRATCH_ELEMENTS = 32768


@dataclass(frozen=True)
class AdjointSource:
    """A rendered adjoint kernel: TVMScript text, its arguments and how the caller turns partials into outputs."""

    text: str
    tensors: tuple[str, ...]                 # reads, then direct outputs, then partials, then the checkpoints
    direct: tuple[str, ...]                  # outputs the kernel writes itself
    partials: tuple[tuple[str, str, tuple], ...]   # (partial name, reduction output, partial axes) (lane, cross)
    chunk: int
    static_dims: tuple[tuple[str, int], ...]
    scalars: tuple[Dim, ...]                 # int arguments after the tensors (then splits, then chunks)
    transposed: tuple[tuple[str, str, tuple[int, ...]], ...] = ()   # (argument, input it is, dims permutation)


def adjoint_supported(group: ScanAdjointGroup) -> tuple[bool, str]:
    """Whether the kernel renders ``group`` ((False, why) when not)."""
    op = group.op
    for name in group.reads + group.outputs:
        if op.tensor(name).dtype not in (DType.f32, DType.f64, DType.bf16, DType.f16):
            return False, f"tensor {name} is {op.tensor(name).dtype}"
    why = group.common_blocker()
    return (not why), why


def _replace(e: Expr, target: Expr, by: Expr) -> Expr:
    """``e`` with every subexpression equal to ``target`` replaced by ``by``."""
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        if n == target:
            memo[n] = by
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


def _transposed(group: ScanAdjointGroup, vax: Axis, taken: set[str]) -> dict[str, tuple[str, list[int]]]:
    """``{input: (argument name, permutation)}`` for the inputs every read of which indexes one dim with exactly
    the vector axis, and that dim is not the last."""
    out = {}
    for name in group.reads:
        dims = set()
        for e in group.exprs():
            for acc in loads(e):
                if acc.tensor != name:
                    continue
                hits = [k for k, i in enumerate(acc.index) if sympy.sympify(i) == vax]
                others = any(vax in sympy.sympify(i).free_symbols for k, i in enumerate(acc.index) if k not in hits)
                dims.add(hits[0] if len(hits) == 1 and not others else None)
        if len(dims) != 1 or None in dims:
            continue
        (k,) = dims
        rank = len(group.op.tensor(name).shape)
        if k != rank - 1:
            out[name] = (unused_name(taken, f"{name}_T"), [i for i in range(rank) if i != k] + [k])
    return out


def _relayout(e: Expr, trans: Mapping[str, tuple[str, list[int]]]) -> Expr:
    """``e`` with the reads of transposed inputs made reads of their transposed arguments."""
    if not trans:
        return e
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        if n.op is ExprOp.LOAD and n.arg.tensor in trans:
            name, perm = trans[n.arg.tensor]
            acc = n.arg
            pad = tuple(acc.pad[k] for k in perm) if acc.pad is not None else None
            memo[n] = Expr(ExprOp.LOAD, n.dtype, (), Access(name, tuple(acc.index[k] for k in perm), pad))
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


@functools.lru_cache(maxsize=256)
def render_adjoint(group: ScanAdjointGroup, static: tuple[tuple[Dim, int], ...], index_bits: int = 32,
                   fast_math: bool = True, chunk: int | None = None) -> AdjointSource:
    """The TVMScript source of ``group`` with the state dims (and any other dims in ``static``) as literals;
    ``chunk`` steps are recomputed at a time (default: as many as :data:`SCRATCH_ELEMENTS` holds)."""
    return _Renderer(group, dict(static), index_bits, fast_math, chunk).render()


class _Renderer:
    def __init__(self, group: ScanAdjointGroup, static: dict, index_bits: int, fast_math: bool,
                 chunk: int | None = None):
        ok, why = adjoint_supported(group)
        if not ok:
            raise ValueError(f"op {group.op.name}: the scan adjoint kernel does not apply: {why}")
        self.g, self.op, self.static = group, group.op, static
        self.idt = f"int{index_bits}"
        self.fast_math = fast_math
        self.chunk = chunk
        self.allocs: list[str] = []

    def render(self) -> AdjointSource:
        g, op = self.g, self.op
        F, R = g.forward, g.adjoint
        taken = {t.name for t in op.tensors} | {d.name for d in op.dims}
        # tensors: reads, direct outputs, partials, checkpoints
        part_kind = {r.node.out: r for r in g.reductions if r.kind in ("lane", "steplane", "cross")}
        direct = tuple(n for n in g.outputs if n not in part_kind)
        splits_dim = Dim(unused_name(taken, "SPLITS"))
        chunks_dim = Dim(unused_name(taken, "CHUNKS"))
        ext_of = {a: e for a, e in op.extents}
        self.state_dt = compute_dtype(promote(F.combine.a.dtype, F.combine.b.dtype))
        sdt = tvm_dtype(self.state_dt)
        # the last state axis runs as one vector (its whole static extent) when it is wide enough
        vext = int(sympy.sympify(ext_of[g.state[-1]]).subs(self.static)) if g.state else 0
        vax = g.state[-1] if g.state and vext % 4 == 0 and 4 <= vext <= 256 else None
        # inputs read across the vector axis with another dim innermost (B[b, n, t] for a vector over n) are
        # passed transposed, that dim last, so the vector loads are contiguous
        trans = _transposed(g, vax, taken) if vax is not None else {}
        params: list[TensorParam] = []
        for n in g.reads:
            t = op.tensor(n)
            if n in trans:
                name, perm = trans[n]
                params.append(TensorParam(name, tuple(t.shape[k] for k in perm), t.dtype, "input"))
            else:
                params.append(TensorParam(n, t.shape, t.dtype, "input"))
        params += [TensorParam(n, op.tensor(n).shape, op.tensor(n).dtype, "output") for n in direct]
        partials = []
        for r in g.reductions:
            if r.kind in ("lane", "steplane"):
                axes = g.lanes + r.kept_state
                shape = tuple(ext_of[a] for a in axes)
            elif r.kind == "cross":
                # the output's axes, the state innermost (vector stores); scattered axes indexed by their lanes
                axes = tuple(a for a in r.node.axes if a not in g.state) + r.kept_state
                shape = (splits_dim,) + tuple(ext_of[a] for a in axes)
            else:
                continue
            pname = unused_name(taken, f"part_{r.node.out}")
            partials.append((pname, r.node.out, axes))
            params.append(TensorParam(pname, shape, self.state_dt, "output"))
        split_lanes = g.split
        outer_lanes = tuple(a for a in g.lanes if a not in split_lanes)
        ck_name = unused_name(taken, "ckp")
        n_par = [ext_of[a] for a in outer_lanes]
        params.append(TensorParam(ck_name, tuple(n_par) + ((splits_dim,) if split_lanes else ())
                                  + (chunks_dim,) + (tuple(ext_of[a] for a in g.state) or (sympy.Integer(1),)),
                                  self.state_dt, "output"))
        # dims
        derived = {d for d, _ in op.derived}
        plain: dict[Dim, str] = {}
        for t in params:
            for s in t.shape:
                if isinstance(s, Dim) and s not in derived and s not in self.static and s not in (splits_dim,
                                                                                                 chunks_dim):
                    plain.setdefault(s, t.name)
        every = list(op.dims)
        for e in [e for _, e in op.derived] + [e for _, e in op.extents]:
            every += [s for s in sympy.sympify(e).free_symbols if isinstance(s, Dim) and s not in every]
        scalars = tuple(d for d in every if d not in derived and d not in self.static and d not in plain)
        sym: dict[sympy.Symbol, str] = {d: (str(self.static[d]) if d in self.static else f"n_{d.name}")
                                        for d in every + [splits_dim, chunks_dim]}
        ir_dims = IndexRenderer(sym, self.idt)
        ext = {a: ir_dims(e) for a, e in op.extents}
        for a in g.lanes + g.state + (g.step,):
            sym[a] = f"i_{a.name}"
        ir = IndexRenderer(sym, self.idt)
        state_ext = [ext[a] for a in g.state]
        for a in g.state:
            if not ext[a].isdigit():
                raise ValueError(f"op {op.name}: state axis {a} must have a static extent (got {ext[a]})")
        S = math.prod(int(x) for x in state_ext) if state_ext else 1
        V = int(ext[vax]) if vax is not None else 1
        if vax is not None:
            sym[vax] = "v"
            ir = IndexRenderer(sym, self.idt)
        CH = self.chunk or max(1, SCRATCH_ELEMENTS // max(1, S))
        st_shape = f"({', '.join(state_ext) or '1'},)"
        st_idx = ", ".join(sym[a] for a in g.state) or "0"
        L = ext[g.step]
        # the forward coefficient is stored per step over the state axes it depends on only (a decay per key)
        a_free = set()
        for acc in loads(F.combine.a):
            for i in acc.index:
                a_free |= sympy.sympify(i).free_symbols
        for nd in F.combine.a.walk():
            if nd.op is ExprOp.INDEX:
                a_free |= nd.arg.free_symbols
        a_axes = tuple(a for a in g.state if a in a_free)
        a_idx = ", ".join(sym[a] for a in a_axes) or "0"
        a_shape = ", ".join(ext[a] for a in a_axes) or "1"
        a_vec = vax is not None and vax in a_axes
        # pseudo tensors served by the kernel: the forward coefficient at the step
        fa_name = unused_name(taken, "fwd_a")
        fa_load = load(fa_name, F.axes, F.combine.a.dtype)
        buffers = {t.name: f"b_{t.name}" for t in list(op.tensors) + params}
        shapes = {t.name: t.shape for t in list(op.tensors) + params}
        dtypes = {t.name: t.dtype for t in list(op.tensors) + params}
        dtypes[fa_name] = compute_dtype(F.combine.a.dtype)
        tt_sym = ["tt"]
        vec = V > 1

        hook_ps: dict[str, str] = {}

        def hook(acc: Access) -> LoadOverride | None:
            tt = tt_sym[0]
            if acc.tensor in hook_ps:
                return LoadOverride(hook_ps[acc.tensor], False, True)
            if acc.tensor == R.out:
                return LoadOverride(f"adj[{st_idx}]", vec, True)
            if acc.tensor == fa_name:
                return LoadOverride(f"ab[{tt}, {a_idx}]", a_vec, True)
            if acc.tensor == F.out:
                k = list(F.axes).index(g.step)
                i = sympy.sympify(acc.index[k])
                if i == g.step:
                    return LoadOverride(f"hb[{tt} + 1, {st_idx}]", vec, True)
                zero = const_text(0, sdt)
                return LoadOverride(f"T.if_then_else(so >= 1, hb[{tt}, {st_idx}], {zero})", vec, True)
            return None

        masked = {n.arg for e in g.exprs() for n in _relayout(e, trans).walk()
                  if n.op is ExprOp.LOAD and n.arg.pad is not None and n.arg.tensor not in (F.out, R.out)
                  and any(sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0 for lo, hi in n.arg.pad)}

        def alloc(dt: str, shape: tuple) -> str:
            name = f"vt{len(self.allocs)}"
            self.allocs.append(scratch_buffer(name, f"({', '.join(shape)},)", dt))
            return name

        em = ExprEmitter(buffers=buffers, shapes=shapes, dtypes=dtypes, index=ir, masked=masked,
                         fast_math=self.fast_math, alloc=alloc, load_hook=hook, vector_axis=vax, vector_len=V)
        self.V = V

        def put(scope: Scope, line: str) -> None:
            (scope.vlines if vec else scope.lets).append(line)

        def conv(text: str, src: DType, dst: DType) -> str:
            s, d = tvm_dtype(compute_dtype(src)), tvm_dtype(compute_dtype(dst))
            return text if s == d else f"T.Cast(\"{d}\", {text})"

        def store(tensor: str, axes, value: str, value_dt: DType) -> str:
            t = next(p for p in params if p.name == tensor)
            out_dt = tvm_dtype(t.dtype)
            val = value if tvm_dtype(compute_dtype(value_dt)) == out_dt else f"T.Cast(\"{out_dt}\", {value})"
            return f"b_{tensor}[{', '.join(ir(i) for i in axes)}] = {val}"

        def chain(parent: Scope, name: str) -> list[Scope]:
            out, cur = [], parent
            for k, a in enumerate(g.state):
                cur = cur.child(f"{name}_{a}", (a,), leaf=(k == len(g.state) - 1))
                out.append(cur)
            if not g.state:
                out.append(parent.child(name, (), leaf=True))
            return out
        self.vax = vax

        def sub_a(e: Expr) -> Expr:
            return _relayout(_replace(e, F.combine.a, fa_load), trans)

        root = Scope("lane", None, g.lanes)
        # recompute: hb[tt + 1] = a * hb[tt] + b, ab[tt] = a
        rec_step = root.child("rec", (g.step,))
        rec_step.tile = CH            # step-level values of a chunk first, in their own (vectorizable) loop
        rec = chain(rec_step, "rec")
        ra = em.emit(_relayout(F.combine.a, trans), rec[-1])
        rb = em.emit(_relayout(F.combine.b, trans), rec[-1])
        a_txt = conv(ra.text, F.combine.a.dtype, self.state_dt)
        b_txt = conv(rb.text, F.combine.b.dtype, self.state_dt)
        # ab is written in the loop level of the axes it depends on (once per key for a per-key decay)
        if a_vec or (a_axes and a_axes[-1] == g.state[-1]):
            put(rec[-1], f"ab[tt, {a_idx}] = {a_txt}")
        else:
            level = rec[g.state.index(a_axes[-1])] if a_axes else rec_step
            (level.lets if level is not rec[-1] or not vec else level.vlines).append(f"ab[tt, {a_idx}] = {a_txt}")
        put(rec[-1], f"hb[tt + 1, {st_idx}] = ab[tt, {a_idx}] * hb[tt, {st_idx}] + {b_txt}")
        # pass 1 (several chunks): the same update on a running state
        p1_step = root.child("p1", (g.step,))
        p1_step.tile = CH
        p1 = chain(p1_step, "p1")
        pa = em.emit(_relayout(F.combine.a, trans), p1[-1])
        pb = em.emit(_relayout(F.combine.b, trans), p1[-1])
        put(p1[-1], f"st[{st_idx}] = {conv(pa.text, F.combine.a.dtype, self.state_dt)} * st[{st_idx}] + "
                           f"{conv(pb.text, F.combine.b.dtype, self.state_dt)}")
        # initial state
        init_chain = chain(root, "init")
        if F.init is not None:
            ri = em.emit(_relayout(F.init, trans), init_chain[-1])
            init_val = conv(ri.text, F.init.dtype, self.state_dt)
        else:
            init_val = const_text(0, sdt)
        put(init_chain[-1], f"st[{st_idx}] = {init_val}")
        adj_dt = compute_dtype(promote(R.combine.a.dtype, R.combine.b.dtype))
        if tvm_dtype(adj_dt) != sdt:
            raise ValueError(f"op {op.name}: the adjoint's dtype {adj_dt} differs from the state's {self.state_dt}")
        if R.init is not None:
            rai = em.emit(sub_a(R.init), init_chain[-1])
            adj_init = conv(rai.text, R.init.dtype, adj_dt)
        else:
            adj_init = const_text(0, sdt)
        put(init_chain[-1], f"adj[{st_idx}] = {adj_init}")
        # reverse pass
        rev_step = root.child("rev", (g.step,))
        rev_step.tile = CH
        rev = chain(rev_step, "rev")
        leaf = rev[-1]
        if g.carry_a:
            coef = f"T.if_then_else(tt + 1 < cnt, ab[tt + 1, {a_idx}], an[{a_idx}])"
        else:
            rr = em.emit(sub_a(R.combine.a), leaf)
            coef = conv(rr.text, R.combine.a.dtype, adj_dt)
        rgb = em.emit(sub_a(R.combine.b), leaf)
        put(leaf, f"adj[{st_idx}] = {coef} * adj[{st_idx}] + {conv(rgb.text, R.combine.b.dtype, adj_dt)}")
        point_writes: list[tuple[str, str, tuple, str, DType]] = []   # (acc buffer, output, axes, idx text, dt)
        zero_lines: list[tuple[str, str, tuple]] = []
        lane_accs: list[tuple[str, str, tuple]] = []
        cross_writes: list[tuple[str, str, tuple, str]] = []
        pnames = {out: p for p, out, _ in partials}
        paxes = {out: ax for _, out, ax in partials}
        for k, r in enumerate(g.reductions):
            n = r.node
            if r.kind == "steplane":
                continue                          # beside the epilogues, below
            val = em.emit(sub_a(n.value), leaf)
            vtxt = conv(val.text, n.value.dtype, self.state_dt)
            kept = r.kept_state
            wide = vec and vax not in kept        # one accumulator per vector lane, summed after the loop
            kax = kept + ((vax,) if wide else ())
            kshape = f"({', '.join(ext[a] for a in kax) or '1'},)"
            kidx = ", ".join(sym[a] for a in kax) or "0"
            if r.kind == "point":
                buf = f"pacc{k}"
                self.allocs.append(scratch_buffer(buf, kshape, sdt))
                if set(g.state) - set(kept) <= {vax}:
                    put(leaf, f"{buf}[{kidx}] = {vtxt}")      # one term per accumulator and step: no zeroing
                else:
                    put(leaf, f"{buf}[{kidx}] = {buf}[{kidx}] + {vtxt}")
                    zero_lines.append((buf, kidx, kax))
                point_writes.append((buf, n.out, n.axes, kidx, self.state_dt, kept, wide))
            elif r.kind == "lane":
                buf = f"lacc{k}"
                self.allocs.append(scratch_buffer(buf, kshape, sdt))
                put(leaf, f"{buf}[{kidx}] = {buf}[{kidx}] + {vtxt}")
                lane_accs.append((buf, kidx, kax))
                lane_accs[-1] = (buf, kidx, kax, pnames[n.out], paxes[n.out], kept, wide)
            else:
                pax = paxes[n.out]
                where = dict(r.scatter)
                idx = ", ".join(["sk"] + [ir(where[a]) if a in where else sym[a] for a in pax])
                p = pnames[n.out]
                if not wide:
                    put(leaf, f"b_{p}[{idx}] = b_{p}[{idx}] + {vtxt}")
                    continue
                # summed over the vector axis too: per step, the vector's lanes folded, then added
                buf = f"cacc{k}"
                self.allocs.append(scratch_buffer(buf, kshape, sdt))
                if set(g.state) - set(kept) <= {vax}:
                    put(leaf, f"{buf}[{kidx}] = {vtxt}")
                else:
                    put(leaf, f"{buf}[{kidx}] = {buf}[{kidx}] + {vtxt}")
                    zero_lines.append((buf, kidx, kax))
                cross_writes.append((buf, kidx, kept, f"b_{p}[{idx}]"))
        # epilogues per lane and step: point sums read from ps[k]
        epi_reads = {a.tensor for m in g.epilogues for a in loads(m.value)}
        epi_reads |= {a.tensor for r in g.reductions if r.kind == "steplane" for a in loads(r.node.value)}
        ps_slot = {r.node.out: k for k, r in enumerate(g.reductions) if r.kind == "point" and r.node.out in epi_reads}
        epi = rev_step.child("epi", (), leaf=True)
        if ps_slot:
            self.allocs.append(scratch_buffer("ps", f"({len(g.reductions)},)", sdt))
        hook_ps.update({name: f"ps[{k}]" for name, k in ps_slot.items()})
        for m in g.epilogues:
            rv = em.emit(sub_a(m.value), epi)
            epi.lets.append(store(m.out, m.axes, rv.text, m.value.dtype))
        for k, r in enumerate(g.reductions):
            if r.kind == "steplane":
                rv = em.emit(sub_a(r.node.value), epi)
                buf = f"lacc{k}"
                self.allocs.append(scratch_buffer(buf, "(1,)", sdt))
                epi.lets.append(f"{buf}[0] = {buf}[0] + {conv(rv.text, r.node.value.dtype, self.state_dt)}")
                lane_accs.append((buf, "0", (), pnames[r.node.out], paxes[r.node.out], (), False))
        for m in g.stores:
            rv = em.emit(sub_a(m.value), leaf)
            put(leaf, store(m.out, m.axes, rv.text, m.value.dtype))
        # tails: at the forward's first step, after the reverse pass (tt = 0 there)
        tail_chain = chain(root, "tail")
        for m, _ in g.tails:
            tt_sym[0] = "0"
            rv = em.emit(sub_a(m.value), tail_chain[-1])
            put(tail_chain[-1], store(m.out, m.axes, rv.text, m.value.dtype))
        tt_sym[0] = "tt"

        # assemble -----------------------------------------------------------------------------------------
        c = Code()
        write_func_head(c, "opgen.targets.tvm.scan_adjoint", "main", params, scalars + (splits_dim, chunks_dim),
                        plain, self.idt, ir_dims,
                        op.derived, self.static)
        ne = [ext[a] for a in outer_lanes]
        n_outer = " * ".join(ne) if ne else "1"
        d = 1
        ck_lead: list[str]
        if split_lanes:
            c.w(d, f"for par in T.parallel({n_outer} * {sym[splits_dim]}):")
            d += 1
            c.w(d, f"sk: T.let = T.floormod(par, {sym[splits_dim]})")
            c.w(d, f"ol: T.let = T.floordiv(par, {sym[splits_dim]})")
            lane_var = "ol"
        else:
            c.w(d, f"for par in T.parallel({n_outer}):")
            d += 1
            lane_var = "par"
        for k, a in enumerate(outer_lanes):
            inner = " * ".join(ne[k + 1:])
            q = f"T.floordiv({lane_var}, {inner})" if inner else lane_var
            val = f"T.floormod({q}, {ne[k]})" if k > 0 else q
            c.w(d, f"i_{a.name}: T.let = {val}")
        ck_lead = [sym[a] for a in outer_lanes] + (["sk"] if split_lanes else [])
        c.block(d, [scratch_buffer("st", st_shape, sdt), scratch_buffer("adj", st_shape, sdt),
                    scratch_buffer("an", f"({a_shape},)", sdt),
                    scratch_buffer("hb", f"({CH + 1}, {', '.join(state_ext) or '1'})", sdt),
                    scratch_buffer("ab", f"({CH}, {a_shape})", sdt),
                    scratch_buffer("hs", "(1,)", sdt)] + self.allocs)
        if split_lanes:
            se = [ext[a] for a in split_lanes]
            ns = " * ".join(se)
            c.w(d, f"for il in range(T.floordiv(sk * ({ns}), {sym[splits_dim]}), "
                   f"T.floordiv((sk + 1) * ({ns}), {sym[splits_dim]})):")
            d += 1
            for k, a in enumerate(split_lanes):
                inner = " * ".join(se[k + 1:])
                q = f"T.floordiv(il, {inner})" if inner else "il"
                val = f"T.floormod({q}, {se[k]})" if k > 0 else q
                c.w(d, f"i_{a.name}: T.let = {val}")
        c.block(d, root.lets)
        for buf, kidx, kax, *_ in lane_accs:
            self._loops_zero(c, d, kax, sym, ext, f"{buf}[{kidx}] = {const_text(0, sdt)}")
        self._write_chain(c, d, init_chain, sym, ext)
        self._loops_zero(c, d, a_axes, sym, ext, f"an[{a_idx}] = {const_text(0, sdt)}")
        ck_idx = ", ".join(ck_lead + ["ck", st_idx])

        def pos(order: str) -> str:
            return f"({L} - 1 - {order})" if g.reverse else order

        # pass 1
        c.w(d, f"if {sym[chunks_dim]} > 1:")
        c.w(d + 1, f"for ck in range({sym[chunks_dim]}):")
        self._loops_zero(c, d + 2, g.state, sym, ext, f"b_{ck_name}[{ck_idx}] = st[{st_idx}]")
        c.w(d + 2, f"cnt1: T.let = T.min({CH}, {L} - ck * {CH})")
        self._tile_loop(c, d + 2, "cnt1", CH, sym[g.step], pos, p1_step)
        c.w(d + 2, "for tt in range(cnt1):")
        c.w(d + 3, f"so: T.let = ck * {CH} + tt")
        c.w(d + 3, f"{sym[g.step]}: T.let = {pos('so')}")
        self._write_chain(c, d + 3, p1, sym, ext)
        # reverse over chunks
        c.w(d, f"for ck2 in range({sym[chunks_dim]}):")
        d2 = d + 1
        c.w(d2, f"ck: T.let = {sym[chunks_dim]} - 1 - ck2")
        c.w(d2, f"cnt: T.let = T.min({CH}, {L} - ck * {CH})")
        c.w(d2, f"if {sym[chunks_dim]} > 1:")
        self._loops_zero(c, d2 + 1, g.state, sym, ext, f"hb[0, {st_idx}] = b_{ck_name}[{ck_idx}]")
        c.w(d2, "else:")
        self._loops_zero(c, d2 + 1, g.state, sym, ext, f"hb[0, {st_idx}] = st[{st_idx}]")
        self._tile_loop(c, d2, "cnt", CH, sym[g.step], pos, rec_step)
        c.w(d2, "for tt in range(cnt):")
        c.w(d2 + 1, f"so: T.let = ck * {CH} + tt")
        c.w(d2 + 1, f"{sym[g.step]}: T.let = {pos('so')}")
        self._write_chain(c, d2 + 1, rec, sym, ext)
        self._tile_loop(c, d2, "cnt", CH, sym[g.step], pos, rev_step)
        c.w(d2, "for tt2 in range(cnt):")
        d3 = d2 + 1
        c.w(d3, "tt: T.let = cnt - 1 - tt2")
        c.w(d3, f"so: T.let = ck * {CH} + tt")
        c.w(d3, f"{sym[g.step]}: T.let = {pos('so')}")
        for buf, kidx, kept in zero_lines:
            self._loops_zero(c, d3, kept, sym, ext, f"{buf}[{kidx}] = {const_text(0, sdt)}")
        self._write_chain(c, d3, rev, sym, ext)
        # (the point writes and epilogues end the step; then, once per chunk, the carry into the next chunk)
        for buf, out, axes, kidx, dt, kept, wide in point_writes:
            def write(v: str, out=out, axes=axes, dt=dt) -> str:
                lines = ([f"ps[{ps_slot[out]}] = {v}"] if out in ps_slot else []) + (
                    [store(out, axes, v, dt)] if out in direct else [])
                return "\n".join(lines) or "T.evaluate(0)"
            self._write_sum(c, d3, kept, wide, sym, ext, buf, kidx, write)
        for buf, kidx, kept, target in cross_writes:
            self._write_sum(c, d3, kept, True, sym, ext, buf, kidx, lambda v, t=target: f"{t} = {t} + {v}")
        c.block(d3, epi.lets)
        self._loops_zero(c, d2, a_axes, sym, ext, f"an[{a_idx}] = ab[0, {a_idx}]")
        # after the lane: lane partials, tails
        for buf, kidx, kax, p, pax, kept, wide in lane_accs:
            idx = ", ".join(sym[a] for a in pax)
            self._write_sum(c, d, kept, wide, sym, ext, buf, kidx, lambda v, p=p, idx=idx: f"b_{p}[{idx}] = {v}")
        if g.tails:
            c.w(d, f"{sym[g.step]}: T.let = {pos('0')}")
            c.w(d, "so: T.let = 0")
            self._write_chain(c, d, tail_chain, sym, ext)
        text = "\n".join(c.lines) + "\n"
        tensors = tuple(p.name for p in params)
        return AdjointSource(text, tensors, direct, tuple(partials), CH,
                             tuple(sorted((dd.name, v) for dd, v in self.static.items())), scalars,
                             tuple((name, src, tuple(perm)) for src, (name, perm) in trans.items()))

    @staticmethod
    def _tile_loop(c: Code, depth: int, count: str, CH: int, step_sym: str, pos, scope: Scope) -> None:
        """The step-level values of a chunk (``scope.lets``, stored per step ``[tt]``), before its recurrence."""
        if not scope.lets and not scope.vlines:
            return
        c.w(depth, f"for tt in range({count}):")
        c.w(depth + 1, f"so: T.let = ck * {CH} + tt")
        c.w(depth + 1, f"{step_sym}: T.let = {pos('so')}")
        c.block(depth + 1, scope.lets)
        if scope.vlines:
            raise ValueError("a step-level value depends on the vector axis")

    def _write_sum(self, c: Code, depth: int, kept, wide: bool, sym, ext, buf: str, kidx: str, write) -> None:
        """``write(value)`` of an accumulator over its kept axes, summing its vector lanes first when ``wide``."""
        for a in kept:
            c.w(depth, f"for {sym[a]} in range({ext[a]}):")
            depth += 1
        if not wide:
            c.block(depth, write(f"{buf}[{kidx}]").split("\n"))
            return
        parts = [sym[a] for a in kept]
        w = self.V
        while w % 2 == 0 and w > 2:             # fold halves as vector adds: log2(V) of them, not V - 1 scalar
            h = w // 2
            c.w(depth, f"for v in T.vectorized({h}):")
            c.w(depth + 1, f"{buf}[{', '.join(parts + ['v'])}] = {buf}[{', '.join(parts + ['v'])}] + "
                           f"{buf}[{', '.join(parts + [f'v + {h}'])}]")
            w = h
        lanes = [f"{buf}[{', '.join(parts + [str(v)])}]" for v in range(w)]
        c.w(depth, f"hs[0] = {tree_sum(lanes)}")
        c.block(depth, write("hs[0]").split("\n"))

    @staticmethod
    def _loops_zero(c: Code, depth: int, axes, sym, ext, line: str) -> None:
        for a in axes:
            c.w(depth, f"for {sym[a]} in range({ext[a]}):")
            depth += 1
        c.w(depth, line)

    def _write_chain(self, c: Code, depth: int, scopes: list[Scope], sym, ext) -> None:
        d = depth
        for s in scopes:
            if s.axes and s.axes != (self.vax,):
                (a,) = s.axes
                c.w(d, f"for {sym[a]} in range({ext[a]}):")
                d += 1
            c.block(d, s.lets)
            if s.vlines:
                c.w(d, f"for v in T.vectorized({self.V}):")
                c.block(d + 1, s.vlines)
            if s.leaf and not s.lets and not s.vlines:
                c.w(d, "T.evaluate(0)")


# ------------------------------------------------------------------------------------------------- running


def static_dims(group: ScanAdjointGroup, binding) -> tuple[tuple[Dim, int], ...]:
    """The dims that the state extents use, with their values at ``binding`` (they size scratch buffers)."""
    op = group.op
    out: dict[Dim, int] = {}
    ext_of = dict(op.extents)
    for a in group.state:
        for s in sympy.sympify(ext_of[a]).free_symbols:
            if isinstance(s, Dim):
                out[s] = int(binding.dims[s])
    return tuple(sorted(out.items(), key=lambda kv: kv[0].name))


def adjoint_call(group: ScanAdjointGroup, binding, cache, threads: int, chunk: int | None = None):
    """A callable ``tensors -> {output: tensor}`` running the group's kernel at ``binding`` (CPU tensors) with
    ``threads`` parallel workers in mind (the cross reductions' split) and ``chunk`` (see :func:`render_adjoint`)."""
    import torch

    from opgen.ir.dtypes import to_torch

    op = group.op
    static = static_dims(group, binding)
    biggest = max((math.prod(binding.shapes[n]) for n in group.reads + group.outputs if n in binding.shapes),
                  default=1)
    src = render_adjoint(group, static, 64 if biggest > 2**31 - 1 else 32, chunk=chunk)
    fn = cache.get(src.text)
    ext = _extents(group, binding)
    steps = int(ext[group.step])
    chunks = -(-steps // src.chunk)
    split_total = math.prod(int(ext[a]) for a in group.split) if group.split else 1
    outer_total = math.prod(int(ext[a]) for a in group.lanes if a not in group.split)
    splits = max(1, min(-(-threads // max(1, outer_total)), split_total)) if group.split else 1
    outer = [int(ext[a]) for a in group.lanes if a not in group.split]
    state = [int(ext[a]) for a in group.state] or [1]
    by_name = {t.name: t for t in op.tensors}
    sdt = to_torch(compute_dtype(promote(group.forward.combine.a.dtype, group.forward.combine.b.dtype)))
    scal = [int(binding.dims[d]) for d in src.scalars]
    red = {r.node.out: r for r in group.reductions}
    part_of = {p: (out, axes) for p, out, axes in src.partials}
    trans = {name: (src_name, list(perm)) for name, src_name, perm in src.transposed}

    def call(tensors: Mapping) -> dict:
        args, outs, parts = [], {}, {}
        for name in src.tensors:
            if name in trans:
                x = tensors[trans[name][0]].permute(trans[name][1])
                want = to_torch(by_name[trans[name][0]].dtype)
                args.append((x if x.dtype == want else x.to(want)).contiguous())
            elif name in group.reads:
                x = tensors[name]
                want = to_torch(by_name[name].dtype)
                if x.dtype != want:
                    x = x.to(want)
                args.append(x.contiguous())
            elif name in src.direct:
                x = torch.empty(binding.shapes[name], dtype=to_torch(by_name[name].dtype))
                outs[name] = x
                args.append(x)
            elif name in part_of:
                out, axes = part_of[name]
                shape = [int(ext[a]) for a in axes]
                if red[out].kind == "cross":
                    x = torch.zeros([splits] + shape, dtype=sdt)
                else:
                    x = torch.empty(shape, dtype=sdt)
                parts[name] = x
                args.append(x)
            else:                                    # checkpoints
                lead = outer + ([splits] if group.split else [])
                args.append(torch.empty(lead + [chunks if chunks > 1 else 1] + state, dtype=sdt))
        with torch.no_grad():
            fn(*args, *scal, splits, chunks)
            for name, x in parts.items():
                out, axes = part_of[name]
                outs[out] = finish_partial(red[out], x, axes).to(to_torch(by_name[out].dtype)).contiguous()
        return outs

    return call


def _extents(group: ScanAdjointGroup, binding) -> dict:
    """Axis extents at ``binding``, including axes the group made (a split lane's block and vector axes)."""
    ext = dict(binding.extents)
    dims = {d: int(v) for d, v in binding.dims.items()}
    for a, e in group.op.extents:
        if a not in ext:
            ext[a] = int(sympy.sympify(e).subs(dims))
    return ext


def lane_vector_group(group: ScanAdjointGroup, binding) -> ScanAdjointGroup:
    """``group`` with its last lane split into vectors (:func:`~opgen.ir.passes.scan_adjoint.split_lane`) when it
    has no state axes and the lane's extent is a multiple of the vector width, else ``group``."""
    if group.state or not group.lanes:
        return group
    width = 8 if group.forward.combine.a.dtype == DType.f64 else 16
    if int(binding.extents[group.lanes[-1]]) % width:
        return group
    return split_lane(group, width) or group


def scan_adjoint_group(op) -> ScanAdjointGroup | None:
    """The op's adjoint group when this kernel renders it, else None."""
    g = fuse_scan_adjoint(op)
    if g is None or not adjoint_supported(g)[0]:
        return None
    return g

