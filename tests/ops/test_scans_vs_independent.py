"""Scan ops (linear_scan, selective_scan, chunk_gla) against independent torch loops.

Every expected value here is computed by a plain float64 python loop written in this
file from the documented recurrences; nothing from opgen is used to build it.
Each test draws a fresh random seed and prints it in the failure message.
"""

import random

import pytest
import torch
import torch.nn.functional as F

import opgen.ops as ops


# --------------------------------------------------------------------------- helpers


def _id(v):
    """Readable test ids: dtypes by name, tuples as AxBxC."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    return None


def _fresh_seed():
    return random.randrange(2**31)


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _rand(gen, *shape, lo=0.0, hi=1.0, dtype=torch.float64):
    x = torch.rand(*shape, generator=gen, dtype=torch.float64)
    return (lo + (hi - lo) * x).to(dtype)


def _tols(dtype, ref):
    """atol/rtol; fp32 atol grows with the magnitude of the expected values."""
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    if dtype == torch.float64:
        return dict(atol=1e-9 * scale, rtol=1e-9)
    if dtype == torch.float32:
        return dict(atol=1e-4 * scale, rtol=1e-4)
    return dict(atol=3e-2 * scale, rtol=3e-2)


def _check(got, ref, dtype, what, seed):
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got)} (seed={seed})"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)} (seed={seed})"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype} (seed={seed})"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed={seed})"
    torch.testing.assert_close(
        got.detach().to(torch.float64),
        ref.to(torch.float64),
        **_tols(dtype, ref),
        msg=lambda m: f"{what} mismatch (seed={seed}):\n{m}",
    )


# ------------------------------------------------------------- linear_scan reference


def ref_linear_scan(a, b, dim=-1, reverse=False, initial=None):
    """h[t] = a[t] * h[t-1] + b[t] along dim (float64 python loop)."""
    a64 = a.to(torch.float64).movedim(dim, -1)
    b64 = b.to(torch.float64).movedim(dim, -1)
    L = a64.shape[-1]
    if initial is None:
        h = torch.zeros(a64.shape[:-1], dtype=torch.float64)
    else:
        h = initial.to(torch.float64).clone()
    out = torch.empty_like(a64)
    order = range(L - 1, -1, -1) if reverse else range(L)
    for t in order:
        h = a64[..., t] * h + b64[..., t]
        out[..., t] = h
    return out.movedim(-1, dim)


F32, F64 = torch.float32, torch.float64

LINEAR_CASES = [
    # shape, dim, reverse, with_initial, dtype
    ((3, 5, 7), -1, False, False, F32),
    ((3, 5, 7), -1, True, True, F64),
    ((3, 5, 7), 0, False, True, F32),
    ((3, 5, 7), 0, True, False, F64),
    ((2, 13, 5), 1, False, True, F64),
    ((2, 13, 5), 1, True, True, F32),
    ((1, 1, 37), 2, True, True, F32),
    ((4, 1, 3), -2, False, True, F64),
    ((5, 3, 1), -1, True, True, F32),
]


@pytest.mark.parametrize("shape,dim,reverse,with_initial,dtype", LINEAR_CASES, ids=_id)
def test_linear_scan(shape, dim, reverse, with_initial, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    a = _rand(g, *shape, lo=-1.1, hi=1.1, dtype=dtype)
    b = _randn(g, *shape, dtype=dtype)
    init_shape = list(shape)
    del init_shape[dim]
    initial = _randn(g, *init_shape, dtype=dtype) if with_initial else None
    a_before, b_before = a.clone(), b.clone()
    ref = ref_linear_scan(a, b, dim=dim, reverse=reverse, initial=initial)
    if initial is None:
        got = ops.linear_scan(a, b, dim=dim, reverse=reverse)
    else:
        got = ops.linear_scan(a, b, dim=dim, reverse=reverse, initial=initial)
    _check(got, ref, dtype, f"linear_scan{shape} dim={dim} reverse={reverse} init={with_initial}", seed)
    assert torch.equal(a, a_before) and torch.equal(b, b_before), f"inputs modified in place (seed={seed})"


@pytest.mark.parametrize("reverse", [False, True], ids=_id)
def test_linear_scan_initial_none_equals_zeros(reverse):
    seed = _fresh_seed()
    g = _gen(seed)
    a = _rand(g, 2, 3, 13, lo=0.5, hi=1.0)
    b = _randn(g, 2, 3, 13)
    got_none = ops.linear_scan(a, b, reverse=reverse)
    got_zero = ops.linear_scan(a, b, reverse=reverse, initial=torch.zeros(2, 3, dtype=torch.float64))
    ref = ref_linear_scan(a, b, reverse=reverse)
    _check(got_none, ref, torch.float64, "linear_scan initial=None", seed)
    _check(got_zero, ref, torch.float64, "linear_scan initial=zeros", seed)


def test_linear_scan_long_decay_fp32_is_finite_and_accurate():
    """a ~ U(0.9, 1), L = 2048: prod(a) underflows fp32, a cumprod/divide scan would NaN."""
    seed = _fresh_seed()
    g = _gen(seed)
    L = 2048
    a = _rand(g, 3, L, lo=0.9, hi=1.0, dtype=torch.float32)
    b = _randn(g, 3, L, dtype=torch.float32)
    got = ops.linear_scan(a, b, dim=-1)
    assert not torch.isnan(got).any(), f"NaN in long linear_scan (seed={seed})"
    assert torch.isfinite(got).all(), f"inf in long linear_scan (seed={seed})"
    ref = ref_linear_scan(a, b, dim=-1)
    _check(got, ref, torch.float32, "linear_scan L=2048", seed)
    # reverse direction too
    got_r = ops.linear_scan(a, b, dim=-1, reverse=True)
    assert torch.isfinite(got_r).all(), f"non-finite reverse long linear_scan (seed={seed})"
    _check(got_r, ref_linear_scan(a, b, dim=-1, reverse=True), torch.float32, "linear_scan L=2048 reverse", seed)


# ---------------------------------------------------------- selective_scan reference


def ref_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba selective_scan_ref, written as an explicit float64 loop. Returns (out, last_state)."""
    u64 = u.to(torch.float64)
    dt = delta.to(torch.float64)
    A64 = A.to(torch.float64)
    B64 = B.to(torch.float64)
    C64 = C.to(torch.float64)
    batch, dim, L = u64.shape
    N = A64.shape[1]
    if delta_bias is not None:
        dt = dt + delta_bias.to(torch.float64)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    if B64.dim() == 4:  # [batch, G, N, L]: channel d uses group d // (dim // G)
        G = B64.shape[1]
        idx = torch.arange(dim) // (dim // G)
        B64 = B64[:, idx]  # [batch, dim, N, L]
    else:
        B64 = B64[:, None].expand(batch, dim, N, L)
    if C64.dim() == 4:
        G = C64.shape[1]
        idx = torch.arange(dim) // (dim // G)
        C64 = C64[:, idx]
    else:
        C64 = C64[:, None].expand(batch, dim, N, L)
    x = torch.zeros(batch, dim, N, dtype=torch.float64)
    y = torch.empty(batch, dim, L, dtype=torch.float64)
    for t in range(L):
        d_t = dt[:, :, t, None]  # [batch, dim, 1]
        x = torch.exp(d_t * A64) * x + d_t * B64[:, :, :, t] * u64[:, :, t, None]
        y[:, :, t] = (x * C64[:, :, :, t]).sum(-1)
    out = y
    if D is not None:
        out = out + u64 * D.to(torch.float64)[:, None]
    if z is not None:
        out = out * F.silu(z.to(torch.float64))
    return out, x


SEL_CASES = [
    # batch, dim, L, N, groups(None = variable B/C [b,N,L]), D, z, delta_bias, softplus, dtype
    (2, 3, 7, 5, None, False, False, False, False, F32),
    (2, 3, 7, 5, None, True, False, False, False, F64),
    (1, 5, 13, 3, None, True, True, False, False, F32),
    (2, 4, 37, 8, None, False, False, True, True, F64),
    (1, 1, 1, 1, None, True, True, True, True, F32),
    (3, 6, 9, 4, 2, True, False, True, True, F32),
    (2, 6, 5, 3, 3, False, True, False, True, F64),
    (1, 6, 13, 7, 1, True, True, True, False, F64),
    (2, 7, 33, 16, 7, True, True, True, True, F32),
    (2, 5, 1, 2, None, True, True, True, True, F64),
]


def _selective_inputs(g, batch, dim, L, N, groups, use_D, use_z, use_bias, softplus, dtype):
    u = _randn(g, batch, dim, L, dtype=dtype)
    if softplus:
        # raw delta, softplus(delta + bias) makes it positive
        delta = (0.5 * _randn(g, batch, dim, L)).to(dtype)
        delta_bias = (0.5 * _randn(g, dim)).to(dtype) if use_bias else None
    else:
        # no softplus: keep delta (+ bias) positive so exp(delta * A) <= 1
        delta = _rand(g, batch, dim, L, lo=0.05, hi=1.0, dtype=dtype)
        delta_bias = _rand(g, dim, lo=0.0, hi=0.5, dtype=dtype) if use_bias else None
    # mamba: A = -exp(A_log) (negative real)
    A = (-torch.exp(_randn(g, dim, N) * 0.5)).to(dtype)
    if groups is None:
        B = _randn(g, batch, N, L, dtype=dtype)
        C = _randn(g, batch, N, L, dtype=dtype)
    else:
        B = _randn(g, batch, groups, N, L, dtype=dtype)
        C = _randn(g, batch, groups, N, L, dtype=dtype)
    D = _randn(g, dim, dtype=dtype) if use_D else None
    z = _randn(g, batch, dim, L, dtype=dtype) if use_z else None
    return u, delta, A, B, C, D, z, delta_bias


@pytest.mark.parametrize("batch,dim,L,N,groups,use_D,use_z,use_bias,softplus,dtype", SEL_CASES, ids=_id)
def test_selective_scan(batch, dim, L, N, groups, use_D, use_z, use_bias, softplus, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    u, delta, A, B, C, D, z, delta_bias = _selective_inputs(
        g, batch, dim, L, N, groups, use_D, use_z, use_bias, softplus, dtype
    )
    ref_out, ref_last = ref_selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus)
    kwargs = {}
    if D is not None:
        kwargs["D"] = D
    if z is not None:
        kwargs["z"] = z
    if delta_bias is not None:
        kwargs["delta_bias"] = delta_bias
    if softplus:
        kwargs["delta_softplus"] = True
    what = f"selective_scan b={batch} d={dim} L={L} N={N} G={groups} D={use_D} z={use_z} bias={use_bias} sp={softplus}"
    out = ops.selective_scan(u, delta, A, B, C, **kwargs)
    _check(out, ref_out, dtype, what, seed)

    res = ops.selective_scan(u, delta, A, B, C, return_last_state=True, **kwargs)
    assert isinstance(res, tuple) and len(res) == 2, f"{what}: return_last_state must give (out, last_state)"
    out2, last = res
    _check(out2, ref_out, dtype, what + " [with last_state]", seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    _check(last, ref_last, state_dtype, what + " last_state", seed)


def test_selective_scan_bf16_dtypes():
    """Output follows u's dtype; last_state is float32 for bf16 inputs."""
    seed = _fresh_seed()
    g = _gen(seed)
    batch, dim, L, N = 2, 3, 13, 4
    u, delta, A, B, C, D, z, delta_bias = _selective_inputs(
        g, batch, dim, L, N, None, True, True, True, True, torch.bfloat16
    )
    out, last = ops.selective_scan(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True, return_last_state=True
    )
    ref_out, ref_last = ref_selective_scan(u, delta, A, B, C, D, z, delta_bias, True)
    assert out.dtype == torch.bfloat16, f"out dtype {out.dtype} (seed={seed})"
    assert last.dtype == torch.float32, f"last_state dtype {last.dtype} (seed={seed})"
    _check(out, ref_out, torch.bfloat16, "selective_scan bf16 out", seed)
    # last state is kept in fp32: it should be much closer than bf16 rounding of the output
    torch.testing.assert_close(
        last.to(torch.float64), ref_last, atol=1e-3 * max(1.0, float(ref_last.abs().max())), rtol=1e-3,
        msg=lambda m: f"bf16 last_state (seed={seed}):\n{m}",
    )


def test_selective_scan_grouped_equals_expanded_variable():
    """Grouped B/C must use group d // (dim // G): compare against the reference on expanded B/C
    and check the result is NOT the same as using the wrong group assignment d % G."""
    seed = _fresh_seed()
    g = _gen(seed)
    batch, dim, L, N, G = 1, 6, 11, 3, 3
    u = _randn(g, batch, dim, L)
    delta = _rand(g, batch, dim, L, lo=0.1, hi=1.0)
    A = -torch.exp(_randn(g, dim, N) * 0.5)
    B = _randn(g, batch, G, N, L)
    C = _randn(g, batch, G, N, L)
    got = ops.selective_scan(u, delta, A, B, C)
    # independent: run each channel separately with its own [batch, N, L] B/C
    per_ch = []
    for d in range(dim):
        grp = d // (dim // G)
        o, _ = ref_selective_scan(u[:, d : d + 1], delta[:, d : d + 1], A[d : d + 1], B[:, grp], C[:, grp])
        per_ch.append(o)
    ref = torch.cat(per_ch, dim=1)
    _check(got, ref, torch.float64, "selective_scan grouped per-channel", seed)
    # the wrong (interleaved, d % G) assignment gives a clearly different answer: the test discriminates
    wrong = torch.cat(
        [ref_selective_scan(u[:, d : d + 1], delta[:, d : d + 1], A[d : d + 1], B[:, d % G], C[:, d % G])[0]
         for d in range(dim)],
        dim=1,
    )
    assert not torch.allclose(wrong, ref, atol=1e-3), f"degenerate grouped test (seed={seed})"


# -------------------------------------------------------------- chunk_gla reference


def ref_gla(q, k, v, g, scale=None, initial_state=None):
    """Gated linear attention recurrence in float64. Returns (o, final_state)."""
    q64, k64, v64, g64 = (x.to(torch.float64) for x in (q, k, v, g))
    Bsz, T, H, K = q64.shape
    V = v64.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if initial_state is None:
        S = torch.zeros(Bsz, H, K, V, dtype=torch.float64)
    else:
        S = initial_state.to(torch.float64).clone()
    o = torch.empty(Bsz, T, H, V, dtype=torch.float64)
    for t in range(T):
        S = torch.exp(g64[:, t])[..., :, None] * S + k64[:, t][..., :, None] * v64[:, t][..., None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q64[:, t] * scale, S)
    return o, S


GLA_CASES = [
    # B, T, H, K, V, scale, with_initial, dtype
    (1, 1, 1, 8, 8, None, False, F32),
    (2, 7, 3, 5, 7, None, False, F64),
    (1, 13, 2, 16, 8, 0.3, True, F32),
    (2, 37, 1, 8, 5, None, True, F64),
    (1, 70, 2, 8, 16, None, True, F32),
    (3, 5, 2, 1, 1, 1.0, True, F64),
    (1, 130, 1, 13, 3, None, False, F32),
    (1, 130, 2, 5, 3, None, True, F64),
]


def _gla_inputs(gen, B, T, H, K, V, with_initial, dtype):
    q = _randn(gen, B, T, H, K, dtype=dtype)
    k = _randn(gen, B, T, H, K, dtype=dtype)
    v = _randn(gen, B, T, H, V, dtype=dtype)
    g = F.logsigmoid(_randn(gen, B, T, H, K)).to(dtype)
    h0 = _randn(gen, B, H, K, V, dtype=dtype) if with_initial else None
    return q, k, v, g, h0


@pytest.mark.parametrize("B,T,H,K,V,scale,with_initial,dtype", GLA_CASES, ids=_id)
def test_chunk_gla(B, T, H, K, V, scale, with_initial, dtype):
    seed = _fresh_seed()
    gen = _gen(seed)
    q, k, v, g, h0 = _gla_inputs(gen, B, T, H, K, V, with_initial, dtype)
    ref_o, ref_S = ref_gla(q, k, v, g, scale=scale, initial_state=h0)
    what = f"chunk_gla B={B} T={T} H={H} K={K} V={V} scale={scale} init={with_initial}"
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    res = ops.chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True)
    assert isinstance(res, tuple) and len(res) == 2, f"{what}: must return (o, final_state)"
    o, S = res
    _check(o, ref_o, dtype, what + " o", seed)
    _check(S, ref_S, state_dtype, what + " final_state", seed)

    res2 = ops.chunk_gla(q, k, v, g, scale=scale, initial_state=h0)
    assert isinstance(res2, tuple) and len(res2) == 2, f"{what}: must return a 2-tuple"
    assert res2[1] is None, f"{what}: final_state must be None when output_final_state=False"
    _check(res2[0], ref_o, dtype, what + " o (no final state)", seed)


def test_chunk_gla_closed_form_two_steps():
    """T=2 closed form: o_1 = s*q_1 . (e^{g_1} * (e^{g_0} S0 + k_0 v_0^T) + k_1 v_1^T)."""
    seed = _fresh_seed()
    gen = _gen(seed)
    q, k, v, g, h0 = _gla_inputs(gen, 1, 2, 1, 3, 2, True, torch.float64)
    s = 3 ** -0.5
    S0 = h0[0, 0]
    S1 = torch.exp(g[0, 0, 0])[:, None] * S0 + torch.outer(k[0, 0, 0], v[0, 0, 0])
    S2 = torch.exp(g[0, 1, 0])[:, None] * S1 + torch.outer(k[0, 1, 0], v[0, 1, 0])
    exp_o = torch.stack([s * q[0, 0, 0] @ S1, s * q[0, 1, 0] @ S2])
    o, S = ops.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    _check(o[0, :, 0], exp_o, torch.float64, "chunk_gla closed form o", seed)
    _check(S[0, 0], S2, torch.float64, "chunk_gla closed form state", seed)


def test_chunk_gla_strong_decay_is_finite():
    """Very negative gates over a long sequence (cumulative log-decay ~ -1e3) must not overflow."""
    seed = _fresh_seed()
    gen = _gen(seed)
    B, T, H, K, V = 1, 150, 2, 8, 8
    q, k, v, _, _ = _gla_inputs(gen, B, T, H, K, V, False, torch.float32)
    g = (-_rand(gen, B, T, H, K, lo=2.0, hi=10.0)).to(torch.float32)
    o, S = ops.chunk_gla(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all(), f"non-finite with strong decay (seed={seed})"
    ref_o, ref_S = ref_gla(q, k, v, g)
    _check(o, ref_o, torch.float32, "chunk_gla strong decay o", seed)
    _check(S, ref_S, torch.float32, "chunk_gla strong decay state", seed)
