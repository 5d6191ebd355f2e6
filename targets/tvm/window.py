"""Render a window group (:class:`opgen.ir.passes.window.WindowGroup`: a convolution plus its pointwise epilogue)
to a TVMScript prim_func, and run it.

Two variants (``WindowConfig.variant``), both built around one register-tiled micro-kernel that accumulates a
``co_tile x rows_tile x (width_vectors * vector)`` tile of outputs (output channels x output rows x output columns,
vectorized along the output width) in a ``local`` buffer that LLVM keeps in registers, in one of two loop orders:

* tap order (``kh_block = 0``): ``for ci, kh, kw: for c, r (unrolled): acc[c, r, :] += src[ci, r*sh + kh*dh,
  :*sw + kw*dw] * w[co0 + c, ci, kh, kw]``: each weight broadcast feeds the ``rows_tile`` rows, each input vector
  the ``co_tile`` channels (the implicit-GEMM tile);
* sliding tap order (``kh_block = 0``, ``kw_outer``): ``for kw, kh: for c, r (unrolled)``: consecutive kh read the
  tile's input rows shifted by one, so each input row vector stays in a register while the kh loop slides past it
  (``rows_tile`` accumulators + ``rows_tile`` input rows + one weight: 15 AVX2 registers at 7 rows), and every
  step feeds ``rows_tile`` independent accumulators (no latency-bound start and end of a weight-stationary block);
* weight-stationary order (``kh_block = k``): per block of k kernel rows and per kw, ``for ir (unrolled over the
  input rows of the block): for r with kh = (ir - r*sh) / dh in the block: acc[0, r, :] += src[ci, ir, ...] *
  w[co, ci, kh, kw]``: each input row vector is loaded once and feeds every output row of the tile, while the
  block's k weights stay in registers (depthwise kernels, where there is no channel reuse).

* ``direct``: parallel over (batch, output-channel block, output-row block); the input rows and columns a block
  reads, zero padding included, are staged into a ``local`` patch (vector copies, the border zero-filled), so the
  micro-kernel has no bounds checks and its input stays in L1. For depthwise convolutions (7x7 .. 31x31) and causal
  conv1d.
* ``gemm`` (implicit GEMM): one parallel pass copies the input into a zero-padded workspace; then parallel over
  (batch, output-row block), each (output-column vector, output-channel block) tile reduces over C*KH*KW from it.
  For dense and grouped convolutions with many input channels per group.
* ``cvec`` and ``dot`` (:mod:`.window_vec`): implicit GEMMs vectorized along the output channels (small images,
  weight gradients) and along the flattened taps.

The epilogue (bias, activation, gating with another tensor) is applied to the register tile before the store, by
:class:`~opgen.targets.tvm.expr.ExprEmitter` (vectorized; the partial last column tile runs it as scalar code).

Sizes: batch and spatial sizes (N, H, W, L) stay symbolic (one kernel serves every image size that fills the default
blocks; the default config fits the blocks of smaller images, :func:`opgen.schedules.window._fit_blocks`); channel
counts, kernel sizes and the padding / offsets are baked in from the binding (one kernel per such combination).
The knobs, their checks and the default configs are in :mod:`opgen.schedules.window`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import sympy

from opgen.ir import Access, DType, ExprOp, promote
from opgen.ir.passes.window import WindowGroup, fuse_window
from opgen.ir.symbols import Dim

from opgen.schedules import window as _sched
from opgen.schedules.space import TargetSpace as Space
from opgen.schedules.window import (MAX_PATCH_ELEMS, VARIANTS, WindowConfig, WindowRules, _block_rows,  # noqa: F401
                                    _patch_extent, as_window_config)
from opgen.schedules.window_static import StaticDim, StaticWindow, static_window
from opgen.targets.spectral import prefer_fft, window_fft_supported

from .expr import (Code, ExprEmitter, IndexRenderer, LoadOverride, Scope, compute_dtype, const_text, scratch_buffer,
                   tvm_dtype, write_func_head)
from .host import host_vector_bits
from .window_vec import VectorKernels

SUPPORTED_DTYPES = frozenset({DType.f32, DType.f64})
_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class WindowSource:
    """A rendered window kernel: TVMScript text and the calling convention."""

    text: str
    tensors: tuple[str, ...]          # tensor arguments in call order: the op's inputs, then the output
    scalars: tuple[Dim, ...]          # then these dims, as int arguments
    config: WindowConfig
    static_dims: tuple[tuple[str, int], ...] = ()
    index_dtype: str = "int32"


# -------------------------------------------------------------------------------------- resolved structure


def window_supported(group: WindowGroup | None) -> tuple[bool, str]:
    """Whether the tvm window kernels can run ``group`` (sizes aside): (True, "") or (False, why)."""
    if group is None:
        return False, "the op is not a window reduction"
    op = group.op
    if len(group.spatial) not in (1, 2):
        return False, f"op {op.name}: {len(group.spatial)}-D windows are not supported (1-D and 2-D are)"
    for t in op.inputs + op.outputs:
        if t.dtype not in SUPPORTED_DTYPES:
            return False, f"op {op.name}: tensor {t.name} is {t.dtype}; the tvm window kernels take f32 and f64"
    return True, ""


# ------------------------------------------------------------------------------------- the schedule (data)
# The knobs, checks and default configs live in :mod:`opgen.schedules.window`; these bind them to this target's
# facts (the host's SIMD width, the FFT rule of :mod:`opgen.targets.spectral`).


RULES = WindowRules(window_fft_supported, prefer_fft, host_vector_bits)


def window_space(group: WindowGroup, binding=None, caps=None) -> Space:
    """The knobs of the window kernels and their constraints (:func:`opgen.schedules.window.window_space`)."""
    return _sched.window_space(group, binding, caps, rules=RULES)


def check_window_config(cfg: WindowConfig, group: WindowGroup, binding) -> tuple[bool, str]:
    """Whether ``cfg`` is valid for ``group`` at ``binding`` ((False, reason) when not)."""
    return _sched.check_window_config(cfg, group, binding, rules=RULES)


def default_window_config(group: WindowGroup, binding, caps=None) -> WindowConfig:
    """The heuristic config (:func:`opgen.schedules.window.default_window_config`)."""
    return _sched.default_window_config(group, binding, caps, rules=RULES)


def resolve_window_config(group: WindowGroup, binding, config=None, caps=None) -> WindowConfig:
    """The config a call uses: ``config`` legalized, or the default."""
    return _sched.resolve_window_config(group, binding, config, caps, rules=RULES)


def legalize_window_config(cfg: WindowConfig, group: WindowGroup, binding) -> WindowConfig:
    """``cfg`` if valid here, else the default config (ValueError naming the op when neither is)."""
    return _sched.legalize_window_config(cfg, group, binding, rules=RULES)


def _lin(var: str, scale: int, off: int) -> str:
    """``var * scale + off`` without unit factors and zero terms."""
    t = var if scale == 1 else f"{var} * {scale}"
    return t if off == 0 else f"{t} + {off}" if off > 0 else f"{t} - {-off}"


def _mul(var: str, k: int) -> str:
    return var if k == 1 else f"{var} * {k}"


# --------------------------------------------------------------------------------------------- rendering


def render_window(group: WindowGroup, config: WindowConfig, *, binding, index_bits: int = 32,
                  func_name: str = "main") -> WindowSource:
    """The TVMScript source of ``group`` under ``config``; channel counts and kernel sizes come from ``binding``
    (batch and spatial sizes stay symbolic)."""
    ok, why = check_window_config(config, group, binding)
    if not ok:
        raise ValueError(f"op {group.op.name}: invalid window config {config}: {why}")
    sh = static_window(group, binding)
    return _render_cached(group, config, sh, index_bits, func_name)


@functools.lru_cache(maxsize=256)
def _render_cached(group: WindowGroup, cfg: WindowConfig, sh: StaticWindow, index_bits: int,
                   func_name: str) -> WindowSource:
    return _Renderer(group, cfg, sh, index_bits, func_name).render()


class _Renderer(VectorKernels):
    def __init__(self, group: WindowGroup, cfg: WindowConfig, sh: StaticWindow, index_bits: int, func_name: str):
        if index_bits not in (32, 64):
            raise ValueError(f"index_bits must be 32 or 64, got {index_bits}")
        self.g, self.cfg, self.sh, self.func_name = group, cfg, sh, func_name
        self.op = group.op
        self.idt = f"int{index_bits}"
        self.static = dict(sh.static)
        self.allocs: list[str] = []
        self._nbuf = 0
        self._emissions = 0
        dt = {t.name: t.dtype for t in self.op.tensors}
        self.acc_dt = compute_dtype(promote(dt[group.data.tensor], dt[group.weight.tensor]))
        self.adt = tvm_dtype(self.acc_dt)
        self.out_t = self.op.tensor(group.out)

    # helpers ----------------------------------------------------------------------------------------------
    def _buf(self, prefix: str, shape: tuple, dtype: str) -> str:
        self._nbuf += 1
        name = f"{prefix}{self._nbuf}"
        dims = ", ".join(str(s) for s in shape)
        self.allocs.append(scratch_buffer(name, f"({dims},)", dtype))
        return name

    def _zero(self) -> str:
        return const_text(0, self.adt)

    def _cast(self, text: str, src: DType) -> str:
        s = tvm_dtype(src)
        return text if s == self.adt else f"T.Cast(\"{self.adt}\", {text})"

    # main -------------------------------------------------------------------------------------------------
    def render(self) -> WindowSource:
        g, op, sh, cfg = self.g, self.op, self.sh, self.cfg
        params = list(op.inputs) + [self.out_t]
        derived = {d for d, _ in op.derived}
        plain: dict[Dim, str] = {}
        for t in params:
            for s in t.shape:
                if isinstance(s, Dim) and s not in derived and s not in self.static:
                    plain.setdefault(s, t.name)
        scalars = tuple(d for d in op.dims if d not in derived and d not in self.static and d not in plain)
        sym: dict = {d: (str(self.static[d]) if d in self.static else f"n_{d.name}") for d in op.dims}
        sub = {d: sympy.Integer(v) for d, v in self.static.items()}
        plain_ir = IndexRenderer(sym, self.idt)
        self.ird = lambda e: plain_ir(sympy.sympify(e).xreplace(sub))
        ext = dict(op.extents)
        self.ext_text = {a: self.ird(sympy.sympify(e)) for a, e in ext.items()}
        data_t = op.tensor(g.data.tensor)
        self.in_rows = self.ird(data_t.shape[sh.row.data_dim]) if sh.row.real else "1"
        self.in_cols = self.ird(data_t.shape[sh.col.data_dim])
        self.sym = sym

        c = Code()
        write_func_head(c, "opgen.targets.tvm.window", self.func_name, params, scalars, plain, self.idt, self.ird,
                        op.derived, self.static)
        c.w(1, f"OH: T.let = {self.ext_text[sh.row.out_axis] if sh.row.real else 1}")
        c.w(1, f"OW: T.let = {self.ext_text[sh.col.out_axis]}")
        nb = " * ".join(self.ext_text[a] for a, _ in g.batch) or "1"
        c.w(1, f"NB: T.let = {nb}")
        if cfg.variant == "direct":
            self._direct(c)
        elif cfg.variant == "dot":
            self._dot(c)
        elif cfg.variant == "cvec":
            self._cvec(c)
        else:
            self._gemm(c)
        text = "\n".join(c.lines) + "\n"
        return WindowSource(text, tuple(t.name for t in params), scalars, cfg,
                            tuple((d.name, v) for d, v in sorted(self.static.items(), key=lambda x: x[0].name)),
                            self.idt)

    # index texts --------------------------------------------------------------------------------------------
    def _batch_lets(self, c: Code, depth: int, var: str) -> None:
        """Define ``i_<axis>`` for every batch axis from the flattened batch index ``var``."""
        bs = [a for a, _ in self.g.batch]
        for k, a in enumerate(bs):
            inner = " * ".join(self.ext_text[b] for b in bs[k + 1:])
            q = f"T.floordiv({var}, {inner})" if inner else var
            val = f"T.floormod({q}, {self.ext_text[a]})" if k > 0 else q
            c.w(depth, f"i_{a.name}: T.let = {val}")

    def _data_index(self, chan: str, row: str, col: str) -> str:
        """``b_x[...]`` with the batch axes as ``i_<axis>``, the given channel, row and column texts."""
        g, sh = self.g, self.sh
        batch = {k: f"i_{a.name}" for a, k in g.batch}
        out = []
        for k, ie in enumerate(g.data.index):
            if k in batch:
                out.append(batch[k])
            elif k == g.channels.data_dim:
                out.append(chan)
            elif sh.row.real and k == sh.row.data_dim:
                out.append(row)
            elif k == sh.col.data_dim:
                out.append(col)
            else:
                out.append(self.ird(ie))
        return f"b_{g.data.tensor}[{', '.join(out)}]"

    def _weight_index(self, co: str, ci: str, kh: str, kw: str) -> str:
        g, sh = self.g, self.sh
        ch = g.channels
        if sh.row.real and sh.row.flip:
            kh = f"({sh.row.K - 1} - ({kh}))"
        if sh.col.flip:
            kw = f"({sh.col.K - 1} - ({kw}))"
        m = {}
        if ch.out_axis is not None:
            m[ch.out_axis] = co
        if ch.in_axis is not None:
            m[ch.in_axis] = ci
        if sh.row.real:
            m[sh.row.win_axis] = kh
        m[sh.col.win_axis] = kw
        return f"b_{g.weight.tensor}[{', '.join(m[a] for a in g.weight.index)}]"

    def _chan(self, grp: str, ci: str) -> str:
        """The data channel of input channel ``ci`` of group ``grp``."""
        Cg = self.sh.Cg
        return grp if Cg == 1 else f"({grp} * {Cg} + {ci})"

    # the micro-kernel -----------------------------------------------------------------------------------------
    def _kh_blocks(self) -> list[tuple[int, int, int]]:
        """(count, block size, first kernel row) of the weight-stationary kernel-row blocks: full, then the tail."""
        K = self.sh.row.K
        kb = min(self.cfg.kh_block, K)
        full, tail = divmod(K, kb)
        out = [(full, kb, 0)]
        if tail:
            out.append((1, tail, full * kb))
        return out

    def _microkernel(self, c: Code, depth: int, CT: int, src, co0: str) -> None:
        """Accumulate the register tile ``acc[CT, RT, VW]``; ``src(ci, row_text, col_text)`` reads the input at
        the row / column offsets (in input positions) relative to the tile's first output."""
        cfg, sh = self.cfg, self.sh
        RT, VW = cfg.rows_tile, cfg.tile_width
        d = depth
        c.w(d, f"for c in T.unroll({CT}):")
        c.w(d + 1, f"for r in T.unroll({RT}):")
        c.w(d + 2, f"for v in T.vectorized({VW}):")
        c.w(d + 3, f"acc[c, r, v] = {self._zero()}")
        if sh.Cg > 1:
            c.w(d, f"for ci in range({sh.Cg}):")
            d += 1
        ci = "ci" if sh.Cg > 1 else "0"
        co = f"{co0} + c" if co0 != "0" else "c"
        cs, cd = sh.col.stride, sh.col.dil
        col = f"v * {cs} + kw * {cd}" if cs != 1 else f"v + kw * {cd}" if cd != 1 else "v + kw"
        kwl = f"T.unroll({sh.col.K})" if cfg.unroll_kw else f"range({sh.col.K})"
        wdt = self.op.tensor(self.g.weight.tensor).dtype
        if cfg.kh_block and sh.row.real:
            self._row_reuse(c, d, CT, src, ci, co, col, kwl, wdt)
            return
        # tap order: each weight broadcast feeds the CT x RT tile, each input vector the CT channels
        rs, rd = sh.row.stride, sh.row.dil
        khl = f"for kh in {f'T.unroll({sh.row.K})' if cfg.unroll_kh else f'range({sh.row.K})'}:"
        if cfg.kw_outer:          # per kw, consecutive kh read the tile's input rows shifted by one: each row
            c.w(d, f"for kw in {kwl}:")       # vector stays in a register while the kh loop slides past it
            c.w(d + 1, khl)
        else:
            c.w(d, khl)
            c.w(d + 1, f"for kw in {kwl}:")
        c.w(d + 2, f"for c in T.unroll({CT}):")
        c.w(d + 3, f"for r in T.unroll({RT}):")
        c.w(d + 4, f"for v in T.vectorized({VW}):")
        row = f"{_mul('r', rs)} + {_mul('kh', rd)}" if sh.row.real else "0"
        w = self._cast(self._weight_index(co, ci, "kh", "kw"), wdt)
        c.w(d + 5, f"acc[c, r, v] = acc[c, r, v] + {src(ci, row, col)} * {w}")

    def _row_reuse(self, c: Code, d: int, CT: int, src, ci: str, co: str, col: str, kwl: str, wdt) -> None:
        """Weight-stationary order: per block of kernel rows and per kw, every input row the tile reads is loaded
        once and fed to each output row (and channel) it contributes to."""
        RT = self.cfg.rows_tile
        VW = self.cfg.tile_width
        rs, rd = self.sh.row.stride, self.sh.row.dil
        for count, kb, first in self._kh_blocks():
            dd = d
            if count > 1:
                c.w(dd, f"for kh0 in range({count}):")
                dd += 1
                base = f"{first} + kh0 * {kb}" if first else f"kh0 * {kb}"
            else:
                base = str(first)
            c.w(dd, f"for kw in {kwl}:")
            c.w(dd + 1, f"for ir in T.unroll({(RT - 1) * rs + (kb - 1) * rd + 1}):")
            c.w(dd + 2, f"for c in T.unroll({CT}):")
            c.w(dd + 3, f"for r in T.unroll({RT}):")
            # ir = r*rs + (kh - base)*rd: the kernel row of (ir, r), relative to the block
            rel = f"ir - {_mul('r', rs)}"
            conds = [f"{rel} >= 0", f"{rel} < {(kb - 1) * rd + 1}"]
            kh_rel = f"({rel})"
            if rd != 1:
                conds.append(f"T.floormod({rel}, {rd}) == 0")
                kh_rel = f"T.floordiv({rel}, {rd})"
            kh = f"{base} + {kh_rel}" if base != "0" else kh_rel
            row = f"({base}) * {rd} + ir" if base != "0" else "ir"
            c.w(dd + 4, f"if {' and '.join(conds)}:")
            c.w(dd + 5, f"for v in T.vectorized({VW}):")
            w = self._cast(self._weight_index(co, ci, kh, "kw"), wdt)
            c.w(dd + 6, f"acc[c, r, v] = acc[c, r, v] + {src(ci, row, col)} * {w}")

    # the epilogue -------------------------------------------------------------------------------------------
    def _epilogue(self, c: Code, depth: int, CT: int, co0: str, oh_base: str, ow: str) -> None:
        """Store the register tile (epilogue applied); rows beyond OH and columns beyond OW are skipped."""
        cfg, sh, g = self.cfg, self.sh, self.g
        RT, VW = cfg.rows_tile, cfg.tile_width
        d = depth
        c.w(d, f"for c in T.unroll({CT}):")
        c.w(d + 1, f"for r in T.unroll({RT}):")
        d += 2
        if sh.row.real:
            c.w(d, f"oh: T.let = {oh_base} + r")
            c.w(d, "if oh < OH:")
            d += 1
        c.w(d, f"if {ow} + {VW} <= OW:")
        self._store(c, d + 1, co0, ow, VW, str(VW))
        c.w(d, "else:")
        self._store(c, d + 1, co0, ow, 1, f"OW - ({ow})")

    def _store(self, c: Code, depth: int, co0: str, ow: str, V: int, count: str) -> None:
        """Store ``count`` columns of row ``r`` of channel ``c`` of the tile: vectorized when ``V > 1``, else as
        scalar code (the partial last tile, whose epilogue must not read past the image)."""
        g, sh = self.g, self.sh
        sym = dict(self.sym)
        for a, _ in g.batch:
            sym[a] = f"i_{a.name}"
        if g.channels.out_axis is not None:
            sym[g.channels.out_axis] = f"({co0} + c)" if co0 != "0" else "c"
        if sh.row.real:
            sym[sh.row.out_axis] = "oh"
        sym[sh.col.out_axis] = f"({ow} + v)"
        ir = IndexRenderer(sym, self.idt)
        out_idx = ", ".join(ir(a) for a in g.axes)
        store_dt = tvm_dtype(self.out_t.dtype)
        if g.epilogue is None:
            val, lets, vlines = "acc[c, r, v]", [], []
            val_dt = self.acc_dt
        else:
            val, lets, vlines, val_dt = self._emit_epilogue(ir, V)
        if tvm_dtype(compute_dtype(val_dt)) != store_dt:
            val = f"T.Cast(\"{store_dt}\", {val})"
        if V > 1:
            for ln in lets:
                c.w(depth, ln)
            c.w(depth, f"for v in T.vectorized({V}):")
            for ln in vlines:
                c.w(depth + 1, ln)
            c.w(depth + 1, f"b_{g.out}[{out_idx}] = {val}")
        else:
            c.w(depth, f"for v in range({count}):")
            for ln in lets:
                c.w(depth + 1, ln)
            c.w(depth + 1, f"b_{g.out}[{out_idx}] = {val}")

    def _emit_epilogue(self, ir: IndexRenderer, V: int):
        g, op = self.g, self.op
        shapes = {t.name: t.shape for t in op.tensors}
        dtypes = {t.name: t.dtype for t in op.tensors}
        masked = set()
        for n in g.epilogue.walk():
            if n.op is ExprOp.LOAD and n.arg.pad is not None and any(
                    sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0 for lo, hi in n.arg.pad):
                masked.add(n.arg)
        red = g.reduce.out
        dtypes[red] = self.acc_dt

        def hook(acc: Access) -> LoadOverride | None:
            if acc.tensor == red:
                return LoadOverride("acc[c, r, v]", V > 1, True)
            return None

        em = ExprEmitter(buffers={t.name: f"b_{t.name}" for t in op.tensors}, shapes=shapes, dtypes=dtypes,
                         index=ir, masked=masked, fast_math=self.cfg.fast_math,
                         vector_axis=self.sh.col.out_axis if V > 1 else None, vector_len=V,
                         alloc=lambda dt, shape: self._buf("et", shape, dt), load_hook=hook)
        self._emissions += 1
        em._n = self._emissions * 1000          # distinct temporary names across the emissions of one kernel
        leaf = Scope("epilogue", None, tuple(g.axes), leaf=True)
        ref = em.emit(g.epilogue, leaf)
        return ref.text, leaf.lets, leaf.vlines, g.epilogue.dtype

    # direct variant -----------------------------------------------------------------------------------------
    def _direct(self, c: Code) -> None:
        cfg, sh, g = self.cfg, self.sh, self.g
        RT, VW = cfg.rows_tile, cfg.tile_width
        RH = _block_rows(cfg, sh)
        TW = cfg.block_width
        PR = _patch_extent(RH, sh.row) if sh.row.real else 1
        PC = _patch_extent(TW, sh.col)
        CT = min(cfg.co_tile, sh.Fg)
        cob_full, co_tail = divmod(sh.Fg, CT)
        COB = cob_full + (1 if co_tail else 0)
        data_dt = self.op.tensor(g.data.tensor).dtype
        pdt = self.adt
        c.w(1, f"OHB: T.let = T.floordiv(OH + {RH - 1}, {RH})")
        c.w(1, f"OWB: T.let = T.floordiv(OW + {TW - 1}, {TW})")
        c.w(1, f"for p in T.parallel(NB * {sh.G * COB} * OHB):")
        d = 2
        c.w(d, f"pb: T.let = T.floordiv(p, {sh.G * COB} * OHB)")
        self._batch_lets(c, d, "pb")
        c.w(d, f"grp: T.let = T.floormod(T.floordiv(p, {COB} * OHB), {sh.G})")
        c.w(d, f"cob: T.let = T.floormod(T.floordiv(p, OHB), {COB})")
        c.w(d, f"oh0: T.let = T.floormod(p, OHB) * {RH}")
        c.w(d, f"co0: T.let = grp * {sh.Fg} + cob * {CT}")
        body_start = len(c.lines)
        c.w(d, f"for owb in range(OWB):")
        d += 1
        c.w(d, f"ow0: T.let = owb * {TW}")
        # stage the patch: only the rows and columns the block's tiles read (a small image or the last block
        # reads less than the static patch; staging all of it zero-filled up to 16 KiB per channel for nothing)
        c.w(d, f"iw0: T.let = {_lin('ow0', sh.col.stride, sh.col.off)}")
        c.w(d, f"pcn: T.let = T.min({PC}, {self._read_extent('OW - ow0', VW, sh.col)})")
        c.w(d, "jlo: T.let = T.min(pcn, T.max(0, 0 - iw0))")
        c.w(d, f"jhi: T.let = T.max(jlo, T.min(pcn, {self.in_cols} - iw0))")
        ci_loop = sh.Cg > 1
        dd = d
        if ci_loop:
            c.w(dd, f"for ci in range({sh.Cg}):")
            dd += 1
        ci = "ci" if ci_loop else "0"
        chan = self._chan("grp", ci)
        if sh.row.real:
            c.w(dd, f"for i in range(T.min({PR}, {self._read_extent('OH - oh0', RT, sh.row)})):")
        else:
            c.w(dd, "for i in range(1):")
        dd += 1
        if sh.row.real:
            c.w(dd, f"ih: T.let = {_lin('oh0', sh.row.stride, sh.row.off)} + i")
            rok = f"ih >= 0 and ih < {self.in_rows}"
        else:
            rok = None
        row = "ih" if sh.row.real else "0"
        V = cfg.vector

        def xval(col: str) -> str:
            return self._cast(self._data_index(chan, row, col), data_dt)

        full = f"{rok} and jlo == 0 and jhi == {PC}" if rok else f"jlo == 0 and jhi == {PC}"
        dst = lambda j: f"P[{ci}, i, {j}]"  # noqa: E731
        c.w(dd, f"if {full}:")
        self._static_copy(c, dd + 1, PC, V, dst, lambda j: xval(f"iw0 + {j}"))
        c.w(dd, f"elif {rok + ' and ' if rok else ''}jhi > jlo:")
        # a border row: zeros left of the image, the image, zeros right of it
        self._range_copy(c, dd + 1, "0", "jlo", V, dst, lambda j: self._zero())
        self._range_copy(c, dd + 1, "jlo", "jhi", V, dst, lambda j: xval(f"iw0 + {j}"))
        self._range_copy(c, dd + 1, "jhi", "pcn", V, dst, lambda j: self._zero())
        c.w(dd, f"elif pcn == {PC}:")
        self._static_copy(c, dd + 1, PC, V, dst, lambda j: self._zero())
        c.w(dd, "else:")
        self._range_copy(c, dd + 1, "0", "pcn", V, dst, lambda j: self._zero())
        # register tiles
        c.w(d, f"for r0 in range({RH // RT}):")
        c.w(d + 1, f"for vb in range({TW // VW}):")
        d2 = d + 2
        c.w(d2, f"if oh0 + r0 * {RT} < OH and ow0 + vb * {VW} < OW:")
        d3 = d2 + 1

        def src(ci_: str, row_: str, col_: str) -> str:
            r = f"r0 * {RT * sh.row.stride} + {row_}" if sh.row.real else "0"
            return f"P[{ci_}, {r}, vb * {VW * sh.col.stride} + {col_}]"

        def tile(depth: int, CT_: int) -> None:
            self._microkernel(c, depth, CT_, src, "co0")
            self._epilogue(c, depth, CT_, "co0", f"oh0 + r0 * {RT}", f"ow0 + vb * {VW}")

        if co_tail:
            c.w(d3, f"if cob < {cob_full}:")
            tile(d3 + 1, CT)
            c.w(d3, "else:")
            tile(d3 + 1, co_tail)
        else:
            tile(d3, CT)
        # allocations at the top of the parallel body
        allocs = [scratch_buffer("P", f"({sh.Cg}, {PR}, {PC})", pdt),
                  scratch_buffer("acc", f"({CT}, {RT}, {VW})", self.adt)] + self.allocs
        c.lines[body_start:body_start] = ["    " * 2 + a for a in allocs]

    def _read_extent(self, left: str, tile: int, sp: StaticDim) -> str:
        """The input positions read along ``sp`` by the register tiles that start among the ``left`` outputs
        still to compute (whole tiles of ``tile`` outputs: the last one may run past the image)."""
        n_out = f"T.floordiv({left} + {tile - 1}, {tile}) * {tile}"
        return f"({n_out} - 1) * {sp.stride} + {(sp.K - 1) * sp.dil + 1}"

    def _static_copy(self, c: Code, depth: int, n: int, V: int, dst, val) -> None:
        """``dst(j) = val(j)`` for j in [0, n): vector chunks, then a static tail."""
        chunks, tail = divmod(n, V)
        if chunks:
            c.w(depth, f"for j0 in range({chunks}):")
            c.w(depth + 1, f"for v in T.vectorized({V}):")
            c.w(depth + 2, f"{dst(f'j0 * {V} + v')} = {val(f'j0 * {V} + v')}")
        if tail:
            c.w(depth, f"for j in range({tail}):")
            c.w(depth + 1, f"{dst(f'{chunks * V} + j')} = {val(f'{chunks * V} + j')}")

    def _range_copy(self, c: Code, depth: int, lo: str, hi: str, V: int, dst, val) -> None:
        """``dst(j) = val(j)`` for j in [lo, hi) (run-time bounds): vector chunks, then a scalar tail."""
        c.w(depth, f"for j0 in range(T.floordiv({hi} - {lo}, {V})):")
        c.w(depth + 1, f"for v in T.vectorized({V}):")
        c.w(depth + 2, f"{dst(f'{lo} + j0 * {V} + v')} = {val(f'{lo} + j0 * {V} + v')}")
        c.w(depth, f"for j in range(T.floormod({hi} - {lo}, {V})):")
        c.w(depth + 1, f"{dst(f'{hi} - 1 - j')} = {val(f'{hi} - 1 - j')}")


    def _padding_row(self, c: Code, d: int, rok: str, lo: int, xval) -> None:
        """One workspace row: zeros left of the input, its columns (vector chunks, a scalar tail), zeros right."""
        V, sh = self.cfg.vector, self.sh
        c.w(d, f"if {rok}jhi > {lo}:")
        e = d + 1
        if lo:
            c.w(e, f"for j in range({lo}):")
            c.w(e + 1, f"Xp[pb, cin, hp, j] = {self._zero()}")
        c.w(e, f"for j0 in range(T.floordiv(jhi - {lo}, {V})):")
        c.w(e + 1, f"for v in T.vectorized({V}):")
        c.w(e + 2, f"Xp[pb, cin, hp, {lo} + j0 * {V} + v] = {xval(f'{lo} + j0 * {V} + v + {sh.col.off}')}")
        c.w(e, f"for j in range(T.floormod(jhi - {lo}, {V})):")
        c.w(e + 1, f"Xp[pb, cin, hp, jhi - 1 - j] = {xval(f'jhi - 1 - j + {sh.col.off}')}")
        c.w(e, "for j in range(Wp - jhi):")
        c.w(e + 1, f"Xp[pb, cin, hp, jhi + j] = {self._zero()}")
        c.w(d, "else:")
        c.w(d + 1, "for j in range(Wp):")
        c.w(d + 2, f"Xp[pb, cin, hp, j] = {self._zero()}")

    def _phase_padding(self, c: Code, d: int, cs: int, rok: str, lo: int, xval) -> None:
        """One workspace row as its ``cs`` column phases: ``Xp[.., ph, q]`` = padded column ``q*cs + ph``."""
        c.w(d, f"for ph in range({cs}):")
        c.w(d + 1, "for wq in range(Wq):")
        c.w(d + 2, f"j: T.let = wq * {cs} + ph")
        c.w(d + 2, f"Xp[pb, cin, hp, ph, wq] = T.if_then_else({rok}j >= {lo} and j < jhi, "
                   f"{xval(f'j + {self.sh.col.off}')}, {self._zero()})")

    # gemm variant -------------------------------------------------------------------------------------------
    def _gemm(self, c: Code) -> None:
        cfg, sh, g = self.cfg, self.sh, self.g
        RT, VW, V = cfg.rows_tile, cfg.tile_width, cfg.vector
        CT = min(cfg.co_tile, sh.Fg)
        cob_full, co_tail = divmod(sh.Fg, CT)
        data_dt = self.op.tensor(g.data.tensor).dtype
        Cin = sh.G * sh.Cg
        c.w(1, f"OHB: T.let = T.floordiv(OH + {RT - 1}, {RT})")
        c.w(1, f"OWB: T.let = T.floordiv(OW + {VW - 1}, {VW})")
        if sh.row.real:
            c.w(1, f"Hp: T.let = (OHB * {RT} - 1) * {sh.row.stride} + {(sh.row.K - 1) * sh.row.dil + 1}")
        else:
            c.w(1, "Hp: T.let = 1")
        c.w(1, f"Wp: T.let = (OWB * {VW} - 1) * {sh.col.stride} + {(sh.col.K - 1) * sh.col.dil + 1}")
        cs = sh.col.stride
        if cs > 1:
            # strided columns: the workspace holds each row as its cs column phases, Xp[.., w % cs, w // cs], so
            # that a tile's input vector (columns ow*cs + kw*dil for consecutive ow) is one contiguous load
            c.w(1, f"Wq: T.let = T.floordiv(Wp + {cs - 1}, {cs})")
            c.w(1, f"Xp = T.alloc_buffer((NB, {Cin}, Hp, {cs}, Wq), \"{self.adt}\")")
        else:
            c.w(1, f"Xp = T.alloc_buffer((NB, {Cin}, Hp, Wp), \"{self.adt}\")")
        # padding pass
        c.w(1, f"for q in T.parallel(NB * {Cin} * Hp):")
        d = 2
        c.w(d, f"pb: T.let = T.floordiv(q, {Cin} * Hp)")
        self._batch_lets(c, d, "pb")
        c.w(d, f"cin: T.let = T.floormod(T.floordiv(q, Hp), {Cin})")
        c.w(d, "hp: T.let = T.floormod(q, Hp)")
        lo = max(0, -sh.col.off)
        c.w(d, f"jhi: T.let = T.min(Wp, {self.in_cols} - {sh.col.off})")
        row = "ih" if sh.row.real else "0"
        if sh.row.real:
            c.w(d, f"ih: T.let = hp + {sh.row.off}")
            rok = f"ih >= 0 and ih < {self.in_rows} and "
        else:
            rok = ""

        def xval(col: str) -> str:
            return self._cast(self._data_index("cin" if g.channels.data_dim is not None else "0", row, col),
                              data_dt)

        if cs > 1:
            self._phase_padding(c, d, cs, rok, lo, xval)
        else:
            self._padding_row(c, d, rok, lo, xval)
        # compute
        c.w(1, "for p in T.parallel(NB * OHB):")
        d = 2
        c.w(d, "pb: T.let = T.floordiv(p, OHB)")
        self._batch_lets(c, d, "pb")
        c.w(d, f"oh0: T.let = T.floormod(p, OHB) * {RT}")
        body_start = len(c.lines)
        c.w(d, "for owb in range(OWB):")
        c.w(d + 1, f"ow0: T.let = owb * {VW}")
        c.w(d + 1, f"for grp in range({sh.G}):")
        d2 = d + 2

        def src(ci_: str, row_: str, col_: str) -> str:
            chan = f"grp * {sh.Cg} + {ci_}" if sh.Cg > 1 else "grp"
            r = f"oh0 * {sh.row.stride} + {row_}"
            if cs > 1:
                assert col_ == f"v * {cs} + kw * {sh.col.dil}", col_      # the microkernel's column offset
                tap = f"kw * {sh.col.dil}" if sh.col.dil != 1 else "kw"
                return f"Xp[pb, {chan}, {r}, T.floormod({tap}, {cs}), ow0 + v + T.floordiv({tap}, {cs})]"
            return f"Xp[pb, {chan}, {r}, ow0 * {cs} + {col_}]"

        if cob_full:
            c.w(d2, f"for cob in range({cob_full}):")
            c.w(d2 + 1, f"co0: T.let = grp * {sh.Fg} + cob * {CT}")
            self._microkernel(c, d2 + 1, CT, src, "co0")
            self._epilogue(c, d2 + 1, CT, "co0", "oh0", "ow0")
        if co_tail:
            c.w(d2, f"co0: T.let = grp * {sh.Fg} + {cob_full * CT}")
            self._microkernel(c, d2, co_tail, src, "co0")
            self._epilogue(c, d2, co_tail, "co0", "oh0", "ow0")
        allocs = [scratch_buffer("acc", f"({CT}, {RT}, {VW})", self.adt)] + self.allocs
        c.lines[body_start:body_start] = ["    " * 2 + a for a in allocs]


# ------------------------------------------------------------------------------------------------- running


@functools.lru_cache(maxsize=512)
def window_group(op) -> WindowGroup | None:
    """``fuse_window(op)``, cached per op."""
    return fuse_window(op)


def _index_bits(binding) -> int:
    """32-bit indices unless a tensor (or the padded workspace, up to ~2x the input) may pass 2**31 elements."""
    biggest = max((math.prod(s) for s in binding.shapes.values()), default=1)
    return 64 if 2 * biggest > _INT32_LIMIT else 32


_SOURCES: dict = {}


def window_source(group: WindowGroup, binding, config: WindowConfig | Mapping | None = None,
                  caps=None) -> WindowSource:
    """The kernel source a call with these sizes uses (``config`` legalized, or the default), cached per
    (group, sizes, config)."""
    cfg = as_window_config(config)
    key = (group, tuple(sorted((d.name, int(v)) for d, v in binding.dims.items())), cfg,
           getattr(caps, "vector_bits", None))
    hit = _SOURCES.get(key)
    if hit is not None:
        return hit
    if cfg is None:
        cfg = default_window_config(group, binding, caps)
    else:
        cfg = legalize_window_config(cfg, group, binding)
    if cfg.variant == "fft":
        raise ValueError(f"op {group.op.name}: the fft variant has no TVM kernel (it runs torch.fft; see "
                         "opgen.targets.spectral)")
    src = render_window(group, cfg, binding=binding, index_bits=_index_bits(binding))
    if len(_SOURCES) > 4096:
        _SOURCES.clear()
    _SOURCES[key] = src
    return src


def window_kernel(group: WindowGroup, binding, config: WindowConfig | Mapping | None = None, cache=None,
                  caps=None):
    """(compiled function, its :class:`WindowSource`) for a call with these sizes; ``cache`` is a
    :class:`~opgen.targets.tvm.compile.KernelCache` (a process-wide in-memory one when None)."""
    src = window_source(group, binding, config, caps)
    return (cache if cache is not None else _default_cache()).get(src.text), src


@functools.lru_cache(maxsize=1)
def _default_cache():
    from .compile import KernelCache

    return KernelCache(None)


def run_window(group: WindowGroup, inputs: Mapping, binding, config: WindowConfig | Mapping | None = None,
               cache=None) -> dict:
    """Run the window kernel: ``{output name: fresh tensor}``. Inputs are made contiguous and converted to their
    declared dtypes; ``cache`` is a :class:`~opgen.targets.tvm.compile.KernelCache` (a process-wide in-memory
    one when None)."""
    from opgen.ir.dtypes import to_torch
    from opgen.targets.memory import empty

    fn, src = window_kernel(group, binding, config, cache)
    args = []
    outs = {}
    for name in src.tensors:
        t = group.op.tensor(name)
        dtype = to_torch(t.dtype)
        if t.kind == "output":
            x = empty(binding.shapes[name], dtype=dtype)
            outs[name] = x
        else:
            if name not in inputs:
                raise ValueError(f"op {group.op.name}: missing input {name!r}")
            x = inputs[name]
            if x.device.type != "cpu":
                raise ValueError(f"op {group.op.name}: the tvm target runs on CPU tensors; input {name!r} is on "
                                 f"{x.device}")
            if x.dtype != dtype:
                x = x.to(dtype)
            if not x.is_contiguous():
                x = x.contiguous()
        args.append(x)
    args += [binding.dims[d] for d in src.scalars]
    fn(*args)
    return outs
