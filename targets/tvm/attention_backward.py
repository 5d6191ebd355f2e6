"""Flash-attention backward for the TVM CPU target: recomputation, block sparsity from tile tables, no L x S storage.

Given the forward's ``out`` and ``lse`` (log-sum-exp of the visible modified scores, ``-inf`` for a fully masked
row) and the output gradient ``dout``, the kernels recompute the probabilities tile by tile::

    delta[b, h, i] = sum_ev dout * out
    s  = q . k^T * scale                     (the raw score, a [block_m, block_n] tile)
    m  = score_mod(s, b, h, i, j)            (the group's inlined score expression; m = s without a mod)
    p  = exp(m - lse)                        (0 where masked, out of range, or where lse = -inf)
    dp = dout . v^T
    ds = p * (dp - delta) * dm/ds            (dm/ds by ``opgen.ir.passes.diff.derivative``; 0 where p is masked)
    dv += p^T . dout        dk += ds^T . q * scale        dq += ds . k * scale

Two schedules (``AttentionBackwardConfig.dq_mode``):

* ``"separate"``: a dq kernel parallel over (b, query head, query tile) walks the row table (``rows``: per query
  tile the key tiles to visit) and also writes ``delta``; then a dk/dv kernel parallel over (b, kv head, key
  tile) walks, for every query head of its GQA group, the column table (``cols``: per key tile the query
  tiles). 7 tile products per visited tile pair.
* ``"fused"``: one kernel parallel over (b, kv head) computes delta for its heads' rows, then walks its key tiles
  serially and adds ``ds . k`` into dq in place (no race: every query row of those heads belongs to this
  iteration). 5 tile products per pair, but only ``B * HKV`` parallel iterations: the default on few threads.

Tiles are ``local`` buffers (q, dout rows; k, v transposed; the score tile), tile products are register-tiled
(``reg_rows`` x ``reg_vectors`` SIMD vectors of accumulators, kept in registers by LLVM), and the pointwise part
(score mod, mask, exp, ds) is vectorized over keys with a polynomial exp for float32. A tile whose table entry
says ``masked``, or that crosses the end of the query or key sequence, runs the guarded variant (mask predicate,
bounds, indices clamped for captured-tensor loads); others run the unguarded one.

Captured tensors (ALiBi slopes, bias tables, document ids) are constants, except those the op's
``capture_grads`` attribute names (:attr:`AttentionGroup.grad_captures`): for each of their loads in the score
expression the dk/dv (or fused) kernel also computes ``dsm * d score_mod / d load`` per tile (``dsm = p * (dp -
delta)``, the gradient of the modified score; the derivative by the same expression rules) and adds it into a
partial gradient of the captured tensor at the load's index. The parallel loop then runs as ``n_SL`` slots
(``for slot in T.parallel(n_SL)``, each slot's iterations serial), one partial sum per slot, summed afterwards: no
atomics, no two threads writing one position.
Sizes B, HQ, HKV, L, S and the captured tensors' sizes are symbolic (one kernel per head dims, dtype and
config); E, EV and the tile sizes are baked in. float32 and float64.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import sympy

from opgen.ir import DType, exp, load, where
from opgen.ir.passes.attention import AttentionGroup
from opgen.ir.passes.diff import derivative
from opgen.ir.symbols import Dim
from opgen.schedules import attention as _sched
from opgen.schedules.attention import AttentionBackwardConfig

from .expr import Code, ExprEmitter, IndexRenderer, LoadOverride, Scope, const_text, tvm_dtype, write_signature
from .host import host_vector_bits

SUPPORTED = (DType.f32, DType.f64)
_INT32_LIMIT = 2**31 - 1
_ALLOCS = "# <local buffers>"
_ALIGN = {"float32": 4, "float64": 8, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "bool": 1, "int8": 1}


# ------------------------------------------------------------------------------------------------- the config
# AttentionBackwardConfig and the default heuristics live in :mod:`opgen.schedules.attention`; these bind them to
# this host's SIMD width.


def host_vector_lanes(dtype: DType) -> int:
    """SIMD lanes of ``dtype`` on this CPU (from /proc/cpuinfo; 4 float32 lanes when unknown)."""
    return _sched.host_vector_lanes(dtype, host_vector_bits=host_vector_bits)


def default_backward_config(group: AttentionGroup | None = None, *, block_m: int = 64, block_n: int = 64,
                            dtype: DType = DType.f32) -> AttentionBackwardConfig:
    """The default schedule on this host (:func:`opgen.schedules.attention.default_backward_config`)."""
    return _sched.default_backward_config(group, block_m=block_m, block_n=block_n, dtype=dtype,
                                          host_vector_bits=host_vector_bits)


def as_backward_config(config: Any, dtype: DType = DType.f32) -> AttentionBackwardConfig:
    """An :class:`AttentionBackwardConfig` from a config, its dict, None or a forward config, ``vector`` 0 resolved
    to this host's width (:func:`opgen.schedules.attention.as_backward_config`)."""
    return _sched.as_backward_config(config, dtype, host_vector_bits=host_vector_bits)



def tvm_threads() -> int:
    """Threads of TVM's pool (``TVM_NUM_THREADS``, else what the runtime reports)."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        import tvm

        return max(1, int(tvm.runtime.num_threads()))
    except Exception:  # noqa: BLE001 - an unusual runtime: assume one thread
        return 1


# ------------------------------------------------------------------------------------------------ the sources


@dataclass(frozen=True)
class BackwardKernel:
    """One rendered kernel: TVMScript text and the names of its tensor arguments, in call order."""

    name: str
    text: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class BackwardSources:
    """The kernels of one backward: ``"fused"`` has one, ``"separate"`` two (dq first: it writes delta)."""

    kernels: tuple[BackwardKernel, ...]
    config: AttentionBackwardConfig
    mode: str


def _check_group(group: AttentionGroup) -> None:
    h = group.h
    kv = sympy.sympify(group.kv_head)
    if kv != h and not (isinstance(kv, sympy.floor) and len(kv.free_symbols - {h}) == 1):
        raise ValueError(f"attention backward: op {group.op.name}: kv head {kv} is neither {h} nor floor({h}/G)")


@functools.lru_cache(maxsize=256)
def render_attention_backward(group: AttentionGroup, config: AttentionBackwardConfig, *, head_dim: int,
                              value_dim: int, dtype: DType = DType.f32, mode: str = "separate") -> BackwardSources:
    """The TVMScript sources of the backward of ``group`` (see the module docstring).

    ``head_dim`` / ``value_dim`` are E / EV (baked in), ``dtype`` the dtype of q, k, v, out and dout (float32
    or float64; lse and delta are in the same dtype), ``mode`` ``"fused"`` or ``"separate"``. Indices are
    int32 (tensors up to 2**31 - 1 elements). ``config.vector`` must be resolved (> 0).
    """
    if dtype not in SUPPORTED:
        raise ValueError(f"attention backward: op {group.op.name}: dtype {dtype} is not supported "
                         f"(float32 or float64)")
    if mode not in ("fused", "separate"):
        raise ValueError(f"attention backward: mode must be 'fused' or 'separate', got {mode!r}")
    if config.vector < 1:
        raise ValueError("attention backward: config.vector must be resolved (use as_backward_config)")
    _check_group(group)
    r = _Renderer(group, config, int(head_dim), int(value_dim), dtype)
    if mode == "fused":
        return BackwardSources((r.render("fused"),), config, mode)
    return BackwardSources((r.render("dq"), r.render("dkdv")), config, mode)


class _Renderer:
    """Writes one kernel of the backward (a fresh emitter state per kernel)."""

    def __init__(self, g: AttentionGroup, cfg: AttentionBackwardConfig, E: int, EV: int, dtype: DType) -> None:
        self.g, self.cfg, self.E, self.EV, self.dtype = g, cfg, E, EV, dtype
        self.idt = "int32"
        self.dt = tvm_dtype(dtype)
        self.BM, self.BN, self.V = cfg.block_m, cfg.block_n, cfg.vector
        if self.BN % self.V:
            raise ValueError(f"block_n={self.BN} must be a multiple of vector={self.V}")
        op = g.op
        self.op = op
        tq, tk, tv = op.tensor(g.q), op.tensor(g.k), op.tensor(g.v)
        self.Bd, self.HQd, self.Ld = tq.shape[0], tq.shape[1], tq.shape[2]
        self.HKVd, self.Sd = tk.shape[1], tk.shape[2]
        self.Ed, self.EVd = tq.shape[3], tv.shape[3]
        self.gqa = sympy.sympify(g.kv_head) != g.h
        self.static = {self.Ed: E, self.EVd: EV}
        self.derived = dict(op.derived)
        # captured tensors that get gradients: (tensor, load, d score / d load, tile of contributions) per load
        self.cleaves: list[tuple[str, Any, Any, str]] = []
        for name in g.grad_captures:
            for leaf in g.capture_leaves(name):
                d = derivative(g.score, leaf)
                if d is not None:
                    self.cleaves.append((name, leaf, d, f"Cg{len(self.cleaves)}"))
        self.cgrads = tuple(dict.fromkeys(n for n, *_ in self.cleaves))

    # helpers -------------------------------------------------------------------------------------------------
    def c(self, v: float) -> str:
        return const_text(v, self.dt)

    def dimtext(self, d) -> str:
        return self.ir_dims(d)

    # kernel -----------------------------------------------------------------------------------------------
    def render(self, kind: str) -> BackwardKernel:
        g, op = self.g, self.op
        self.allocs: list[str] = []
        self._nbuf = 0
        self._nslots = 0
        sym: dict[sympy.Symbol, str] = {}
        for d in op.dims:
            sym[d] = str(self.static[d]) if d in self.static else f"n_{d.name}"
        self.ir_dims = IndexRenderer(sym, self.idt)
        self.sym = sym
        BM, BN, E, EV, V, dt = self.BM, self.BN, self.E, self.EV, self.V, self.dt
        L, S, HQ = self.dimtext(self.Ld), self.dimtext(self.Sd), self.dimtext(self.HQd)
        HKV, B = self.dimtext(self.HKVd), self.dimtext(self.Bd)
        self.L, self.S = L, S
        G = sym[self._gdim()] if self.gqa else "1"

        # arguments
        caps = list(g.captures)
        if kind == "dq":
            ins = [g.q, g.k, g.v, "out", "dout", "lse"] + caps + ["count", "index", "masked"]
            outs = ["dq", "delta"]
        elif kind == "dkdv":
            ins = [g.q, g.k, g.v, "dout", "lse", "delta"] + caps + ["count", "index", "masked"]
            outs = ["dk", "dv"]
        else:
            ins = [g.q, g.k, g.v, "out", "dout", "lse"] + caps + ["count", "index", "masked"]
            outs = ["dq", "dk", "dv", "delta"]
        self.accumulate = kind != "dq" and bool(self.cleaves)
        # captured tensors whose positions no two parallel iterations share write into one buffer, the others
        # into one partial buffer per slot
        self.disjoint = {n: partition_disjoint(g, n, "fused" if kind == "fused" else "separate")
                         for n in self.cgrads}
        if self.accumulate:   # per-slot partial sums of the capture gradients: [n_SL, *capture shape]
            outs = outs + [capture_grad_arg(n) for n in self.cgrads]
        args = ins + outs
        q_shape = (B, HQ, L, str(E))
        k_shape = (B, HKV, S, str(E))
        v_shape = (B, HKV, S, str(EV))
        shapes = {g.q: q_shape, g.k: k_shape, g.v: v_shape, "out": (B, HQ, L, str(EV)),
                  "dout": (B, HQ, L, str(EV)), "lse": (B, HQ, L), "delta": (B, HQ, L), "dq": q_shape,
                  "dk": k_shape, "dv": v_shape,
                  "count": ("n_Bt", "n_Ht", "n_NT"), "index": ("n_Bt", "n_Ht", "n_NT", "n_W"),
                  "masked": ("n_Bt", "n_Ht", "n_NT", "n_W")}
        dtypes = {n: dt for n in shapes}
        for n in ("count", "index", "masked"):
            dtypes[n] = "int32"
        for n in caps:
            t = op.tensor(n)
            shapes[n] = tuple(self.dimtext(s) for s in t.shape)
            dtypes[n] = tvm_dtype(t.dtype)
        if self.accumulate:
            for n in self.cgrads:
                shapes[capture_grad_arg(n)] = ("1" if self.disjoint[n] else "n_SL",) + shapes[n]
                dtypes[capture_grad_arg(n)] = dt
        buf = {n: f"b_{n}" for n in args}
        self.buf = buf

        # the pointwise part (emitted first: its hoisted lets are placed while assembling)
        self.em = ExprEmitter(buffers={n: buf[n] for n in caps}, shapes={n: op.tensor(n).shape for n in caps},
                              dtypes={n: op.tensor(n).dtype for n in caps}, index=self.ir_dims,
                              fast_math=self.cfg.fast_math, vector_axis=g.j, vector_len=V,
                              alloc=lambda dtype, shp: self._buf("vt", shp, dtype), load_hook=self._hook)
        if kind == "dq":
            root = Scope("root", None, (g.b, g.h))
            head = root
        else:
            root = Scope("root", None, (g.b,))
            head = root.child("head", (g.h,))
        ew_full = self._pointwise(head, partial=False)
        ew_part = self._pointwise(head, partial=True)

        # local tiles
        for name, shp in (("Qs", (BM, E)), ("dOs", (BM, EV)), ("Kt", (E, BN)), ("Vt", (EV, BN)),
                          ("St", (BM, BN)), ("Dt", (BM, BN)), ("lse_t", (BM,)), ("dl_t", (BM,))):
            self.allocs.append(f"{name} = T.alloc_buffer({self._shape(shp)}, \"{dt}\", scope=\"local\")")
        if kind in ("dq", "fused"):
            self.allocs.append(f"Ks = T.alloc_buffer({self._shape((BN, E))}, \"{dt}\", scope=\"local\")")
        if kind == "dq":
            self.allocs.append(f"dQa = T.alloc_buffer({self._shape((BM, E))}, \"{dt}\", scope=\"local\")")
        if kind in ("dkdv", "fused"):
            self.allocs.append(f"dKa = T.alloc_buffer({self._shape((BN, E))}, \"{dt}\", scope=\"local\")")
            self.allocs.append(f"dVa = T.alloc_buffer({self._shape((BN, EV))}, \"{dt}\", scope=\"local\")")
        if self.accumulate:
            for *_, tile in self.cleaves:
                self.allocs.append(f"{tile} = T.alloc_buffer({self._shape((BM, BN))}, \"{dt}\", scope=\"local\")")
            self.allocs.append(f"cg_sum = T.alloc_buffer(({V},), \"{dt}\", scope=\"local\")")

        c = Code()
        write_signature(c, f"opgen.targets.tvm.attention_backward ({kind} kernel; TVMScript, TVM 0.27)", "main",
                        [f"h_{n}: T.handle" for n in args])
        plain = []
        for n in args:
            for s in shapes[n]:
                if s.startswith("n_") and s not in plain and s not in ("n_G",):
                    plain.append(s)
        for s in plain:
            c.w(1, f"{s} = T.{self.idt}()")
        for n in args:
            shp = shapes[n]
            align = _ALIGN.get(dtypes[n], 1)
            c.w(1, f"{buf[n]} = T.match_buffer(h_{n}, {self._shape(shp)}, \"{dtypes[n]}\", align={align})")
        nt_expr = f"T.floordiv({L} + {BM - 1}, {BM})" if kind == "dq" else f"T.floordiv({S} + {BN - 1}, {BN})"
        c.w(1, f"assert n_NT == {nt_expr}, \"opgen attention backward: the {'row' if kind == 'dq' else 'column'}"
               f" table has the wrong number of tiles for the block size\"")
        c.w(1, f"assert T.Or(n_Bt == 1, n_Bt == {B}), \"opgen attention backward: table batch must be 1 or B\"")
        c.w(1, f"assert T.Or(n_Ht == 1, n_Ht == {HQ}), \"opgen attention backward: table heads must be 1 or HQ\"")
        if kind == "dq":
            self._dq_kernel(c, root, ew_full, ew_part)
        elif kind == "dkdv":
            self._dkdv_kernel(c, root, head, ew_full, ew_part, fused=False)
        else:
            self._dkdv_kernel(c, root, head, ew_full, ew_part, fused=True)
        self.allocs.append(f"ints = T.alloc_buffer(({max(1, self._nslots)},), \"{self.idt}\", scope=\"local\")")
        if self.accumulate and not all(self.disjoint.values()):
            c.lines = _slotted(c.lines)
        lines = []
        for ln in c.lines:   # the local buffers, known once the whole body is written
            if ln.strip() == _ALLOCS:
                pad = ln[:len(ln) - len(ln.lstrip())]
                lines += [pad + a for a in self.allocs]
            else:
                lines.append(ln)
        return BackwardKernel(kind, "\n".join(lines) + "\n", tuple(args))

    def _let(self, c: Code, d: int, name: str, expr: str, boolean: bool = False) -> None:
        """Bind ``name`` to ``expr`` through a slot of a local int buffer: a plain ``T.let`` would be substituted
        into every use, and divisions by symbolic sizes or table loads repeated in every index made the LLVM
        code larger (twice the compile time)."""
        k = self._nslots
        self._nslots += 1
        value = f"T.Select({expr}, 1, 0)" if boolean else expr
        c.w(d, f"ints[{k}] = T.Cast(\"{self.idt}\", {value})")
        c.w(d, f"{name}: T.let = ints[{k}]{' != 0' if boolean else ''}")

    def _partial(self, tile: str) -> str:
        """Whether the current tile pair runs the guarded variant: marked partial, or crossing L or S."""
        return (f"T.Or({self.buf['masked']}[bt, ht, {tile}, n] != 0, "
                f"T.Or(q0 + {self.BM} > {self.L}, k0 + {self.BN} > {self.S}))")

    def _gqa_let(self, c: Code) -> None:
        if self.gqa:
            HQ, HKV = self.dimtext(self.HQd), self.dimtext(self.HKVd)
            self._let(c, 2, self.sym[self._gdim()], f"T.floordiv({HQ}, {HKV})")

    def _gdim(self) -> Dim:
        for d, _ in self.op.derived:
            if d in sympy.sympify(self.g.kv_head).free_symbols:
                return d
        raise ValueError(f"attention backward: op {self.op.name}: cannot find the GQA group size in "
                         f"{self.g.kv_head}")

    @staticmethod
    def _shape(shp) -> str:
        parts = [str(s) for s in shp]
        return f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"

    def _buf(self, prefix: str, shape, dtype: str) -> str:
        self._nbuf += 1
        name = f"{prefix}{self._nbuf}"
        self.allocs.append(f"{name} = T.alloc_buffer({self._shape(shape)}, \"{dtype}\", scope=\"local\")")
        return name

    # pointwise part ------------------------------------------------------------------------------------
    def _hook(self, acc) -> LoadOverride | None:
        g = self.g
        jv = f"jc * {self.V} + v"
        if acc.tensor == g.raw_score:
            return LoadOverride(f"St[ii, {jv}]", True, True)
        if acc.tensor == "__dp":
            return LoadOverride(f"Dt[ii, {jv}]", True, True)
        if acc.tensor == "__lse":
            return LoadOverride("lse_t[ii]", False, False, frozenset({g.i}))
        if acc.tensor == "__delta":
            return LoadOverride("dl_t[ii]", False, False, frozenset({g.i}))
        return None

    def _pointwise(self, head: Scope, partial: bool) -> tuple[Scope, Scope, str, str]:
        """Emit p and ds for one tile variant: (row scope, leaf scope, p text, ds text)."""
        g = self.g
        sdt = g.score.dtype
        raw = load(g.raw_score, (g.b, g.h, g.i, g.j), sdt)
        lse = load("__lse", (g.b, g.h, g.i), sdt)
        dp = load("__dp", (g.b, g.h, g.i, g.j), sdt)
        delta = load("__delta", (g.b, g.h, g.i), sdt)
        row = head.child("row", (g.i,))
        leaf = row.child("leaf", (g.j,), leaf=True)
        sym = dict(self.sym)
        sym[g.b], sym[g.h] = "i_b", "i_h"
        if partial:   # indices clamped into range (captured-tensor loads stay inside); bounds applied below
            sym[g.i], sym[g.j] = "i_c", f"T.min(jb + v, {self.S} - 1)"
        else:
            sym[g.i], sym[g.j] = "i_q", "(jb + v)"
        self.em.index = IndexRenderer(sym, self.idt)
        p = exp(g.score - lse)
        dm = derivative(g.score, raw) if g.has_score_mod else None
        if partial and g.mask is not None:
            p = where(g.mask, p, 0.0)
        ds = p * (dp - delta)
        if g.has_score_mod:
            ds = ds * dm if dm is not None else ds * 0.0
        if partial and g.mask is not None:
            ds = where(g.mask, ds, 0.0)
        pr = self.em.emit(p, leaf)
        dsr = self.em.emit(ds, leaf)
        ctxts = []
        if self.accumulate:   # d loss / d capture load = d loss / d modified score * d score_mod / d load
            for *_, dleaf, _tile in self.cleaves:
                ce = p * (dp - delta) * dleaf
                if partial and g.mask is not None:
                    ce = where(g.mask, ce, 0.0)
                ctxts.append(self.em.emit(ce, leaf).text)
        if leaf.lets:
            raise AssertionError("scalar statements at the key level of the pointwise part")
        ptxt, dstxt = pr.text, dsr.text
        if partial:
            inside = f"T.And(i_q < {self.L}, jb + v < {self.S})"
            ptxt = f"T.Select({inside}, {ptxt}, {self.c(0.0)})"
            dstxt = f"T.Select({inside}, {dstxt}, {self.c(0.0)})"
            ctxts = [f"T.Select({inside}, {t}, {self.c(0.0)})" for t in ctxts]
        return row, leaf, ptxt, dstxt, ctxts

    def _write_pointwise(self, c: Code, d: int, ew, partial: bool) -> None:
        row, leaf, ptxt, dstxt, ctxts = ew
        BN, V = self.BN, self.V
        c.w(d, f"for ii in range({self.BM}):")
        c.w(d + 1, "i_q: T.let = q0 + ii")
        if partial:
            c.w(d + 1, f"i_c: T.let = T.min(i_q, {self.L} - 1)")
        c.block(d + 1, row.lets)
        c.w(d + 1, f"for jc in range({BN // V}):")
        c.w(d + 2, f"jb: T.let = k0 + jc * {V}")
        c.w(d + 2, f"for v in T.vectorized({V}):")
        c.block(d + 3, leaf.vlines)
        c.w(d + 3, f"St[ii, jc * {V} + v] = {ptxt}")
        c.w(d + 3, f"Dt[ii, jc * {V} + v] = {dstxt}")
        for (*_, tile), ctxt in zip(self.cleaves, ctxts):
            c.w(d + 3, f"{tile}[ii, jc * {V} + v] = {ctxt}")

    def _pointwise_branch(self, c: Code, d: int, ew_full, ew_part) -> None:
        c.w(d, "if part:")
        self._write_pointwise(c, d + 1, ew_part, True)
        c.w(d, "else:")
        self._write_pointwise(c, d + 1, ew_full, False)

    # capture gradients ------------------------------------------------------------------------------------
    def _scatter_capture_grads(self, c: Code, d: int) -> None:
        """Add each load's contribution tile into the slot's partial gradient of its captured tensor at the load's
        index (this slot's iterations run on one thread: no atomics). An index that does not depend on the key
        (ALiBi's ``slopes[h]``) is summed over the tile's keys first (and over its rows when it does not depend on
        the query either); others add element by element. Every add is guarded by the tensor's bounds (a mod may
        index outside its table where the mask removes the pair: the forward reads there, the scatter must not
        write)."""
        g, V, BM, BN, L, S = self.g, self.V, self.BM, self.BN, self.L, self.S
        z = self.c(0.0)
        for name, leaf, _d, tile in self.cleaves:
            out = self.buf[capture_grad_arg(name)]
            shape = self.op.tensor(name).shape
            index = leaf.arg.index
            free = set().union(*(sympy.sympify(x).free_symbols for x in index)) if index else set()
            sym = dict(self.sym)
            sym[g.b], sym[g.h], sym[g.i], sym[g.j] = "i_b", "i_h", "(q0 + ii)", "(k0 + jj)"
            ren = IndexRenderer(sym, self.idt)
            idx = [ren(x) for x in index]
            inb = _all([f"0 <= {x}" for x in idx] + [f"{x} < {self.dimtext(n)}" for x, n in zip(idx, shape)])
            slot = "0" if self.disjoint[name] else "slot"
            target = f"{out}[{', '.join([slot, *idx])}]"
            if g.j not in free:
                tile_wide = g.i not in free
                if tile_wide:
                    c.w(d, f"for v in T.vectorized({V}):")
                    c.w(d + 1, f"cg_sum[v] = {z}")
                c.w(d, f"for ii in range({BM}):")
                dd = d + 1
                if not tile_wide:
                    c.w(dd, f"for v in T.vectorized({V}):")
                    c.w(dd + 1, f"cg_sum[v] = {z}")
                c.w(dd, f"for jc in range({BN // V}):")
                c.w(dd + 1, f"for v in T.vectorized({V}):")
                c.w(dd + 2, f"cg_sum[v] = cg_sum[v] + {tile}[ii, jc * {V} + v]")
                if not tile_wide:
                    self._add_lanes(c, dd, _all([f"q0 + ii < {L}", inb]), target)
                if tile_wide:
                    ren0 = IndexRenderer({**sym, g.i: "q0", g.j: "k0"}, self.idt)
                    idx0 = [ren0(x) for x in index]
                    inb0 = _all([f"0 <= {x}" for x in idx0] + [f"{x} < {self.dimtext(n)}"
                                                                for x, n in zip(idx0, shape)])
                    self._add_lanes(c, d, inb0, f"{out}[{', '.join([slot, *idx0])}]")
            else:
                c.w(d, f"for ii in range({BM}):")
                c.w(d + 1, f"if q0 + ii < {L}:")
                c.w(d + 2, f"for jj in range({BN}):")
                c.w(d + 3, f"if {tile}[ii, jj] != {z}:")   # masked pairs (and pairs past S) add nothing
                c.w(d + 4, f"if {_all([f'k0 + jj < {S}', inb])}:")
                c.w(d + 5, f"{target} = {target} + {tile}[ii, jj]")

    def _add_lanes(self, c: Code, d: int, cond: str, target: str) -> None:
        """``target += sum(cg_sum)`` when ``cond``."""
        lanes = " + ".join(f"cg_sum[{v}]" for v in range(self.V))
        c.w(d, f"if {cond}:")
        c.w(d + 1, f"{target} = {target} + ({lanes})")

    # tile products ----------------------------------------------------------------------------------------
    def _matmul(self, c: Code, d: int, C: str, rows: int, cols: int, K: int, a, b, accumulate: bool) -> None:
        """``C[r, col] (+)= sum_k a(r, k) * b(k, col)`` with register tiles (a: broadcast scalars, b: vectors)."""
        RR = self.cfg.reg_rows
        CC = self.cfg.reg_vectors * self.V
        segs_r = [(rows // RR, RR, 0)] if rows // RR else []
        if rows % RR:
            segs_r.append((1, rows % RR, (rows // RR) * RR))
        segs_c = [(cols // CC, CC, 0)] if cols // CC else []
        if cols % CC:
            segs_c.append((1, cols % CC, (cols // CC) * CC))
        for nr, rr, r_off in segs_r:
            for nc, cc, c_off in segs_c:
                acc = self._acc(rr, cc)
                dd = d
                rb = f"{r_off}" if nr == 1 else f"r0 * {rr}"
                cb = f"{c_off}" if nc == 1 else f"c0 * {cc}"
                if nr > 1:
                    c.w(dd, f"for r0 in range({nr}):")
                    dd += 1
                if nc > 1:
                    c.w(dd, f"for c0 in range({nc}):")
                    dd += 1
                ridx, cidx = f"{rb} + r", f"{cb} + cc"
                c.w(dd, f"for r in T.unroll({rr}):")
                c.w(dd + 1, f"for cc in T.vectorized({cc}):")
                init = f"{C}[{ridx}, {cidx}]" if accumulate else self.c(0.0)
                c.w(dd + 2, f"{acc}[r, cc] = {init}")
                c.w(dd, f"for kk in range({K}):")
                c.w(dd + 1, f"for r in T.unroll({rr}):")
                c.w(dd + 2, f"for cc in T.vectorized({cc}):")
                c.w(dd + 3, f"{acc}[r, cc] = {acc}[r, cc] + {a(ridx, 'kk')} * {b('kk', cidx)}")
                c.w(dd, f"for r in T.unroll({rr}):")
                c.w(dd + 1, f"for cc in T.vectorized({cc}):")
                c.w(dd + 2, f"{C}[{ridx}, {cidx}] = {acc}[r, cc]")

    def _acc(self, rr: int, cc: int) -> str:
        name = f"acc_{rr}_{cc}"
        if not any(a.startswith(f"{name} =") for a in self.allocs):
            self.allocs.append(f"{name} = T.alloc_buffer(({rr}, {cc}), \"{self.dt}\", scope=\"local\")")
        return name

    # staging -------------------------------------------------------------------------------------------
    def _stage_rows(self, c: Code, d: int, delta_from: str) -> None:
        """Q and dout rows of the query tile at q0 (zeros past L), lse (+inf where -inf or past L), delta."""
        g, b = self.g, self.buf
        E, EV, L = self.E, self.EV, self.L
        inf = self.c(math.inf)
        c.w(d, f"for ii in range({self.BM}):")
        c.w(d + 1, f"if q0 + ii < {L}:")
        c.w(d + 2, f"for e in T.vectorized({E}):")
        c.w(d + 3, f"Qs[ii, e] = {b[g.q]}[i_b, i_h, q0 + ii, e]{self._scaled()}")
        c.w(d + 2, f"for e in T.vectorized({EV}):")
        c.w(d + 3, f"dOs[ii, e] = {b['dout']}[i_b, i_h, q0 + ii, e]")
        c.w(d + 2, f"lse_t[ii] = T.Select({b['lse']}[i_b, i_h, q0 + ii] == {self.c(-math.inf)}, {inf}, "
                   f"{b['lse']}[i_b, i_h, q0 + ii])")
        if delta_from == "buffer":
            c.w(d + 2, f"dl_t[ii] = {b['delta']}[i_b, i_h, q0 + ii]")
        else:   # compute from out and dout, and write it
            c.w(d + 2, f"dl_t[ii] = {self.c(0.0)}")
            c.w(d + 2, f"for e in range({EV}):")
            c.w(d + 3, f"dl_t[ii] = dl_t[ii] + dOs[ii, e] * {b['out']}[i_b, i_h, q0 + ii, e]")
            c.w(d + 2, f"{b['delta']}[i_b, i_h, q0 + ii] = dl_t[ii]")
        c.w(d + 1, "else:")
        c.w(d + 2, f"for e in T.vectorized({E}):")
        c.w(d + 3, f"Qs[ii, e] = {self.c(0.0)}")
        c.w(d + 2, f"for e in T.vectorized({EV}):")
        c.w(d + 3, f"dOs[ii, e] = {self.c(0.0)}")
        c.w(d + 2, f"lse_t[ii] = {inf}")
        c.w(d + 2, f"dl_t[ii] = {self.c(0.0)}")

    def _stage_keys(self, c: Code, d: int, with_ks: bool) -> None:
        """k and v of the key tile at k0 transposed into Kt / Vt (and k as rows into Ks), zeros past S."""
        g, b = self.g, self.buf
        E, EV, S = self.E, self.EV, self.S
        z = self.c(0.0)
        c.w(d, f"for jj in range({self.BN}):")
        c.w(d + 1, f"if k0 + jj < {S}:")
        c.w(d + 2, f"for e in range({E}):")
        c.w(d + 3, f"Kt[e, jj] = {b[g.k]}[i_b, hk, k0 + jj, e]")
        c.w(d + 2, f"for e in range({EV}):")
        c.w(d + 3, f"Vt[e, jj] = {b[g.v]}[i_b, hk, k0 + jj, e]")
        if with_ks:
            c.w(d + 2, f"for e in T.vectorized({E}):")
            c.w(d + 3, f"Ks[jj, e] = {b[g.k]}[i_b, hk, k0 + jj, e]{self._scaled()}")
        c.w(d + 1, "else:")
        c.w(d + 2, f"for e in range({E}):")
        c.w(d + 3, f"Kt[e, jj] = {z}")
        c.w(d + 2, f"for e in range({EV}):")
        c.w(d + 3, f"Vt[e, jj] = {z}")
        if with_ks:
            c.w(d + 2, f"for e in T.vectorized({E}):")
            c.w(d + 3, f"Ks[jj, e] = {z}")

    def _scaled(self) -> str:
        return "" if self.g.scale == 1.0 else f" * {self.c(self.g.scale)}"

    def _scores(self, c: Code, d: int) -> None:
        """St = Qs . Kt (the raw scores: Qs holds q * scale) and Dt = dOs . Vt."""
        BM, BN, E, EV = self.BM, self.BN, self.E, self.EV
        self._matmul(c, d, "St", BM, BN, E, lambda r, k: f"Qs[{r}, {k}]", lambda k, col: f"Kt[{k}, {col}]", False)
        self._matmul(c, d, "Dt", BM, BN, EV, lambda r, k: f"dOs[{r}, {k}]", lambda k, col: f"Vt[{k}, {col}]", False)

    # kernels --------------------------------------------------------------------------------------------
    def _dq_kernel(self, c: Code, root: Scope, ew_full, ew_part) -> None:
        g, b = self.g, self.buf
        BM, BN, E, L, S, HQ, B = self.BM, self.BN, self.E, self.L, self.S, self.dimtext(self.HQd), \
            self.dimtext(self.Bd)
        c.w(1, f"for blk in T.parallel({B} * {HQ} * n_NT):")
        c.w(2, _ALLOCS)
        self._gqa_let(c)
        self._let(c, 2, "i_b", f"T.floordiv(blk, {HQ} * n_NT)")
        self._let(c, 2, "i_h", f"T.floormod(T.floordiv(blk, n_NT), {HQ})")
        self._let(c, 2, "mt", f"T.floormod(blk, n_NT)")
        self._let(c, 2, "q0", f"mt * {BM}")
        self._let(c, 2, "hk", f"{self._kv_head()}")
        self._let(c, 2, "bt", f"T.min(i_b, n_Bt - 1)")
        self._let(c, 2, "ht", f"T.min(i_h, n_Ht - 1)")
        c.block(2, root.lets)
        self._stage_rows(c, 2, delta_from="out")
        c.w(2, f"for ii in range({BM}):")
        c.w(3, f"for e in T.vectorized({E}):")
        c.w(4, f"dQa[ii, e] = {self.c(0.0)}")
        c.w(2, f"for n in range({b['count']}[bt, ht, mt]):")
        self._let(c, 3, "k0", f"{b['index']}[bt, ht, mt, n] * {BN}")
        self._let(c, 3, "part", self._partial("mt"), boolean=True)
        self._stage_keys(c, 3, with_ks=True)
        self._scores(c, 3)
        self._pointwise_branch(c, 3, ew_full, ew_part)
        self._matmul(c, 3, "dQa", BM, E, BN, lambda r, k: f"Dt[{r}, {k}]", lambda k, col: f"Ks[{k}, {col}]", True)
        c.w(2, f"for ii in range({BM}):")
        c.w(3, f"if q0 + ii < {L}:")
        c.w(4, f"for e in T.vectorized({E}):")
        c.w(5, f"{b['dq']}[i_b, i_h, q0 + ii, e] = dQa[ii, e]")

    def _kv_head(self) -> str:
        sym = dict(self.sym)
        sym[self.g.h] = "i_h"
        return IndexRenderer(sym, self.idt)(self.g.kv_head)

    def _dkdv_kernel(self, c: Code, root: Scope, head: Scope, ew_full, ew_part, fused: bool) -> None:
        g, b = self.g, self.buf
        BM, BN, E, EV, L, S = self.BM, self.BN, self.E, self.EV, self.L, self.S
        B, HKV = self.dimtext(self.Bd), self.dimtext(self.HKVd)
        G = self.sym[self._gdim()] if self.gqa else "1"
        z = self.c(0.0)
        if fused:
            c.w(1, f"for blk in T.parallel({B} * {HKV}):")
            c.w(2, _ALLOCS)
            self._gqa_let(c)
            self._let(c, 2, "i_b", f"T.floordiv(blk, {HKV})")
            self._let(c, 2, "hk", f"T.floormod(blk, {HKV})")
        else:
            c.w(1, f"for blk in T.parallel({B} * {HKV} * n_NT):")
            c.w(2, _ALLOCS)
            self._gqa_let(c)
            self._let(c, 2, "i_b", f"T.floordiv(blk, {HKV} * n_NT)")
            self._let(c, 2, "hk", f"T.floormod(T.floordiv(blk, n_NT), {HKV})")
        self._let(c, 2, "bt", f"T.min(i_b, n_Bt - 1)")
        c.block(2, root.lets)
        d = 2
        if fused:
            # delta of every row of this kv head's query heads, and dq = 0
            c.w(d, f"for g in range({G}):")
            self._let(c, d + 1, "i_h", f"hk * {G} + g")
            c.w(d + 1, f"for i in range({L}):")
            c.w(d + 2, "acc_d = T.alloc_buffer((1,), \"" + self.dt + "\", scope=\"local\")")
            c.w(d + 2, f"acc_d[0] = {z}")
            c.w(d + 2, f"for e in range({EV}):")
            c.w(d + 3, f"acc_d[0] = acc_d[0] + {b['dout']}[i_b, i_h, i, e] * {b['out']}[i_b, i_h, i, e]")
            c.w(d + 2, f"{b['delta']}[i_b, i_h, i] = acc_d[0]")
            c.w(d + 2, f"for e in T.vectorized({E}):")
            c.w(d + 3, f"{b['dq']}[i_b, i_h, i, e] = {z}")
            c.w(d, f"for nt in range(T.floordiv({S} + {BN - 1}, {BN})):")
            d += 1
        else:
            self._let(c, d, "nt", f"T.floormod(blk, n_NT)")
        self._let(c, d, "k0", f"nt * {BN}")
        self._stage_keys(c, d, with_ks=fused)
        c.w(d, f"for jj in range({BN}):")
        c.w(d + 1, f"for e in T.vectorized({E}):")
        c.w(d + 2, f"dKa[jj, e] = {z}")
        c.w(d + 1, f"for e in T.vectorized({EV}):")
        c.w(d + 2, f"dVa[jj, e] = {z}")
        c.w(d, f"for g in range({G}):")
        self._let(c, d + 1, "i_h", f"hk * {G} + g")
        self._let(c, d + 1, "ht", f"T.min(i_h, n_Ht - 1)")
        c.block(d + 1, head.lets)
        c.w(d + 1, f"for n in range({b['count']}[bt, ht, nt]):")
        dd = d + 2
        self._let(c, dd, "q0", f"{b['index']}[bt, ht, nt, n] * {BM}")
        self._let(c, dd, "part", self._partial("nt"), boolean=True)
        self._stage_rows(c, dd, delta_from="buffer")
        self._scores(c, dd)
        self._pointwise_branch(c, dd, ew_full, ew_part)
        if self.accumulate:
            self._scatter_capture_grads(c, dd)
        self._matmul(c, dd, "dVa", BN, EV, BM, lambda r, k: f"St[{k}, {r}]", lambda k, col: f"dOs[{k}, {col}]", True)
        self._matmul(c, dd, "dKa", BN, E, BM, lambda r, k: f"Dt[{k}, {r}]", lambda k, col: f"Qs[{k}, {col}]", True)
        if fused:
            # dq rows of this query tile += ds . k (Ks holds k * scale)
            self._matmul_global_dq(c, dd)
        c.w(d, f"for jj in range({BN}):")
        c.w(d + 1, f"if k0 + jj < {S}:")
        c.w(d + 2, f"for e in T.vectorized({E}):")
        c.w(d + 3, f"{b['dk']}[i_b, hk, k0 + jj, e] = dKa[jj, e]")
        c.w(d + 2, f"for e in T.vectorized({EV}):")
        c.w(d + 3, f"{b['dv']}[i_b, hk, k0 + jj, e] = dVa[jj, e]")

    def _matmul_global_dq(self, c: Code, d: int) -> None:
        """dq[b, h, q0 + r, :] += Dt[r, :] . Ks for the rows of the tile inside L (register tiles on the rows)."""
        b = self.buf
        BM, BN, E, L = self.BM, self.BN, self.E, self.L
        RR = self.cfg.reg_rows
        CC = self.cfg.reg_vectors * self.V
        dq = b["dq"]
        c.w(d, f"if q0 + {BM} <= {L}:")
        segs_r = [(BM // RR, RR, 0)] if BM // RR else []
        if BM % RR:
            segs_r.append((1, BM % RR, (BM // RR) * RR))
        segs_c = [(E // CC, CC, 0)] if E // CC else []
        if E % CC:
            segs_c.append((1, E % CC, (E // CC) * CC))
        for nr, rr, r_off in segs_r:
            for nc, cc, c_off in segs_c:
                acc = self._acc(rr, cc)
                dd = d + 1
                rb = f"{r_off}" if nr == 1 else f"r0 * {rr}"
                cb = f"{c_off}" if nc == 1 else f"c0 * {cc}"
                if nr > 1:
                    c.w(dd, f"for r0 in range({nr}):")
                    dd += 1
                if nc > 1:
                    c.w(dd, f"for c0 in range({nc}):")
                    dd += 1
                c.w(dd, f"for r in T.unroll({rr}):")
                c.w(dd + 1, f"for cc in T.vectorized({cc}):")
                c.w(dd + 2, f"{acc}[r, cc] = {dq}[i_b, i_h, q0 + {rb} + r, {cb} + cc]")
                c.w(dd, f"for kk in range({BN}):")
                c.w(dd + 1, f"for r in T.unroll({rr}):")
                c.w(dd + 2, f"for cc in T.vectorized({cc}):")
                c.w(dd + 3, f"{acc}[r, cc] = {acc}[r, cc] + Dt[{rb} + r, kk] * Ks[kk, {cb} + cc]")
                c.w(dd, f"for r in T.unroll({rr}):")
                c.w(dd + 1, f"for cc in T.vectorized({cc}):")
                c.w(dd + 2, f"{dq}[i_b, i_h, q0 + {rb} + r, {cb} + cc] = {acc}[r, cc]")
        # a tile crossing L: row by row, guarded
        c.w(d, "else:")
        c.w(d + 1, f"for ii in range({BM}):")
        c.w(d + 2, f"if q0 + ii < {L}:")
        c.w(d + 3, f"for kk in range({BN}):")
        c.w(d + 4, f"for e in T.vectorized({E}):")
        c.w(d + 5, f"{dq}[i_b, i_h, q0 + ii, e] = {dq}[i_b, i_h, q0 + ii, e] + Dt[ii, kk] * Ks[kk, e]")


def _all(conds: list[str]) -> str:
    """The conjunction of TVMScript conditions (``T.bool(True)`` for none)."""
    if not conds:
        return "T.bool(True)"
    out = conds[-1]
    for cnd in reversed(conds[:-1]):
        out = f"T.And({cnd}, {out})"
    return out


def partition_disjoint(group: AttentionGroup, name: str, mode: str) -> bool:
    """Whether no two parallel iterations of the kernel that accumulates capture gradients (``"fused"``: one per
    (b, kv head); ``"separate"``'s dk/dv kernel: one per (b, kv head, key tile)) can add into one position of the
    captured tensor ``name``: every load of it has the plain axes b and h (and j for ``"separate"``) among its
    indices (a dense bias ``bias[b, h, q_idx, kv_idx]``). Those write straight into one gradient buffer instead of
    one partial buffer per slot (no slots x tensor memory)."""
    need = {group.b, group.h} | ({group.j} if mode == "separate" else set())
    return all(need <= set(leaf.arg.index) for leaf in group.capture_leaves(name))


def capture_grad_arg(name: str) -> str:
    """The kernel argument holding the per-slot partial gradients of the captured input ``name``."""
    return f"d{name}"


def _slotted(lines: list[str]) -> list[str]:
    """The kernel's ``for blk in T.parallel(N)`` loop as ``n_SL`` parallel slots, each running the iterations
    ``slot, slot + n_SL, ...`` in turn: a slot's partial capture gradients are written by one thread only."""
    out: list[str] = []
    it = iter(lines)
    for ln in it:
        if ln.startswith("    for blk in T.parallel(") and ln.endswith("):"):
            total = ln[len("    for blk in T.parallel("):-2]
            out.append("    for slot in T.parallel(n_SL):")
            out.append("        " + _ALLOCS)
            out.append(f"        for it in range(T.floordiv({total} - slot + n_SL - 1, n_SL)):")
            out.append("            blk: T.let = slot + it * n_SL")
            for rest in it:
                if rest.strip() == _ALLOCS:
                    continue
                out.append("    " + rest if rest.strip() else rest)
            break
        out.append(ln)
    return out


# ------------------------------------------------------------------------------------------------ running


def _table(t: Any, what: str):
    """(count, index, masked) int32 contiguous tensors from a table object, mapping or 3-tuple."""
    import torch

    if isinstance(t, Mapping):
        parts = (t["count"], t["index"], t["masked"])
    elif isinstance(t, (tuple, list)) and len(t) == 3:
        parts = tuple(t)
    elif all(hasattr(t, a) for a in ("count", "index", "masked")):
        parts = (t.count, t.index, t.masked)
    else:
        raise TypeError(f"attention backward: argument '{what}' must have count, index and masked tensors, got "
                        f"{type(t).__name__}")
    count, idx, masked = (torch.as_tensor(p).to(torch.int32).contiguous() for p in parts)
    if count.dim() != 3 or idx.dim() != 4 or masked.shape != idx.shape or idx.shape[:3] != count.shape:
        raise ValueError(f"attention backward: argument '{what}' has count {tuple(count.shape)}, index "
                         f"{tuple(idx.shape)}, masked {tuple(masked.shape)}; expected [Bt, Ht, N] and [Bt, Ht, N, W]")
    if idx.shape[3] == 0:   # no tile at all: a 1-wide padding column (never read: counts are 0)
        idx = torch.zeros(*idx.shape[:3], 1, dtype=torch.int32)
        masked = torch.zeros_like(idx)
    return count, idx, masked


def attention_backward(group: AttentionGroup, inputs: Mapping[str, Any], out, lse, dout, rows, cols,
                       config: Any = None, cache=None) -> dict:
    """Gradients ``{"q": dq, "k": dk, "v": dv}`` of the attention ``group`` by the flash backward on CPU.

    ``inputs``: q, k, v and the captured tensors by name; ``out`` / ``lse``: the forward's outputs; ``dout``: the
    gradient of ``out``; ``rows`` / ``cols``: the tile tables per query tile (key tiles to visit) and per key
    tile (query tiles), each ``(count, index, masked)`` as a 3-tuple, a mapping or an object with those
    attributes, built for ``config.block_m`` / ``block_n``. ``config``: an :class:`AttentionBackwardConfig`, its
    JSON dict, any object with ``block_m`` / ``block_n``, or None (default). ``cache``: a
    :class:`~opgen.targets.tvm.compile.KernelCache` (a process-wide one when None).

    The captured tensors ``group.grad_captures`` (set on the op of a backward that wants them) get their
    gradients too, under their names; the others are constants.
    """
    import torch

    who = f"attention backward ({group.op.name})"
    q, k, v = inputs[group.q], inputs[group.k], inputs[group.v]
    caps = [inputs[n] for n in group.captures]
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("dout", dout)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ValueError(f"{who}: argument '{name}' must be a CPU tensor, got "
                             f"{getattr(t, 'device', type(t).__name__)}")
    dtype = group.op.tensor(group.q).dtype
    if dtype not in SUPPORTED or any(group.op.tensor(n).dtype != dtype for n in (group.k, group.v)):
        raise TypeError(f"{who}: the op's q, k, v dtypes are {group.op.tensor(group.q).dtype}, "
                        f"{group.op.tensor(group.k).dtype}, {group.op.tensor(group.v).dtype}; the TVM backward "
                        f"runs all-float32 or all-float64 attention")
    tdt = torch.float32 if dtype == DType.f32 else torch.float64
    B, HQ, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    if out.shape != (B, HQ, L, EV) or dout.shape != (B, HQ, L, EV) or lse.shape != (B, HQ, L):
        raise ValueError(f"{who}: out {tuple(out.shape)}, dout {tuple(dout.shape)} and lse {tuple(lse.shape)} must "
                         f"be [{B}, {HQ}, {L}, {EV}], [{B}, {HQ}, {L}, {EV}] and [{B}, {HQ}, {L}]")
    cfg = as_backward_config(config, dtype)
    mode = cfg.dq_mode
    if mode == "auto":
        mode = "fused" if B * HKV >= tvm_threads() else "separate"
    biggest = max([q.numel(), k.numel(), v.numel(), out.numel()] + [c.numel() for c in caps])
    if biggest > _INT32_LIMIT:
        raise ValueError(f"{who}: tensors over 2**31 - 1 elements need 64-bit indices (not supported)")
    src = render_attention_backward(group, cfg, head_dim=E, value_dim=EV, dtype=dtype, mode=mode)
    kc = cache if cache is not None else _default_cache()

    def prep(t):
        t = t.to(tdt) if t.dtype != tdt else t
        return t.contiguous()

    q, k, v, out, dout, lse = (prep(t) for t in (q, k, v, out, dout, lse))
    from opgen.ir.dtypes import to_torch

    caps = [(c.to(to_torch(group.op.tensor(n).dtype)) if c.dtype != to_torch(group.op.tensor(n).dtype) else c)
            .contiguous() for n, c in zip(group.captures, caps)]
    nq, nk = -(-L // cfg.block_m), -(-S // cfg.block_n)
    rt, ct = _table(rows, "rows"), _table(cols, "cols")
    if rt[0].shape[2] != nq:
        raise ValueError(f"{who}: the row table has {rt[0].shape[2]} query tiles; L={L} with block_m="
                         f"{cfg.block_m} needs {nq}")
    if ct[0].shape[2] != nk:
        raise ValueError(f"{who}: the column table has {ct[0].shape[2]} key tiles; S={S} with block_n="
                         f"{cfg.block_n} needs {nk}")
    delta = torch.empty(B, HQ, L, dtype=tdt)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    named = {group.q: q, group.k: k, group.v: v, "out": out, "dout": dout, "lse": lse, "delta": delta,
             "dq": dq, "dk": dk, "dv": dv, **dict(zip(group.captures, caps))}
    # capture gradients: one partial sum per slot of the dk/dv (or fused) kernel's parallel loop, summed here
    slots = min(tvm_threads(), B * HKV * (1 if mode == "fused" else nk)) or 1
    partial = {n: torch.zeros(1 if partition_disjoint(group, n, mode) else slots, *named[n].shape, dtype=tdt)
               for n in group.grad_captures}
    named.update({capture_grad_arg(n): t for n, t in partial.items()})
    for kern in src.kernels:
        table = rt if kern.name == "dq" else ct
        t_named = {**named, "count": table[0], "index": table[1], "masked": table[2]}
        fn = kc.get(kern.text)
        fn(*[t_named[n] for n in kern.args])
    res = {"q": dq, "k": dk, "v": dv}
    res.update({n: t.sum(0) if t.shape[0] > 1 else t[0] for n, t in partial.items()})
    return res


@functools.lru_cache(maxsize=1)
def _default_cache():
    """A memory-only kernel cache for calls that pass none (the target passes its own)."""
    from .compile import KernelCache

    return KernelCache()


__all__ = ["AttentionBackwardConfig", "BackwardKernel", "BackwardSources", "as_backward_config",
           "attention_backward", "default_backward_config", "host_vector_lanes", "render_attention_backward"]
