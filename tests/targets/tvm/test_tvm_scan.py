"""The TVM CPU target on the scan ops (``opgen.targets.tvm``).

Every case runs ``TVMTarget().run`` on ops built with the ``declare_*`` functions of ``opgen.ops.scan`` and
compares with the reference backend (``opgen.targets.reference.evaluate``) and with an independent float64 torch
loop written in this file. Data is fresh random data (the seed is in every failure message); sizes are odd
(3, 5, 7, 13) and include size-1 axes. Both kernel forms run: scalar (one lane per iteration) and vectorized
over lanes (``lanes_vector`` > 1), chosen by the default config or forced.

Tolerances: fp32 ``1e-4 * max(1, max|expected|)`` (absolute, on every element); fp64 ``1e-9`` likewise.
Kernels are shared by the whole module through one target (dims are symbolic, so one kernel serves every size
of a case family), keeping the compile time of the module around half a minute.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import sympy
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

from opgen.ir import (DType, OpBuilder, absolute, bind, dims, exp, maximum, sigmoid, silu, softplus, tanh,  # noqa: E402
                      where)
from opgen.ir.passes import fuse_scan  # noqa: E402
from opgen.ir.symbols import make_axes  # noqa: E402
from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan  # noqa: E402
from opgen.targets.reference import evaluate  # noqa: E402
from opgen.targets.tvm import (ScanConfig, TVMTarget, as_config, check_config, default_config,  # noqa: E402
                               legalize, render_scan, space)
from opgen.targets.tvm.compile import KernelCache  # noqa: E402
from opgen.targets.tvm.expr import IndexRenderer  # noqa: E402

F32, F64 = torch.float32, torch.float64
IR = {F32: DType.f32, F64: DType.f64}
TOL = {F32: 1e-4, F64: 1e-9}
SCALAR = ScanConfig()


class Rand:
    def __init__(self) -> None:
        self.seed = random.randrange(2**31)
        self.g = torch.Generator().manual_seed(self.seed)

    def randn(self, *shape, dtype=F32, scale=1.0):
        return (scale * torch.randn(*shape, generator=self.g, dtype=F64)).to(dtype)

    def uniform(self, *shape, lo=0.0, hi=1.0, dtype=F32):
        return (lo + (hi - lo) * torch.rand(*shape, generator=self.g, dtype=F64)).to(dtype)


@pytest.fixture
def rnd() -> Rand:
    return Rand()


@pytest.fixture(scope="module")
def tvm_target(tmp_path_factory) -> TVMTarget:
    return TVMTarget(cache_dir=tmp_path_factory.mktemp("tvm-cache"))


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype, what: str, seed: int) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    want = want.to(F64)
    tol = TOL[dtype] * max(1.0, want.abs().max().item() if want.numel() else 1.0)
    err = (got.to(F64) - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"{what}: max |error| {err:.3g} > {tol:.3g} (seed {seed})"


def run_all(target: TVMTarget, op, inputs: dict, config=None):
    """(tvm outputs, reference outputs, the binding)."""
    b = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    got = target.run(op, inputs, b, config)
    ref = evaluate(op, inputs, b)
    assert set(got) == set(ref)
    return got, ref, b


# ------------------------------------------------------------------------------------- independent formulas


def linear_scan_loop(a, b, reverse=False, initial=None):
    a, b = a.to(F64), b.to(F64)
    P, L, Q = a.shape
    h = torch.zeros(P, Q, dtype=F64) if initial is None else initial.to(F64).clone()
    out = torch.empty(P, L, Q, dtype=F64)
    for t in (reversed(range(L)) if reverse else range(L)):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's selective scan, step by step in float64 (as mamba_ssm's selective_scan_ref)."""
    u, delta, A = u.to(F64), delta.to(F64), A.to(F64)
    Bt, Dd, L = u.shape
    N = A.shape[1]
    dt = delta + (delta_bias.to(F64)[:, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        dt = F.softplus(dt)

    def full(M):  # -> [Bt, Dd, N, L]
        M = M.to(F64)
        if M.dim() == 2:
            return M[None, :, :, None].expand(Bt, Dd, N, L)
        if M.dim() == 3:
            return M[:, None].expand(Bt, Dd, N, L)
        return M.repeat_interleave(Dd // M.shape[1], dim=1)

    Bx, Cx = full(B), full(C)
    h = torch.zeros(Bt, Dd, N, dtype=F64)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * Bx[..., t] * u[:, :, t, None]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.to(F64)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(F64))
    return y, h


def chunk_gla_loop(q, k, v, g, scale, initial_state=None):
    q, k, v, g = (x.to(F64) for x in (q, k, v, g))
    Bt, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(Bt, H, K, V, dtype=F64) if initial_state is None else initial_state.to(F64).clone()
    outs = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S + k[:, t][..., None] * v[:, t][..., None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


# -------------------------------------------------------------------------------------------- linear_scan


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_linear_scan(tvm_target, rnd, dtype, reverse, with_initial):
    op = declare_linear_scan(IR[dtype], IR[dtype], reverse, IR[dtype] if with_initial else None)
    # (3,13,5) and (1,1,1): no lane extent divisible by the SIMD width -> scalar kernel; (16,7,1): vectorized
    for shape in [(3, 13, 5), (1, 1, 1), (16, 7, 1), (7, 5, 3)]:
        P, L, Q = shape
        inputs = {"a": rnd.uniform(P, L, Q, lo=0.5, hi=1.05, dtype=dtype), "b": rnd.randn(P, L, Q, dtype=dtype)}
        if with_initial:
            inputs["initial"] = rnd.randn(P, Q, dtype=dtype)
        interleaved = ScanConfig(lanes_vector=4, vector_axis="p", time_tile=4, interleave=True)
        configs = [None, SCALAR, interleaved] if shape == (16, 7, 1) else [None]
        for cfg in configs:
            got, ref, _ = run_all(tvm_target, op, inputs, cfg)
            what = f"linear_scan {shape} reverse={reverse} initial={with_initial} cfg={cfg}"
            assert_close(got["h"], ref["h"], dtype, what + " vs reference", rnd.seed)
            indep = linear_scan_loop(inputs["a"], inputs["b"], reverse, inputs.get("initial"))
            assert_close(got["h"], indep, dtype, what + " vs loop", rnd.seed)


def test_linear_scan_vector_over_contiguous_axis(tvm_target, rnd):
    """Vectorized over q (the stride-1 axis): direct vector loads and stores instead of staged tiles. The config
    comes as its JSON dict (as a tuning store returns it)."""
    op = declare_linear_scan(reverse=True)
    inputs = {"a": rnd.uniform(3, 9, 16, lo=0.5, hi=1.0), "b": rnd.randn(3, 9, 16)}
    cfg = ScanConfig(lanes_vector=8, vector_axis="q", time_tile=4).to_json()
    got, ref, b = run_all(tvm_target, op, inputs, cfg)
    assert tvm_target.config_for(op, b, cfg).lanes_vector == 8
    assert_close(got["h"], ref["h"], F32, "linear_scan vector q", rnd.seed)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_time_vector(tvm_target, rnd, dtype, reverse):
    """Blocks of W steps scanned in registers (targets/tvm/scan_time_vector.py), the remainder as scalar steps:
    lengths below, at and above W and not multiples of it, one lane, an initial state."""
    op = declare_linear_scan(IR[dtype], IR[dtype], reverse, IR[dtype])
    for W, (P, L) in [(4, (3, 37)), (8, (1, 8)), (8, (2, 3)), (16, (5, 53)), (16, (1, 1))]:
        inputs = {"a": rnd.uniform(P, L, 1, lo=0.5, hi=1.05, dtype=dtype), "b": rnd.randn(P, L, 1, dtype=dtype),
                  "initial": rnd.randn(P, 1, dtype=dtype)}
        cfg = ScanConfig(time_vector=W)
        got, ref, b = run_all(tvm_target, op, inputs, cfg)
        assert tvm_target.config_for(op, b, cfg).time_vector == W
        indep = linear_scan_loop(inputs["a"], inputs["b"], reverse, inputs["initial"])
        assert_close(got["h"], indep, dtype, f"linear_scan time_vector={W} {(P, L)} reverse={reverse}", rnd.seed)
    # strided steps (Q > 1): the variant does not apply; a stored config falls back to a valid one
    b = bind(op, {"a": (2, 9, 3), "b": (2, 9, 3), "initial": (2, 3)})
    ok, why = check_config(ScanConfig(time_vector=8), fuse_scan(op), b)
    assert not ok and "contiguous" in why
    assert tvm_target.config_for(op, b, ScanConfig(time_vector=8)).time_vector == 0
    assert "T.Shuffle" in tvm_target.source(op, bind(op, {"a": (2, 9, 1), "b": (2, 9, 1), "initial": (2, 1)}),
                                            ScanConfig(time_vector=4)).text


def _shifted_scan(reverse: bool, shift: int):
    """``h[t] = where(0 <= t + shift < L, a[t + shift], 0) * h[t -/+ 1] + b[t] * c[t - 1]`` (padded loads at
    both ends of the sequence, as in the adjoint of a linear scan)."""
    from opgen.ir import where

    P, L = dims("P L")
    with OpBuilder("shifted_scan") as bld:
        a = bld.input("a", (P, L, 1), DType.f32)
        b = bld.input("b", (P, L, 1), DType.f32)
        c = bld.input("c", (P, L, 1), DType.f32)
        p, t, q = make_axes("p t q")
        inside = (t + shift >= 0) & (t + shift < L) if shift else True
        coef = a.pad(0, abs(shift), 0)[p, t + shift, q]
        h = bld.scan(t, a=where(inside, coef, 0.0) if shift else coef,
                     b=b[p, t, q] * c.pad(0, 1, 0)[p, t - 1, q], reverse=reverse, axes=(p, t, q))
        return bld.build({"h": h})


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shift", [1, -2])
def test_time_vector_with_shifted_padded_loads(tvm_target, rnd, reverse, shift):
    """Loads at t + 1 / t - 2 and t - 1 that fall outside the sequence read 0: the blocks stay inside (plain
    vector loads), the scalar steps at both edges mask. Lengths around the block size and shorter than the
    shifts."""
    op = _shifted_scan(reverse, shift)
    for W, (P, L) in [(8, (3, 29)), (4, (2, 4)), (16, (1, 2)), (4, (2, 1))]:
        inputs = {n: rnd.randn(P, L, 1) for n in "bc"}
        inputs["a"] = rnd.uniform(P, L, 1, lo=0.5, hi=1.0)
        b = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
        cfg = ScanConfig(time_vector=W)
        assert check_config(cfg, fuse_scan(op), b) == (True, "")
        got, ref, _ = run_all(tvm_target, op, inputs, cfg)
        assert_close(got["h"], ref["h"], F32, f"shifted scan W={W} {(P, L)} reverse={reverse} shift={shift}",
                     rnd.seed)


# ----------------------------------------------------------------------------------------- selective_scan

SS_CASES = [
    # (dtype, B layout, C layout, D, z, delta_bias, softplus, last_state, (batch, dim, L, N), G, config)
    (F32, "variable", "variable", False, False, False, False, False, (2, 5, 13, 3), 1, None),
    (F32, "variable", "variable", True, True, True, True, True, (2, 16, 13, 5), 1, None),
    (F32, "variable", "variable", True, True, True, True, True, (2, 16, 13, 5), 1, SCALAR),
    (F32, "grouped", "grouped", True, False, False, True, True, (3, 16, 7, 5), 4,
     ScanConfig(lanes_vector=8, vector_axis="d", static_state=True, unroll_state=True)),
    (F32, "grouped", "variable", False, True, True, False, False, (1, 13, 5, 3), 13, None),
    (F32, "shared", "grouped", False, False, True, True, True, (3, 7, 1, 1), 7, None),
    (F32, "variable", "shared", True, True, False, True, True, (1, 24, 37, 5), 1,
     ScanConfig(lanes_vector=8, vector_axis="d", time_tile=8)),
    (F64, "variable", "variable", True, True, True, True, True, (2, 7, 13, 3), 1, None),
    (F64, "grouped", "variable", True, True, True, True, True, (2, 8, 5, 3), 2,
     ScanConfig(lanes_vector=4, vector_axis="d", static_state=True)),
    # interleaved lanes (unrolled chains, blocks of steps; L=13 leaves a partial block)
    (F32, "variable", "variable", True, True, True, True, True, (2, 16, 13, 5), 1,
     ScanConfig(lanes_vector=4, vector_axis="d", time_tile=4, interleave=True)),
    (F64, "grouped", "shared", True, False, True, False, True, (3, 8, 9, 3), 2,
     ScanConfig(lanes_vector=2, vector_axis="d", time_tile=8, static_state=True, unroll_state=True,
                interleave=True)),
]


@pytest.mark.parametrize("case", SS_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'D' if c[3] else ''}"
                         f"{'z' if c[4] else ''}{'bias' if c[5] else ''}{'sp' if c[6] else ''}"
                         f"{'last' if c[7] else ''}-{c[8]}-{'cfg' if c[10] else 'default'}")
def test_selective_scan(tvm_target, rnd, case):
    dtype, bl, cl, has_D, has_z, has_bias, sp, last, (Bt, Dd, L, N), G, cfg = case
    dt = IR[dtype]
    op = declare_selective_scan(dt, dt, dt, dt, dt, bl, cl, dt if has_D else None, dt if has_z else None,
                                dt if has_bias else None, sp, last)

    def proj(layout):
        if layout == "shared":
            return rnd.randn(Dd, N, dtype=dtype)
        if layout == "variable":
            return rnd.randn(Bt, N, L, dtype=dtype)
        return rnd.randn(Bt, G, N, L, dtype=dtype)

    inputs = {"u": rnd.randn(Bt, Dd, L, dtype=dtype), "delta": rnd.uniform(Bt, Dd, L, lo=-1.0, hi=1.0, dtype=dtype),
              "A": -rnd.uniform(Dd, N, lo=0.1, hi=2.0, dtype=dtype), "B": proj(bl), "C": proj(cl)}
    if not sp:
        inputs["delta"] = inputs["delta"].abs()
    if has_D:
        inputs["D"] = rnd.randn(Dd, dtype=dtype)
    if has_z:
        inputs["z"] = rnd.randn(Bt, Dd, L, dtype=dtype, scale=2.0)
    if has_bias:
        inputs["delta_bias"] = rnd.randn(Dd, dtype=dtype, scale=0.5)
    got, ref, _ = run_all(tvm_target, op, inputs, cfg)
    y, h = selective_scan_loop(**inputs, delta_softplus=sp)
    what = f"selective_scan case {case}"
    assert_close(got["out"], ref["out"], dtype, what + " out vs reference", rnd.seed)
    assert_close(got["out"], y, dtype, what + " out vs loop", rnd.seed)
    if last:
        assert_close(got["last_state"], ref["last_state"], dtype, what + " last_state vs reference", rnd.seed)
        assert_close(got["last_state"], h, dtype, what + " last_state vs loop", rnd.seed)


def test_selective_scan_large_delta_uses_softplus_threshold(tvm_target, rnd):
    """delta + bias above 20 must pass through softplus unchanged (torch's threshold), below it log1p(exp)."""
    op = declare_selective_scan(D=DType.f32, z=DType.f32, delta_bias=DType.f32, delta_softplus=True,
                                last_state=True)
    Bt, Dd, L, N = 2, 16, 13, 5
    inputs = {"u": rnd.randn(Bt, Dd, L), "delta": rnd.uniform(Bt, Dd, L, lo=-30.0, hi=30.0),
              "A": -rnd.uniform(Dd, N, lo=0.001, hi=0.01), "B": rnd.randn(Bt, N, L), "C": rnd.randn(Bt, N, L),
              "D": rnd.randn(Dd), "z": rnd.randn(Bt, Dd, L), "delta_bias": rnd.randn(Dd)}
    got, ref, _ = run_all(tvm_target, op, inputs)
    assert_close(got["out"], ref["out"], F32, "selective_scan large delta", rnd.seed)
    assert_close(got["last_state"], ref["last_state"], F32, "selective_scan large delta state", rnd.seed)


# ----------------------------------------------------------------------------------------------- chunk_gla

GLA_CASES = [
    (F32, False, False, 1.0, (2, 7, 3, 5, 4), None),
    (F32, True, True, 0.5, (1, 13, 8, 3, 5), None),
    (F32, True, True, 0.5, (1, 13, 8, 3, 5), SCALAR),
    (F64, True, True, 0.25, (2, 5, 1, 3, 1), None),
    (F32, True, True, 0.5, (1, 13, 8, 3, 5), ScanConfig(lanes_vector=4, vector_axis="h", time_tile=4,
                                                        static_state=True, interleave=True)),
]


@pytest.mark.parametrize("case", GLA_CASES, ids=lambda c: f"{c[0]}-init{c[1]}-final{c[2]}-{c[4]}-{bool(c[5])}")
def test_chunk_gla(tvm_target, rnd, case):
    dtype, with_init, final, scale, (Bt, T, H, K, V), cfg = case
    dt = IR[dtype]
    op = declare_chunk_gla(dt, dt, dt, dt, scale, dt if with_init else None, final)
    inputs = {"q": rnd.randn(Bt, T, H, K, dtype=dtype), "k": rnd.randn(Bt, T, H, K, dtype=dtype),
              "v": rnd.randn(Bt, T, H, V, dtype=dtype),
              "g": F.logsigmoid(rnd.randn(Bt, T, H, K, dtype=F64) + 2).to(dtype)}
    if with_init:
        inputs["initial_state"] = rnd.randn(Bt, H, K, V, dtype=dtype)
    got, ref, _ = run_all(tvm_target, op, inputs, cfg)
    o, S = chunk_gla_loop(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale, inputs.get("initial_state"))
    what = f"chunk_gla case {case}"
    assert_close(got["o"], ref["o"], dtype, what + " o vs reference", rnd.seed)
    assert_close(got["o"], o, dtype, what + " o vs loop", rnd.seed)
    if final:
        assert_close(got["final_state"], ref["final_state"], dtype, what + " final vs reference", rnd.seed)
        assert_close(got["final_state"], S, dtype, what + " final vs loop", rnd.seed)


# --------------------------------------------------------------------------------------- inputs and layout


def test_misaligned_inputs(tvm_target, rnd):
    """Views at an odd element offset (x[1:]) are not 64-byte aligned; the kernel must accept them."""
    op = declare_linear_scan(initial=DType.f32)
    P, L, Q = 16, 7, 1

    def shifted(*shape, **kw):
        flat = rnd.randn(math.prod(shape) + 1, **kw)
        return flat[1:].view(*shape)

    inputs = {"a": shifted(P, L, Q, scale=0.5), "b": shifted(P, L, Q), "initial": shifted(P, Q)}
    assert inputs["a"].data_ptr() % 64 != 0
    for cfg in (None, SCALAR):
        got, ref, _ = run_all(tvm_target, op, inputs, cfg)
        assert_close(got["h"], ref["h"], F32, f"misaligned linear_scan {cfg}", rnd.seed)
    op = declare_selective_scan(D=DType.f32, last_state=True)
    Bt, Dd, L, N = 2, 16, 5, 5
    inputs = {"u": shifted(Bt, Dd, L), "delta": shifted(Bt, Dd, L, scale=0.3).abs(),
              "A": -shifted(Dd, N).abs(), "B": shifted(Bt, N, L), "C": shifted(Bt, N, L), "D": shifted(Dd)}
    got, ref, _ = run_all(tvm_target, op, inputs)
    assert_close(got["out"], ref["out"], F32, "misaligned selective_scan", rnd.seed)
    assert_close(got["last_state"], ref["last_state"], F32, "misaligned selective_scan state", rnd.seed)


def test_non_contiguous_inputs(tvm_target, rnd):
    op = declare_chunk_gla(scale=0.5, initial_state=DType.f32, final_state=True)
    Bt, T, H, K, V = 2, 5, 3, 3, 4
    q = rnd.randn(Bt, H, T, K).transpose(1, 2)          # [B, T, H, K] with permuted strides
    k = rnd.randn(Bt, T, H, 2 * K)[..., ::2]            # strided last dim
    v = rnd.randn(Bt, T, H, V)
    g = -rnd.uniform(Bt, T, H, K, lo=0.01, hi=0.5)
    init = rnd.randn(Bt, H, V, K).transpose(-1, -2)
    inputs = {"q": q, "k": k, "v": v, "g": g, "initial_state": init}
    assert not q.is_contiguous() and not k.is_contiguous() and not init.is_contiguous()
    got, ref, _ = run_all(tvm_target, op, inputs)
    o, S = chunk_gla_loop(q, k, v, g, 0.5, init)
    assert_close(got["o"], o, F32, "non-contiguous chunk_gla o", rnd.seed)
    assert_close(got["final_state"], S, F32, "non-contiguous chunk_gla final", rnd.seed)
    assert q.stride() != (Bt, T, H, K) and q.is_contiguous() is False   # inputs untouched


def test_input_dtype_converted_to_declared(tvm_target, rnd):
    op = declare_linear_scan()
    a, b = rnd.uniform(3, 5, 2, dtype=F64), rnd.randn(3, 5, 2, dtype=F64)
    bd = bind(op, {"a": a.shape, "b": b.shape})
    got = tvm_target.run(op, {"a": a, "b": b}, bd)["h"]
    assert got.dtype == F32
    assert_close(got, linear_scan_loop(a.float(), b.float()), F32, "f64 inputs to an f32 op", 0)


# ------------------------------------------------------------------------------------- expressions, masks


def _zoo_op(dtype: DType):
    """A scan whose coefficients use padded (zero-halo) shifted reads, index predicates, floor division and
    every transcendental function."""
    P, L = dims("P L")
    with OpBuilder("zoo") as bld:
        x = bld.input("x", (P, L), dtype)
        y = bld.input("y", (P, L), dtype)
        p, t = make_axes("p t")
        xs = x.pad((0, 0), (2, 1))
        prev, nxt = xs[p, t - 2], xs[p, t + 1]
        a = sigmoid(x[p, t]) * where(sympy.Eq(t % 3, 0), 0.5, 1.0)
        b = (tanh(y[p, t]) + where(sympy.Eq(t % 2, 0), softplus(prev * 12.0), silu(prev))
             + maximum(y[p, t // 2], -0.5) * exp(-absolute(nxt)) + where(sympy.Ge(t, p), 1.0, 0.0))
        h = bld.scan(t, a=a, b=b, axes=(p, t), name="h")
        return bld.build({"h": h})


@pytest.mark.parametrize("dtype", [F32, F64])
def test_padded_reads_predicates_and_functions(tvm_target, rnd, dtype):
    op = _zoo_op(IR[dtype])
    for P, L in ((3, 13), (16, 7)):
        inputs = {"x": rnd.randn(P, L, dtype=dtype, scale=2.0), "y": rnd.randn(P, L, dtype=dtype, scale=2.0)}
        for cfg in (None, SCALAR, ScanConfig(lanes_vector=8, vector_axis="p")):
            got, ref, _ = run_all(tvm_target, op, inputs, cfg)
            assert_close(got["h"], ref["h"], dtype, f"zoo {P}x{L} cfg={cfg}", rnd.seed)


def _elementwise_op(fn, dtype: DType):
    """h[p, t] = fn(x[p, t]) (a scan with a = 0): evaluates one function at every input point."""
    P, L = dims("P L")
    with OpBuilder("elementwise") as bld:
        x = bld.input("x", (P, L), dtype)
        p, t = make_axes("p t")
        h = bld.scan(t, a=0.0, b=fn(x[p, t]), axes=(p, t), name="h")
        return bld.build({"h": h})


FUNCS = {"exp": (exp, torch.exp), "sigmoid": (sigmoid, torch.sigmoid), "softplus": (softplus, F.softplus),
         "silu": (silu, F.silu), "tanh": (tanh, torch.tanh)}


@pytest.mark.parametrize("name", sorted(FUNCS))
@pytest.mark.parametrize("dtype", [F32, F64])
def test_transcendental_accuracy(tvm_target, name, dtype):
    """The polynomial float32 functions (and the exact float64 ones) against torch over [-120, 120], at the
    overflow/underflow edges, the softplus threshold and the special values."""
    ir_fn, torch_fn = FUNCS[name]
    op = _elementwise_op(ir_fn, IR[dtype])
    grid = torch.cat([torch.linspace(-120, 120, 4001, dtype=F64), torch.linspace(-1, 1, 999, dtype=F64),
                      torch.tensor([0.0, -0.0, 19.99, 20.0, 20.01, 88.7, 88.8, -87.3, -87.4, -103.0, 1e-8, -1e-8,
                                    math.inf, -math.inf, math.nan], dtype=F64)])
    x = grid.to(dtype)[None, :].repeat(8, 1)
    bd = bind(op, {"x": x.shape})
    want = torch_fn(x[0].to(F64))                  # accuracy reference
    want_dt = torch_fn(x[0]).to(F64)               # overflow / NaN pattern of the storage dtype
    finite = torch.isfinite(want_dt)
    tiny = want.abs() < (1e-30 if dtype == F32 else 1e-300)   # flushed near underflow
    bound = 2e-6 if dtype == F32 else 1e-13
    for cfg in (SCALAR, ScanConfig(lanes_vector=8, vector_axis="p")):
        got = tvm_target.run(op, {"x": x}, bd, cfg)["h"][0].to(F64)
        assert torch.equal(torch.isnan(got), torch.isnan(want_dt)), f"{name}: NaN pattern differs ({cfg})"
        special = ~finite & ~torch.isnan(want_dt)
        assert torch.equal(got[special], want_dt[special]), f"{name}: infinities differ ({cfg})"
        ok = finite & ~tiny
        rel = (got[ok] - want[ok]).abs() / want[ok].abs()
        assert rel.max().item() <= bound, \
            f"{name} {dtype}: max relative error {rel.max().item():.3g} at x={x[0][ok][rel.argmax()].item()} ({cfg})"
        assert (got[finite & tiny] - want[finite & tiny]).abs().max().item() <= (1e-30 if dtype == F32 else 1e-300), f"{name}: tiny values"
    nan = torch.full((1, 1), math.nan, dtype=dtype)
    assert torch.isnan(tvm_target.run(op, {"x": nan}, bind(op, {"x": (1, 1)}))["h"]).all(), f"{name}(nan)"


def test_index_renderer():
    p, t = make_axes("p t")
    L, G = dims("L G")
    r = IndexRenderer({p: "i_p", t: "i_t", L: "n_L", G: "n_G"})
    assert r(t // 2) == "T.floordiv(i_t, 2)"
    assert r(sympy.Mod(t, 3)) == "T.floormod(i_t, 3)"
    assert r(L - 1 - t) == "(n_L + (-1 * i_t) + -1)" or "T.floordiv" not in r(L - 1 - t)
    assert r(sympy.Min(t, p)) in ("T.min(i_p, i_t)", "T.min(i_t, i_p)")
    assert r(sympy.Piecewise((t, sympy.Eq(p, 0)), (p, True))) == "T.if_then_else((i_p == 0), i_t, i_p)"
    assert r(sympy.And(t >= 1, p < L)) in ("T.And((i_p < n_L), (i_t >= 1))", "T.And((i_t >= 1), (i_p < n_L))")
    assert r(sympy.Not(sympy.Eq(t, 2))).startswith(("T.Not", "(i_t != 2)"))
    assert r(sympy.true) == "T.bool(True)"
    assert r(L / G) == "T.floordiv(n_L, n_G)"
    r64 = IndexRenderer({t: "i_t"}, "int64")
    assert r64(t + 3) == "(i_t + T.int64(3))"


# ------------------------------------------------------------------------------------------- disk cache


def test_disk_cache_reused_by_a_new_target(tmp_path, rnd):
    op = declare_linear_scan(reverse=True)
    inputs = {"a": rnd.uniform(3, 5, 2), "b": rnd.randn(3, 5, 2)}
    b = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    fwd = declare_linear_scan(reverse=False)      # a second kernel (different source)
    first = TVMTarget(cache_dir=tmp_path)
    out1 = first.run(op, inputs, b, SCALAR)["h"]
    assert first.cache.stats.compiled == 1 and first.cache.stats.loaded == 0
    first.run(op, inputs, b, SCALAR)                 # served by the per-target dispatch cache
    first.kernel(op, b, SCALAR)                      # the kernel cache answers from memory
    assert first.cache.stats.compiled == 1 and first.cache.stats.memory_hits == 1
    ref_fwd = first.run(fwd, inputs, b, SCALAR)["h"]
    assert first.cache.stats.compiled == 2
    so = sorted((tmp_path / "tvm").glob("*.so"))
    assert len(so) == 2 and not list((tmp_path / "tvm").glob(".*tmp*")), "no temporary files are left"
    assert len(list((tmp_path / "tvm" / "src").glob("*.py"))) == 2, "the generated sources are kept"
    # corrupt the second kernel's file (replaced, as another writer would: the old file may be mapped)
    bad_path = tmp_path / "tvm" / f"{first.cache.key(first.source(fwd, b, SCALAR).text)}.so"
    bad = tmp_path / "bad.tmp"
    bad.write_bytes(b"not a shared object")
    os.replace(bad, bad_path)
    second = TVMTarget(cache_dir=tmp_path)
    out2 = second.run(op, inputs, b, SCALAR)["h"]
    assert second.cache.stats.loaded == 1 and second.cache.stats.compiled == 0, second.cache.stats
    assert torch.equal(out1, out2)
    out3 = second.run(fwd, inputs, b, SCALAR)["h"]
    assert second.cache.stats.load_failures == 1 and second.cache.stats.compiled == 1, second.cache.stats
    assert torch.equal(ref_fwd, out3)
    third = TVMTarget(cache_dir=tmp_path)
    third.run(fwd, inputs, b, SCALAR)
    assert third.cache.stats.loaded == 1 and third.cache.stats.compiled == 0, "the rebuilt file replaced the bad one"


def test_cache_key_depends_on_source_and_target(tmp_path):
    c = KernelCache(tmp_path)
    k1, k2 = c.key("a"), c.key("b")
    assert k1 != k2 and len(k1) == 64
    assert c.so_path(k1) == tmp_path / "tvm" / f"{k1}.so"


# -------------------------------------------------------------------------------------- target protocol


def test_target_protocol(tvm_target):
    from opgen.targets.base import Target

    assert isinstance(tvm_target, Target)
    assert tvm_target.name == "tvm"
    assert tvm_target.available() == (True, "")
    caps = tvm_target.caps()
    assert caps.device_kind == "cpu" and caps.cores >= 1 and caps.vector_bits in (0, 128, 256, 512)
    ss = declare_selective_scan()
    assert tvm_target.supports(ss, "cpu")
    assert not tvm_target.supports(ss, "cuda")
    assert tvm_target.supports(declare_chunk_gla(DType.f64, DType.f64, DType.f64, DType.f64), "cpu")
    assert not tvm_target.supports(declare_linear_scan(DType.bf16, DType.bf16), "cpu")
    from opgen.ops.conv import declare_causal_conv1d

    assert tvm_target.supports(declare_causal_conv1d(), "cpu")      # a window reduction (targets/tvm/window.py)
    assert not tvm_target.supports(declare_causal_conv1d(DType.bf16, DType.bf16), "cpu")


def test_config_space_and_defaults():
    op = declare_selective_scan()
    g = fuse_scan(op)
    b = bind(op, {"u": (2, 24, 9), "delta": (2, 24, 9), "A": (24, 5), "B": (2, 5, 9), "C": (2, 5, 9)})
    sp = space(g).to_json()
    assert set(sp["knobs"]) == {"lanes_vector", "vector_axis", "time_tile", "static_state", "unroll_state",
                                "fast_math", "interleave", "time_vector"}
    assert "d" in sp["knobs"]["vector_axis"]["values"]
    cfg = default_config(g, b)
    assert check_config(cfg, g, b) == (True, "")
    assert ScanConfig(**cfg.to_json()) == cfg
    assert as_config(cfg.to_json()) == cfg and as_config(None) is None
    with pytest.raises(ValueError, match="unknown"):
        as_config({"lanes_vectr": 8})
    bad = ScanConfig(lanes_vector=16, vector_axis="d")      # 24 % 16 != 0
    ok, why = check_config(bad, g, b)
    assert not ok and "multiple" in why
    assert legalize(bad, g, b).lanes_vector == 1
    assert not check_config(ScanConfig(unroll_state=True), g, b)[0]
    ok, why = check_config(ScanConfig(interleave=True), g, b)
    assert not ok and "interleave requires lanes_vector > 1" in why
    ok, why = check_config(ScanConfig(time_vector=8), g, b)          # a state axis n: not a first-order scan
    assert not ok and "state has axes" in why
    assert legalize(ScanConfig(time_vector=8), g, b).time_vector == 0
    assert not check_config(ScanConfig(time_vector=6), g, b)[0]
    with pytest.raises(ValueError, match="vector_axis"):
        render_scan(g, ScanConfig(lanes_vector=8, vector_axis="n"))


def test_int64_indexing_kernel(tvm_target, rnd):
    """The int64 variant (used when a tensor has 2**31 elements or more) renders, compiles and is correct."""
    op = declare_selective_scan(D=DType.f32, last_state=True)
    g = fuse_scan(op)
    inputs = {"u": rnd.randn(2, 5, 7), "delta": rnd.uniform(2, 5, 7), "A": -rnd.uniform(5, 3),
              "B": rnd.randn(2, 3, 7), "C": rnd.randn(2, 3, 7), "D": rnd.randn(5)}
    b = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    ks = render_scan(g, SCALAR, index_bits=64)
    assert "T.int64()" in ks.text
    fn = tvm_target.cache.get(ks.text)
    outs = {"out": torch.empty(2, 5, 7), "last_state": torch.empty(2, 5, 3)}
    fn(*[inputs[n] if n in inputs else outs[n] for n in ks.tensors])
    ref = evaluate(op, inputs, b)
    assert_close(outs["out"], ref["out"], F32, "int64 kernel", rnd.seed)
    assert_close(outs["last_state"], ref["last_state"], F32, "int64 kernel state", rnd.seed)


def test_importing_the_package_does_not_import_tvm():
    code = ("import sys, opgen.targets.tvm as m; t = m.TVMTarget(); t.caps(); "
            "assert 'tvm' not in sys.modules, 'tvm was imported'; print('ok')")
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_rendered_source_properties():
    """What the kernels must look like: vectorized lanes with the polynomial exp for float32 (no libm call per
    lane, no T.isnan, which TVM does not vectorize), exact T.exp for float64, symbolic dims, staged tiles."""
    op = declare_selective_scan(D=DType.f32, z=DType.f32, delta_bias=DType.f32, delta_softplus=True,
                                last_state=True)
    g = fuse_scan(op)
    N = [d for d in op.dims if d.name == "N"][0]
    vec = render_scan(g, ScanConfig(lanes_vector=8, vector_axis="d", static_state=True, unroll_state=True),
                      static_dims={N: 16}).text
    assert "T.vectorized(8)" in vec and "T.unroll(16)" in vec and "T.parallel(" in vec
    assert "T.exp(" not in vec and "T.isnan" not in vec and "T.log(" not in vec and "T.let = x" not in vec
    assert "n_D = T.int32()" in vec and "n_DgB" not in vec        # variable B/C: no groups
    assert "tl" in vec and "ot" in vec                              # staged input / output tiles
    op64 = declare_selective_scan(*(DType.f64,) * 5, D=DType.f64, delta_softplus=True)
    exact = render_scan(fuse_scan(op64), SCALAR).text
    assert "T.exp(" in exact and "T.log1p(" in exact and "float32" not in exact
    grouped = render_scan(fuse_scan(declare_selective_scan(B_layout="grouped")), SCALAR).text
    assert "n_DgB: T.let = T.floordiv(n_D, n_GB)" in grouped
