"""Scan ops declared only for the Triton backend's tests (shared by ``interp_check.py`` and the AOT tests).

They cover what the library ops do not: a reversed scalar-decay matrix scan with an epilogue (Mamba-2 / SSD
style), a reversed per-key-decay GLA with an initial state, a scan without lane axes, and index arithmetic on
negative values with a zero-padded read.
"""
from __future__ import annotations

from opgen.ir import DType, OpBuilder, exp, maximum, sigmoid, silu, tanh
from opgen.ir.symbols import dims, make_axes


def declare_ssd_like(reverse: bool = True):
    """A Mamba-2 / SSD style scan: scalar decay per (head, step), keys n, values p, a z-gated epilogue;
    reversed, so the chunked-matmul kernel's scalar-decay path, reversal and epilogue are all exercised."""
    Bt, T, H, N, P = dims("B T H N P")
    with OpBuilder("ssd_like") as bld:
        x = bld.input("x", (Bt, T, H, P), DType.f32)
        dt = bld.input("dt", (Bt, T, H), DType.f32)
        A = bld.input("A", (H,), DType.f32)
        Bm = bld.input("Bm", (Bt, T, N), DType.f32)
        Cm = bld.input("Cm", (Bt, T, N), DType.f32)
        z = bld.input("z", (Bt, T, H, P), DType.f32)
        b, t, h, n, p = make_axes("b t h n p")
        S = bld.scan(t, a=exp(dt[b, t, h] * A[h]), b=dt[b, t, h] * Bm[b, t, n] * x[b, t, h, p], state=(n, p),
                     axes=(b, h, n, p, t), name="S", reverse=reverse)
        y = bld.reduce(n, Cm[b, t, n] * S[b, h, n, p, t], axes=(b, t, h, p), name="y")
        out = bld.map(y[b, t, h, p] * silu(z[b, t, h, p]), (b, t, h, p), name="out")
        return bld.build({"out": out})


def declare_gla_reverse(dtype: DType = DType.f32):
    """Gated linear attention run backwards in time with an initial state (per-key decay, reversed chunks)."""
    Bt, T, H, K, V = dims("B T H K V")
    with OpBuilder("gla_reverse") as bld:
        q, k = bld.input("q", (Bt, T, H, K), dtype), bld.input("k", (Bt, T, H, K), dtype)
        v, g = bld.input("v", (Bt, T, H, V), dtype), bld.input("g", (Bt, T, H, K), dtype)
        s0 = bld.input("s0", (Bt, H, K, V), dtype)
        b, t, h, kk, vv = make_axes("b t h kk vv")
        S = bld.scan(t, a=exp(g[b, t, h, kk]), b=k[b, t, h, kk] * v[b, t, h, vv], init=s0[b, h, kk, vv],
                     state=(kk, vv), axes=(b, h, kk, vv, t), name="S", reverse=True)
        o = bld.reduce(kk, q[b, t, h, kk] * S[b, h, kk, vv, t], axes=(b, t, h, vv), name="o")
        first = bld.map(S[b, h, kk, vv, 0], (b, h, kk, vv), name="first")
        return bld.build({"o": o, "first": first})


def declare_lane_free():
    """One sequence with a vector state and a constant decay: no lane axes at all (the block is padding)."""
    L, N = dims("L N")
    with OpBuilder("lane_free") as bld:
        x = bld.input("x", (L, N), DType.f32)
        w = bld.input("w", (N,), DType.f32)
        t, n = make_axes("t n")
        h = bld.scan(t, a=0.9, b=x[t, n], axes=(t, n), state=(n,), name="h")
        y = bld.reduce(n, h[t, n] * w[n], axes=(t,), name="y")
        return bld.build({"y": y})


def declare_index_math():
    """Index arithmetic on possibly negative values (floor division and modulo must follow Python, not C),
    a zero-padded read, tanh/max/pow in the coefficients, the state stored every step and a final-state tail."""
    P, L, Q = dims("P L Q")
    with OpBuilder("index_math") as bld:
        x = bld.input("x", (P, L, Q), DType.f32)
        w = bld.input("w", (P, 3), DType.f32)
        p, t, q = make_axes("p t q")
        xv = x[p, t, q]
        h = bld.scan(t, a=sigmoid(w[p, (t - L) % 3]),
                     b=x.pad((0, 0), (6, 0), (0, 0))[p, (2 * t - L) // 3, q] + tanh(xv) * maximum(xv, -0.5) + xv ** 2,
                     axes=(p, t, q), name="h")
        last = bld.map(h[p, L - 1, q] * 2.0, (p, q), name="last")
        return bld.build({"h": h, "last": last})
