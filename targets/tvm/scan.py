"""Render a fused scan group (:class:`opgen.ir.passes.ScanGroup`, sequential variant) to a TVMScript prim_func.

The kernel (no tvm import here: the result is source text, compiled by :mod:`opgen.targets.tvm.compile`)::

    for lane in T.parallel(prod(lane extents) [/ V]):     # one (or V) independent recurrences per iteration
        state = local buffer [state extents (, V)]          # initial state: group.scan.init, else 0
        for step in serial (reversed when group.reverse):
            acc = 0                                          # projection accumulator over the kept state axes
            for state axes: state = a * state + b            # (+ store the state, + acc += projection value)
            for kept axes: epilogue maps on acc -> outputs   # earlier epilogue results are inlined
        for state axes: tails (final state) -> outputs

Every dim is symbolic (``T.int32()`` vars bound by ``T.match_buffer``; derived dims such as ``DgB = D / GB``
are computed inside); ``static_dims`` turns chosen dims (the state extents) into literals. Tensors are
contiguous; ``align`` is the element size, so misaligned views (``x[1:]``) are accepted.

Interleaved mode (``lanes_vector = V > 1`` with ``interleave``) runs V lanes per iteration as independent chains
with direct loads, in blocks of ``time_tile`` steps: ``for block: for v in T.unroll(V): for step in block``. A
first-order recurrence over lanes that are strided in memory (each lane contiguous in time) is latency-bound with
one chain per iteration; lane after lane within a block, the out-of-order core overlaps the V chains while each
lane streams a contiguous run (V rows at one step each, 8 KiB apart, would share L1 sets: 4.9 ms for V=8 against
1.7 ms blocked, linear_scan 1024 x 2048 fp32). Unrolling full blocks was slower (2.75 against 2.41 ms).

Vector mode (``ScanConfig.lanes_vector = V > 1``) runs V lanes of ``vector_axis`` at once in
``T.vectorized(V)`` loops. Per-step inputs that are strided along that axis (Mamba's ``u[b, d, t]``,
contiguous in t) are staged through ``[time_tile, V]`` local tiles (a transpose), outputs likewise; inputs
that do not depend on the step but on the state (``A[d, n]``) are loaded once into ``[N, V]`` buffers. The
extent of ``vector_axis`` must be a multiple of V (the kernel asserts it; the target falls back to V = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import sympy

from opgen.ir import Access, DType, ExprOp, promote
from opgen.ir.passes import ScanGroup, inline_maps
from opgen.ir.symbols import Axis, Dim
from opgen.schedules.scan import TIME_VECTOR_WIDTHS, ScanConfig, time_vector_supported

from .expr import (Code, ExprEmitter, IndexRenderer, LoadOverride, Scope, compute_dtype, const_text, scratch_buffer,
                   tvm_dtype, write_func_head)
from .scan_time_vector import time_vector_body


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel: TVMScript text and the calling convention."""

    text: str
    tensors: tuple[str, ...]          # tensor arguments, in call order (inputs, then outputs)
    scalars: tuple[Dim, ...]          # then these dims, as int arguments
    config: ScanConfig
    index_dtype: str = "int32"
    static_dims: tuple[tuple[str, int], ...] = ()


def _axes_of(acc: Access) -> frozenset:
    out = set()
    for i in acc.index:
        out |= {s for s in sympy.sympify(i).free_symbols if isinstance(s, Axis)}
    return frozenset(out)


def _padded(acc: Access) -> bool:
    return acc.pad is not None and any(sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0 for lo, hi in acc.pad)


def render_scan(group: ScanGroup, config: ScanConfig = ScanConfig(), *,
                static_dims: Mapping[Dim, int] | None = None, index_bits: int = 32,
                func_name: str = "main") -> KernelSource:
    """The TVMScript source of ``group`` under ``config`` (see the module docstring)."""
    return _Renderer(group, config, dict(static_dims or {}), index_bits, func_name).render()


class _Renderer:
    def __init__(self, group: ScanGroup, cfg: ScanConfig, static: dict, index_bits: int, func_name: str):
        if index_bits not in (32, 64):
            raise ValueError(f"index_bits must be 32 or 64, got {index_bits}")
        if cfg.lanes_vector < 1:
            raise ValueError(f"lanes_vector must be >= 1, got {cfg.lanes_vector}")
        if cfg.unroll_state and not cfg.static_state:
            raise ValueError("unroll_state needs static_state")
        if cfg.time_vector and (cfg.time_vector not in TIME_VECTOR_WIDTHS or cfg.lanes_vector > 1):
            raise ValueError(f"time_vector must be 0 or one of {TIME_VECTOR_WIDTHS} with lanes_vector 1, got "
                             f"time_vector={cfg.time_vector}, lanes_vector={cfg.lanes_vector}")
        self.g, self.cfg, self.func_name = group, cfg, func_name
        self.op = group.op
        self.idt = f"int{index_bits}"
        self.static = {d: int(v) for d, v in static.items()}
        self.V = cfg.lanes_vector
        self.vax: Axis | None = None
        if self.V > 1:
            names = {str(a): a for a in group.lanes}
            if cfg.vector_axis not in names:
                raise ValueError(f"vector_axis {cfg.vector_axis!r} is not a lane axis of the scan "
                                 f"(lanes: {sorted(names)})")
            self.vax = names[cfg.vector_axis]
        self.TT = cfg.time_tile
        self.tiled = self.V > 1 and not cfg.interleave        # staged [time_tile, V] tiles (vector mode)
        self.vloop = "T.unroll" if cfg.interleave else "T.vectorized"
        self._v_bound = False                                  # inside the interleaved step loop: v is bound
        if self.V > 1 and self.TT < 1:
            raise ValueError(f"time_tile must be >= 1, got {self.TT}")
        self.allocs: list[str] = []
        self.tiles: dict[Access, str] = {}
        self.pres: dict[Access, tuple[str, tuple[Axis, ...]]] = {}
        self.otiles: list[tuple[str, str, tuple]] = []   # (tile, buffer, index exprs)
        self._nbuf = 0

    # names -------------------------------------------------------------------------------------------------
    def _buf(self, prefix: str, shape: str, dtype: str) -> str:
        self._nbuf += 1
        name = f"{prefix}{self._nbuf}"
        self.allocs.append(scratch_buffer(name, f"{shape}", dtype))
        return name

    # main ----------------------------------------------------------------------------------------------------
    def render(self) -> KernelSource:
        g, op = self.g, self.op
        params = list(op.inputs) + list(op.outputs)
        derived = {d for d, _ in op.derived}
        plain: dict[Dim, str] = {}
        for t in params:
            for s in t.shape:
                if isinstance(s, Dim) and s not in derived and s not in self.static:
                    plain.setdefault(s, t.name)
        scalars = tuple(d for d in op.dims if d not in derived and d not in self.static and d not in plain)
        sym: dict[sympy.Symbol, str] = {}
        for d in op.dims:
            sym[d] = str(self.static[d]) if d in self.static else f"n_{d.name}"
        self.ir_dims = IndexRenderer(sym, self.idt)
        ext = {a: self.ir_dims(e) for a, e in op.extents}
        self.ext = ext
        lanes, state, step = g.lanes, g.state, g.step
        for a in lanes + state + (step,):
            sym[a] = f"i_{a.name}"
        if self.vax is not None:
            sym[self.vax] = f"(vb + v)"
        self.sym = sym
        self.ir = IndexRenderer(sym, self.idt)
        self.buffers = {t.name: f"b_{t.name}" for t in op.tensors}
        shapes = {t.name: t.shape for t in op.tensors}
        dtypes = {t.name: t.dtype for t in op.tensors}
        comb = g.scan.combine
        self.state_dt = compute_dtype(promote(comb.a.dtype, comb.b.dtype))
        self.sdt = tvm_dtype(self.state_dt)
        if self.cfg.time_vector:
            return self._render_time_vector(params, plain, scalars, shapes, dtypes)
        proj = g.projection
        self.kept = tuple(a for a in state if proj is not None and a in proj.axes)
        self.acc_dt = compute_dtype(proj.value.dtype) if proj is not None else self.state_dt
        masked = set()
        for n in [g.scan] + ([proj] if proj else []) + list(g.epilogue) + list(g.tails):
            for e in n.exprs():
                for nd in e.walk():
                    if nd.op is ExprOp.LOAD and _padded(nd.arg):
                        masked.add(nd.arg)
        self.em = ExprEmitter(buffers=self.buffers, shapes=shapes, dtypes=dtypes, index=self.ir, masked=masked,
                              fast_math=self.cfg.fast_math, vector_axis=self.vax, vector_len=self.V,
                              alloc=lambda dt, shape: self._buf("vt", f"({', '.join(shape)},)", dt),
                              load_hook=self._hook)
        V = self.V
        vec = V > 1
        # state and accumulator buffers
        s_shape = [ext[a] for a in state] + ([str(V)] if vec else [])
        self.allocs.append(scratch_buffer("st", f"({', '.join(s_shape) or '1'},)", self.sdt))
        self.st_idx = ", ".join([sym[a] for a in state] + (["v"] if vec else [])) or "0"
        if proj is not None:
            a_shape = [ext[a] for a in self.kept] + ([str(V)] if vec else [])
            self.allocs.append(scratch_buffer("acc", f"({', '.join(a_shape) or '1'},)", tvm_dtype(self.acc_dt)))
            self.acc_idx = ", ".join([sym[a] for a in self.kept] + (["v"] if vec else [])) or "0"
        outputs = {t.name for t in op.outputs}

        # scopes -------------------------------------------------------------------------------------------
        root = Scope("lane", None, tuple(lanes))

        def chain(parent: Scope, axes, name: str) -> list[Scope]:
            out, cur = [], parent
            for k, a in enumerate(axes):
                cur = cur.child(f"{name}_{a}", (a,), leaf=(k == len(axes) - 1))
                out.append(cur)
            if not axes:
                out.append(parent.child(name, (), leaf=True))
            return out

        # init
        init_chain = chain(root, state, "init")
        init_leaf = init_chain[-1]
        if g.scan.init is not None:
            r = self.em.emit(g.scan.init, init_leaf)
            init_val = self._conv(r.text, g.scan.init.dtype, self.state_dt)
        else:
            init_val = const_text(0, self.sdt)
        self._stmt(init_leaf, f"st[{self.st_idx}] = {init_val}")

        # update (+ store state, + accumulate the projection)
        step_scope = root.child("step", (step,))
        if self.tiled:
            step_scope.tile = self.TT
        upd_chain = chain(step_scope, state, "upd")
        upd_leaf = upd_chain[-1]
        ra = self.em.emit(comb.a, upd_leaf)
        rb = self.em.emit(comb.b, upd_leaf)
        a_txt = self._conv(ra.text, comb.a.dtype, self.state_dt)
        b_txt = self._conv(rb.text, comb.b.dtype, self.state_dt)
        self._stmt(upd_leaf, f"st[{self.st_idx}] = {a_txt} * st[{self.st_idx}] + {b_txt}")
        if g.store_state:
            self._store(upd_leaf, g.scan.out, g.scan.axes, f"st[{self.st_idx}]", self.state_dt)
        if proj is not None:
            rp = self.em.emit(proj.value, upd_leaf)
            pv = self._conv(rp.text, proj.value.dtype, self.acc_dt)
            self._stmt(upd_leaf, f"acc[{self.acc_idx}] = acc[{self.acc_idx}] + {pv}")

        # epilogue
        epi_chain: list[Scope] = []
        if proj is not None:
            epi_chain = chain(step_scope, self.kept, "epi")
            epi_leaf = epi_chain[-1]
            if proj.out in outputs:
                self._store(epi_leaf, proj.out, proj.axes, f"acc[{self.acc_idx}]", self.acc_dt)
            done: dict = {}
            for m in g.epilogue:
                value = inline_maps(m.value, done) if done else m.value
                done[m.out] = m
                if m.out not in outputs:
                    continue
                r = self.em.emit(value, epi_leaf)
                self._store(epi_leaf, m.out, m.axes, r.text, compute_dtype(value.dtype))

        # tails (final state)
        tail_chain: list[Scope] = []
        if g.tails:
            tail_chain = chain(root, state, "tail")
            tail_leaf = tail_chain[-1]
            for m in g.tails:
                r = self.em.emit(m.value, tail_leaf)
                self._store(tail_leaf, m.out, m.axes, r.text, compute_dtype(m.value.dtype))

        # assemble -------------------------------------------------------------------------------------------
        c = Code()
        d1 = self._write_head(c, params, plain, scalars)
        c.block(d1, self.allocs)
        self._write_scope_head(c, d1, root)
        # pre-buffers (vector mode): step-invariant, state-dependent loads
        for acc_, (name, axes) in self.pres.items():
            dd = d1
            for a in axes:
                c.w(dd, f"for {sym[a]} in range({ext[a]}):")
                dd += 1
            c.w(dd, f"for v in {self.vloop}({V}):")
            c.w(dd + 1, f"{name}[{', '.join([sym[a] for a in axes] + ['v'])}] = {self.em.load_text(acc_)}")
        self._write_chain(c, d1, init_chain)
        # step loop
        if self.tiled:
            c.w(d1, f"for s0 in range(T.floordiv({ext[step]} + {self.TT - 1}, {self.TT})):")
            d2 = d1 + 1
            c.w(d2, f"tb: T.let = s0 * {self.TT}")
            c.w(d2, f"cnt: T.let = T.min({self.TT}, {ext[step]} - tb)")
            tpos = self._t_of("(tb + tt)")
            ir_tile = self.ir.with_symbols({step: tpos})
            for acc_, name in self.tiles.items():
                c.w(d2, f"for v in range({V}):")
                c.w(d2 + 1, "for tt in range(cnt):")
                c.w(d2 + 2, f"{name}[tt, v] = {self.em.load_text(acc_, ir_tile)}")
            if step_scope.lets or step_scope.vlines:
                # the step-level values of the whole tile first: independent across steps, so they pipeline
                c.w(d2, "for tt in range(cnt):")
                c.w(d2 + 1, f"{sym[step]}: T.let = {tpos}")
                self._write_scope_head(c, d2 + 1, step_scope)
            c.w(d2, "for tt in range(cnt):")
            d3 = d2 + 1
            c.w(d3, f"{sym[step]}: T.let = {tpos}")
        elif vec:                           # interleaved: per block of steps, each lane's chain in turn
            c.w(d1, f"for s0 in range(T.floordiv({ext[step]} + {self.TT - 1}, {self.TT})):")
            d2 = d1 + 1
            c.w(d2, f"tb: T.let = s0 * {self.TT}")
            c.w(d2, f"cnt: T.let = T.min({self.TT}, {ext[step]} - tb)")
            c.w(d2, f"for v in T.unroll({V}):")
            self._v_bound = True
            c.w(d2 + 1, "for tt in range(cnt):")
            d3 = d2 + 2
            c.w(d3, f"{sym[step]}: T.let = {self._t_of('(tb + tt)')}")
            self._write_scope_head(c, d3, step_scope)
            self._write_step_body(c, d3, proj, upd_chain, epi_chain)
        else:
            c.w(d1, f"for s in range({ext[step]}):")
            d3 = d1 + 1
            c.w(d3, f"{sym[step]}: T.let = {self._t_of('s')}")
            self._write_scope_head(c, d3, step_scope)
        if not self._v_bound:
            self._write_step_body(c, d3, proj, upd_chain, epi_chain)
        self._v_bound = False
        if self.tiled and self.otiles:
            ir_tile = self.ir.with_symbols({step: self._t_of("(tb + tt)"), self.vax: "(vb + v)"})
            for name, buf, index in self.otiles:
                c.w(d2, f"for v in range({V}):")
                c.w(d2 + 1, "for tt in range(cnt):")
                c.w(d2 + 2, f"{buf}[{', '.join(ir_tile(i) for i in index)}] = {name}[tt, v]")
        if tail_chain:
            self._write_chain(c, d1, tail_chain)
        text = "\n".join(c.lines) + "\n"
        return KernelSource(text, tuple(t.name for t in params), scalars, self.cfg, self.idt,
                            tuple(sorted((d.name, v) for d, v in self.static.items())))

    # helpers -------------------------------------------------------------------------------------------------
    def _write_head(self, c: Code, params: list, plain: dict, scalars: tuple) -> int:
        """The function header, buffers, derived dims and the parallel lane loop with its lane indices; returns
        the depth of the lane loop's body."""
        op, ext, V, lanes = self.op, self.ext, self.V, self.g.lanes
        write_func_head(c, "opgen.targets.tvm.scan", self.func_name, params, scalars, plain, self.idt, self.ir_dims,
                        op.derived, self.static)
        if V > 1:
            c.w(1, f"assert T.floormod({ext[self.vax]}, {V}) == 0, "
                   f"\"opgen: the extent of lane axis {self.vax} must be a multiple of {V}\"")
        # flattened lanes
        lane_ext = [f"T.floordiv({ext[a]}, {V})" if a == self.vax else ext[a] for a in lanes]
        nl = " * ".join(lane_ext) if lane_ext else "1"
        c.w(1, f"for lane in T.parallel({nl}):")
        d1 = 2
        for k, a in enumerate(lanes):
            inner = " * ".join(lane_ext[k + 1:])
            q = f"T.floordiv(lane, {inner})" if inner else "lane"
            val = f"T.floormod({q}, {lane_ext[k]})" if k > 0 else q
            if a == self.vax:
                c.w(d1, f"vb: T.let = {val} * {V}")
            else:
                c.w(d1, f"i_{a.name}: T.let = {val}")
        return d1

    def _render_time_vector(self, params: list, plain: dict, scalars: tuple, shapes: dict,
                            dtypes: dict) -> KernelSource:
        """The time-vector variant (:mod:`.scan_time_vector`): blocks of steps scanned in registers."""
        g = self.g
        ok, why = time_vector_supported(g, lambda s: self.ir_dims(s) == "1")
        if not ok:
            raise ValueError(f"time_vector={self.cfg.time_vector} does not apply to scan {g.scan.out}: {why}")
        out_dt = tvm_dtype(self.op.tensor(g.scan.out).dtype) if g.store_state else None
        allocs, body = time_vector_body(
            g, self.cfg.time_vector, sym=self.sym, buffers=self.buffers, dtypes=dtypes, shapes=shapes,
            ext_step=self.ext[g.step], state_dtype=self.sdt, out_dtype=out_dt,
            conv=lambda text, dt: self._conv(text, dt, self.state_dt), fast_math=self.cfg.fast_math,
            index_dtype=self.idt)
        c = Code()
        d1 = self._write_head(c, params, plain, scalars)
        c.block(d1, allocs)
        for depth, line in body:
            c.w(d1 + depth, line)
        text = "\n".join(c.lines) + "\n"
        return KernelSource(text, tuple(t.name for t in params), scalars, self.cfg, self.idt,
                            tuple(sorted((d.name, v) for d, v in self.static.items())))

    def _write_step_body(self, c: Code, d3: int, proj, upd_chain: list[Scope], epi_chain: list[Scope]) -> None:
        """One step: the projection accumulator reset, the state update, the epilogue."""
        if proj is not None:
            dd = d3
            for a in self.kept:
                c.w(dd, f"for {self.sym[a]} in {self._loop(a)}:")
                dd += 1
            if self.V > 1 and not self._v_bound:
                c.w(dd, f"for v in {self.vloop}({self.V}):")
                dd += 1
            c.w(dd, f"acc[{self.acc_idx}] = {const_text(0, tvm_dtype(self.acc_dt))}")
        self._write_chain(c, d3, upd_chain)
        if epi_chain:
            self._write_chain(c, d3, epi_chain)

    def _t_of(self, pos: str) -> str:
        return f"({self.ext[self.g.step]} - 1 - {pos})" if self.g.reverse else pos

    def _loop(self, a: Axis) -> str:
        if self.cfg.unroll_state and a in self.g.state:
            return f"T.unroll({self.ext[a]})"
        return f"range({self.ext[a]})"

    def _conv(self, text: str, src: DType, dst: DType) -> str:
        s, d = tvm_dtype(compute_dtype(src)), tvm_dtype(compute_dtype(dst))
        return text if s == d else f"T.Cast(\"{d}\", {text})"

    def _stmt(self, leaf: Scope, line: str) -> None:
        (leaf.vlines if self.V > 1 else leaf.lets).append(line)

    def _store(self, leaf: Scope, tensor: str, axes: tuple, value: str, value_dt: DType) -> None:
        t = self.op.tensor(tensor)
        out_dt = tvm_dtype(t.dtype)
        val = value if tvm_dtype(compute_dtype(value_dt)) == out_dt else f"T.Cast(\"{out_dt}\", {value})"
        index = tuple(axes)
        if self.tiled:
            ax = set(index)
            last = index[-1] if index else None
            if (self.vax in ax and self.g.step in ax and not (ax & set(self.g.state)) and last != self.vax):
                name = self._buf("ot", f"({self.TT}, {self.V})", out_dt)
                self.otiles.append((name, self.buffers[tensor], index))
                self._stmt(leaf, f"{name}[tt, v] = {val}")
                return
        self._stmt(leaf, f"{self.buffers[tensor]}[{', '.join(self.ir(i) for i in index)}] = {val}")

    def _hook(self, acc: Access) -> LoadOverride | None:
        g = self.g
        vec = self.V > 1
        if acc.tensor == g.scan.out:
            return LoadOverride(f"st[{self.st_idx}]", vec, True)
        if g.projection is not None and acc.tensor == g.projection.out:
            return LoadOverride(f"acc[{self.acc_idx}]", vec, True)
        if not vec:
            return None
        axes = _axes_of(acc)
        if self.vax not in axes or _padded(acc):
            return None
        state_used = tuple(a for a in g.state if a in axes)
        if g.step in axes:
            if not self.tiled or state_used or (acc.index and acc.index[-1] == self.vax):
                return None               # gathered per state element / contiguous vector load
            name = self.tiles.get(acc)
            if name is None:
                name = self._buf("tl", f"({self.TT}, {self.V})", tvm_dtype(self.op.tensor(acc.tensor).dtype))
                self.tiles[acc] = name
            return LoadOverride(f"{name}[tt, v]", True, False, axes)
        if not state_used:
            return None                   # computed once per lane block by the emitter
        hit = self.pres.get(acc)
        if hit is None:
            shape = ", ".join([self.ext[a] for a in state_used] + [str(self.V)])
            name = self._buf("pr", f"({shape})", tvm_dtype(self.op.tensor(acc.tensor).dtype))
            hit = self.pres[acc] = (name, state_used)
        name, used = hit
        return LoadOverride(f"{name}[{', '.join([self.sym[a] for a in used] + ['v'])}]", True, False, axes)

    def _write_scope_head(self, c: Code, depth: int, s: Scope) -> None:
        c.block(depth, s.lets)
        self._vlines(c, depth, s.vlines)

    def _vlines(self, c: Code, depth: int, lines: list[str]) -> None:
        """Per-lane lines: in a ``v`` loop, or as they are where ``v`` is bound by an enclosing loop."""
        if not lines:
            return
        if self._v_bound:
            c.block(depth, lines)
            return
        c.w(depth, f"for v in {self.vloop}({self.V}):")
        c.block(depth + 1, lines)

    def _write_chain(self, c: Code, depth: int, scopes: list[Scope]) -> None:
        d = depth
        for s in scopes:
            if s.axes:
                (a,) = s.axes
                c.w(d, f"for {self.sym[a]} in {self._loop(a)}:")
                d += 1
            if s.leaf:
                c.block(d, s.lets)
                self._vlines(c, d, s.vlines)
                if not s.lets and not s.vlines:
                    c.w(d, "T.evaluate(0)")
            else:
                self._write_scope_head(c, d, s)
