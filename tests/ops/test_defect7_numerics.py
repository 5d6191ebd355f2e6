"""Issue 14, defect 7: shapes torch accepts that opgen rejected, and inputs where opgen silently differed from a
sequential / causal evaluation.

* conv2d with a large stride (a staged patch over the local-buffer limit): every shape ``F.conv2d`` accepts runs,
  forward and gradients, against ``F.conv2d`` in float64 (float32 inputs: ``atol = rtol = 1e-5`` relative to the
  reference's magnitude; each output is a sum of at most C*KH*KW = 864 products of N(0, 1) values).
* long_conv is causal: an input at position t (NaN, inf, or 1e7) leaves every output before t unchanged.
* linear_scan with inf in ``a`` or ``b`` gives the inf / NaN pattern of a sequential float32 loop.

Every test draws a fresh seed and prints it in its failure message.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import opgen.ops as ops

F32, F64 = torch.float32, torch.float64


def _gen() -> tuple[int, torch.Generator]:
    seed = random.randrange(2**31)
    return seed, torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape, dtype=F32) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, seed: int, tol: float = 1e-5) -> None:
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(got.detach().to(F64), ref.to(F64), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what} (seed {seed}):\n{m}")


# ---------------------------------------------------------------------------------- conv2d, large strides

# (x shape, weight shape, stride, padding, groups): the shapes, a non-square odd one, and one with many input
# channels and a single output channel per group (the direct variant's one-tile patch does not fit at any width)
LARGE_STRIDES = {
    "3x3-s16-64": ((2, 4, 64, 64), (8, 4, 3, 3), 16, 1, 1),
    "1x1-s14-128": ((1, 16, 128, 128), (8, 16, 1, 1), 14, 0, 1),
    "1x1-s17-128": ((1, 16, 128, 128), (8, 16, 1, 1), 17, 0, 1),
    "dw3x3-s32-64": ((2, 8, 64, 64), (8, 1, 3, 3), 32, 1, 8),
    "3x5-s13x11-61x45": ((2, 3, 61, 45), (5, 3, 3, 5), (13, 11), (1, 2), 1),
    "3x3-s16-96to1": ((1, 96, 50, 50), (1, 96, 3, 3), 16, 1, 1),
}


@pytest.mark.parametrize("case", list(LARGE_STRIDES), ids=list(LARGE_STRIDES))
def test_conv2d_large_stride_forward_and_gradients(case):
    """Failed before: "the staged patch has 49572 elements (> 32768)" for a config the op chose itself (and the
    strided data gradients split into 196-289 phase kernels, minutes per call)."""
    xs, ws, stride, padding, groups = LARGE_STRIDES[case]
    seed, g = _gen()
    x = _randn(g, *xs).requires_grad_()
    w = _randn(g, *ws).requires_grad_()
    y = ops.conv2d(x, w, stride=stride, padding=padding, groups=groups)
    x64, w64 = x.detach().to(F64).requires_grad_(), w.detach().to(F64).requires_grad_()
    ref = F.conv2d(x64, w64, stride=stride, padding=padding, groups=groups)
    _close(y, ref, f"conv2d {case} forward", seed)
    gy = _randn(g, *ref.shape)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    rx, rw = torch.autograd.grad(ref, (x64, w64), gy.to(F64))
    _close(gx, rx, f"conv2d {case} grad x", seed)
    _close(gw, rw, f"conv2d {case} grad weight", seed)


def test_default_window_configs_are_valid_at_any_stride():
    """The default config of every forward window (dense, grouped, depthwise; f32 and f64) passes its own check
    (no compile: configs only) for strides up to 40 and kernels up to 7x7."""
    pytest.importorskip("tvm")
    from opgen.ir import DType, bind
    from opgen.ir.passes.window import fuse_window
    from opgen.ops.conv import declare_conv2d, declare_depthwise_conv2d
    from opgen.targets.tvm.window import check_window_config, default_window_config

    seed, _ = _gen()
    rng = random.Random(seed)
    for _ in range(12):
        dt = rng.choice((DType.f32, DType.f64))
        C, Fo, G = rng.choice(((4, 8, 1), (96, 1, 1), (8, 8, 8), (16, 32, 4), (3, 5, 1), (64, 64, 1)))
        KH, KW = rng.choice((1, 3, 5, 7)), rng.choice((1, 3, 5, 7))
        sh, sw = rng.randint(1, 40), rng.randint(1, 40)
        H, W = rng.randint(KH, 160), rng.randint(KW, 160)
        if G == C == Fo and rng.random() < 0.5:
            op = declare_depthwise_conv2d(dt, dt, None, (sh, sw), (0,) * 4, (1, 1))
            b = bind(op, {"x": (1, C, H, W), "weight": (C, KH, KW)})
        else:
            op = declare_conv2d(dt, dt, None, (sh, sw), (0,) * 4, (1, 1), G)
            b = bind(op, {"x": (1, C, H, W), "weight": (Fo, C // G, KH, KW)})
        grp = fuse_window(op)
        cfg = default_window_config(grp, b)
        ok, why = check_window_config(cfg, grp, b)
        assert ok, f"default config {cfg} of {op.name} C={C} F={Fo} G={G} {KH}x{KW} s=({sh}, {sw}) {H}x{W}: {why} " \
                   f"(seed {seed})"


# ------------------------------------------------------------------------------------- long_conv causality


def _long_inputs(g: torch.Generator, L: int, B: int = 2, H: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """u ``[B, H, L]`` ~ N(0, 1) and a full-length filter k ``[H, L]`` ~ N(0, 1/L) (outputs ~ N(0, 1)): the FFT
    path is the default at these lengths."""
    return _randn(g, B, H, L), _randn(g, H, L) / math.sqrt(L)


@pytest.mark.parametrize("L", [8192, 4097])
def test_long_conv_nan_or_inf_input_leaves_earlier_outputs(L):
    """Failed before: a NaN at the last position made all earlier outputs NaN (the FFT mixes every position).
    Now outputs before it are finite and equal the clean outputs within float32 rounding (1e-5 relative)."""
    seed, g = _gen()
    u, k = _long_inputs(g, L)
    y = ops.long_conv(u, k)
    for bad in (float("nan"), float("inf")):
        for t in (L - 1, L // 3):
            u2 = u.clone()
            u2[:, 1, t] = bad
            y2 = ops.long_conv(u2, k)
            assert torch.isfinite(y2[..., :t]).all() and torch.isfinite(y2[:, (0, 2)]).all(), \
                f"L={L}: {bad} at {t} reached earlier outputs or other channels (seed {seed})"
            assert not torch.isfinite(y2[:, 1, t]).any(), f"L={L}: {bad} at {t} lost (seed {seed})"
            _close(y2[..., :t], y[..., :t], f"long_conv L={L} with {bad} at {t}", seed)


@pytest.mark.parametrize("L", [8192, 4097])
def test_long_conv_large_input_does_not_move_earlier_outputs(L):
    """Failed before: 1e7 at the last position moved every earlier output by ~0.1 (of ~3). Now an outlier
    (:data:`opgen.targets.spectral.OUTLIER_RATIO` times its row's mean |x|) never enters the transform: it is added
    back by a direct sum to the outputs at and after it, so earlier outputs move only by the transform's rounding
    of the ordinary values (at most 1e-5 of the row's scale), and the outputs that read it are right."""
    seed, g = _gen()
    u, k = _long_inputs(g, L)
    y = ops.long_conv(u, k)
    scale = y.abs().max().item()
    for t in (L - 1, L // 2 + 1, 1):
        u2 = u.clone()
        u2[:, 1, t] = 1e7
        y2 = ops.long_conv(u2, k)
        moved = (y2[..., :t] - y[..., :t]).abs().max().item()
        assert moved <= 1e-5 * scale, f"L={L}: 1e7 at {t} moved earlier outputs by {moved} of {scale} (seed {seed})"
        want = y[:, 1, t:] + (1e7 - u[:, 1, t, None].double()) * k[1, :L - t].double()
        assert torch.allclose(y2[:, 1, t:].double(), want, rtol=1e-5, atol=1e-5 * scale), \
            f"L={L}: outputs reading the 1e7 at {t} are wrong (seed {seed})"


@pytest.mark.parametrize("L", [4097, 2048])
def test_long_conv_backward_is_anticausal(L):
    """The data gradient du[s] = sum_{t >= s} k[t - s] gy[t] reads only later gradients: a NaN in gy[0] stays in
    du[0] (failed before: every du was NaN) and leaves the filter gradient of the other channels finite, and 1e7 in
    gy[0] moves later du only by the transform's rounding. (dk[h] sums gy[h] against the zero-padded u, so
    a NaN in gy[h] makes all of dk[h] NaN, as for F.conv1d.)"""
    seed, g = _gen()
    u, k = _long_inputs(g, L)
    u.requires_grad_()
    k.requires_grad_()
    gy = _randn(g, *u.shape)
    du, dk = torch.autograd.grad(ops.long_conv(u, k), (u, k), gy)
    gy2 = gy.clone()
    gy2[:, 1, 0] = float("nan")
    du2, dk2 = torch.autograd.grad(ops.long_conv(u, k), (u, k), gy2)
    assert torch.isfinite(du2[..., 1:]).all() and torch.isfinite(du2[:, (0, 2)]).all(), \
        f"L={L}: a NaN in gy[0] reached du after 0 (seed {seed})"
    assert du2[:, 1, 0].isnan().all() and torch.isfinite(dk2[(0, 2), :]).all()
    _close(du2[..., 1:], du[..., 1:], f"long_conv L={L} du with NaN in gy[0]", seed)
    _close(dk2[(0, 2), :], dk[(0, 2), :], f"long_conv L={L} dk with NaN in gy[0]", seed)
    gy3 = gy.clone()
    gy3[:, 1, 0] = 1e7
    du3, = torch.autograd.grad(ops.long_conv(u, k), (u,), gy3)
    moved = (du3[..., 1:] - du[..., 1:]).abs().max().item()
    assert moved <= 1e-5 * du.abs().max().item(), f"L={L}: 1e7 in gy[0] moved du after 0 by {moved} (seed {seed})"


# ------------------------------------------------------------------------------------- linear_scan with inf


def _sequential_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """h[t] = a[t] * h[t-1] + b[t] from h = 0, one float32 step at a time (along the last dim)."""
    h = torch.zeros(a.shape[:-1], dtype=F32)
    out = torch.empty_like(a)
    steps = range(a.shape[-1] - 1, -1, -1) if reverse else range(a.shape[-1])
    for t in steps:
        h = a[..., t] * h + b[..., t]
        out[..., t] = h
    return out


def _same_pattern(got: torch.Tensor, ref: torch.Tensor, what: str, seed: int) -> None:
    """Same NaN positions, same infinities (with sign), finite values within 1e-4 relative (float32 reassociation
    over up to 1000 steps of decays in (0, 1))."""
    assert torch.equal(got.isnan(), ref.isnan()), \
        f"{what}: NaN at {got.isnan().nonzero().tolist()[:6]}, sequential at {ref.isnan().nonzero().tolist()[:6]} " \
        f"(seed {seed})"
    inf = ref.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], ref[inf]), f"{what}: infinities differ (seed {seed})"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} (seed {seed}): {m}")


@pytest.mark.parametrize("L", [16, 17, 100, 1000])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_inf_matches_a_sequential_loop(L, reverse):
    """Failed before: an inf in ``a`` gave NaN from L >= 16 where the sequential loop gives inf (the in-register
    scan of W steps multiplies the product of the a's by a zero state or a zero shifted in: inf * 0)."""
    seed, g = _gen()
    P = 12
    a = torch.rand(P, L, generator=g, dtype=F64).to(F32)
    b = _randn(g, P, L)
    rng = random.Random(seed)
    for lane in range(P):
        kind = lane % 4                     # inf in a, -inf in a, inf in b, both
        t = rng.randrange(L)
        if kind in (0, 3):
            a[lane, t] = float("inf")
        if kind == 1:
            a[lane, t] = float("-inf")
        if kind in (2, 3):
            b[lane, rng.randrange(L)] = float("inf")
    b[0, 0] = 0.0                            # a zero state before an inf: inf * 0 is NaN in the loop too
    got = ops.linear_scan(a, b, reverse=reverse)
    _same_pattern(got, _sequential_scan(a, b, reverse), f"linear_scan L={L} reverse={reverse}", seed)
