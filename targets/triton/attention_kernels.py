"""The Triton attention kernels as source text (the templates :func:`opgen.targets.triton.attention.render` fills
in): forward, split-key decode and its combine step, and the backward (preprocess, dk/dv, dq).

Plain text with ``__MARKERS__``, no imports: the module that renders them substitutes the score mod, the context
arguments and, in the backward, the score mod's derivative.
"""

SCORE_T = "s = _score_mod(qk, off_b, off_h, qi, kj, qi_ok, kj_ok__CTX__) * 1.4426950408889634\n"
SCORE_DSC_T = ("s, dsc = _score_bwd(qk, off_b, off_h, qi, kj, qi_ok, kj_ok__CTX__)\n"
               "s = s * 1.4426950408889634\n")
DSC_MASK_T = "dsc = tl.where(vis, dsc, 0.0)\n"
# captured tensors that get gradients: d loss / d modified score (p * (dp - delta)) times d score_mod / d capture,
# added atomically into each captured position (``__DCAPP__``: the gradient buffers' pointers and strides)
CAPGRAD_T = "_capture_grads(qk, off_b, off_h, qi, kj, qi_ok, kj_ok, p * (dp - delta[None, :])__CTX____DCAP__)\n"

# The kernels. ``__CTXP__``/``__CTX__`` become the context arguments (capture pointers, dims, capture strides);
# ``__SCORE_BWD*__`` / ``__DSC*__`` insert the score mod with its derivative in the backward when there is one.
KERNELS = '''
@triton.jit
def _fwd_block(q, m_i, l_i, acc, kt, partial, k_base, v_base, s_k_2, s_k_3, s_v_2, s_v_3,
               off_b, off_h, qi, qi_ok, offs_e, e_ok, offs_ev, ev_ok, LK, sm_scale__CTXP__,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax: returns the updated (row max in log2 units, row sum, acc)."""
    start_n = kt * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < LK
    k_t = tl.load(k_base + offs_n[None, :] * s_k_2 + offs_e[:, None] * s_k_3,
                  mask=n_ok[None, :] & e_ok[:, None], other=0.0)
    qk = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=tl.float32) * sm_scale
    kj = offs_n[None, :]
    kj_ok = n_ok[None, :]
    s = _score_mod(qk, off_b, off_h, qi, kj, qi_ok, kj_ok__CTX__) * 1.4426950408889634
    if (partial != 0) | (start_n + BLOCK_N > LK):
        s = tl.where(_visible(qk, off_b, off_h, qi, kj, qi_ok, kj_ok__CTX__), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * s_v_2 + offs_ev[None, :] * s_v_3,
                mask=n_ok[:, None] & ev_ok[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=tl.float32)
    return m_new, l_i, acc


@triton.jit
def _store_out(Out, Lse, m_i, l_i, acc, off_b, off_h, offs_m, m_ok, offs_ev, ev_ok,
               s_o_0, s_o_1, s_o_2, s_o_3, s_l_0, s_l_1, s_l_2):
    """out = acc / l (0 for a fully masked row) and lse = m + log(l) (natural log; -inf for a fully masked row)."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_base = Out + off_b.to(tl.int64) * s_o_0 + off_h.to(tl.int64) * s_o_1
    tl.store(o_base + offs_m[:, None] * s_o_2 + offs_ev[None, :] * s_o_3, o.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & ev_ok[None, :])
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(l_i > 0.0, (m_use + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + off_b.to(tl.int64) * s_l_0 + off_h.to(tl.int64) * s_l_1 + offs_m * s_l_2, lse, mask=m_ok)


@triton.jit
def attn_fwd(Q, K, V, Out, Lse, Cnt, Idx, Msk__CTXP__,
             HQ, LQ, LK, DE, DV, GQA,
             s_q_0, s_q_1, s_q_2, s_q_3, s_k_0, s_k_1, s_k_2, s_k_3, s_v_0, s_v_1, s_v_2, s_v_3,
             s_o_0, s_o_1, s_o_2, s_o_3, s_l_0, s_l_1, s_l_2,
             s_c_0, s_c_1, s_c_2, s_i_0, s_i_1, s_i_2, s_i_3, s_m_0, s_m_1, s_m_2, s_m_3,
             sm_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
             PRECISION: tl.constexpr):
    """Flash forward: grid (query tiles, B * HQ); the key tiles come from the row tile table."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    off_hk = off_h // GQA
    k_base = K + off_b.to(tl.int64) * s_k_0 + off_hk.to(tl.int64) * s_k_1
    v_base = V + off_b.to(tl.int64) * s_v_0 + off_hk.to(tl.int64) * s_v_1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    m_ok = offs_m < LQ
    e_ok = offs_e < DE
    ev_ok = offs_ev < DV
    q_base = Q + off_b.to(tl.int64) * s_q_0 + off_h.to(tl.int64) * s_q_1
    q = tl.load(q_base + offs_m[:, None] * s_q_2 + offs_e[None, :] * s_q_3, mask=m_ok[:, None] & e_ok[None, :],
                other=0.0)
    qi = offs_m[:, None]
    qi_ok = m_ok[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)
    cnt = tl.load(Cnt + off_b * s_c_0 + off_h * s_c_1 + pid_m * s_c_2)
    i_base = Idx + off_b * s_i_0 + off_h * s_i_1 + pid_m * s_i_2
    f_base = Msk + off_b * s_m_0 + off_h * s_m_1 + pid_m * s_m_2
    for n in range(0, cnt):
        kt = tl.load(i_base + n * s_i_3)
        partial = tl.load(f_base + n * s_m_3)
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, kt, partial, k_base, v_base, s_k_2, s_k_3, s_v_2, s_v_3,
                                   off_b, off_h, qi, qi_ok, offs_e, e_ok, offs_ev, ev_ok, LK, sm_scale__CTX__,
                                   BLOCK_N, PRECISION)
    _store_out(Out, Lse, m_i, l_i, acc, off_b, off_h, offs_m, m_ok, offs_ev, ev_ok,
               s_o_0, s_o_1, s_o_2, s_o_3, s_l_0, s_l_1, s_l_2)


@triton.jit
def attn_decode_split(Q, K, V, Pm, Pl, Pacc, Cnt, Idx, Msk__CTXP__,
                      HQ, LQ, LK, DE, DV, GQA, BH, SPLITS,
                      s_q_0, s_q_1, s_q_2, s_q_3, s_k_0, s_k_1, s_k_2, s_k_3, s_v_0, s_v_1, s_v_2, s_v_3,
                      s_c_0, s_c_1, s_c_2, s_i_0, s_i_1, s_i_2, s_i_3, s_m_0, s_m_1, s_m_2, s_m_3,
                      sm_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
                      PRECISION: tl.constexpr):
    """FlashDecoding, part 1: grid (splits, query tiles, B * HQ); split s walks its share of the listed key
    tiles and writes the partial (row max in log2 units, row sum, unnormalized acc) in fp32."""
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    off_hk = off_h // GQA
    k_base = K + off_b.to(tl.int64) * s_k_0 + off_hk.to(tl.int64) * s_k_1
    v_base = V + off_b.to(tl.int64) * s_v_0 + off_hk.to(tl.int64) * s_v_1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    m_ok = offs_m < LQ
    e_ok = offs_e < DE
    ev_ok = offs_ev < DV
    q_base = Q + off_b.to(tl.int64) * s_q_0 + off_h.to(tl.int64) * s_q_1
    q = tl.load(q_base + offs_m[:, None] * s_q_2 + offs_e[None, :] * s_q_3, mask=m_ok[:, None] & e_ok[None, :],
                other=0.0)
    qi = offs_m[:, None]
    qi_ok = m_ok[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)
    cnt = tl.load(Cnt + off_b * s_c_0 + off_h * s_c_1 + pid_m * s_c_2)
    i_base = Idx + off_b * s_i_0 + off_h * s_i_1 + pid_m * s_i_2
    f_base = Msk + off_b * s_m_0 + off_h * s_m_1 + pid_m * s_m_2
    per = tl.cdiv(cnt, SPLITS)
    lo = pid_s * per
    hi = tl.minimum(lo + per, cnt)
    for n in range(lo, hi):
        kt = tl.load(i_base + n * s_i_3)
        partial = tl.load(f_base + n * s_m_3)
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, kt, partial, k_base, v_base, s_k_2, s_k_3, s_v_2, s_v_3,
                                   off_b, off_h, qi, qi_ok, offs_e, e_ok, offs_ev, ev_ok, LK, sm_scale__CTX__,
                                   BLOCK_N, PRECISION)
    row = (pid_s * BH + pid_bh).to(tl.int64) * LQ + offs_m
    tl.store(Pm + row, m_i, mask=m_ok)
    tl.store(Pl + row, l_i, mask=m_ok)
    tl.store(Pacc + row[:, None] * DV + offs_ev[None, :], acc, mask=m_ok[:, None] & ev_ok[None, :])


@triton.jit
def attn_decode_combine(Pm, Pl, Pacc, Out, Lse, HQ, LQ, DV, BH, SPLITS,
                        s_o_0, s_o_1, s_o_2, s_o_3, s_l_0, s_l_1, s_l_2,
                        BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    """FlashDecoding, part 2: grid (query tiles, B * HQ); merges the partials of every split."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    m_ok = offs_m < LQ
    ev_ok = offs_ev < DV
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], tl.float32)
    for sp in range(0, SPLITS):
        row = (sp * BH + pid_bh).to(tl.int64) * LQ + offs_m
        m_s = tl.load(Pm + row, mask=m_ok, other=float("-inf"))
        l_s = tl.load(Pl + row, mask=m_ok, other=0.0)
        a_s = tl.load(Pacc + row[:, None] * DV + offs_ev[None, :], mask=m_ok[:, None] & ev_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(m_s - m_use)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    _store_out(Out, Lse, m_i, l_i, acc, off_b, off_h, offs_m, m_ok, offs_ev, ev_ok,
               s_o_0, s_o_1, s_o_2, s_o_3, s_l_0, s_l_1, s_l_2)


@triton.jit
def attn_bwd_preprocess(Out, DOut, Delta, HQ, LQ, DV,
                        s_o_0, s_o_1, s_o_2, s_o_3, s_do_0, s_do_1, s_do_2, s_do_3,
                        BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    """delta[b, h, i] = sum_ev dout * out (fp32, contiguous [B * HQ, L])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    ok = (offs_m < LQ)[:, None] & (offs_ev < DV)[None, :]
    o = tl.load(Out + off_b.to(tl.int64) * s_o_0 + off_h.to(tl.int64) * s_o_1 + offs_m[:, None] * s_o_2
                + offs_ev[None, :] * s_o_3, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + off_b.to(tl.int64) * s_do_0 + off_h.to(tl.int64) * s_do_1 + offs_m[:, None] * s_do_2
                 + offs_ev[None, :] * s_do_3, mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * LQ + offs_m, tl.sum(o * do, 1), mask=offs_m < LQ)


@triton.jit
def attn_bwd_dkdv(Q, K, V, DOut, Lse, Delta, DK, DVt, Cnt, Idx, Msk__CTXP____DCAPP__,
                  HQ, HKV, LQ, LK, DE, DV, GQA,
                  s_q_0, s_q_1, s_q_2, s_q_3, s_k_0, s_k_1, s_k_2, s_k_3, s_v_0, s_v_1, s_v_2, s_v_3,
                  s_do_0, s_do_1, s_do_2, s_do_3, s_l_0, s_l_1, s_l_2,
                  s_dk_0, s_dk_1, s_dk_2, s_dk_3, s_dv_0, s_dv_1, s_dv_2, s_dv_3,
                  s_c_0, s_c_1, s_c_2, s_i_0, s_i_1, s_i_2, s_i_3, s_m_0, s_m_1, s_m_2, s_m_3,
                  sm_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
                  PRECISION: tl.constexpr):
    """dk, dv of one key tile: grid (key tiles, B * HKV); walks the query tiles of the column tile table of
    each of the GQA query heads of this kv head (p recomputed from lse; no atomics)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HKV
    off_hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n_ok = offs_n < LK
    e_ok = offs_e < DE
    ev_ok = offs_ev < DV
    k = tl.load(K + off_b.to(tl.int64) * s_k_0 + off_hk.to(tl.int64) * s_k_1 + offs_n[:, None] * s_k_2
                + offs_e[None, :] * s_k_3, mask=n_ok[:, None] & e_ok[None, :], other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * s_v_0 + off_hk.to(tl.int64) * s_v_1 + offs_n[:, None] * s_v_2
                + offs_ev[None, :] * s_v_3, mask=n_ok[:, None] & ev_ok[None, :], other=0.0)
    kj = offs_n[:, None]
    kj_ok = n_ok[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], tl.float32)
    for g in range(0, GQA):
        off_h = off_hk * GQA + g
        q_base = Q + off_b.to(tl.int64) * s_q_0 + off_h.to(tl.int64) * s_q_1
        do_base = DOut + off_b.to(tl.int64) * s_do_0 + off_h.to(tl.int64) * s_do_1
        l_base = Lse + off_b.to(tl.int64) * s_l_0 + off_h.to(tl.int64) * s_l_1
        d_base = Delta + (off_b * HQ + off_h).to(tl.int64) * LQ
        cnt = tl.load(Cnt + off_b * s_c_0 + off_h * s_c_1 + pid_n * s_c_2)
        i_base = Idx + off_b * s_i_0 + off_h * s_i_1 + pid_n * s_i_2
        f_base = Msk + off_b * s_m_0 + off_h * s_m_1 + pid_n * s_m_2
        for t in range(0, cnt):
            mt = tl.load(i_base + t * s_i_3)
            partial = tl.load(f_base + t * s_m_3)
            offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < LQ
            q_t = tl.load(q_base + offs_m[None, :] * s_q_2 + offs_e[:, None] * s_q_3,
                          mask=m_ok[None, :] & e_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_do_2 + offs_ev[None, :] * s_do_3,
                         mask=m_ok[:, None] & ev_ok[None, :], other=0.0)
            # rows past the end get lse = +inf, hence p = 0; a fully masked row (lse = -inf) only has masked keys
            lse = tl.load(l_base + offs_m * s_l_2, mask=m_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            delta = tl.load(d_base + offs_m, mask=m_ok, other=0.0)
            qk = tl.dot(k, q_t, input_precision=PRECISION, out_dtype=tl.float32) * sm_scale
            qi = offs_m[None, :]
            qi_ok = m_ok[None, :]
__SCORE_BWD12__
            p = tl.exp2(s - lse2[None, :])
            if partial != 0:
                vis = _visible(qk, off_b, off_h, qi, kj, qi_ok, kj_ok__CTX__)
                p = tl.where(vis, p, 0.0)
__DSC_MASK16__
            dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=tl.float32)
            dp = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=tl.float32)
            ds = p * (dp - delta[None, :])__DSC_MUL__
__CAPGRAD12__
            dk = tl.dot(ds.to(q_t.dtype), tl.trans(q_t), dk, input_precision=PRECISION, out_dtype=tl.float32)
    dk = dk * sm_scale
    tl.store(DK + off_b.to(tl.int64) * s_dk_0 + off_hk.to(tl.int64) * s_dk_1 + offs_n[:, None] * s_dk_2
             + offs_e[None, :] * s_dk_3, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & e_ok[None, :])
    tl.store(DVt + off_b.to(tl.int64) * s_dv_0 + off_hk.to(tl.int64) * s_dv_1 + offs_n[:, None] * s_dv_2
             + offs_ev[None, :] * s_dv_3, dv.to(DVt.dtype.element_ty), mask=n_ok[:, None] & ev_ok[None, :])


@triton.jit
def attn_bwd_dq(Q, K, V, DOut, Lse, Delta, DQ, Cnt, Idx, Msk__CTXP__,
                HQ, LQ, LK, DE, DV, GQA,
                s_q_0, s_q_1, s_q_2, s_q_3, s_k_0, s_k_1, s_k_2, s_k_3, s_v_0, s_v_1, s_v_2, s_v_3,
                s_do_0, s_do_1, s_do_2, s_do_3, s_l_0, s_l_1, s_l_2, s_dq_0, s_dq_1, s_dq_2, s_dq_3,
                s_c_0, s_c_1, s_c_2, s_i_0, s_i_1, s_i_2, s_i_3, s_m_0, s_m_1, s_m_2, s_m_3,
                sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
                PRECISION: tl.constexpr):
    """dq of one query tile: grid (query tiles, B * HQ); walks the key tiles of the row tile table."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    off_hk = off_h // GQA
    k_base = K + off_b.to(tl.int64) * s_k_0 + off_hk.to(tl.int64) * s_k_1
    v_base = V + off_b.to(tl.int64) * s_v_0 + off_hk.to(tl.int64) * s_v_1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    m_ok = offs_m < LQ
    e_ok = offs_e < DE
    ev_ok = offs_ev < DV
    q = tl.load(Q + off_b.to(tl.int64) * s_q_0 + off_h.to(tl.int64) * s_q_1 + offs_m[:, None] * s_q_2
                + offs_e[None, :] * s_q_3, mask=m_ok[:, None] & e_ok[None, :], other=0.0)
    do = tl.load(DOut + off_b.to(tl.int64) * s_do_0 + off_h.to(tl.int64) * s_do_1 + offs_m[:, None] * s_do_2
                 + offs_ev[None, :] * s_do_3, mask=m_ok[:, None] & ev_ok[None, :], other=0.0)
    lse = tl.load(Lse + off_b.to(tl.int64) * s_l_0 + off_h.to(tl.int64) * s_l_1 + offs_m * s_l_2, mask=m_ok,
                  other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * LQ + offs_m, mask=m_ok, other=0.0)
    qi = offs_m[:, None]
    qi_ok = m_ok[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    cnt = tl.load(Cnt + off_b * s_c_0 + off_h * s_c_1 + pid_m * s_c_2)
    i_base = Idx + off_b * s_i_0 + off_h * s_i_1 + pid_m * s_i_2
    f_base = Msk + off_b * s_m_0 + off_h * s_m_1 + pid_m * s_m_2
    for n in range(0, cnt):
        kt = tl.load(i_base + n * s_i_3)
        partial = tl.load(f_base + n * s_m_3)
        start_n = kt * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK
        k_t = tl.load(k_base + offs_n[None, :] * s_k_2 + offs_e[:, None] * s_k_3,
                      mask=n_ok[None, :] & e_ok[:, None], other=0.0)
        v_t = tl.load(v_base + offs_n[None, :] * s_v_2 + offs_ev[:, None] * s_v_3,
                      mask=n_ok[None, :] & ev_ok[:, None], other=0.0)
        qk = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=tl.float32) * sm_scale
        kj = offs_n[None, :]
        kj_ok = n_ok[None, :]
__SCORE_BWD8__
        p = tl.exp2(s - lse2[:, None])
        if (partial != 0) | (start_n + BLOCK_N > LK):
            vis = _visible(qk, off_b, off_h, qi, kj, qi_ok, kj_ok__CTX__)
            p = tl.where(vis, p, 0.0)
__DSC_MASK12__
        dp = tl.dot(do, v_t, input_precision=PRECISION, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])__DSC_MUL__
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION, out_dtype=tl.float32)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * s_dq_0 + off_h.to(tl.int64) * s_dq_1 + offs_m[:, None] * s_dq_2
             + offs_e[None, :] * s_dq_3, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & e_ok[None, :])
'''
