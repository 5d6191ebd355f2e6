"""Tensors with the negative bit (``torch._neg_view``) are read negated by every op and backend.

A neg view shares its storage with the un-negated tensor; a kernel that reads the data pointer sees the
un-negated values unless the view is resolved first. Each op is checked with a neg-view input against the same
op on a materialized negated tensor and against an independent float64 torch formulation written here.
Fresh random data per run (the seed is in the failure message); fp32, tolerances 1e-4 relative to the scale.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import opgen
import opgen.ops as ops


def _gen() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, seed: int, tol: float = 1e-4) -> None:
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got.double(), ref.double(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what} (seed={seed}): {m}")


def _neg(x: torch.Tensor) -> torch.Tensor:
    """``-x`` as a neg view of a materialized ``x`` (same storage, negative bit set)."""
    v = torch._neg_view(x)
    assert v.is_neg()
    return v


# ----------------------------------------------------------------------- independent float64 references

def _ref_linear_scan(a, b):
    a, b = a.double(), b.double()
    h, out = torch.zeros_like(b[..., 0]), []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append(h)
    return torch.stack(out, -1)


def _ref_selective_scan(u, delta, A, B, C, D):
    u, delta, A, B, C, D = (x.double() for x in (u, delta, A, B, C, D))
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, 2) + D[:, None] * u


def _ref_chunk_gla(q, k, v, g, scale):
    q, k, v, g = (x.double() for x in (q, k, v, g))
    s = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, s))
    return torch.stack(outs, 1)


def _ref_causal_conv1d(x, w, bias):
    y = F.conv1d(x.double(), w.double()[:, None, :], bias.double(), padding=w.shape[1] - 1, groups=x.shape[1])
    return y[..., : x.shape[2]]


def _ref_long_conv(u, k):
    u, k = u.double(), k.double()
    y = torch.zeros_like(u)
    for j in range(k.shape[1]):
        y[..., j:] += k[:, j, None] * u[..., : u.shape[2] - j]
    return y


# ---------------------------------------------------------------------------------------------- tests

def test_linear_scan_neg_view():
    g, seed = _gen()
    a, b = torch.rand(3, 5, 37, generator=g) * 0.9, _randn(g, 3, 5, 37)
    ref = _ref_linear_scan(a, -b)
    _close(ops.linear_scan(a, _neg(b)), ref, "b neg view", seed)
    _close(ops.linear_scan(a, -b), ref, "b materialized", seed)
    _close(ops.linear_scan(_neg(-a), b), _ref_linear_scan(a, b), "a neg view", seed)


def test_linear_scan_neg_view_backward():
    g, seed = _gen()
    a, b, gh = torch.rand(2, 21, generator=g) * 0.9, _randn(g, 2, 21), _randn(g, 2, 21)
    grads = []
    for bb in (_neg(b.clone()), -b):
        aa = a.clone().requires_grad_()
        bb = bb.detach().requires_grad_()
        ops.linear_scan(aa, bb).backward(_neg(-gh) if len(grads) == 0 else gh)
        grads.append((aa.grad, bb.grad))
    a64, b64 = a.double().requires_grad_(), (-b).double().requires_grad_()
    _ref_linear_scan(a64, b64).backward(gh.double())
    for (ga, gb), what in zip(grads, ("neg views", "materialized")):
        _close(ga, a64.grad, f"grad a ({what})", seed)
        _close(gb, b64.grad, f"grad b ({what})", seed)


def test_selective_scan_neg_view():
    g, seed = _gen()
    u, delta = _randn(g, 2, 6, 19), torch.rand(2, 6, 19, generator=g) * 0.5
    A, B, C, D = -torch.rand(6, 5, generator=g), _randn(g, 2, 5, 19), _randn(g, 2, 5, 19), _randn(g, 6)
    ref = _ref_selective_scan(-u, delta, A, B, -C, D)
    _close(ops.selective_scan(_neg(u), delta, A, B, _neg(C), D), ref, "u, C neg views", seed)
    _close(ops.selective_scan(-u, delta, A, B, -C, D), ref, "materialized", seed)
    ref = _ref_selective_scan(u, delta, A, B, C, D)
    _close(ops.selective_scan(u, delta, _neg(-A), B, C, D), ref, "A neg view", seed)


def test_chunk_gla_neg_view():
    g, seed = _gen()
    q, k, v = _randn(g, 1, 13, 2, 6), _randn(g, 1, 13, 2, 6), _randn(g, 1, 13, 2, 5)
    gate = F.logsigmoid(_randn(g, 1, 13, 2, 6))
    ref = _ref_chunk_gla(q, -k, v, gate, 6 ** -0.5)
    _close(ops.chunk_gla(q, _neg(k), v, gate)[0], ref, "k neg view", seed)
    _close(ops.chunk_gla(q, -k, v, gate)[0], ref, "materialized", seed)
    _close(ops.chunk_gla(q, k, v, _neg(-gate))[0], _ref_chunk_gla(q, k, v, gate, 6 ** -0.5), "g neg view", seed)


def test_causal_conv1d_neg_view():
    g, seed = _gen()
    x, w, bias = _randn(g, 2, 5, 19), _randn(g, 5, 4), _randn(g, 5)
    ref = _ref_causal_conv1d(-x, w, -bias)
    _close(ops.causal_conv1d(_neg(x), w, _neg(bias)), ref, "x, bias neg views", seed)
    _close(ops.causal_conv1d(-x, w, -bias), ref, "materialized", seed)


def test_conv2d_neg_view():
    g, seed = _gen()
    x, w = _randn(g, 1, 3, 13, 11), _randn(g, 4, 3, 3, 3)
    ref = F.conv2d(-x.double(), w.double(), padding=1)
    _close(ops.conv2d(_neg(x), w, padding=1), ref, "x neg view", seed)
    _close(ops.conv2d(-x, w, padding=1), ref, "materialized", seed)
    xd, wd = _randn(g, 1, 6, 9, 10), _randn(g, 6, 1, 3, 3)
    ref = F.conv2d(xd.double(), -wd.double(), padding=1, groups=6)
    _close(ops.conv2d(xd, _neg(wd), padding=1, groups=6), ref, "depthwise weight neg view", seed)


def test_long_conv_neg_view():
    g, seed = _gen()
    u, k = _randn(g, 2, 3, 20), _randn(g, 3, 5)
    ref = _ref_long_conv(-u, k)
    _close(ops.long_conv(_neg(u), k), ref, "u neg view", seed)
    _close(ops.long_conv(-u, k), ref, "materialized", seed)
    _close(ops.long_conv(u, _neg(-k)), _ref_long_conv(u, k), "k neg view", seed)


def test_attention_neg_view():
    g, seed = _gen()
    q, k, v = _randn(g, 1, 2, 11, 8), _randn(g, 1, 2, 13, 8), _randn(g, 1, 2, 13, 8)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), -v.double())
    _close(ops.attention(q, k, _neg(v)), ref, "v neg view", seed)
    _close(ops.attention(q, k, -v), ref, "materialized", seed)


def test_declared_op_neg_view():
    """A user-declared op run through ``opgen.run`` resolves neg views too."""
    g, seed = _gen()
    from opgen.ops.scan import declare_linear_scan

    a, b = torch.rand(2, 17, 3, generator=g) * 0.9, _randn(g, 2, 17, 3)
    out = opgen.run(declare_linear_scan(), a=a, b=_neg(b))["h"]
    _close(out, _ref_linear_scan(a.transpose(1, 2), -b.transpose(1, 2)).transpose(1, 2), "opgen.run", seed)


def test_conj_view_is_resolved():
    """The conj bit on a real tensor is a no-op, but a resolved copy is what kernels read (completeness)."""
    from opgen.runtime import resolve_views

    x = torch.randn(3, 4)
    n = torch._neg_view(x)
    out = resolve_views({"x": n, "y": x})
    assert not out["x"].is_neg() and torch.equal(out["x"], -x) and out["y"] is x
    c = torch.randn(3, dtype=torch.complex64).conj()
    assert c.is_conj() and not resolve_views({"c": c})["c"].is_conj()
