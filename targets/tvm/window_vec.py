"""The window kernels vectorized along another axis than the output width (mixed into the renderer of
:mod:`opgen.targets.tvm.window`, whose helpers they use: ``_range_copy``, ``_data_index``, ``_weight_index``,
``_batch_lets``, ``_store``):

* ``cvec``: implicit GEMM vectorized along the output channels, for images too small to fill vectors along the width
  (7-28 px) and for weight gradients (whose taps are the N*OH*OW output pixels and whose output is the kernel);
* ``dot``: implicit GEMM vectorized along the flattened taps (stride-1 weight gradients; a tuning alternative).

Both stage the data in zero-padded planes and finish through a scratch of sums and one epilogue pass.
"""
from __future__ import annotations

from .expr import Code, scratch_buffer, tree_sum


class VectorKernels:
    """The ``cvec`` and ``dot`` renderers (methods of :class:`opgen.targets.tvm.window._Renderer`)."""

    def _fill_planes(self, c: Code, n_planes: str, Cin: int, V: int) -> None:
        """``Xf[(pb * Cin + cin) * PS + hp * Wp + wp]`` = the data at batch entry ``pb``, channel ``cin``, row
        ``hp + row offset`` and column ``wp + column offset`` (zero outside the data and for ``pb >= NB``), for the
        ``n_planes`` batch entries and ``HR`` rows of pitch ``Wp`` (lets the caller defines)."""
        sh, g = self.sh, self.g
        data_dt = self.op.tensor(g.data.tensor).dtype
        zero = self._zero()
        c.w(1, f"for q in T.parallel({n_planes} * {Cin} * HR):")
        d = 2
        c.w(d, f"pb: T.let = T.floordiv(q, {Cin} * HR)")
        c.w(d, f"cin: T.let = T.floormod(T.floordiv(q, HR), {Cin})")
        c.w(d, "hp: T.let = T.floormod(q, HR)")
        c.w(d, f"ih: T.let = hp + {sh.row.off}")
        c.w(d, f"base: T.let = (pb * {Cin} + cin) * PS + hp * Wp")
        c.w(d, f"jlo: T.let = T.min(Wp, T.max(0, {-sh.col.off}))")
        c.w(d, f"jhi: T.let = T.max(jlo, T.min(Wp, {self.in_cols} - {sh.col.off}))")
        dst = lambda j: f"Xf[base + {j}]"  # noqa: E731
        c.w(d, f"if pb < NB and ih >= 0 and ih < {self.in_rows}:")
        self._batch_lets(c, d + 1, "pb")
        xval = lambda j: self._cast(self._data_index("cin", "ih", f"{j} + {sh.col.off}"), data_dt)  # noqa: E731
        self._range_copy(c, d + 1, "0", "jlo", V, dst, lambda j: zero)
        self._range_copy(c, d + 1, "jlo", "jhi", V, dst, xval)
        self._range_copy(c, d + 1, "jhi", "Wp", V, dst, lambda j: zero)
        c.w(d, "else:")
        self._range_copy(c, d + 1, "0", "Wp", V, dst, lambda j: zero)

    def _scratch_epilogue(self, c: Code, sval) -> None:
        """The pass that applies the epilogue to the finished sums in the scratch ``S`` and stores the output:
        per (batch entry, output channel, output row), vectors along the row; ``sval(v)`` is the ``S`` element of
        column ``ow0 + v`` (lets ``pb``, ``co``, ``oh`` defined)."""
        sh, V = self.sh, self.cfg.vector
        GF = sh.G * sh.Fg
        c.w(1, f"for q in T.parallel(NB * {GF} * OH):")
        d = 2
        c.w(d, f"pb: T.let = T.floordiv(q, {GF} * OH)")
        self._batch_lets(c, d, "pb")
        c.w(d, f"co: T.let = T.floormod(T.floordiv(q, OH), {GF})")
        c.w(d, "oh: T.let = T.floormod(q, OH)")
        body_start = len(c.lines)
        self.allocs = []
        c.w(d, f"for owb in range(T.floordiv(OW + {V - 1}, {V})):")
        c.w(d + 1, f"ow0: T.let = owb * {V}")
        c.w(d + 1, "for c in T.unroll(1):")
        c.w(d + 2, "for r in T.unroll(1):")
        e = d + 3
        c.w(e, f"if ow0 + {V} <= OW:")
        c.w(e + 1, f"for v in T.vectorized({V}):")
        c.w(e + 2, f"acc[c, r, v] = {sval('v')}")
        self._store(c, e + 1, "co", "ow0", V, str(V))
        c.w(e, "else:")
        c.w(e + 1, "for v in range(OW - ow0):")
        c.w(e + 2, f"acc[c, r, v] = {sval('v')}")
        self._store(c, e + 1, "co", "ow0", 1, "OW - ow0")
        allocs = [scratch_buffer("acc", f"(1, 1, {V})", self.adt)] + self.allocs
        c.lines[body_start:body_start] = ["    " * d + a for a in allocs]

    # dot variant --------------------------------------------------------------------------------------------
    def _dot(self, c: Code) -> None:
        """Reduction-vectorized implicit GEMM for windows with many taps and few outputs (the weight gradient of a
        stride-1 convolution: taps = the N*OH*OW output pixels, outputs = the kernel taps). The data is copied into
        zero-padded planes of pitch ``Wp`` (the padded width the outputs read) and the weight into rows of the same
        pitch (zeros between the taps of one row and after the last), so that the taps of one output are ONE
        contiguous run of ``KR * Wp`` elements at offset ``oh*rs*Wp + ow*cs`` of its plane: each register tile of
        ``co_tile x batch_tile x rows_tile x cols`` outputs keeps one vector accumulator per output, fed by one weight
        vector per channel and one unaligned data vector per (batch entry, output), and sums its lanes at the end.
        Passes over blocks of input channels (``block_width`` reduction elements) keep their data planes in cache;
        the per-pass sums accumulate in a scratch ``S`` that the epilogue pass reads."""
        cfg, sh, g = self.cfg, self.sh, self.g
        V = cfg.vector
        CT = min(cfg.co_tile, sh.Fg)
        BT, RT, CW = cfg.batch_tile, cfg.rows_tile, cfg.width_vectors
        cob_full, co_tail = divmod(sh.Fg, CT)
        COB = cob_full + (1 if co_tail else 0)
        KR, KC = sh.row.K, sh.col.K
        rs, cs = sh.row.stride, sh.col.stride
        Cg, G = sh.Cg, sh.G
        Cin, GF = G * Cg, G * sh.Fg
        adt = self.adt
        wdt = self.op.tensor(g.weight.tensor).dtype
        zero = self._zero()
        c.w(1, f"OHB: T.let = T.floordiv(OH + {RT - 1}, {RT})")
        c.w(1, f"OWB: T.let = T.floordiv(OW + {CW - 1}, {CW})")
        c.w(1, f"NBB: T.let = T.floordiv(NB + {BT - 1}, {BT})")
        c.w(1, f"Wp: T.let = (OW - 1) * {cs} + {KC}")
        c.w(1, f"LQ: T.let = T.floordiv({KR} * Wp + {V - 1}, {V}) * {V}")
        # rows of a plane: what the last (partial) tile reads, whole rows
        c.w(1, f"HR: T.let = T.floordiv((OHB * {RT} - 1) * {rs} * Wp + (OWB * {CW} - 1) * {cs} + LQ + Wp - 1, Wp)")
        c.w(1, "PS: T.let = HR * Wp")
        c.w(1, f"CB: T.let = T.max(1, T.min({Cg}, T.floordiv({max(1, cfg.block_width)}, LQ)))")
        c.w(1, f"NCB: T.let = T.floordiv({Cg} + CB - 1, CB)")
        c.w(1, f"Xf = T.alloc_buffer((NBB * {BT * Cin} * PS,), \"{adt}\")")
        c.w(1, f"Wf = T.alloc_buffer(({GF * Cg} * LQ,), \"{adt}\")")
        c.w(1, f"S = T.alloc_buffer((NB * {GF} * OH * OW,), \"{adt}\")")
        self._fill_planes(c, f"NBB * {BT}", Cin, V)
        d = 2
        # the weight rows: tap row r at [r * Wp, r * Wp + KC), zeros elsewhere up to LQ
        c.w(1, f"for q in T.parallel({GF * Cg}):")
        c.w(d, f"wco: T.let = T.floordiv(q, {Cg})")
        c.w(d, f"wci: T.let = T.floormod(q, {Cg})")
        c.w(d, f"for r in range({KR}):")
        c.w(d + 1, "wrow: T.let = q * LQ + r * Wp")
        wdst = lambda j: f"Wf[wrow + {j}]"  # noqa: E731
        self._range_copy(c, d + 1, "0", str(KC), V, wdst,
                         lambda j: self._cast(self._weight_index("wco", "wci", "r", j), wdt))
        self._range_copy(c, d + 1, str(KC), "Wp", V, wdst, lambda j: zero)
        c.w(d, f"wend: T.let = q * LQ + {KR} * Wp")
        self._range_copy(c, d, "0", f"LQ - {KR} * Wp", V, lambda j: f"Wf[wend + {j}]", lambda j: zero)
        # compute: per output-channel tile, every pass, batch tile and output tile
        c.w(1, f"for p in T.parallel({G * COB}):")
        c.w(d, f"grp: T.let = T.floordiv(p, {COB})")
        c.w(d, f"cob: T.let = T.floormod(p, {COB})")
        c.w(d, f"co0: T.let = grp * {sh.Fg} + cob * {CT}")
        body_start = len(c.lines)
        c.w(d, "for cb in range(NCB):")
        c.w(d + 1, "for bb in range(NBB):")
        c.w(d + 2, "for r0 in range(OHB):")
        c.w(d + 3, "for c0 in range(OWB):")
        d4 = d + 4

        def tile(depth: int, CT_: int) -> None:
            e = depth
            loops = [("c", CT_), ("bt", BT), ("r", RT), ("j", CW)]
            for k, (nm, n) in enumerate(loops):
                c.w(e + k, f"for {nm} in T.unroll({n}):")
            c.w(e + 4, f"for v in T.vectorized({V}):")
            c.w(e + 5, f"dacc[c, bt, r, j, v] = {zero}")
            c.w(e, f"for ci in range(T.min(CB, {Cg} - cb * CB)):")
            c.w(e + 1, "cig: T.let = cb * CB + ci")
            c.w(e + 1, f"xb: T.let = (bb * {BT * Cin} + grp * {Cg} + cig) * PS + r0 * {RT * rs} * Wp + c0 * {CW * cs}")
            c.w(e + 1, f"wb: T.let = (co0 * {Cg} + cig) * LQ")
            c.w(e + 1, f"for qv in range(T.floordiv(LQ, {V})):")
            # channels innermost: one data vector live at a time, each feeding the tile's CT weight vectors
            for k, (nm, n) in enumerate(loops[1:] + loops[:1]):
                c.w(e + 2 + k, f"for {nm} in T.unroll({n}):")
            c.w(e + 6, f"for v in T.vectorized({V}):")
            xoff = f"xb + bt * {Cin} * PS + r * {rs} * Wp + j * {cs} + qv * {V} + v"
            c.w(e + 7, f"dacc[c, bt, r, j, v] = dacc[c, bt, r, j, v] + Wf[wb + c * {Cg} * LQ + qv * {V} + v] * "
                       f"Xf[{xoff}]")
            for k, (nm, n) in enumerate(loops):
                c.w(e + k, f"for {nm} in T.unroll({n}):")
            f = e + 4
            c.w(f, "ob: T.let = bb * " + str(BT) + " + bt")
            c.w(f, f"if ob < NB and r0 * {RT} + r < OH and c0 * {CW} + j < OW:")
            c.w(f + 1, f"si: T.let = ((ob * {GF} + co0 + c) * OH + r0 * {RT} + r) * OW + c0 * {CW} + j")
            total = tree_sum([f"dacc[c, bt, r, j, {v}]" for v in range(V)])
            c.w(f + 1, "if cb == 0:")
            c.w(f + 2, f"S[si] = {total}")
            c.w(f + 1, "else:")
            c.w(f + 2, f"S[si] = S[si] + {total}")

        _channel_tiles(c, d4, tile, CT, co_tail, cob_full)
        c.lines[body_start:body_start] = ["    " * d + scratch_buffer("dacc", f"({CT}, {BT}, {RT}, {CW}, {V})", adt)]
        self._scratch_epilogue(c, lambda v: f"S[((pb * {GF} + co) * OH + oh) * OW + ow0 + {v}]")

    # cvec variant -------------------------------------------------------------------------------------------
    def _cvec(self, c: Code) -> None:
        """Implicit GEMM vectorized along the output channels, for images too small to fill vectors along the
        width (7-28 px) and for weight gradients (taps = the output pixels): the weight is copied transposed,
        ``Wt[grp, ci, kh, kw, co]`` (output channels contiguous, padded to whole vectors), the data into
        zero-padded planes ``Xf`` of pitch ``Wp``; each register tile of ``co_tile`` channel vectors x
        ``rows_tile`` x ``width_vectors`` output pixels (``width_vectors`` counts pixels here) accumulates, per
        (input channel, tap), the tile's weight vectors times one broadcast data element per pixel. Passes over
        blocks of input channels (``block_width`` reduction elements per pass) keep the pass's weight slice in
        L2 while the batch loop runs; partial sums accumulate channel-last in the scratch ``S``, read by the
        epilogue pass. Any stride and dilation (the data elements are scalar loads)."""
        cfg, sh, g = self.cfg, self.sh, self.g
        V = cfg.vector
        RT, CW = cfg.rows_tile, cfg.width_vectors
        KR, KC = sh.row.K, sh.col.K
        rs, cs, rd, cd = sh.row.stride, sh.col.stride, sh.row.dil, sh.col.dil
        Cg, G, Fg = sh.Cg, sh.G, sh.Fg
        Cin = G * Cg
        NV = -(-Fg // V)                 # channel vectors per group
        FP = NV * V                      # padded channels per group
        CT = min(cfg.co_tile, NV)
        cob_full, co_tail = divmod(NV, CT)
        COB = cob_full + (1 if co_tail else 0)
        taps = KR * KC
        adt = self.adt
        wdt = self.op.tensor(g.weight.tensor).dtype
        zero = self._zero()
        c.w(1, f"OHB: T.let = T.floordiv(OH + {RT - 1}, {RT})")
        c.w(1, f"OWB: T.let = T.floordiv(OW + {CW - 1}, {CW})")
        c.w(1, f"Wp: T.let = (OWB * {CW} - 1) * {cs} + {(KC - 1) * cd + 1}")
        c.w(1, f"HR: T.let = (OHB * {RT} - 1) * {rs} + {(KR - 1) * rd + 1}")
        c.w(1, "PS: T.let = HR * Wp")
        cb_n = max(1, min(Cg, cfg.block_width // taps))
        ncb = -(-Cg // cb_n)
        c.w(1, f"Xf = T.alloc_buffer((NB * {Cin} * PS,), \"{adt}\")")
        c.w(1, f"Wt = T.alloc_buffer(({Cin * taps * FP},), \"{adt}\")")
        c.w(1, f"S = T.alloc_buffer((NB * OH * OW * {G * FP},), \"{adt}\")")
        self._fill_planes(c, "NB", Cin, V)
        d = 2
        # the transposed weight, per channel tile contiguous along the reduction (the tile's slice streams from L2):
        # Wt[tb(grp, cob) + (ci * taps + tap) * TWc + c * V + v], TWc = CT * V (co_tail * V for the last tile),
        # zeros for channels >= Fg. Per input channel, each output channel's taps are read in their order
        tile_w = CT * V
        c.w(1, f"for q in T.parallel({Cin}):")
        c.w(d, f"wg: T.let = T.floordiv(q, {Cg})")
        c.w(d, f"wci: T.let = T.floormod(q, {Cg})")
        c.w(d, f"for wcob in range({COB}):")
        c.w(d + 1, f"wtw: T.let = T.if_then_else(wcob < {cob_full}, {tile_w}, {co_tail * V})")
        c.w(d + 1, f"wbase: T.let = (wg * {NV * V} + wcob * {tile_w}) * {Cg * taps} + wci * {taps} * wtw")
        c.w(d + 1, f"nval: T.let = T.min(wtw, {Fg} - wcob * {tile_w})")
        c.w(d + 1, f"for wr in range({KR}):")
        c.w(d + 2, f"for wk in range({KC}):")
        c.w(d + 3, f"wrow: T.let = wbase + (wr * {KC} + wk) * wtw")
        wv = self._cast(self._weight_index(f"wg * {Fg} + wcob * {tile_w} + cc", "wci", "wr", "wk"), wdt)
        c.w(d + 3, "for cc in range(nval):")
        c.w(d + 4, f"Wt[wrow + cc] = {wv}")
        if FP > Fg:
            c.w(d + 3, "for cc in range(wtw - nval):")
            c.w(d + 4, f"Wt[wrow + nval + cc] = {zero}")
        # compute: per channel tile, each pass over an input-channel block, each batch entry and pixel tile
        c.w(1, f"for p in T.parallel({G * COB}):")
        c.w(d, f"grp: T.let = T.floordiv(p, {COB})")
        c.w(d, f"cob: T.let = T.floormod(p, {COB})")
        body_start = len(c.lines)
        c.w(d, f"for cb in range({ncb}):")
        c.w(d + 1, "for pb in range(NB):")
        c.w(d + 2, "for r0 in range(OHB):")
        c.w(d + 3, "for c0 in range(OWB):")
        d4 = d + 4
        kwl = f"T.unroll({KC})" if cfg.unroll_kw else f"range({KC})"
        khl = f"T.unroll({KR})" if cfg.unroll_kh else f"range({KR})"

        def tile(e: int, CT_: int) -> None:
            loops = [("r", RT), ("j", CW), ("c", CT_)]

            def nest(depth: int) -> int:
                for k, (nm, n) in enumerate(loops):
                    c.w(depth + k, f"for {nm} in T.unroll({n}):")
                c.w(depth + 3, f"for v in T.vectorized({V}):")
                return depth + 4

            sidx = (f"((pb * OH + r0 * {RT} + r) * OW + c0 * {CW} + j) * {G * FP} + grp * {FP} + "
                    f"(cob * {CT} + c) * {V} + v")
            c.w(nest(e), f"acc[r, j, c, v] = {zero}")
            c.w(e, f"for ci in range({min(cb_n, Cg)}):")
            c.w(e + 1, f"cig: T.let = cb * {cb_n} + ci")
            c.w(e + 1, f"if cig < {Cg}:")
            c.w(e + 2, f"xb: T.let = (pb * {Cin} + grp * {Cg} + cig) * PS + r0 * {RT * rs} * Wp + c0 * {CW * cs}")
            c.w(e + 2, f"wb: T.let = (grp * {NV * V} + cob * {tile_w}) * {Cg * taps} + cig * {taps * CT_ * V}")
            c.w(e + 2, f"for kh in {khl}:")
            c.w(e + 3, f"for kw in {kwl}:")
            f = nest(e + 4)
            c.w(f, f"acc[r, j, c, v] = acc[r, j, c, v] + Wt[wb + (kh * {KC} + kw) * {CT_ * V} + c * {V} + v] * "
                   f"Xf[xb + (r * {rs} + kh * {rd}) * Wp + j * {cs} + kw * {cd}]")
            for k, (nm, n) in enumerate(loops):
                c.w(e + k, f"for {nm} in T.unroll({n}):")
            c.w(e + 3, f"if r0 * {RT} + r < OH and c0 * {CW} + j < OW:")
            c.w(e + 4, "if cb == 0:")
            c.w(e + 5, f"for v in T.vectorized({V}):")
            c.w(e + 6, f"S[{sidx}] = acc[r, j, c, v]")
            c.w(e + 4, "else:")
            c.w(e + 5, f"for v in T.vectorized({V}):")
            c.w(e + 6, f"S[{sidx}] = S[{sidx}] + acc[r, j, c, v]")

        _channel_tiles(c, d4, tile, CT, co_tail, cob_full)
        c.lines[body_start:body_start] = ["    " * d + scratch_buffer("acc", f"({RT}, {CW}, {CT}, {V})", adt)]
        self._scratch_epilogue(c, lambda v: f"S[((pb * OH + oh) * OW + ow0 + {v}) * {G * FP} + T.floordiv(co, "
                                            f"{Fg}) * {FP} + T.floormod(co, {Fg})]")


def _channel_tiles(c, depth: int, tile, CT: int, co_tail: int, cob_full) -> None:
    """``tile(depth, width)`` for the full output-channel tiles, and for the last, narrower one when there is one."""
    if co_tail:
        c.w(depth, f"if cob < {cob_full}:")
        tile(depth + 1, CT)
        c.w(depth, "else:")
        tile(depth + 1, co_tail)
    else:
        tile(depth, CT)
