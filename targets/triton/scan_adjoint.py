"""Render and run a scan's fused backward (:class:`opgen.ir.passes.scan_adjoint.ScanAdjointGroup`) with Triton.

The CUDA counterpart of :mod:`opgen.targets.tvm.scan_adjoint`, with the same semantics and host contract
(:func:`.scan_adjoint_call.adjoint_call` returns ``call(tensors) -> {group output: tensor}``). One kernel computes
every gradient the backward op reduces from the scan::

    program = (outer lanes) x (a block of BLOCK block lanes)     # block lanes: the split lanes when there are
                                                                 # cross reductions, else every lane axis
    tiles [BLOCK, NS_0, NS_1, ...] in registers (state axes padded to powers of two and masked)
    h = init; for chunk except the last: ckp[prog, chunk] = h; h advanced CH steps       # pass 1
    ckp[prog, last] = h
    adj = adjoint init; a_next = 0
    for chunk, last first:
        h = ckp[prog, chunk]; ws[prog, 0] = h
        for step in chunk: h = a * h + b; ws[prog, step + 1] = h                        # recompute
        h_cur = h
        for step in chunk, backwards:
            h_prev = ws[prog, step] (0 at the forward's first step)
            adj = a_next * adj + g; a_next = a(step)                                     # a(step + 1) carried
            point sums (tl.sum over the state axes) -> outputs / epilogues
            lane accumulators += ...; cross sums (tl.sum over the block) -> partial[prog's split block, step]
            h_cur = h_prev
    lane accumulators -> partial[lanes, kept state]; tails (the forward's first step) -> outputs

Triton has no per-program scratch arrays, so the recomputed states of a chunk go to a global workspace
``ws[programs, CH + 1, BLOCK, prod(NS)]`` (``CH`` steps, a constexpr; about 128 KiB per program at the default,
so it stays in L2) and the chunk-boundary states to ``ckp[programs, chunks, BLOCK, prod(NS)]``: nothing of the
scan's full size ``[lanes, steps, state]`` is ever allocated. Each program reads back only what it wrote itself,
with the same tile layout as the store, and ``tl.debug_barrier()`` separates each write phase from the reads.

Reductions: ``point`` sums are ``tl.sum`` over the reduced state axes each step (a lane reduction of the same
value shares that sum); ``lane`` and ``steplane`` sums are register accumulators per lane, written once to a
partial ``[lanes..., kept state...]`` that the caller sums over the reduced lane axes; ``cross`` sums (over the
split lanes, e.g. ``dB[b, n, t] = sum_d``) are ``tl.sum`` over the block dimension each step, written to a partial
``[split blocks, kept lanes..., steps, kept state...]`` that the caller sums over its first axis. A cross sum
scattered into groups (``grad_C[b, g, n, t] = sum_d`` over the channels ``d`` with ``g = d // Dg``: grouped B/C) is a
segmented sum over the block instead (a one-hot ``[BLOCK, SLOTS]`` of each lane's slot among the block's groups,
computed on the host), written to ``[split blocks, SLOTS, ...]`` and scattered into the groups by the caller
(``index_add_``). No atomics: the result does not depend on scheduling (deterministic run to run).

The source depends only on the group (and ``UNROLL``, steps per loop iteration: :func:`render`): sizes are runtime
arguments, ``BLOCK``, ``CH``, the padded state sizes and the index dtype are constexprs chosen by
:func:`.scan_adjoint_call.default_config` (a config dict ``{BLOCK, CH, num_warps, num_stages, UNROLL}``). The host
side (configs, launching, summing partials) is :mod:`.scan_adjoint_call`.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import Any

import sympy

from opgen.ir import DType, ExprOp, index_str, promote
from opgen.ir.expr import Expr, load, loads
from opgen.ir.passes.scan_adjoint import ScanAdjointGroup, fuse_scan_adjoint
from opgen.ir.symbols import Axis

from .expr import (TL_DTYPE, AxisVar, Namer, Section, TensorArg, ValueRenderer, compute_dtype, helper_source,
                   render_index)

GENERATOR_VERSION = "triton-scan-adjoint-1"

#: most steps per iteration of the step loops (config ``UNROLL``; see :func:`render`)
MAX_UNROLL = 8

#: fixed identifiers of the generated kernel (reserved from the namer, so no IR-derived name can take them)
_FIXED = ("pid", "pid_o", "pid_b", "n_blk", "lane_loc", "wofs", "ws_base", "ck_base", "n_chunks", "ck", "ck2",
          "cnt", "tt", "tt2", "so", "hs", "adj", "a_next", "h_cur", "h_prev", "h_first", "TILE", "CH", "SP",
          "ws_ptr", "ckp_ptr", "rem", "tq") + tuple(f"{v}{u}" for v in ("so", "tt", "h_prev") for u in range(MAX_UNROLL))



@dataclass(frozen=True)
class AdjointKernel:
    """A rendered module: its kernel and what the host passes to it."""

    source: str
    kernel: str
    tensors: tuple[str, ...]                          # pointer args: reads, direct outputs, partials, ws, ckp
    direct: tuple[str, ...]                           # outputs the kernel writes itself
    partials: tuple[tuple[str, str, tuple], ...]      # (partial name, reduction output, partial axes)
    kernel_args: tuple[tuple[str, str, Any], ...]     # (arg name, kind ptr/dim/stride, detail) in order
    constexprs: tuple[str, ...]
    state_constexprs: tuple[tuple[str, str], ...]     # (state axis name, its padded-size constexpr)
    block_lanes: tuple[str, ...]                      # lane axes in the BLOCK dimension (the rest: one per program)
    # cross reductions scattered into groups (``grad_C[b, g, ..] = sum_d`` with ``g = d // Dg``): (output, its
    # slots-per-block constexpr, the scattered axes) in the order of their slot-map pointer arguments
    scattered: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


def adjoint_supported(group: ScanAdjointGroup) -> tuple[bool, str]:
    """Whether the Triton kernel renders ``group`` ((False, why) when not)."""
    op = group.op
    for name in group.reads + group.outputs:
        if op.tensor(name).dtype not in (DType.f32, DType.f64, DType.bf16, DType.f16):
            return False, f"tensor {name} is {op.tensor(name).dtype}"
    if not group.lanes:
        return False, "the scan has no lane axis"
    for r in group.reductions:
        if r.kind not in ("point", "lane", "steplane", "cross") or (getattr(r, "scatter", ()) and r.kind != "cross"):
            return False, f"reduction {r.node.out} of kind {r.kind} is not rendered"
    why = group.common_blocker()
    if why:
        return False, why
    scans = (group.forward.out, group.adjoint.out)
    for e in (group.forward.init, group.adjoint.init):
        if e is not None and any(a.tensor in scans for a in loads(e)):
            return False, "an initial value reads the scan"
    return True, ""


def _replace_node(e: Expr, memo_fn) -> Expr:
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        hit = memo_fn(n)
        if hit is not None:
            memo[n] = hit
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


class _Renderer:
    def __init__(self, group: ScanAdjointGroup, unroll: int = 1) -> None:
        if not 1 <= unroll <= MAX_UNROLL:
            raise ValueError(f"unroll must be in 1..{MAX_UNROLL} (got {unroll})")
        self.unroll = unroll
        ok, why = adjoint_supported(group)
        if not ok:
            raise ValueError(f"op {group.op.name}: the triton scan adjoint kernel does not apply: {why}")
        self.g, self.op = group, group.op
        self.namer = Namer(reserved=_FIXED)
        self.dim_names = {d: f"dim_{d.name}" for d in self.op.dims}
        for v in self.dim_names.values():
            self.namer.reserve(v)

    def _dimname(self, s: sympy.Symbol) -> str:
        if s in self.dim_names:
            return self.dim_names[s]
        raise ValueError(f"symbol {s} in a tensor shape is not a dim")

    def ext(self, axis: Axis, mode: str = "triton") -> str:
        return render_index(self.op.extent(axis), self._dimname, mode)

    # pseudo tensors: the kernel's registers for h at the step / the step before, adj, h at the first step
    def _pseudo(self, e: Expr, tail: bool = False) -> Expr:
        g, F, R = self.g, self.g.forward, self.g.adjoint
        k = list(F.axes).index(g.step)
        prev = g.step + 1 if g.reverse else g.step - 1

        def hit(n: Expr):
            if n.op is not ExprOp.LOAD or n.arg.tensor not in (F.out, R.out):
                return None
            acc = n.arg
            if acc.tensor == R.out:
                return load(self.p_adj, acc.index, n.dtype)
            if tail:
                return load(self.p_first, acc.index, n.dtype)
            i = sympy.sympify(acc.index[k])
            if i == g.step:
                return load(self.p_cur, acc.index, n.dtype)
            if sympy.simplify(i - prev) == 0:
                return load(self.p_prev, F.axes, n.dtype)
            raise ValueError(f"op {self.op.name}: {acc.tensor} is read at step {i}")
        return _replace_node(e, hit)

    def render(self) -> AdjointKernel:
        g, op, namer = self.g, self.op, self.namer
        F, R = g.forward, g.adjoint
        taken = {t.name for t in op.tensors}

        def fresh_key(base: str) -> str:
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            taken.add(name)
            return name
        self.p_cur, self.p_prev = fresh_key("h_at_step"), fresh_key("h_before_step")
        self.p_adj, self.p_first = fresh_key("adj_at_step"), fresh_key("h_at_first_step")
        state_dt = compute_dtype(promote(F.combine.a.dtype, F.combine.b.dtype))
        SDT = TL_DTYPE[state_dt]
        part_kind = {r.node.out: r for r in g.reductions if r.kind in ("lane", "steplane", "cross")}
        direct = tuple(n for n in g.outputs if n not in part_kind)
        block_lanes = g.split or g.lanes
        outer = tuple(a for a in g.lanes if a not in block_lanes)
        split_sym = sympy.Symbol("split_block", integer=True, nonnegative=True)
        # tensors ----------------------------------------------------------------------------------------
        targs: dict[str, TensorArg] = {}
        args: list[tuple[str, str, Any]] = []
        order: list[str] = []

        def add(name: str, sizes: tuple[str, ...], dtype: DType) -> None:
            ptr = namer.fresh(f"{name}_ptr")
            strides = tuple(namer.fresh(f"stride_{name}_{k}") for k in range(len(sizes)))
            targs[name] = TensorArg(ptr, strides, sizes, dtype)
            order.append(name)
        for n in g.reads + direct:
            t = op.tensor(n)
            add(n, tuple(render_index(s, self._dimname) for s in t.shape), t.dtype)
        partials = []
        for r in g.reductions:
            if r.kind in ("lane", "steplane"):
                axes = g.lanes + r.kept_state
                sizes = tuple(self.ext(a) for a in axes)
            elif r.kind == "cross":
                scat = dict(r.scatter)
                axes = tuple(a for a in r.node.axes if a not in g.state and a not in scat) + r.kept_state
                sizes = ("n_blk",) + (("SLOTS",) if scat else ()) + tuple(self.ext(a) for a in axes)
                for a, ex in scat.items():
                    if not {x for x in sympy.sympify(ex).free_symbols if isinstance(x, Axis)} <= set(block_lanes):
                        raise ValueError(f"op {op.name}: {r.node.out}'s axis {a} = {ex} is not a function of the "
                                         f"lanes it sums over")
            else:
                continue
            pname = fresh_key(f"part_{r.node.out}")
            partials.append((pname, r.node.out, axes))
            add(pname, sizes, state_dt)
        for name in order:
            args.append((targs[name].ptr, "ptr", name))
        args += [("ws_ptr", "ptr", "ws"), ("ckp_ptr", "ptr", "ckp")]
        scattered = []
        for x in g.reductions:
            if x.kind == "cross" and x.scatter:
                k = len(scattered)
                scattered.append((x.node.out, namer.fresh(f"SLOTS_{x.node.out}"), tuple(a.name for a, _ in x.scatter)))
                args.append((namer.fresh(f"slot_{x.node.out}_ptr"), "ptr", ("slot", k)))
        for d in op.dims:
            args.append((self.dim_names[d], "dim", d.name))
        for name in order:
            for k, s in enumerate(targs[name].strides):
                args.append((s, "stride", (name, k)))
        masked = set()
        for e in g.exprs():
            for acc in loads(e):
                if acc.tensor in (F.out, R.out):
                    continue
                if (acc.pad is not None and any(sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0
                                                for lo, hi in acc.pad)) or \
                        any(not isinstance(sympy.sympify(i), Axis) for i in acc.index):
                    masked.add(acc)
        r = self.renderer = ValueRenderer(namer, targs, self.dim_names, masked)
        # axes -------------------------------------------------------------------------------------------
        Rk = 1 + len(g.state)

        def expand(pos: int) -> str:
            return "" if Rk == 1 else "[" + ", ".join(":" if k == pos else "None" for k in range(Rk)) + "]"
        ns = {a: namer.fresh(f"NS_{a.name}") for a in g.state}
        constexprs = ["BLOCK"] + [ns[a] for a in g.state] + ["CH", "IDX"] + [c for _, c, _ in scattered]
        full = "[" + ", ".join(["BLOCK"] + [ns[a] for a in g.state]) + "]"
        sp = " * ".join(ns[a] for a in g.state) or "1"
        body: list[str] = []
        bexts = [self.ext(a) for a in block_lanes]
        oexts = [self.ext(a) for a in outer]
        n_block = " * ".join(bexts)
        body.append(f"# one program: one position of ({', '.join(map(str, outer))}) x BLOCK consecutive positions of "
                    f"the row-major flattening of ({', '.join(map(str, block_lanes))})")
        body.append("pid = tl.program_id(0).to(IDX)")
        body.append(f"n_blk = tl.cdiv({n_block}, BLOCK)")
        body.append("pid_o = pid // n_blk")
        body.append("pid_b = pid % n_blk")
        body.append(f"lane_loc = tl.arange(0, BLOCK).to(IDX){expand(0)}")
        body.append("lane = pid_b * BLOCK + tl.arange(0, BLOCK).to(IDX)")
        body.append(f"lane_ok = (lane < {n_block}){expand(0)}")
        env: dict = {split_sym: AxisVar("pid_b", None, block=False)}

        def decompose(axes, exts, src: str, block: bool) -> None:
            rest = src
            for k in reversed(range(len(axes))):
                a = axes[k]
                name = namer.fresh(a.name)
                tail = expand(0) if block else ""
                if k == 0:
                    body.append(f"{name} = {rest}{tail}")
                else:
                    body.append(f"{name} = ({rest} % {exts[k]}){tail}")
                    nxt = namer.fresh("rest")
                    body.append(f"{nxt} = {rest} // {exts[k]}")
                    rest = nxt
                env[a] = AxisVar(name, "lane_ok") if block else AxisVar(name, None, block=False)
        decompose(block_lanes, bexts, "lane", True)
        decompose(outer, oexts, "pid_o", False)
        flat = []
        for k, a in enumerate(g.state):
            name, ok = namer.fresh(a.name), namer.fresh(f"{a.name}_ok")
            body.append(f"{name} = tl.arange(0, {ns[a]}).to(IDX){expand(k + 1)}")
            body.append(f"{ok} = {name} < {self.ext(a)}")
            env[a] = AxisVar(name, ok)
            inner = " * ".join(ns[b] for b in g.state[k + 1:])
            flat.append(f"{name} * {inner}" if inner else name)
        body.append(f"# workspace slot of each tile element: [BLOCK, {' x '.join(ns[a] for a in g.state) or '1'}] "
                    f"row-major")
        body.append(f"wofs = lane_loc * SP + {' + '.join(flat)}" if flat else "wofs = lane_loc")
        body.append("n_chunks = tl.cdiv(" + self.ext(g.step) + ", CH)")
        body.append("ws_base = pid * ((CH + 1) * TILE)")
        body.append("ck_base = pid * (n_chunks * TILE)")
        steps = self.ext(g.step)
        U = self.unroll
        tvars = [namer.fresh(g.step.name) for _ in range(U)]
        step_envs = [{**env, g.step: AxisVar(tvars[u], None, block=False)} for u in range(U)]

        def pos(u: int) -> str:
            return f"{steps} - 1 - so{u}" if g.reverse else f"so{u}"

        pre = Section(env=dict(env))
        state_mask = " & ".join(["lane_ok"] + [env[a].mask for a in g.state])

        def tile_of(code: str) -> str:
            return f"(tl.zeros({full}, dtype={SDT}) + {code}).to({SDT})"
        if F.init is not None:
            init = r.value(F.init, pre, "init")
            pre.emit(f"hs = tl.where({state_mask}, {tile_of(init)}, 0.0)  # initial state")
        else:
            pre.emit(f"hs = tl.zeros({full}, dtype={SDT})")
        if R.init is not None:
            ai = r.value(self._pseudo(R.init), pre, "adj_init")
            pre.emit(f"adj = tl.where({state_mask}, {tile_of(ai)}, 0.0)  # adjoint initial value")
        else:
            pre.emit(f"adj = tl.zeros({full}, dtype={SDT})")

        def a_shape(e: Expr) -> str:
            deps = r.deps(e)
            dims = ["BLOCK" if any(a in deps for a in block_lanes) else "1"]
            dims += [ns[a] if a in deps else "1" for a in g.state]
            return "[" + ", ".join(dims) + "]"

        # pass 1 and recompute: h = a * h + b -----------------------------------------------------------------
        def advance(u: int, store: bool) -> Section:
            sec = Section(env=step_envs[u], hoist=pre, varying=frozenset({g.step}))
            sec.emit(f"so{u} = tl.cast(ck * CH + tt{u}, IDX)")
            sec.emit(f"{tvars[u]} = {pos(u)}")
            av = r.value(F.combine.a, sec, "a_t")
            bv = r.value(F.combine.b, sec, "b_t")
            sec.emit(f"hs = {av}.to({SDT}) * hs + {bv}.to({SDT})  # {F.out} = a * {F.out}[prev] + b")
            if store:
                sec.emit(f"tl.store(ws_ptr + ws_base + (tt{u} + 1) * TILE + wofs, hs)")
            return sec
        p1 = [advance(u, False) for u in range(U)]
        rec = [advance(u, True) for u in range(U)]

        # the reverse pass -----------------------------------------------------------------------------------
        point_outs = {x.node.out for x in g.reductions if x.kind == "point"}
        varying = {g.step, self.p_cur, self.p_prev, self.p_adj} | point_outs | {m.out for m in g.epilogues}
        acc_init: list[str] = []
        final: list[tuple[str, str]] = []
        accs: dict[str, str] = {}
        seg: dict[str, tuple] = {}
        pnames = {out: (p, ax) for p, out, ax in partials}
        a_next_shape = a_shape(F.combine.a) if g.carry_a else None

        def rev_step(u: int) -> Section:
            regs = {self.p_cur: "h_cur", self.p_prev: f"h_prev{u}", self.p_adj: "adj"}
            rev = Section(env=dict(step_envs[u]), hoist=pre, varying=frozenset(varying), registers=regs)
            rev.emit(f"so{u} = tl.cast(ck * CH + tt{u}, IDX)")
            rev.emit(f"{tvars[u]} = {pos(u)}")
            rev.emit(f"h_prev{u} = tl.where(so{u} >= 1, tl.load(ws_ptr + ws_base + tt{u} * TILE + wofs), 0.0)"
                     f"  # {F.out} at the step before (0 before the first)")
            if g.carry_a:
                at = r.value(F.combine.a, rev, "a_t")
                coef = "a_next"
            else:
                coef = r.value(self._pseudo(R.combine.a), rev, "a_adj") + f".to({SDT})"
            gv = r.value(self._pseudo(R.combine.b), rev, "g_t")
            rev.emit(f"adj = {coef} * adj + {gv}.to({SDT})  # {R.out} = a[step + 1] * {R.out}[step + 1] + g")
            sums: dict[tuple, str] = {}

            def state_sum(e: Expr, axes: tuple, hint: str) -> str:
                """``e`` summed over the state axes ``axes`` (kept as size-1 dims); shared between reductions."""
                key = (e, axes)
                if key in sums:
                    return sums[key]
                val = r.value(e, rev, f"{hint}_terms")
                if not axes:
                    sums[key] = val
                    return val
                code = f"tl.where({' & '.join(env[a].mask for a in axes)}, {val}, 0.0)"
                for ax in sorted((g.state.index(a) + 1 for a in axes), reverse=True):
                    code = f"tl.expand_dims(tl.sum({code}, axis={ax}), {ax})"
                name = namer.fresh(hint)
                rev.emit(f"{name} = {code}")
                sums[key] = name
                return name

            def acc(out: str, shape: str) -> str:
                if out not in accs:
                    accs[out] = namer.fresh(f"acc_{out}")
                    acc_init.append(f"{accs[out]} = tl.zeros({shape}, dtype={SDT})")
                    final.append((accs[out], out))
                return accs[out]
            for k, x in enumerate(g.reductions):
                n = x.node
                if x.kind == "steplane":
                    continue
                e = self._pseudo(n.value)
                red_state = tuple(a for a in g.state if a not in x.kept_state)
                s = state_sum(e, red_state, n.out)
                if x.kind == "point":
                    rev.emit(f"# {n.out}: sum over {', '.join(map(str, n.raxes))}")
                    rev.registers[n.out] = s
                    if n.out in direct:
                        self._store(n.out, tuple(n.axes), s, rev)
                elif x.kind == "lane":
                    shape = "[" + ", ".join(["BLOCK"] + [ns[a] if a in x.kept_state else "1" for a in g.state]) + "]"
                    rev.emit(f"{acc(n.out, shape)} += {s}.to({SDT})  # {n.out}: sum over "
                             f"{', '.join(map(str, n.raxes))}")
                else:
                    p, pax = pnames[n.out]
                    crs = namer.fresh(f"{n.out}_blk")
                    if not x.scatter:
                        rev.emit(f"{crs} = tl.expand_dims(tl.sum(tl.where(lane_ok, {s}, 0.0), axis=0), 0)"
                                 f"  # {n.out}: sum over {', '.join(map(str, n.raxes))} (this block of lanes)")
                        self._store(p, (split_sym,) + tuple(pax), crs, rev)
                        continue
                    # scattered: a segmented sum over the block, one row per slot (the block's groups, in order)
                    if n.out not in seg:
                        k = [o for o, _, _ in scattered].index(n.out)
                        _, slots, _ = scattered[k]
                        sptr = next(a for a, kd, det in args if det == ("slot", k))
                        oh, sl = namer.fresh(f"onehot_{n.out}"), namer.fresh(f"slot_{n.out}")
                        tail_dims = "".join(", None" for _ in g.state)
                        pre.emit(f"{sl} = tl.load({sptr} + lane, mask=lane < {n_block}, other=-1)  # {n.out}: slot "
                                 f"of each lane in this block's groups")
                        pre.emit(f"{oh} = ({sl}[:, None] == tl.arange(0, {slots})[None, :])[:, :{tail_dims}]")
                        sar = namer.fresh(f"slot_rows_{n.out}")
                        pre.emit(f"{sar} = tl.arange(0, {slots}).to(IDX){expand(0)}")
                        seg[n.out] = (oh, sympy.Symbol(f"slot_of_{k}", integer=True, nonnegative=True), sar)
                    oh, ssym, sar = seg[n.out]
                    rev.env[ssym] = AxisVar(sar, None)
                    rev.emit(f"{crs} = tl.sum(tl.where({oh}, tl.expand_dims(tl.where(lane_ok, {s}, 0.0), 1), 0.0), "
                             f"axis=0)  # {n.out}: sum over {', '.join(map(str, n.raxes))} per group of this block")
                    self._store(p, (split_sym, ssym) + tuple(pax), crs, rev)
            for m in g.epilogues:
                v = r.value(self._pseudo(m.value), rev, m.out)
                if not v.isidentifier():
                    v = r._assign(m.out, v, rev)
                rev.registers[m.out] = v
                if m.out in direct:
                    self._store(m.out, tuple(m.axes), v, rev)
            for x in g.reductions:
                if x.kind != "steplane":
                    continue
                v = r.value(self._pseudo(x.node.value), rev, f"{x.node.out}_terms")
                accn = acc(x.node.out, "[BLOCK" + ", 1" * len(g.state) + "]")
                rev.emit(f"{accn} += {v}.to({SDT})  # {x.node.out}: sum over {', '.join(map(str, x.node.raxes))}")
            for m in g.stores:
                v = r.value(self._pseudo(m.value), rev, m.out)
                if not v.isidentifier():
                    v = r._assign(m.out, v, rev)
                self._store(m.out, tuple(m.axes), v, rev)
            if g.carry_a:
                rev.emit(f"a_next = {at}.to({SDT}) + tl.zeros({a_next_shape}, dtype={SDT})  # a at this step, "
                         f"for the step before")
            rev.emit(f"h_cur = h_prev{u}")
            return rev
        rev = [rev_step(u) for u in range(U)]
        carried = {"hs", "adj", "a_next", "h_cur"} | set(accs.values())

        # after the lane: partials and tails ------------------------------------------------------------------
        tail = Section(env=dict(env), hoist=pre, varying=frozenset({self.p_first, self.p_adj}),
                       registers={self.p_first: "h_first", self.p_adj: "adj"})
        for accn, out in final:
            p, pax = pnames[out]
            self._store(p, tuple(pax), accn, tail)
        if g.tails:
            tail.emit("h_first = tl.load(ws_ptr + ws_base + TILE + wofs)  # the state at the forward's first step")
            for m, _ in g.tails:
                v = r.value(self._pseudo(m.value, tail=True), tail, m.out)
                if not v.isidentifier():
                    v = r._assign(m.out, v, tail)
                self._store(m.out, tuple(m.axes), v, tail)

        # assemble -------------------------------------------------------------------------------------------
        kernel = namer.fresh(f"{op.name}_scan_adjoint_kernel")
        lines = [f'"""Generated by opgen ({GENERATOR_VERSION}): the fused scan backward of op {op.name}.', ""]
        lines += ["    " + ln if ln else "" for ln in g.describe().splitlines()]
        lines += ["", f"    op fingerprint {op.fingerprint}", '"""', "import triton", "import triton.language as tl",
                  ""]
        helpers = helper_source(r.helpers)
        if helpers:
            lines += ["", helpers.rstrip("\n"), ""]
        lines += ["", "@triton.jit", f"def {kernel}("]
        lines.append("    " + ", ".join(a for a, kd, _ in args if kd == "ptr") + ",")
        if op.dims:
            lines.append("    " + ", ".join(a for a, kd, _ in args if kd == "dim") + ",")
        for name in order:
            if targs[name].strides:
                lines.append("    " + ", ".join(targs[name].strides) + ",")
        lines.append("    " + ", ".join(f"{c}: tl.constexpr" for c in constexprs) + ",")
        lines.append("):")
        lines.append(f"    SP: tl.constexpr = {sp}")
        lines.append("    TILE: tl.constexpr = BLOCK * SP")
        lines += ["    " + ln for ln in body]
        lines += pre.text(4)
        lines += ["    " + ln for ln in acc_init]
        lines.append("    # pass 1: the state at each chunk boundary")
        lines.append("    for ck in range(0, n_chunks - 1):")
        lines.append("        tl.store(ckp_ptr + ck_base + ck * TILE + wofs, hs)")
        lines += _step_loops(p1, carried, "CH", False, 8)
        lines.append("    tl.store(ckp_ptr + ck_base + (n_chunks - 1) * TILE + wofs, hs)")
        lines.append("    tl.debug_barrier()")
        if g.carry_a:
            lines.append(f"    a_next = tl.zeros({a_next_shape}, dtype={SDT})  # a past the last step: 0")
        lines.append("    for ck2 in range(0, n_chunks):")
        lines.append("        ck = n_chunks - 1 - ck2")
        lines.append(f"        cnt = tl.minimum(CH, {steps} - ck * CH)")
        lines.append("        hs = tl.load(ckp_ptr + ck_base + ck * TILE + wofs)")
        lines.append("        tl.store(ws_ptr + ws_base + wofs, hs)")
        lines.append("        # recompute the chunk's states into the workspace")
        lines += _step_loops(rec, carried, "cnt", False, 8)
        lines.append("        tl.debug_barrier()")
        lines.append("        h_cur = hs")
        lines.append("        # the adjoint, backwards over the chunk, and every reduction")
        lines += _step_loops(rev, carried, "cnt", True, 8)
        lines.append("        tl.debug_barrier()")
        if tail.lines:
            lines.append("    # lane partials and the values at the forward's first step")
            lines += tail.text(4)
        source = "\n".join(lines).rstrip() + "\n"
        return AdjointKernel(source, kernel, tuple(order) + ("ws", "ckp"), direct, tuple(partials), tuple(args),
                             tuple(constexprs), tuple((a.name, ns[a]) for a in g.state),
                             tuple(a.name for a in block_lanes), tuple(scattered))

    def _store(self, tensor: str, idx: tuple, value: str, sec: Section) -> None:
        r = self.renderer
        t = r.tensors[tensor]
        off = r.offset(tensor, idx, sec)
        syms: set = set()
        for ie in idx:
            syms |= sympy.sympify(ie).free_symbols
        masks = r.mask_of(syms, sec)
        mask = f", mask={' & '.join(masks)}" if masks else ""
        sec.emit(f"tl.store({t.ptr} + {off}, {value}.to({TL_DTYPE[t.dtype]}){mask})"
                 f"  # {tensor}[{', '.join(index_str(i) for i in idx)}]")


def _split(lines: list[str], carried: set[str]) -> tuple[list[str], list[str]]:
    """(step-only lines, the rest) of a step's straight-line code: an assignment that reads nothing carried between
    steps (nor anything computed from it) only loads and computes from the step index, so it may move ahead of the
    previous step's recurrence; stores, accumulations and comments keep their order in the rest."""
    dep = set(carried)
    pure, rest = [], []
    for ln in lines:
        body = ast.parse(ln).body
        st = body[0] if body else None
        reads = {x.id for x in ast.walk(st) if isinstance(x, ast.Name)} if st is not None else set()
        if (isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)
                and st.targets[0].id not in dep and not (reads - {st.targets[0].id}) & dep):
            pure.append(ln)
            continue
        rest.append(ln)
        if isinstance(st, (ast.Assign, ast.AugAssign)):
            dep |= {x.id for t in (st.targets if isinstance(st, ast.Assign) else [st.target])
                    for x in ast.walk(t) if isinstance(x, ast.Name)}
    return pure, rest


def _step_loops(secs: list[Section], carried: set[str], count: str, backward: bool, indent: int) -> list[str]:
    """The loops over ``count`` steps of a chunk (backwards when ``backward``): blocks of ``len(secs)`` steps, the
    step-only lines of every step of a block first, then the remaining steps one by one (``secs[0]``)."""
    U = len(secs)
    pad, inner = " " * indent, " " * (indent + 4)
    one = [ln for ln in secs[0].lines]
    parts = [_split(sec.lines, carried) for sec in secs]
    block = [f"tt{u} = {count} - rem - 1 - tq * {U} - {u}" if backward else f"tt{u} = tq * {U} + {u}"
             for u in range(U)]
    block += [ln for pure, _ in parts for ln in pure] + [ln for _, rest in parts for ln in rest]
    out = [f"{pad}rem = {count} % {U}"]
    if backward:
        out += [f"{pad}for tt2 in range(0, rem):  # the last steps of the chunk, one by one",
                f"{inner}tt0 = {count} - 1 - tt2"] + [inner + ln for ln in one]
    out += [f"{pad}for tq in range(0, {count} // {U}):  # {U} steps at a time: their loads first"]
    out += [inner + ln for ln in block]
    if not backward:
        out += [f"{pad}for tt0 in range({count} - rem, {count}):  # the steps left over"] + [inner + ln for ln in one]
    return out


@functools.lru_cache(maxsize=128)
def render(group: ScanAdjointGroup, unroll: int = 1) -> AdjointKernel:
    """The Triton module of ``group``'s fused backward (a pure function of the group and ``unroll``; cached).

    ``unroll`` steps per iteration of the step loops: the loads and step-only values of all of them first (a
    statement that reads nothing carried between steps moves ahead of the previous step's recurrence), then the
    recurrences and stores in order, so the next step's loads are in flight while a step computes (the compiler
    does not move a load above a store it cannot prove apart); the steps left over run one by one. More registers:
    at Mamba's N=16, ``unroll=2`` spills 24 bytes at 16 lanes x 2 warps (none at 1), none at 32 lanes x 8 warps."""
    return _Renderer(group, unroll).render()


def scan_adjoint_group(op) -> ScanAdjointGroup | None:
    """The op's adjoint group when this kernel renders it, else None."""
    g = fuse_scan_adjoint(op)
    if g is None or not adjoint_supported(g)[0]:
        return None
    try:
        render(g)
    except (ValueError, NotImplementedError, KeyError):
        return None
    return g
