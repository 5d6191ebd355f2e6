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
