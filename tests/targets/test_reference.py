"""The reference interpreter (``opgen.targets.reference.evaluate``) on ops declared here with ``OpBuilder``.

Every expected value is an independent torch formulation written in this file (python loops over an explicit
visiting order, ``torch.cummax`` / ``cumsum`` / ``logcumsumexp`` / ``logsumexp``, ``F.conv1d`` ...); nothing
from opgen is used to build it. Data is fresh random data (the seed is printed in every failure message), sizes
are not powers of two and include size-1 axes.

Tolerances (``_TOL``): fp32 ``rtol = atol = 2e-5`` (relative to the largest expected magnitude, at least 1);
fp64 ``rtol = atol = 1e-12``, tight enough that any silent fp32 computation of an fp64 op fails. bf16: the
output must be the fp32 result rounded once to bf16, i.e. ``|got - ref| <= 2**-8 * |ref| + 1e-5`` (half a
bf16 ulp; see ``_assert_one_bf16_rounding``).
"""
from __future__ import annotations

import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F

import opgen
from opgen.ir import (MAX, PROD, SUM, DType, IRError, OpBuilder, ShapeError, absolute, bind, column_major, dims,
                      exp, forward, backward, log, maximum, monoid, row_major, sigmoid, silu, strided, where,
                      zigzag)
from opgen.ir.symbols import make_axes
from opgen.targets.reference import evaluate

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
IR = {F32: DType.f32, F64: DType.f64, BF16: DType.bf16}
_TOL = {F32: 2e-5, F64: 1e-12}


# ------------------------------------------------------------------------------------------------ helpers


class Rand:
    """Fresh random data from a per-test seed (reported in failure messages)."""

    def __init__(self) -> None:
        self.seed = random.randrange(2**31)
        self.g = torch.Generator().manual_seed(self.seed)

    def randn(self, *shape, dtype=F64, scale=1.0):
        return (scale * torch.randn(*shape, generator=self.g, dtype=F64)).to(dtype)

    def uniform(self, *shape, lo=0.0, hi=1.0, dtype=F64):
        return (lo + (hi - lo) * torch.rand(*shape, generator=self.g, dtype=F64)).to(dtype)

    def mask(self, *shape, p=0.5):
        return torch.rand(*shape, generator=self.g) < p


@pytest.fixture
def rnd() -> Rand:
    return Rand()


@functools.lru_cache(maxsize=None)
def _bind(op, shapes: tuple) -> opgen.ir.Binding:
    return bind(op, dict(shapes))


def run(op, inputs: dict, **kw) -> dict:
    """Bind the inputs' shapes (cached per op and shapes) and evaluate with the reference interpreter."""
    return evaluate(op, inputs, _bind(op, tuple(sorted((k, tuple(v.shape)) for k, v in inputs.items()))), **kw)


def check(got, ref, dtype, what, rnd, tol=None):
    """Same shape, declared dtype, finite where the reference is, and close within the dtype's tolerance."""
    assert isinstance(got, torch.Tensor), f"{what}: got {type(got)} (seed={rnd.seed})"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)} " \
                                                 f"(seed={rnd.seed})"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype} (seed={rnd.seed})"
    t = _TOL[dtype] if tol is None else tol
    ref64 = ref.detach().to(F64)
    finite = ref64[torch.isfinite(ref64)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(got.detach().to(F64), ref64, rtol=t, atol=t * scale, equal_nan=False,
                               msg=lambda m: f"{what} (seed={rnd.seed}):\n{m}")


def _assert_one_bf16_rounding(got, ref32, what, rnd):
    """``got`` (bf16) is ``ref32`` (an fp32 computation) rounded once: within half a bf16 ulp (+ fp32 noise)."""
    assert got.dtype == BF16, f"{what}: dtype {got.dtype} != bfloat16 (seed={rnd.seed})"
    assert got.shape == ref32.shape
    err = (got.to(F64) - ref32.to(F64)).abs()
    bound = 2.0**-8 * ref32.to(F64).abs() * (1 + 1e-3) + 1e-5
    worst = float((err - bound).max())
    assert worst <= 0, f"{what}: bf16 output is not the fp32 result rounded once: max excess {worst:.3g}, max err " \
                       f"{float(err.max()):.3g} (seed={rnd.seed})"


def _order(kind: str, H: int, W: int, stride: int, reverse: bool) -> list[torch.Tensor]:
    """The chains of flat row-major grid positions in visiting order, built with torch permutations."""
    grid = torch.arange(H * W).view(H, W)
    if kind == "row":
        chains = [grid.flatten()]
    elif kind == "column":
        chains = [grid.t().flatten()]
    elif kind == "zigzag":
        g = grid.clone()
        g[1::2] = g[1::2].flip(-1)   # boustrophedon: odd rows right to left
        chains = [g.flatten()]
    elif kind == "strided":
        chains = [grid.flatten()[c::stride] for c in range(stride)]   # chain c: c, c+s, c+2s, ...
    else:
        raise ValueError(kind)
    return [c.flip(0) if reverse else c for c in chains]


def _traversal(kind: str, grid, stride: int, reverse: bool):
    if kind == "row":
        return row_major(grid, reverse=reverse)
    if kind == "column":
        return column_major(grid, reverse=reverse)
    if kind == "zigzag":
        return zigzag(grid, reverse=reverse)
    return strided(grid, stride, reverse=reverse)


def _grid_loop(a, b, chains, h0=None, combine=None):
    """Plain sequential loop over [..., H, W] grids along each chain; h0 [...] (zero / first value if None)."""
    out = torch.zeros(b.shape, dtype=b.dtype)
    fa = a.flatten(-2) if a is not None else None
    fb, fo = b.flatten(-2), out.view(*out.shape[:-2], -1)
    for chain in chains:
        seq_b = fb[..., chain]                    # flatten in visiting order
        seq_a = fa[..., chain] if fa is not None else None
        h = h0
        states = []
        for s in range(len(chain)):
            if combine is None:                   # affine: h = a * h + b
                h = seq_b[..., s] if h is None else seq_a[..., s] * h + seq_b[..., s]
            else:                                 # associative: h = combine(h, x)
                h = seq_b[..., s] if h is None else combine(h, seq_b[..., s])
            states.append(h)
        if states:
            fo[..., chain] = torch.stack(states, -1)  # un-permute
    return out


# ------------------------------------------------------------------------------------- 2-D traversal scans


@functools.lru_cache(maxsize=None)
def grid_scan_op(kind: str, stride: int, reverse: bool, dtype: DType, with_init: bool = False):
    """``h = a * h[prev] + b`` over the (r, w) grid of [B, C, H, W] in the given traversal order."""
    B, C, H, W = dims("B C H W")
    with OpBuilder(f"grid_scan_{kind}") as bld:
        a = bld.input("a", (B, C, H, W), dtype)
        b = bld.input("b", (B, C, H, W), dtype)
        h0 = bld.input("h0", (B, C), dtype) if with_init else None
        n, c, r, w = make_axes("n c r w")
        h = bld.scan((r, w), a=a[n, c, r, w], b=b[n, c, r, w], init=h0[n, c] if h0 is not None else None,
                     traversal=_traversal(kind, (H, W), stride, reverse), axes=(n, c, r, w))
        return bld.build({"h": h})


GRID_SHAPES = [(2, 3, 5, 7), (1, 2, 1, 6), (3, 1, 7, 1)]
TRAVERSALS = [("row", 1), ("column", 1), ("zigzag", 1), ("strided", 1), ("strided", 3), ("strided", 8)]


@pytest.mark.parametrize("shape", GRID_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("kind,stride", TRAVERSALS, ids=[f"{k}{s}" for k, s in TRAVERSALS])
def test_affine_scan_over_2d_traversal(rnd, kind, stride, reverse, dtype, shape):
    op = grid_scan_op(kind, stride, reverse, IR[dtype])
    a = rnd.uniform(*shape, lo=-1.0, hi=1.0, dtype=dtype)
    b = rnd.randn(*shape, dtype=dtype)
    got = run(op, {"a": a, "b": b})["h"]
    H, W = shape[2:]
    ref = _grid_loop(a.to(F64), b.to(F64), _order(kind, H, W, stride, reverse))
    check(got, ref, dtype, f"{kind}{stride} reverse={reverse} {shape}", rnd)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("kind,stride", TRAVERSALS, ids=[f"{k}{s}" for k, s in TRAVERSALS])
def test_affine_scan_over_2d_traversal_with_init(rnd, kind, stride, reverse):
    """Every chain (of a strided traversal too) starts from init[b, c]."""
    op = grid_scan_op(kind, stride, reverse, DType.f64, with_init=True)
    shape = (2, 3, 5, 7)
    a = rnd.uniform(*shape, lo=-1.0, hi=1.0)
    b, h0 = rnd.randn(*shape), rnd.randn(2, 3, scale=3.0)
    got = run(op, {"a": a, "b": b, "h0": h0})["h"]
    ref = _grid_loop(a, b, _order(kind, 5, 7, stride, reverse), h0=h0)
    check(got, ref, F64, f"{kind}{stride} reverse={reverse} init", rnd)


@functools.lru_cache(maxsize=None)
def grid_max_scan_op(kind: str, stride: int, reverse: bool):
    B, C, H, W = dims("B C H W")
    with OpBuilder("grid_cummax") as bld:
        x = bld.input("x", (B, C, H, W), DType.f32)
        n, c, r, w = make_axes("n c r w")
        h = bld.scan((r, w), combine=MAX, value=x[n, c, r, w], traversal=_traversal(kind, (H, W), stride, reverse))
        return bld.build({"h": h})


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("kind,stride", TRAVERSALS, ids=[f"{k}{s}" for k, s in TRAVERSALS])
def test_max_scan_over_2d_traversal(rnd, kind, stride, reverse):
    """Associative scan along a traversal: ragged strided chains must not leak the -inf identity."""
    op = grid_max_scan_op(kind, stride, reverse)
    x = rnd.randn(2, 1, 5, 7, dtype=F32)
    got = run(op, {"x": x})["h"]
    ref = _grid_loop(None, x, _order(kind, 5, 7, stride, reverse), combine=torch.maximum)
    assert torch.isfinite(got).all(), f"non-finite values (seed={rnd.seed})"
    check(got, ref, F32, f"cummax {kind}{stride} reverse={reverse}", rnd, tol=0.0)


@pytest.mark.parametrize("kind", ["row", "zigzag", "column"])
def test_traversal_with_int_grid(rnd, kind):
    """Traversal grids given as Python ints over tensors whose grid dims are ints too."""
    B, C = dims("B C")
    with OpBuilder("int_grid") as bld:
        a = bld.input("a", (B, C, 4, 3), DType.f64)
        b = bld.input("b", (B, C, 4, 3), DType.f64)
        n, c, r, w = make_axes("n c r w")
        h = bld.scan((r, w), a=a[n, c, r, w], b=b[n, c, r, w], traversal=_traversal(kind, (4, 3), 1, True))
        op = bld.build({"h": h})
    av, bv = rnd.uniform(3, 1, 4, 3, lo=-1, hi=1), rnd.randn(3, 1, 4, 3)
    got = run(op, {"a": av, "b": bv})["h"]
    check(got, _grid_loop(av, bv, _order(kind, 4, 3, 1, True)), F64, f"int grid {kind}", rnd)


def test_traversal_scan_with_interleaved_output_axes_and_swapped_grid(rnd):
    """Output axes (w, n, r, c) interleave lanes and grid axes; scanning over (w, r) with zigzag((W, H)) is the
    zigzag of the transposed image (columns alternate direction)."""
    B, C, H, W = dims("B C H W")
    with OpBuilder("interleaved") as bld:
        a = bld.input("a", (B, C, H, W), DType.f64)
        b = bld.input("b", (B, C, H, W), DType.f64)
        n, c, r, w = make_axes("n c r w")
        h1 = bld.scan((r, w), a=a[n, c, r, w], b=b[n, c, r, w], traversal=zigzag((H, W)), axes=(w, n, r, c),
                      name="s1")
        h2 = bld.scan((w, r), a=a[n, c, r, w], b=b[n, c, r, w], traversal=zigzag((W, H)), axes=(n, c, r, w),
                      name="s2")
        op = bld.build({"h1": h1, "h2": h2})
    shape = (2, 3, 4, 5)
    av, bv = rnd.uniform(*shape, lo=-1, hi=1), rnd.randn(*shape)
    out = run(op, {"a": av, "b": bv})
    ref1 = _grid_loop(av, bv, _order("zigzag", 4, 5, 1, False)).permute(3, 0, 2, 1)
    ref2 = _grid_loop(av.transpose(-1, -2), bv.transpose(-1, -2), _order("zigzag", 5, 4, 1, False))
    check(out["h1"], ref1, F64, "interleaved output axes", rnd)
    check(out["h2"], ref2.transpose(-1, -2), F64, "scan over (w, r)", rnd)


def test_outputs_may_take_the_auto_names_of_other_outputs(rnd):
    """``build({"h1": first, "h2": second})`` where the unnamed scans were auto-named h0, h1: the key "h1" names
    an output that is itself renamed away. Regression: build() compared the key (a str) with TensorRefs
    (``key not in named.values()``) and raised "output name 'h1' is already a tensor of the op"."""
    P, L = dims("P L")
    with OpBuilder("two_scans") as bld:
        x = bld.input("x", (P, L), DType.f64)
        p, t = make_axes("p t")
        first = bld.scan(t, b=x[p, t], a=0.5)               # auto-named h0
        second = bld.scan(t, b=x[p, t], a=0.25, reverse=True)  # auto-named h1
        op = bld.build({"h1": first, "h2": second})
    xv = rnd.randn(2, 6)
    out = run(op, {"x": xv})
    ref1, ref2 = torch.empty_like(xv), torch.empty_like(xv)
    h1, h2 = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    for s in range(6):
        h1 = 0.5 * h1 + xv[:, s]
        ref1[:, s] = h1
        h2 = 0.25 * h2 + xv[:, 5 - s]
        ref2[:, 5 - s] = h2
    check(out["h1"], ref1, F64, "h1", rnd)
    check(out["h2"], ref2, F64, "h2", rnd)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("stride", [2, 4, 13])
def test_strided_traversal_over_one_axis(rnd, stride, reverse):
    L = dims("L")
    P = dims("P")
    with OpBuilder("atrous") as bld:
        a = bld.input("a", (P, L), DType.f64)
        b = bld.input("b", (P, L), DType.f64)
        p, t = make_axes("p t")
        h = bld.scan(t, a=a[p, t], b=b[p, t], traversal=strided((L,), stride, reverse=reverse))
        op = bld.build({"h": h})
    av, bv = rnd.uniform(3, 11, lo=-1, hi=1), rnd.randn(3, 11)
    got = run(op, {"a": av, "b": bv})["h"]
    chains = [c.flip(0) if reverse else c for c in (torch.arange(11)[c::stride] for c in range(stride))]
    ref = _grid_loop(av.unsqueeze(-2), bv.unsqueeze(-2), chains).squeeze(-2)
    check(got, ref, F64, f"1-D strided{stride} reverse={reverse}", rnd)


@pytest.mark.parametrize("grid", ["transposed", "wrong_int"])
def test_traversal_grid_must_match_scan_extents(rnd, grid):
    """A traversal whose grid is not the scan axes' extents must be rejected (at build or bind time), not run.

    Regression: build() and bind() used not to compare ``traversal.grid`` with the scan axes' extents; the
    interpreter then left unvisited positions at 0 (grid (4, 7) over 5x7) or raised an IndexError ((W, H))."""
    B, C, H, W = dims("B C H W")
    with pytest.raises((IRError, ShapeError)):
        with OpBuilder("bad_grid") as bld:
            a = bld.input("a", (B, C, H, W), DType.f32)
            b = bld.input("b", (B, C, H, W), DType.f32)
            n, c, r, w = make_axes("n c r w")
            tr = zigzag((W, H)) if grid == "transposed" else row_major((4, 7))
            h = bld.scan((r, w), a=a[n, c, r, w], b=b[n, c, r, w], traversal=tr)
            op = bld.build({"h": h})
        shape = (1, 2, 5, 7)
        av, bv = rnd.uniform(*shape, dtype=F32), rnd.randn(*shape, dtype=F32)
        out = run(op, {"a": av, "b": bv})["h"]
        pytest.fail(f"a {grid} traversal grid over a 5x7 grid was accepted; row 4 of the result is "
                    f"{out[0, 0, 4].tolist()}")


# ------------------------------------------------------------------------------------- associative scans

def _logaddexp_naive(acc, x):
    return maximum(acc, x) + log(1 + exp(-absolute(acc - x)))


LOGADDEXP = monoid("logaddexp", -math.inf, _logaddexp_naive)


@functools.lru_cache(maxsize=None)
def cum_op(kind: str, reverse: bool, dtype: DType, with_init: bool = False):
    P, L, Q = dims("P L Q")
    comb = {"max": MAX, "sum": SUM, "logaddexp": LOGADDEXP}[kind]
    with OpBuilder(f"cum{kind}") as bld:
        x = bld.input("x", (P, L, Q), dtype)
        h0 = bld.input("h0", (P, Q), dtype) if with_init else None
        p, t, q = make_axes("p t q")
        h = bld.scan(t, combine=comb, value=x[p, t, q], reverse=reverse, init=h0[p, q] if h0 is not None else None,
                     axes=(p, t, q))
        return bld.build({"h": h})


def _rev(fn, x, reverse):
    return fn(x.flip(1)).flip(1) if reverse else fn(x)


CUM_REF = {"max": lambda x: torch.cummax(x, dim=1).values, "sum": lambda x: torch.cumsum(x, dim=1),
           "logaddexp": lambda x: torch.logcumsumexp(x, dim=1)}


@pytest.mark.parametrize("shape", [(3, 19, 2), (1, 1, 5), (2, 33, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("kind", ["max", "sum", "logaddexp"])
def test_associative_scan(rnd, kind, reverse, dtype, shape):
    op = cum_op(kind, reverse, IR[dtype])
    x = rnd.randn(*shape, dtype=dtype, scale=3.0)
    got = run(op, {"x": x})["h"]
    ref = _rev(CUM_REF[kind], x.to(F64), reverse)
    check(got, ref, dtype, f"cum{kind} reverse={reverse}", rnd)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("kind", ["max", "sum", "logaddexp"])
def test_associative_scan_with_init(rnd, kind, reverse):
    """h[-1] = init: cummax/cumsum/logcumsumexp of the sequence with init prepended, minus the first entry."""
    op = cum_op(kind, reverse, DType.f64, with_init=True)
    x, h0 = rnd.randn(2, 13, 3, scale=2.0), rnd.randn(2, 3, scale=2.0)
    got = run(op, {"x": x, "h0": h0})["h"]
    xs = x.flip(1) if reverse else x
    ref = CUM_REF[kind](torch.cat([h0.unsqueeze(1), xs], dim=1))[:, 1:]
    ref = ref.flip(1) if reverse else ref
    check(got, ref, F64, f"cum{kind} init reverse={reverse}", rnd)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_affine_scan_init_and_reverse(rnd, reverse, dtype):
    P, L, Q = dims("P L Q")
    with OpBuilder("lin") as bld:
        a = bld.input("a", (P, L, Q), IR[dtype])
        b = bld.input("b", (P, L, Q), IR[dtype])
        h0 = bld.input("h0", (P, Q), IR[dtype])
        p, t, q = make_axes("p t q")
        h = bld.scan(t, a=a[p, t, q], b=b[p, t, q], init=h0[p, q], reverse=reverse, axes=(p, t, q))
        op = bld.build({"h": h})
    av = rnd.uniform(3, 23, 5, lo=0.5, hi=1.05, dtype=dtype)
    bv, iv = rnd.randn(3, 23, 5, dtype=dtype), rnd.randn(3, 5, dtype=dtype, scale=4.0)
    got = run(op, {"a": av, "b": bv, "h0": iv})["h"]
    ref = torch.empty(3, 23, 5, dtype=F64)
    h = iv.to(F64)
    for s in (range(22, -1, -1) if reverse else range(23)):
        h = av[:, s].to(F64) * h + bv[:, s].to(F64)
        ref[:, s] = h
    check(got, ref, dtype, f"affine init reverse={reverse}", rnd)


def test_forward_backward_traversal_helpers(rnd):
    """``traversal=forward(L)`` / ``backward(L)`` equal the default / reverse=True scans."""
    P, L = dims("P L")
    ops_ = {}
    for name, kw in (("fwd", dict(traversal=forward(L))), ("bwd", dict(traversal=backward(L)))):
        with OpBuilder(name) as bld:
            x = bld.input("x", (P, L), DType.f64)
            p, t = make_axes("p t")
            ops_[name] = bld.build({"h": bld.scan(t, b=x[p, t], a=0.5, **kw)})
    x = rnd.randn(2, 9)
    for name, rev in (("fwd", False), ("bwd", True)):
        got = run(ops_[name], {"x": x})["h"]
        ref = torch.empty_like(x)
        h = torch.zeros(2, dtype=F64)
        for s in (range(8, -1, -1) if rev else range(9)):
            h = 0.5 * h + x[:, s]
            ref[:, s] = h
        check(got, ref, F64, name, rnd)


# ---------------------------------------------------------------------------------------------- reductions

def _logaddexp_robust(acc, x):
    m = maximum(acc, x)
    return where(m.eq(-math.inf), acc, m + log(exp(acc - m) + exp(x - m)))


LOGADDEXP_ROBUST = monoid("logaddexp_robust", -math.inf, _logaddexp_robust)
MONOIDS = {"sum": SUM, "max": MAX, "prod": PROD, "logaddexp": LOGADDEXP_ROBUST}


@functools.lru_cache(maxsize=None)
def masked_reduce_op(kind: str, dtype: DType, pred: str):
    """``out[i, k] = monoid_j x[i, j, k]`` where ``m[i, j] > 0.5`` (data) or ``j <= i`` (index predicate)."""
    I, J, K = dims("I J K")
    with OpBuilder(f"masked_{kind}") as bld:
        x = bld.input("x", (I, J, K), dtype)
        m = bld.input("m", (I, J), dtype)
        i, j, k = make_axes("i j k")
        where_ = m[i, j] > 0.5 if pred == "data" else (j <= i)
        out = bld.reduce(j, x[i, j, k], monoid=MONOIDS[kind], where=where_, axes=(i, k))
        return bld.build({"out": out})


def _masked_ref(kind, x, mask):
    """mask [I, J] over x [I, J, K]: torch reductions on the masked values."""
    mk = mask.unsqueeze(-1).expand_as(x)
    if kind == "sum":
        return torch.where(mk, x, 0.0).sum(1)
    if kind == "prod":
        return torch.where(mk, x, 1.0).prod(1)
    if kind == "max":
        return torch.where(mk, x, -math.inf).amax(1)
    return torch.logsumexp(torch.where(mk, x, -math.inf), dim=1)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("pred", ["data", "index"])
@pytest.mark.parametrize("kind", ["sum", "max", "prod", "logaddexp"])
def test_masked_reduce(rnd, kind, pred, dtype):
    op = masked_reduce_op(kind, IR[dtype], pred)
    I, J, K = 6, 11, 3
    x = rnd.uniform(I, J, K, lo=0.6, hi=1.5, dtype=dtype) if kind == "prod" else rnd.randn(I, J, K, dtype=dtype)
    m = rnd.uniform(I, J, dtype=dtype)
    m[2] = 0.0                        # a fully masked row: the monoid's identity
    got = run(op, {"x": x, "m": m})["out"]
    mask = m.to(F64) > 0.5 if pred == "data" else torch.arange(J)[None, :] <= torch.arange(I)[:, None]
    ref = _masked_ref(kind, x.to(F64), mask)
    if kind in ("max", "logaddexp") and pred == "data":
        assert torch.equal(got[2], torch.full((K,), -math.inf, dtype=dtype)), f"empty row (seed={rnd.seed})"
    check(got, ref, dtype, f"masked {kind} ({pred} predicate)", rnd)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["prod", "logaddexp"])
def test_reduce_custom_and_prod_monoids_unmasked(rnd, kind, dtype):
    """Over two reduction axes with odd sizes (the pairwise tree pads with the identity)."""
    I, J, K = dims("I J K")
    with OpBuilder("red") as bld:
        x = bld.input("x", (I, J, K), IR[dtype])
        i, j, k = make_axes("i j k")
        op = bld.build({"out": bld.reduce((j, k), x[i, j, k], monoid=MONOIDS[kind], axes=(i,))})
    x = rnd.uniform(4, 7, 5, lo=0.8, hi=1.2, dtype=dtype) if kind == "prod" else rnd.randn(4, 7, 5, dtype=dtype)
    got = run(op, {"x": x})["out"]
    x64 = x.to(F64).flatten(1)
    ref = x64.prod(1) if kind == "prod" else torch.logsumexp(x64, 1)
    check(got, ref, dtype, f"{kind} over (j, k)", rnd)


@pytest.mark.parametrize("kind", ["sum", "max"])
def test_guarded_out_of_range_reads(rnd, kind):
    """``y[i] = monoid_{j <= i} x[i - j] (* w[j])``: reads at i - j < 0 are outside x but guarded by the predicate."""
    L = dims("L")
    with OpBuilder("causal") as bld:
        x = bld.input("x", (L,), DType.f64)
        w = bld.input("w", (L,), DType.f64)
        i = make_axes("i")
        j = bld.axis("j", L)
        val = x[i - j] * w[j] if kind == "sum" else x[i - j]
        op = bld.build({"y": bld.reduce(j, val, monoid=MONOIDS[kind], where=(j <= i), axes=(i,))})
    xv, wv = rnd.randn(13), rnd.randn(13)
    got = run(op, {"x": xv, "w": wv})["y"]
    if kind == "sum":
        ref = torch.stack([sum(xv[n - s] * wv[s] for s in range(n + 1)) for n in range(13)])
    else:
        ref = torch.cummax(xv, 0).values
    check(got, ref, F64, f"guarded {kind}", rnd)


# --------------------------------------------------------------------------- memory-chunked reduction path

@functools.lru_cache(maxsize=None)
def chunk_op(kind: str):
    I, J, K = dims("I J K")
    with OpBuilder(f"chunk_{kind}") as bld:
        x = bld.input("x", (I, J, K), DType.f64)
        y = bld.input("y", (I, J, K), DType.f64)
        m = bld.input("m", (J, K), DType.f64)
        i, j, k = make_axes("i j k")
        value = exp(x[i, j, k]) + y[i, j, k]          # not a product: never the einsum path
        pred = m[j, k] > 0.3 if kind in ("max", "sum_masked", "logaddexp") else None
        mon = {"sum": SUM, "sum_masked": SUM, "max": MAX, "prod": PROD, "logaddexp": LOGADDEXP_ROBUST}[kind]
        if kind == "prod":
            value = 1 + 0.1 * y[i, j, k]
        out = bld.reduce((j, k), value, monoid=mon, where=pred, axes=(i,))
        return bld.build({"out": out})


@pytest.mark.parametrize("budget", [1, 40, 100])
@pytest.mark.parametrize("kind", ["sum", "sum_masked", "max", "prod", "logaddexp"])
def test_chunked_reduce_equals_default_path(rnd, kind, budget):
    """``max_elements`` below the 5*11*3 iteration space: chunks of 1 row, of 2 rows (ragged) and of 6 rows."""
    op = chunk_op(kind)
    x, y, m = rnd.randn(5, 11, 3), rnd.randn(5, 11, 3), rnd.uniform(11, 3)
    inputs = {"x": x, "y": y, "m": m}
    default = run(op, inputs)["out"]
    chunked = run(op, inputs, max_elements=budget)["out"]
    val = 1 + 0.1 * y if kind == "prod" else torch.exp(x) + y
    mask = (m > 0.3).unsqueeze(0).expand_as(x)
    flat_v, flat_m = val.flatten(1), mask.flatten(1)
    ref = {"sum": lambda: flat_v.sum(1), "sum_masked": lambda: torch.where(flat_m, flat_v, 0.0).sum(1),
           "max": lambda: torch.where(flat_m, flat_v, -math.inf).amax(1), "prod": lambda: flat_v.prod(1),
           "logaddexp": lambda: torch.logsumexp(torch.where(flat_m, flat_v, -math.inf), 1)}[kind]()
    check(default, ref, F64, f"{kind} default path", rnd)
    check(chunked, ref, F64, f"{kind} max_elements={budget}", rnd)
    check(chunked, default, F64, f"{kind} chunked vs default", rnd)


@pytest.mark.parametrize("budget", [None, 10, 1])
def test_product_reduction_falls_back_under_tiny_budget(rnd, budget):
    """A sum of products (einsum path) with a predicate; a tiny budget forces the chunked gather path."""
    I, J, K = dims("I J K")
    with OpBuilder("matmul_masked") as bld:
        x = bld.input("x", (I, J), DType.f64)
        y = bld.input("y", (J, K), DType.f64)
        i, j, k = make_axes("i j k")
        op = bld.build({"out": bld.reduce(j, x[i, j] * y[j, k] * 2.0, where=(j <= i + k), axes=(i, k))})
    xv, yv = rnd.randn(7, 9), rnd.randn(9, 5)
    kw = {} if budget is None else {"max_elements": budget}
    got = run(op, {"x": xv, "y": yv}, **kw)["out"]
    mask = torch.arange(9)[None, :, None] <= (torch.arange(7)[:, None, None] + torch.arange(5)[None, None, :])
    ref = (xv[:, :, None] * yv[None] * 2.0 * mask).sum(1)
    check(got, ref, F64, f"masked matmul budget={budget}", rnd)


# ------------------------------------------------------------------------------ zero-padded affine loads

@functools.lru_cache(maxsize=None)
def conv1d_op(stride: int, dilation: int, pad_lo: int, pad_hi: int, dtype: DType):
    """``y[n, o, t] = sum_{c, k} x.pad[n, c, t*s + k*d - lo] * w[o, c, k]`` (F.conv1d on F.pad(x, (lo, hi)))."""
    N, C, L, O, K = dims("N C L O K")
    with OpBuilder("conv1d", attrs={"stride": stride, "dilation": dilation}) as bld:
        x = bld.input("x", (N, C, L), dtype)
        w = bld.input("w", (O, C, K), dtype)
        n, o, t, c, k = make_axes("n o t c k")
        xv = x.pad(0, 0, (pad_lo, pad_hi))[n, c, t * stride + k * dilation - pad_lo]
        return bld.build({"y": bld.reduce((c, k), xv * w[o, c, k], axes=(n, o, t))})


CONVS = [(1, 1, 0, 0), (2, 3, 2, 1), (3, 2, 4, 4), (1, 2, 0, 5)]


@pytest.mark.parametrize("budget", [None, 1], ids=["einsum", "chunked"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "s{}d{}p{}-{}".format(*c))
def test_padded_dilated_strided_conv1d(rnd, conv, dtype, budget):
    s, d, lo, hi = conv
    op = conv1d_op(s, d, lo, hi, IR[dtype])
    x, w = rnd.randn(2, 3, 17, dtype=dtype), rnd.randn(5, 3, 3, dtype=dtype)
    kw = {} if budget is None else {"max_elements": budget}
    got = run(op, {"x": x, "w": w}, **kw)["y"]
    ref = F.conv1d(F.pad(x.to(F64), (lo, hi)), w.to(F64), stride=s, dilation=d)
    check(got, ref, dtype, f"conv1d stride={s} dilation={d} pad=({lo},{hi})", rnd)


def test_padded_conv_with_symbolic_padding_single_channel(rnd):
    """Causal depthwise conv with a padding that is a dim expression (K - 1), size-1 batch and channel."""
    N, C, L, K = dims("N C L K")
    with OpBuilder("causal") as bld:
        x = bld.input("x", (N, C, L), DType.f64)
        w = bld.input("w", (C, K), DType.f64)
        n, c, t, k = make_axes("n c t k")
        y = bld.reduce(k, x.pad(0, 0, (K - 1, 0))[n, c, t + k - (K - 1)] * w[c, k], axes=(n, c, t))
        op = bld.build({"y": y})
    xv, wv = rnd.randn(1, 1, 10), rnd.randn(1, 4)
    got = run(op, {"x": xv, "w": wv})["y"]
    ref = F.conv1d(F.pad(xv, (3, 0)), wv.unsqueeze(1), groups=1)
    check(got, ref, F64, "causal conv", rnd)


def test_padded_stencil_map(rnd):
    """A Map reading a zero-padded halo: ``y[t] = x.pad[t-1] - 2 x[t] + x.pad[t+1]``."""
    P, L = dims("P L")
    with OpBuilder("stencil") as bld:
        x = bld.input("x", (P, L), DType.f64)
        p = make_axes("p")
        t = bld.axis("t", L)
        xp = x.pad(0, (1, 1))
        op = bld.build({"y": bld.map(xp[p, t - 1] - 2.0 * x[p, t] + xp[p, t + 1], (p, t))})
    xv = rnd.randn(3, 8)
    got = run(op, {"x": xv})["y"]
    z = F.pad(xv, (1, 1))
    check(got, z[:, :-2] - 2 * xv + z[:, 2:], F64, "stencil", rnd)


# ---------------------------------------------------------------------------------------------- autograd

def test_gradcheck_linear_scan(rnd):
    P, L = dims("P L")
    with OpBuilder("lin") as bld:
        a = bld.input("a", (P, L), DType.f64)
        b = bld.input("b", (P, L), DType.f64)
        p, t = make_axes("p t")
        op = bld.build({"h": bld.scan(t, a=a[p, t], b=b[p, t])})
    binding = bind(op, {"a": (2, 5), "b": (2, 5)})
    av = rnd.uniform(2, 5, lo=-0.9, hi=0.9).requires_grad_()
    bv = rnd.randn(2, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a_, b_: evaluate(op, {"a": a_, "b": b_}, binding)["h"], (av, bv)), \
        f"seed={rnd.seed}"


def test_gradcheck_zigzag_scan_with_init(rnd):
    op = grid_scan_op("zigzag", 1, True, DType.f64, with_init=True)
    shape = (1, 2, 3, 2)
    binding = bind(op, {"a": shape, "b": shape, "h0": (1, 2)})
    av = rnd.uniform(*shape, lo=-0.9, hi=0.9).requires_grad_()
    bv, h0 = rnd.randn(*shape).requires_grad_(), rnd.randn(1, 2).requires_grad_()
    fn = lambda a_, b_, i_: evaluate(op, {"a": a_, "b": b_, "h0": i_}, binding)["h"]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (av, bv, h0)), f"seed={rnd.seed}"


@pytest.mark.parametrize("budget", [None, 1], ids=["einsum", "chunked"])
def test_gradcheck_padded_conv(rnd, budget):
    op = conv1d_op(2, 2, 2, 1, DType.f64)
    binding = bind(op, {"x": (1, 2, 7), "w": (2, 2, 2)})
    xv, wv = rnd.randn(1, 2, 7).requires_grad_(), rnd.randn(2, 2, 2).requires_grad_()
    kw = {} if budget is None else {"max_elements": budget}
    fn = lambda x_, w_: evaluate(op, {"x": x_, "w": w_}, binding, **kw)["y"]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xv, wv)), f"seed={rnd.seed}"


# -------------------------------------------------------------------------------------------- bf16 inputs

@functools.lru_cache(maxsize=None)
def gated_rnn_op(dtype: DType):
    """``h = sigmoid(f) * h[prev] + (1 - sigmoid(f)) * x``; outputs y = h * silu(g) as bf16 (declared), the same
    in f32 (declared), and h with its default dtype (the value's dtype: the input dtype)."""
    Bt, D, L = dims("B D L")
    with OpBuilder("gated_rnn") as bld:
        f = bld.input("f", (Bt, D, L), dtype)
        x = bld.input("x", (Bt, D, L), dtype)
        g = bld.input("g", (Bt, D, L), dtype)
        b, d, t = make_axes("b d t")
        h = bld.scan(t, a=sigmoid(f[b, d, t]), b=(1 - sigmoid(f[b, d, t])) * x[b, d, t], axes=(b, d, t))
        y = h[b, d, t] * silu(g[b, d, t])
        return bld.build({"y": bld.map(y, (b, d, t), dtype=DType.bf16),
                          "y32": bld.map(y, (b, d, t), dtype=DType.f32), "h": h})


def _gated_rnn_ref32(f, x, g):
    f, x, g = f.float(), x.float(), g.float()
    h = torch.zeros(f.shape[:-1])
    hs = []
    for s in range(f.shape[-1]):
        a = torch.sigmoid(f[..., s])
        h = a * h + (1 - a) * x[..., s]
        hs.append(h)
    h = torch.stack(hs, -1)
    return h * F.silu(g), h


def test_bf16_inputs_declared_dtypes_and_fp32_accuracy(rnd):
    op = gated_rnn_op(DType.bf16)
    assert {t.name: t.dtype for t in op.outputs} == {"y": DType.bf16, "y32": DType.f32, "h": DType.bf16}
    shape = (2, 3, 37)
    f, x, g = (rnd.randn(*shape, dtype=BF16, scale=2.0) for _ in range(3))
    out = run(op, {"f": f, "x": x, "g": g})
    y_ref, h_ref = _gated_rnn_ref32(f, x, g)
    # y32 is computed from the same bf16 inputs entirely in fp32 (intermediates are never rounded to bf16)
    check(out["y32"], y_ref, F32, "y32 from bf16 inputs", rnd)
    _assert_one_bf16_rounding(out["y"], y_ref, "y (bf16)", rnd)
    _assert_one_bf16_rounding(out["h"], h_ref, "h (bf16)", rnd)


def test_bf16_reduction_accumulates_in_fp32(rnd):
    """A 301-term bf16 sum: accumulating in bf16 would be off by many bf16 ulps of the result."""
    I, J = dims("I J")
    with OpBuilder("bsum") as bld:
        x = bld.input("x", (I, J), DType.bf16)
        i, j = make_axes("i j")
        op = bld.build({"s": bld.reduce(j, x[i, j] + 1.0, axes=(i,))})
    assert op.outputs[0].dtype == DType.bf16
    x = rnd.uniform(3, 301, lo=0.0, hi=1.0, dtype=BF16)
    got = run(op, {"x": x})["s"]
    _assert_one_bf16_rounding(got, (x.float() + 1.0).sum(1), "bf16 sum", rnd)


def test_shifted_zero_padded_loads(rnd):
    """Loads at t + 2 and t - 1 of zero-padded tensors take the interpreter's shifted copy instead of a gather;
    the values match torch slicing, with zeros where a read falls outside. (Zero-inserted reads, floor(u / 2),
    are checked through the strided convolution gradients in tests/test_conv_ops.py.)"""
    P, L = dims("P L")
    with OpBuilder("shifts") as bld:
        x = bld.input("x", (P, L), DType.f32)
        p, t = make_axes("p"), opgen.axis("t", L)
        y = bld.map(x.pad(0, 2)[p, t + 2] + 10.0 * x.pad(0, 1)[p, t - 1], (p, t), name="y")
        op = bld.build({"y": y})
    for n in (7, 1, 2):
        xv = rnd.randn(3, n, dtype=F32)
        got = evaluate(op, {"x": xv}, bind(op, {"x": (3, n)}))["y"]
        pad = F.pad(xv, (1, 2))
        want = pad[:, 3:3 + n] + 10.0 * pad[:, 0:n]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_strided_zero_padded_loads(rnd):
    """Loads at 2t - 1 and 3t + 1 of zero-padded tensors (the weight taps of a phase-split strided gradient) take
    the interpreter's strided copy instead of a gather; the values match torch slicing, zeros outside."""
    P, L = dims("P L")
    with OpBuilder("strided") as bld:
        x = bld.input("x", (P, L), DType.f32)
        p, t = make_axes("p"), opgen.axis("t", L)
        y = bld.map(x.pad(1, L)[p, 2 * t - 1] + 10.0 * x.pad(0, 2 * L)[p, 3 * t + 1], (p, t), name="y")
        op = bld.build({"y": y})
    for n in (7, 1, 2):
        xv = rnd.randn(3, n, dtype=F32)
        got = evaluate(op, {"x": xv}, bind(op, {"x": (3, n)}))["y"]
        pad = F.pad(xv, (1, 3 * n + 2))
        want = pad[:, 0:2 * n:2] + 10.0 * pad[:, 2:3 * n + 2:3]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 3, 4])
def test_phase_interleave(rnd, monkeypatch, m):
    """A map choosing between tensors by the residue of an axis mod 2, each read at floor(t / 2) (the interleave
    of a phase-split strided gradient), takes strided copies; it equals the generic evaluation and torch."""
    import importlib

    import sympy

    from opgen.ir.expr import index

    M = dims("M")
    with OpBuilder("interleave") as bld:
        a = bld.input("a", (3, M), DType.f32)
        b = bld.input("b", (3, M), DType.f32)
        p, t = make_axes("p"), opgen.axis("t", 2 * M - 1)
        y = bld.map(where(index(sympy.Eq(sympy.Mod(t, 2), 0)), a[p, t // 2], b[p, t // 2]), (p, t), name="y")
        op = bld.build({"y": y})
    av, bv = rnd.randn(3, m, dtype=F32), rnd.randn(3, m, dtype=F32)
    want = torch.stack([av, bv], -1).reshape(3, 2 * m)[:, :2 * m - 1]
    got = evaluate(op, {"a": av, "b": bv}, bind(op, {"a": (3, m), "b": (3, m)}))["y"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ev = importlib.import_module("opgen.targets.reference.evaluate")
    assert ev._phase_branches(op.nodes[0].value, op.nodes[0].axes) is not None
    monkeypatch.setattr(ev, "_phase_branches", lambda value, axes: None)
    generic = evaluate(op, {"a": av, "b": bv}, bind(op, {"a": (3, m), "b": (3, m)}))["y"]
    torch.testing.assert_close(generic, want, rtol=0, atol=0)
