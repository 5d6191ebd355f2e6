"""Dense stride-1 conv2d forward + backward at the image sizes of a ResNet / ConvNeXt first stage, small batches.

Failed before: the weight gradient (a window whose taps are the output pixels) got a default config that unrolled
the kernel-height loop over all of them, and its own check refused it: ``ValueError ... unroll_kh with a window
height of 56 (> 32)`` for every output above 32 px at batch 1, 2 and 4 (issue 22's crash; a config the op picks
itself must never be refused, issue 14). Compared with float64 ``F.conv2d`` autograd, fresh data each run.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import opgen.ops as ops

pytest.importorskip("tvm")


@pytest.mark.parametrize("n,c,f,hw", [(1, 16, 24, 33), (2, 8, 12, (40, 37)), (2, 64, 64, 56)],
                         ids=["1x16->24 33px", "2x8->12 40x37px", "resnet stage 2x64->64 56px"])
def test_dense_stride1_backward_above_32px(n, c, f, hw):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    h, w_ = (hw, hw) if isinstance(hw, int) else hw
    x64 = torch.randn(n, c, h, w_, generator=g, dtype=torch.float64)
    w64 = torch.randn(f, c, 3, 3, generator=g, dtype=torch.float64) / (3 * c ** 0.5)
    gy = torch.randn(n, f, h, w_, generator=g, dtype=torch.float64)
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
    y = ops.conv2d(x, w, padding=1)
    gx, gw = torch.autograd.grad(y, (x, w), gy.float())
    x64.requires_grad_(), w64.requires_grad_()
    ref = F.conv2d(x64, w64, padding=1)
    rx, rw = torch.autograd.grad(ref, (x64, w64), gy)
    for what, got, want in (("out", y, ref), ("grad x", gx, rx), ("grad weight", gw, rw)):
        scale = float(want.abs().max())
        err = float((got.double() - want).abs().max())
        assert err <= 1e-5 * scale, f"conv2d {n}x{c}->{f} {h}x{w_} {what}: max error {err} of {scale} (seed {seed})"
