"""The flash-attention forward kernel for CPUs, rendered to TVMScript (no tvm import here: source text only).

One kernel per (group, config, dtype, head dims); batch, heads, lengths and the tile-table sizes are symbolic,
so one compiled kernel serves every sequence length. The kernel, per task ``(b, h, query tile)`` of
``T.parallel(B * HQ * NQ)``::

    qT[e, r] = q[b, h, i0 + r, e]                       # the query tile, transposed once (0 past L)
    for n in range(count[tb, th, qt]):                  # the key tiles of the tile table
        kb = index[tb, th, qt, n] * BN; jn = min(BN, S - kb)
        sT[jj, r] = sum_e k[b, kvh, kb + jj, e] * qT[e, r] * scale
                                                        # register blocks of qk_rows keys x qk_vectors vectors
                                                        # of queries: k broadcast, queries contiguous lanes
        if masked[tb, th, qt, n]: sT = where(mask, score_mod(sT), -inf)   # jj < jn only, from here on
        else:                     sT = score_mod(sT)    # full tiles never evaluate the mask
        m_new = max(m, max_jj sT); alpha = exp(m - m_new); sT = exp(sT - m_new); l = l * alpha + sum_jj sT
        acc[r, ev] = acc[r, ev] * alpha[r] + sum_jj sT[jj, r] * v[b, kvh, kb + jj, ev]
                                                        # blocks of pv_rows queries x pv_vectors value vectors
    out = acc / l (0 where l == 0); lse = m + log(l) (-inf where l == 0)

The score tile is kept transposed (keys x queries) so that the row max and row sum of the softmax are vertical,
lane-wise operations, and both products are register-blocked outer products (a scalar broadcast times a
contiguous vector): no horizontal reductions and no packing of the key or value tiles. The score mod and
data-dependent masks are inlined by :class:`~opgen.targets.tvm.expr.ExprEmitter` in vector mode over the query
axis; a pure index mask is split by ``sympy.cse`` into key-only lets, per-tile query buffers and per-lane
values. Queries past ``L`` compute on zeros and are never written; the ragged last key tile computes on
clamped key rows and every later pass runs over its ``jn`` valid keys only; indices into captured tensors use
queries clamped to ``L - 1``. Without a score mod the tile max comes out of the score product, and full tiles
skip the mod/mask pass entirely.

float32 uses the polynomial exp of :mod:`opgen.targets.tvm.expr`; float64 (gradcheck) uses ``T.exp``.
Measured (2-core AMD EPYC, AVX2, 1 thread, B=1 H=4 D=64, CPU time): sliding window 256 at L=4096 20.7 ms vs
SDPA with a boolean mask 340 ms and compiled FlexAttention 50.6 ms; causal L=2048 36.7 ms vs SDPA is_causal
44.7 ms (``tests/targets/tvm/measure_attention.py``).
"""
from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping

import sympy

from opgen.ir import DType, ExprOp
from opgen.ir.passes.attention import AttentionGroup
from opgen.schedules import attention as _sched
from opgen.schedules.attention import AttentionConfig, as_attention_config, check_attention_config
from opgen.schedules.space import TargetSpace as Space

from .expr import (Code, ExprEmitter, IndexRenderer, LoadOverride, Scope, const_text, fast_exp_f32, tvm_dtype,
                   write_signature)
from .host import host_vector_bits

if TYPE_CHECKING:
    import torch

    from opgen.targets.base import Caps

    from .compile import KernelCache

SUPPORTED = {DType.f32: "float32", DType.f64: "float64"}
_INT32_LIMIT = 2**31 - 1


class AttentionKernelError(ValueError):
    """The TVM attention kernel cannot run this call (the caller falls back to another implementation)."""


# ------------------------------------------------------------------------------------------------- config
# The forward kernel's knobs, checks and default config live in :mod:`opgen.schedules.attention`; the default
# reads this host's SIMD width when the capability record gives none.


def attention_space(group: AttentionGroup, caps: "Caps | None" = None) -> Space:
    """The knobs of the forward kernel for ``group`` (:func:`opgen.schedules.attention.attention_space`)."""
    return _sched.attention_space(group, caps, host_vector_bits=host_vector_bits)


def default_attention_config(group: AttentionGroup, sizes: Mapping[str, int] | None = None,
                             caps: "Caps | None" = None, dtype: DType = DType.f32) -> AttentionConfig:
    """The measured default (:func:`opgen.schedules.attention.default_attention_config`) on this host."""
    return _sched.default_attention_config(group, sizes, caps, dtype, host_vector_bits=host_vector_bits)


# ----------------------------------------------------------------------------------------------- rendering


def _chunks(total: int, lanes: int) -> list[tuple[int, int]]:
    """(offset, lanes) vector chunks covering ``total`` elements (the last one may be shorter)."""
    return [(o, min(lanes, total - o)) for o in range(0, total, lanes)]


def kernel_tensors(group: AttentionGroup) -> tuple[str, ...]:
    """The tensor arguments of the kernel in call order: q, k, v, the captures, count, index, masked, out, lse."""
    return (group.q, group.k, group.v, *group.captures, "count", "index", "masked", group.out, group.lse)


def render_attention_forward(group: AttentionGroup, config: AttentionConfig, dtype: DType,
                             head_dims: tuple[int, int], func_name: str = "main") -> str:
    """The TVMScript source of the forward kernel (see the module docstring).

    ``dtype`` is the dtype of q, k, v (float32 or float64); ``head_dims`` the static ``(E, EV)``. The kernel's
    arguments are :func:`kernel_tensors` (all contiguous).
    """
    return _render_cached(group, as_attention_config(config), dtype, tuple(int(x) for x in head_dims), func_name)


@functools.lru_cache(maxsize=256)
def _render_cached(group: AttentionGroup, cfg: AttentionConfig, dtype: DType, head_dims: tuple[int, int],
                   func_name: str) -> str:
    return _Renderer(group, cfg, dtype, head_dims, func_name).render()


class _Renderer:
    def __init__(self, g: AttentionGroup, cfg: AttentionConfig, dtype: DType, head_dims: tuple[int, int],
                 func_name: str) -> None:
        who = f"tvm attention kernel for op {g.op.name}"
        if dtype not in SUPPORTED:
            raise AttentionKernelError(f"{who}: dtype {dtype.value} is not supported (float32 and float64 only)")
        for name in (g.q, g.k, g.v):
            if g.op.tensor(name).dtype != dtype:
                raise AttentionKernelError(f"{who}: tensor {name!r} has dtype {g.op.tensor(name).dtype.value}, "
                                           f"expected {dtype.value} (q, k and v must share one dtype)")
        why = check_attention_config(cfg, dtype)
        if why:
            raise AttentionKernelError(f"{who}: invalid config: {why}")
        E, EV = head_dims
        if E < 1 or EV < 1:
            raise AttentionKernelError(f"{who}: head dims must be positive, got E={E}, EV={EV}")
        self.g, self.cfg, self.func_name = g, cfg, func_name
        self.dt = SUPPORTED[dtype]
        self.E, self.EV = E, EV
        self.BM, self.BN, self.V = cfg.block_m, cfg.block_n, cfg.vector
        self.allocs: list[str] = []
        self.qlines: list[str] = []        # per-task vector lines over the query tile (iv, v)
        self._nbuf = 0
        self._nt = 0
        op = g.op
        self.e_dim = op.tensor(g.q).shape[3]
        self.ev_dim = op.tensor(g.v).shape[3]
        self.static = {self.e_dim: E, self.ev_dim: EV}
        self.lse_dt = tvm_dtype(op.tensor(g.lse).dtype)
        self.derived = {d for d, _ in op.derived}

    # helpers ---------------------------------------------------------------------------------------------
    def c(self, v) -> str:
        return const_text(v, self.dt)

    def buf(self, prefix: str, shape: tuple, dtype: str | None = None) -> str:
        self._nbuf += 1
        name = f"{prefix}{self._nbuf}"
        dims = ", ".join(str(s) for s in shape)
        self.allocs.append(f"{name} = T.alloc_buffer(({dims},), \"{dtype or self.dt}\", scope=\"local\")")
        return name

    def exp(self, x: str, lines: list[str], lanes: int) -> str:
        """``exp(x)`` in a vectorized loop over ``v`` of ``lanes``; temporaries go to ``lines``."""
        if not (self.cfg.fast_math and self.dt == "float32"):
            return f"T.exp({x})"

        def bind(text: str, dtype: str) -> str:
            b = self.buf("et", (lanes,), "int8" if dtype == "bool" else dtype)
            lines.append(f"{b}[v] = {text}")
            return f"{b}[v]"
        return fast_exp_f32(x, bind)

    # symbols ---------------------------------------------------------------------------------------------
    def _symbols(self) -> None:
        g, op = self.g, self.g.op
        sym: dict[sympy.Symbol, str] = {}
        for d in op.dims:
            sym[d] = str(self.static[d]) if d in self.static else f"n_{d.name}"
        self.dim_r = IndexRenderer(sym, "int32")
        # dims bound by match_buffer (first tensor naming them), the rest are derived
        self.plain: list = []
        for name in kernel_tensors(g):
            if name in ("count", "index", "masked"):
                continue
            for s in op.tensor(name).shape:
                for d in sorted(sympy.sympify(s).free_symbols, key=str):
                    if d in self.static or d in self.derived or d in self.plain:
                        continue
                    self.plain.append(d)
        reads = bool(self._capture_reads())
        qi = "(ib + iv * {V} + v)".format(V=self.V)
        self.i_text = f"T.min({qi}, n_L1)" if reads else qi
        self.j_text = "i_j"                      # keys are always < S: the loops run over range(jn)
        full = dict(sym)
        full.update({g.b: "i_b", g.h: "i_h", g.i: self.i_text, g.j: self.j_text})
        self.ir = IndexRenderer(full, "int32")

    def _capture_reads(self) -> set[str]:
        out = set()
        for e in (self.g.score, self.g.mask):
            if e is None:
                continue
            for n in e.walk():
                if n.op is ExprOp.LOAD and n.arg.tensor != self.g.raw_score:
                    out.add(n.arg.tensor)
        return out

    def _shape(self, name: str) -> str:
        shape = [self.dim_r(s) for s in self.g.op.tensor(name).shape]
        return f"({', '.join(shape)}{',' if len(shape) == 1 else ''})"

    # main ------------------------------------------------------------------------------------------------
    def render(self) -> str:
        g, op = self.g, self.g.op
        self._symbols()
        L, S = self._len("q", 2), self._len("k", 2)
        self.L, self.S = L, S
        emitted = self._emit_mods()
        c = Code()
        write_signature(c, "opgen.targets.tvm.attention (TVMScript, TVM 0.27)", self.func_name,
                        [f"h_{t}: T.handle" for t in kernel_tensors(g)])
        for d in self.plain:
            c.w(1, f"n_{d.name} = T.int32()")
        for t in ("t_B", "t_H", "t_NQ", "t_W"):
            c.w(1, f"{t} = T.int32()")
        for name in kernel_tensors(g):
            if name in ("count", "index", "masked"):
                shape = "(t_B, t_H, t_NQ)" if name == "count" else "(t_B, t_H, t_NQ, t_W)"
                c.w(1, f"b_{name} = T.match_buffer(h_{name}, {shape}, \"int32\", align=4)")
                continue
            t = op.tensor(name)
            c.w(1, f"b_{name} = T.match_buffer(h_{name}, {self._shape(name)}, \"{tvm_dtype(t.dtype)}\", "
                   f"align={max(1, t.dtype.bits // 8)})")
        for d, e in op.derived:
            c.w(1, f"n_{d.name}: T.let = {self.dim_r(e)}")
        c.w(1, f"n_L1: T.let = {L} - 1")
        c.w(1, f"n_S1: T.let = {S} - 1")
        B, HQ = self.dim_r(op.tensor(g.q).shape[0]), self.dim_r(op.tensor(g.q).shape[1])
        c.w(1, f"assert t_NQ == T.floordiv({L} + {self.BM - 1}, {self.BM}), "
               f"\"opgen attention: the tile table must have ceil(L / {self.BM}) query tiles\"")
        c.w(1, f"assert T.Or(t_B == 1, t_B == {B}), \"opgen attention: tile table batch must be 1 or B\"")
        c.w(1, f"assert T.Or(t_H == 1, t_H == {HQ}), \"opgen attention: tile table heads must be 1 or HQ\"")
        c.w(1, f"for task in T.parallel({B} * {HQ} * t_NQ):")
        d = 2
        # plain assignments (1-element local buffers), not T.let: the simplifier would substitute the nested
        # floordiv / floormod of the task index into every access and try to prove bounds on them (a GQA
        # kernel took 9 s instead of 0.3 s to compile); LLVM promotes them to registers
        c.w(d, f"i_b = T.floordiv(task, {HQ} * t_NQ)")
        c.w(d, f"i_h = T.floormod(T.floordiv(task, t_NQ), {HQ})")
        c.w(d, "qt = T.floormod(task, t_NQ)")
        c.w(d, f"kvh = {self.ir(g.kv_head)}")
        c.w(d, "tb = T.min(i_b, t_B - 1)")
        c.w(d, "th = T.min(i_h, t_H - 1)")
        c.w(d, f"ib = qt * {self.BM}")
        body = Code()
        self._body(body, emitted)
        c.block(d, self.allocs)
        c.block(d, self.root.lets)
        c.lines += ["    " * d + ln for ln in body.lines]
        return "\n".join(c.lines) + "\n"

    def _len(self, which: str, axis: int) -> str:
        name = {"q": self.g.q, "k": self.g.k}[which]
        return self.dim_r(self.g.op.tensor(name).shape[axis])

    # score mod and mask ------------------------------------------------------------------------------------
    def _emit_mods(self) -> dict:
        """Emit the score mod (and the mask) with the ExprEmitter: once with the mask (partial tiles), once
        without (full tiles). Returns {"masked": variant or None, "plain": variant or None}, a variant being
        (row scope, lane scope, value text, mask condition text or None)."""
        g, op = self.g, self.g.op
        V = self.V
        buffers = {t.name: f"b_{t.name}" for t in op.inputs}
        dtypes = {t.name: t.dtype for t in op.tensors}
        shapes = {t.name: t.shape for t in op.tensors}
        self.score_ref = "sT[jj, iv * {V} + v]".format(V=V)

        def hook(acc):
            if acc.tensor == g.raw_score:
                return LoadOverride(self.score_ref, True, True)
            return None

        em = ExprEmitter(buffers=buffers, shapes=shapes, dtypes=dtypes, index=self.ir, masked=(),
                         fast_math=self.cfg.fast_math, vector_axis=g.i, vector_len=V,
                         alloc=lambda dt, shape: self.buf("vt", shape, dt), load_hook=hook)
        self.root = Scope("task", None, (g.b, g.h))
        out: dict = {}
        for name in ("masked", "plain"):
            if name == "masked" and g.mask is None:
                out[name] = None
                continue
            row = self.root.child(f"row_{name}", (g.j,))
            leaf = row.child(f"lane_{name}", (g.i,), leaf=True)
            val = em.emit(g.score, leaf).text if g.has_score_mod else self.score_ref
            cond = None
            if name == "masked":
                pred = g.mask_predicate
                cond = self._predicate(pred, row, leaf) if pred is not None else em.emit(g.mask, leaf).text
            out[name] = (row, leaf, val, cond)
        return out

    def _predicate(self, pred: sympy.Basic, row: Scope, leaf: Scope) -> str:
        """A pure index mask as text, its repeated subexpressions computed once (``sympy.cse``): key-only ones
        as row lets, query-only ones once per task into ``[block_m]`` local buffers, the others in ``V``-lane
        local buffers (int32, or int8 for booleans). Besides the saved work this keeps TVM from binding one
        lowered ``floormod`` twice in a statement (an internal error of its simplifier on neighborhood masks)."""
        g, V = self.g, self.V
        try:
            repl, (reduced,) = sympy.cse([pred], symbols=sympy.numbered_symbols("cse_"))
        except Exception:  # noqa: BLE001 - sympy cannot split some boolean forms: render the predicate whole
            return self.ir(pred)
        refs: dict[sympy.Symbol, str] = {}
        deps: dict[sympy.Symbol, frozenset] = {}     # symbol -> the axes among (i, j) it depends on
        for sym, sub in repl:
            ir = self.ir.with_symbols(refs)
            ax: frozenset = frozenset()
            for x in sub.free_symbols:
                ax |= deps.get(x, frozenset({x}) & {g.i, g.j})
            deps[sym] = ax
            is_bool = isinstance(sub, sympy.logic.boolalg.Boolean)
            dt = "int8" if is_bool else "int32"
            text = ir(sub)
            val = f"T.Cast(\"int8\", {text})" if is_bool else text
            if g.i not in ax:
                name = f"{sym.name}_{self._bump()}"
                (row.lets if g.j in ax else self.root.lets).append(f"{name}: T.let = {text}")
                refs[sym] = name
                continue
            if g.j in ax:
                buf = self.buf("cs", (V,), dt)
                leaf.vlines.append(f"{buf}[v] = {val}")
                ref = f"{buf}[v]"
            else:
                buf = self.buf("qm", (self.BM,), dt)
                self.qlines.append(f"{buf}[iv * {V} + v] = {val}")
                ref = f"{buf}[iv * {V} + v]"
            refs[sym] = f"({ref} != T.int8(0))" if is_bool else ref
        return self.ir.with_symbols(refs)(reduced)

    def _bump(self) -> int:
        self._nt += 1
        return self._nt

    def _mods(self, c: Code, emitted: dict) -> None:
        """Score mod and mask over the valid keys (range(jn)) of the tile: partial tiles apply the mask, full
        tiles only the mod. Both recompute the tile max; without a mod, full tiles keep the max of the product."""
        g = self.g
        masked, plain = emitted["masked"], emitted["plain"]
        if masked is not None:
            c.w(0, "if b_masked[tb, th, qt, n] != 0:")
            self._mod_pass(c, 1, masked)
            c.w(0, "else:" if g.has_score_mod else f"elif jn < {self.BN}:")
            self._mod_pass(c, 1, plain)
        elif g.has_score_mod:
            self._mod_pass(c, 0, plain)
        else:
            c.w(0, f"if jn < {self.BN}:")
            self._mod_pass(c, 1, plain)

    def _mod_pass(self, c: Code, d: int, variant) -> None:
        row, leaf, val, cond = variant
        V, BM = self.V, self.BM
        ninf = self.c(-math.inf)
        c.w(d, f"for r in range({BM}):")
        c.w(d + 1, f"mt[r] = {ninf}")
        c.w(d, "for jj in range(jn):")
        c.w(d + 1, "i_j: T.let = kb + jj")
        c.block(d + 1, row.lets)
        if row.vlines:
            raise AssertionError("row-level vector lines")
        c.w(d + 1, f"for iv in range({BM // V}):")
        c.block(d + 2, leaf.lets)
        lines = list(leaf.vlines)
        value = val if cond is None else f"T.Select({cond}, {val}, {ninf})"
        idx = f"iv * {V} + v"
        if value != self.score_ref:
            lines.append(f"{self.score_ref} = {value}")
        lines.append(f"mt[{idx}] = T.max(mt[{idx}], {self.score_ref})")
        self._vec_loop(c, d + 2, V, lines)

    # the kernel body ---------------------------------------------------------------------------------------
    def _body(self, c: Code, emitted: dict) -> None:
        g, cfg = self.g, self.cfg
        BM, BN, V, E, EV = self.BM, self.BN, self.V, self.E, self.EV
        dt = self.dt
        ninf = self.c(-math.inf)
        self.allocs += [
            f"qT = T.alloc_buffer(({E}, {BM}), \"{dt}\", scope=\"local\")",
            f"sT = T.alloc_buffer(({BN}, {BM}), \"{dt}\", scope=\"local\")",
            f"acc = T.alloc_buffer(({BM}, {EV}), \"{dt}\", scope=\"local\")",
            f"m = T.alloc_buffer(({BM},), \"{dt}\", scope=\"local\")",
            f"ms = T.alloc_buffer(({BM},), \"{dt}\", scope=\"local\")",
            f"l = T.alloc_buffer(({BM},), \"{dt}\", scope=\"local\")",
            f"mt = T.alloc_buffer(({BM},), \"{dt}\", scope=\"local\")",
            f"alpha = T.alloc_buffer(({BM},), \"{dt}\", scope=\"local\")",
            f"cq = T.alloc_buffer(({cfg.qk_rows}, {cfg.qk_vectors * V}), \"{dt}\", scope=\"local\")",
            f"cp = T.alloc_buffer(({cfg.pv_rows}, {cfg.pv_vectors * V}), \"{dt}\", scope=\"local\")",
        ]
        # the query tile, transposed (zeros past L)
        c.w(0, f"for r in range({BM}):")
        c.w(1, f"for e in range({E}):")
        c.w(2, f"qT[e, r] = T.if_then_else(ib + r < {self.L}, b_{g.q}[i_b, i_h, T.min(ib + r, n_L1), e], "
               f"{self.c(0)})")
        if self.qlines:
            c.w(0, f"for iv in range({BM // V}):")
            self._vec_loop(c, 1, V, self.qlines)
        c.w(0, f"for r in range({BM}):")
        c.w(1, f"m[r] = {ninf}")
        c.w(1, f"l[r] = {self.c(0)}")
        for off, lanes in _chunks(EV, V):
            c.w(1, f"for v in T.vectorized({lanes}):")
            c.w(2, f"acc[r, {off} + v] = {self.c(0)}")
        c.w(0, "for n in range(b_count[tb, th, qt]):")
        c.w(1, f"kb = b_index[tb, th, qt, n] * {BN}")
        c.w(1, f"jn = T.min({BN}, {self.S} - kb)")
        body = Code()
        self._qk(body)
        self._mods(body, emitted)
        self._softmax(body)
        self._pv(body)
        c.block(1, body.lines)
        self._finish(c)

    def _vec_loop(self, c: Code, depth: int, lanes: int, lines: list[str]) -> None:
        c.w(depth, f"for v in T.vectorized({lanes}):")
        c.block(depth + 1, lines)

    def _qk(self, c: Code) -> None:
        """sT[jj, r] = sum_e k[kb + jj, e] * qT[e, r] * scale, and the tile max mt over jj."""
        cfg, V, BM, BN = self.cfg, self.V, self.BM, self.BN
        if not self.g.has_score_mod:
            c.w(0, f"for r in range({BM}):")
            c.w(1, f"mt[r] = {self.c(-math.inf)}")
        RJ, NI = cfg.qk_rows, cfg.qk_vectors
        nvec = BM // V
        nj, tj = divmod(BN, RJ)
        ni, ti = divmod(nvec, NI)
        blocks = []
        if nj and ni:
            blocks.append((f"jo * {RJ}", RJ, f"io * {NI * V}", NI, nj, ni))
        if nj and ti:
            blocks.append((f"jo * {RJ}", RJ, str(ni * NI * V), ti, nj, 0))
        if tj and ni:
            blocks.append((str(nj * RJ), tj, f"io * {NI * V}", NI, 0, ni))
        if tj and ti:
            blocks.append((str(nj * RJ), tj, str(ni * NI * V), ti, 0, 0))
        for j0, rows, i0, vecs, jloop, iloop in blocks:
            d = 0
            if jloop:
                c.w(d, f"for jo in range({jloop}):")
                d += 1
            if iloop:
                c.w(d, f"for io in range({iloop}):")
                d += 1
            self._qk_block(c, d, j0, rows, i0, vecs)

    def _qk_block(self, c: Code, d: int, j0: str, rows: int, i0: str, vecs: int) -> None:
        g, V, E = self.g, self.V, self.E
        zero, scale = self.c(0), self.c(self.g.scale)
        c.w(d, f"for rj in T.unroll({rows}):")
        for k in range(vecs):
            self._vec_loop(c, d + 1, V, [f"cq[rj, {k * V} + v] = {zero}"])
        c.w(d, f"for e in range({E}):")
        dd = d + 1
        c.w(dd, f"for rj in T.unroll({rows}):")
        kload = f"b_{g.k}[i_b, kvh, T.min(kb + {j0} + rj, n_S1), e]"
        for k in range(vecs):
            self._vec_loop(c, dd + 1, V, [f"cq[rj, {k * V} + v] = cq[rj, {k * V} + v] + "
                                          f"{kload} * qT[e, {i0} + {k * V} + v]"])
        c.w(d, f"for rj in T.unroll({rows}):")
        for k in range(vecs):
            idx = f"{i0} + {k * V} + v"
            lines = [f"sT[{j0} + rj, {idx}] = cq[rj, {k * V} + v] * {scale}"]
            if not g.has_score_mod:     # the tile max of full tiles (the mod pass recomputes it otherwise)
                lines.append(f"mt[{idx}] = T.max(mt[{idx}], sT[{j0} + rj, {idx}])")
            self._vec_loop(c, d + 1, V, lines)

    def _softmax(self, c: Code) -> None:
        """Online softmax update: new max, rescale factor, probabilities in place, row sums."""
        V, BM, BN = self.V, self.BM, self.BN
        zero, ninf = self.c(0), self.c(-math.inf)
        mn = self.buf("mn", (V,))
        ls = self.buf("ls", (BM,))
        c.w(0, f"for iv in range({BM // V}):")
        lines = [f"{mn}[v] = T.max(m[iv * {V} + v], mt[iv * {V} + v])",
                 f"ms[iv * {V} + v] = T.Select({mn}[v] == {ninf}, {zero}, {mn}[v])"]
        ex = self.exp(f"m[iv * {V} + v] - ms[iv * {V} + v]", lines, V)
        lines += [f"alpha[iv * {V} + v] = {ex}", f"m[iv * {V} + v] = {mn}[v]", f"{ls}[iv * {V} + v] = {zero}"]
        self._vec_loop(c, 1, V, lines)
        c.w(0, "for jj in range(jn):")
        c.w(1, f"for iv in range({BM // V}):")
        lines = []
        ex = self.exp(f"sT[jj, iv * {V} + v] - ms[iv * {V} + v]", lines, V)
        lines += [f"sT[jj, iv * {V} + v] = {ex}",
                  f"{ls}[iv * {V} + v] = {ls}[iv * {V} + v] + sT[jj, iv * {V} + v]"]
        self._vec_loop(c, 2, V, lines)
        c.w(0, f"for iv in range({BM // V}):")
        self._vec_loop(c, 1, V, [f"l[iv * {V} + v] = l[iv * {V} + v] * alpha[iv * {V} + v] + {ls}[iv * {V} + v]"])

    def _pv(self, c: Code) -> None:
        """acc[r, ev] = acc[r, ev] * alpha[r] + sum_jj sT[jj, r] * v[kb + jj, ev]."""
        cfg, V, BM = self.cfg, self.V, self.BM
        RI, NE = cfg.pv_rows, cfg.pv_vectors
        chunks = _chunks(self.EV, V)
        groups = [chunks[k:k + NE] for k in range(0, len(chunks), NE)]
        nr, tr = divmod(BM, RI)
        for grp in groups:
            if nr:
                c.w(0, f"for io in range({nr}):")
                self._pv_block(c, 1, f"io * {RI}", RI, grp)
            if tr:
                self._pv_block(c, 0, str(nr * RI), tr, grp)

    def _pv_block(self, c: Code, d: int, r0: str, rows: int, grp: list[tuple[int, int]]) -> None:
        g = self.g
        base = grp[0][0]
        c.w(d, f"for ri in T.unroll({rows}):")
        for off, lanes in grp:
            self._vec_loop(c, d + 1, lanes, [f"cp[ri, {off - base} + v] = acc[{r0} + ri, {off} + v] * "
                                             f"alpha[{r0} + ri]"])
        c.w(d, "for jj in range(jn):")
        c.w(d + 1, f"for ri in T.unroll({rows}):")
        for off, lanes in grp:
            self._vec_loop(c, d + 2, lanes, [f"cp[ri, {off - base} + v] = cp[ri, {off - base} + v] + "
                                             f"sT[jj, {r0} + ri] * b_{g.v}[i_b, kvh, kb + jj, {off} + v]"])
        c.w(d, f"for ri in T.unroll({rows}):")
        for off, lanes in grp:
            self._vec_loop(c, d + 1, lanes, [f"acc[{r0} + ri, {off} + v] = cp[ri, {off - base} + v]"])

    def _finish(self, c: Code) -> None:
        g, V = self.g, self.V
        zero = self.c(0)
        c.w(0, f"for r in range({self.BM}):")
        c.w(1, f"if ib + r < {self.L}:")
        inv = self.buf("inv", (1,))
        c.w(2, f"{inv}[0] = T.Select(l[r] > {zero}, {self.c(1)} / l[r], {zero})")
        for off, lanes in _chunks(self.EV, V):
            self._vec_loop(c, 2, lanes, [f"b_{g.out}[i_b, i_h, ib + r, {off} + v] = acc[r, {off} + v] * {inv}[0]"])
        lse = f"m[r] + T.log(l[r])"
        if self.lse_dt != self.dt:
            lse = f"T.Cast(\"{self.lse_dt}\", {lse})"
        c.w(2, f"b_{g.lse}[i_b, i_h, ib + r] = T.Select(l[r] > {zero}, {lse}, {const_text(-math.inf, self.lse_dt)})")


# ------------------------------------------------------------------------------------------------ calling


def attention_forward(group: AttentionGroup, inputs: Mapping[str, "torch.Tensor"],
                      rows: tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"],
                      config: AttentionConfig | Mapping[str, Any], cache: "KernelCache", *,
                      validate: bool = False) -> dict[str, "torch.Tensor"]:
    """Run the forward kernel: ``{"out": [B, HQ, L, EV], "lse": [B, HQ, L]}``.

    ``inputs`` holds q, k, v and the captured tensors by name (``group.q`` ...); ``rows`` is the tile table
    ``(count [Bt, Ht, NQ], index [Bt, Ht, NQ, W], masked [Bt, Ht, NQ, W])`` (int32) for tiles of
    ``config.block_m`` x ``config.block_n``; the kernel trusts its entries (``validate=True`` checks them
    first: an out-of-range key tile would read outside k and v). Raises :class:`AttentionKernelError` for
    unsupported dtypes, devices or table shapes (the caller falls back).
    """
    import torch

    from opgen.targets.memory import empty

    cfg = as_attention_config(config)
    who = f"tvm attention forward (op {group.op.name})"
    q, k, v = inputs[group.q], inputs[group.k], inputs[group.v]
    for name, x in ((group.q, q), (group.k, k), (group.v, v)):
        if x.device.type != "cpu":
            raise AttentionKernelError(f"{who}: tensor {name!r} is on {x.device}; this kernel runs on CPU tensors")
        if x.dim() != 4:
            raise AttentionKernelError(f"{who}: tensor {name!r} must be 4-D, got shape {tuple(x.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] or v.shape[1] != k.shape[1]:
        raise AttentionKernelError(f"{who}: {q.shape[1]} query heads cannot share {k.shape[1]} key / "
                                   f"{v.shape[1]} value heads")
    dtype = _ir_dtype(q.dtype)
    if dtype not in SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttentionKernelError(f"{who}: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} are not supported "
                                   f"(float32 or float64, all the same)")
    count, index, masked = (_int32(who, n, t) for n, t in zip(("count", "index", "masked"), rows))
    B, HQ, L, _ = q.shape
    nq = -(-L // cfg.block_m)
    if (count.dim() != 3 or count.shape[2] != nq or index.dim() != 4 or index.shape[:3] != count.shape
            or masked.shape != index.shape or count.shape[0] not in (1, B) or count.shape[1] not in (1, HQ)):
        raise AttentionKernelError(f"{who}: tile table shapes count {tuple(count.shape)}, index {tuple(index.shape)}, "
                                   f"masked {tuple(masked.shape)} do not fit [1 or B={B}, 1 or HQ={HQ}, "
                                   f"ceil(L / block_m) = {nq} query tiles of block_m={cfg.block_m}, W]")
    if max(x.numel() for x in (q, k, v)) > _INT32_LIMIT or B * HQ * L * v.shape[3] > _INT32_LIMIT:
        raise AttentionKernelError(f"{who}: tensors over 2**31 elements need 64-bit indices (not supported)")
    if validate:
        why = check_tile_table((count, index, masked), k.shape[2], cfg)
        if why:
            raise AttentionKernelError(f"{who}: invalid tile table: {why}")
    out = empty((B, HQ, L, v.shape[3]), dtype=q.dtype)
    lse = torch.empty((B, HQ, L), dtype=q.dtype)
    if out.numel() == 0:
        return {"out": out, "lse": lse}
    fn = _kernel(group, cfg, dtype, (int(q.shape[3]), int(v.shape[3])), cache)
    args = [q.contiguous(), k.contiguous(), v.contiguous()]
    for name in group.captures:
        t = inputs[name]
        want = _torch_dtype(group.op.tensor(name).dtype)
        if t.dtype != want:
            t = t.to(want)
        args.append(t.contiguous())
    args += [count, index, masked, out, lse]
    fn(*args)
    return {"out": out, "lse": lse}


_KERNELS: "OrderedDict[tuple, tuple]" = OrderedDict()


def _kernel(group: AttentionGroup, cfg: AttentionConfig, dtype: DType, head_dims: tuple[int, int],
            cache: "KernelCache"):
    """The compiled kernel, memoized by the identity of the group and the cache: a repeated call costs a dict
    lookup instead of hashing the group's op and the source (~100 us)."""
    key = (id(group), id(cache), cfg, dtype, head_dims)
    hit = _KERNELS.get(key)
    if hit is not None and hit[0]() is group and hit[1]() is cache:
        _KERNELS.move_to_end(key)
        return hit[2]
    fn = cache.get(render_attention_forward(group, cfg, dtype, head_dims))
    _KERNELS[key] = (weakref.ref(group), weakref.ref(cache), fn)      # weak: never keeps a cache alive
    if len(_KERNELS) > 256:
        _KERNELS.popitem(last=False)
    return fn


def check_tile_table(rows: tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"], kv_len: int,
                     config: AttentionConfig) -> str | None:
    """Why the entries of a tile table are invalid for ``kv_len`` keys (None when they are valid): counts in
    ``[0, W]`` and listed key tiles in ``[0, ceil(kv_len / block_n))``."""
    import torch

    count, index, _ = rows
    W = index.shape[-1]
    if count.numel() and (int(count.min()) < 0 or int(count.max()) > W):
        return f"counts must lie in [0, {W}], got [{int(count.min())}, {int(count.max())}]"
    nk = -(-kv_len // config.block_n)
    live = torch.arange(W).view(*([1] * (index.dim() - 1)), W) < count.unsqueeze(-1).long()
    used = index[live]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= nk):
        return (f"key tiles must lie in [0, {nk}) for {kv_len} keys in tiles of {config.block_n}, got "
                f"[{int(used.min())}, {int(used.max())}]")
    return None


def _int32(who: str, name: str, t: "torch.Tensor") -> "torch.Tensor":
    import torch

    if not isinstance(t, torch.Tensor):
        raise AttentionKernelError(f"{who}: tile table {name!r} must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        t = t.to(torch.int32)
    return t.contiguous()


def _ir_dtype(d) -> DType | None:
    import torch

    return {torch.float32: DType.f32, torch.float64: DType.f64}.get(d)


def _torch_dtype(d: DType):
    from opgen.ir.dtypes import to_torch

    return to_torch(d)
