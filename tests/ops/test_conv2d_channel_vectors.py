"""The channel-vectorized (``cvec``) and reduction-vectorized (``dot``) window kernels of conv2d and its generated
gradients (issue 22 item 3).

Failed before: a small image with many channels (7-28 px) ran the gemm kernel with 16 lanes along a 7-wide row, and
the weight gradient (taps = the N*OH*OW output pixels, a 3x3 output) ran it with 16 lanes along a 3-wide output:
B=8 3x3 512->512 7 px forward 33 ms, 64->64 56 px weight gradient 60 ms (cvec: 16 and 14 ms, one thread, AVX-512).
Every variant is checked against float64 ``F.conv2d`` autograd on fresh random data (sizes that are not powers of
two, a partial last channel tile, padded channel vectors, groups, strides, dilation, batch 1, a size-1 width);
fp32 relative tolerance 2e-5 of the largest reference value.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

from opgen.bridge import backward_op  # noqa: E402
from opgen.ops.conv import conv2d_inputs, conv2d_op_for  # noqa: E402
from opgen.runtime import default_session  # noqa: E402
from opgen.schedules.window import default_cvec_config, default_dot_config  # noqa: E402
from opgen.targets.tvm.window import (check_window_config, default_window_config, run_window,  # noqa: E402
                                      window_group)

TOL = 2e-5


def _case(n, c, f, k, hw, stride, pad, dil, groups, seed):
    g = torch.Generator().manual_seed(seed)
    h, w_ = hw
    x64 = torch.randn(n, c, h, w_, generator=g, dtype=torch.float64)
    w64 = torch.randn(f, c // groups, k, k, generator=g, dtype=torch.float64) / (k * (c // groups) ** 0.5)
    conv = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    x64.requires_grad_(), w64.requires_grad_()
    y64 = F.conv2d(x64, w64, **conv)
    gy = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    rx, rw = torch.autograd.grad(y64, (x64, w64), gy)
    x, w = x64.detach().float(), w64.detach().float()
    op = conv2d_op_for(x, w, None, [stride] * 2, [pad] * 4, [dil] * 2, groups)
    ins = conv2d_inputs(op, {"x": x, "weight": w, "bias": None}, {"groups": groups})
    return op, {**ins, "grad_out": gy.float()}, {"out": y64.detach(), "grad_x": rx, "grad_weight": rw}


def _run(op, ins, config_of):
    """(output name, output) of ``op``'s window kernel under ``config_of(group, binding)``, or None when that config
    does not apply to this group."""
    group = window_group(op)
    assert group is not None, op.name
    names = {t.name for t in op.inputs}
    given = {k: v for k, v in ins.items() if k in names}
    b = default_session().binding(op, {k: tuple(v.shape) for k, v in given.items()}, {}, "test")
    cfg = config_of(group, b)
    if not check_window_config(cfg, group, b)[0]:
        return None
    (name, out), = run_window(group, given, b, cfg).items()
    return name, out


CVEC = lambda g, b: default_cvec_config(g, b, 16)  # noqa: E731
CVEC_AVX2 = lambda g, b: default_cvec_config(g, b, 8, 16)  # noqa: E731
CVEC_ROW = lambda g, b: replace(default_cvec_config(g, b, 16), rows_tile=1, width_vectors=2,  # noqa: E731
                                co_tile=2, block_width=64)              # several passes over the input channels
DOT = lambda g, b: default_dot_config(g, b, 16)  # noqa: E731

CASES = [  # n, c, f, k, (h, w), stride, pad, dilation, groups; the (gradient, config) pairs run
    ((2, 40, 40, 3, (9, 6), 1, 1, 1, 1), [("out", CVEC), ("grad_x", CVEC), ("grad_weight", CVEC)]),  # a 2-vector tail
    ((1, 24, 20, 3, (7, 7), 1, 1, 1, 1), [("out", CVEC), ("grad_weight", DOT)]),       # 20 channels: padded vector
    ((3, 32, 48, 3, (11, 10), 2, 1, 1, 2), [("out", CVEC)]),                           # groups, stride 2
    ((2, 16, 32, 3, (11, 10), 2, 1, 1, 1), [("grad_weight", CVEC)]),                   # a strided weight gradient
    ((2, 16, 32, 3, (13, 9), 1, 2, 2, 1), [("out", CVEC_ROW), ("grad_weight", DOT)]),  # dilation 2
    ((1, 24, 24, 7, (7, 7), 1, 3, 1, 1), [("out", CVEC_ROW), ("grad_weight", CVEC_AVX2)]),  # 7x7 at 7 px
    ((2, 24, 32, 1, (5, 1), 1, 0, 1, 1), [("grad_x", CVEC), ("grad_weight", CVEC)]),   # 1x1, a size-1 width
]


@pytest.mark.parametrize("case,runs", CASES,
                         ids=lambda c: "n{0} {1}->{2} k{3} {4} s{5} p{6} d{7} g{8}".format(*c) if len(c) == 9 else "")
def test_cvec_and_dot_match_float64_autograd(case, runs):
    seed = random.randrange(2**31)
    fwd, ins, ref = _case(*case, seed)
    for what, config_of in runs:
        op = fwd if what == "out" else backward_op(fwd, (what[len("grad_"):],))
        got = _run(op, ins, config_of)
        assert got is not None, f"{what} {case}: the config does not apply"
        want = ref[what]
        out = got[1].double().reshape(want.shape)
        err = float((out - want).abs().max())
        scale = float(want.abs().max())
        assert err <= TOL * scale, f"{what} {case}: max error {err} of {scale} (seed {seed})"


def test_small_images_and_weight_gradients_take_channel_vectors():
    """The default configs: cvec for a 7 px image with 64 channels and for the weight gradients of a 56 px and a
    7 px convolution; the gemm kernel stays for a 56 px forward."""
    def config(n, c, s, wrt=None):
        x, w = torch.zeros(n, c, s, s), torch.zeros(c, c, 3, 3)
        op = conv2d_op_for(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
        if wrt is not None:
            op = backward_op(op, (wrt,))
        shapes = {"x": tuple(x.shape), "weight": tuple(w.shape), "grad_out": (n, c, s, s)}
        shapes = {k: v for k, v in shapes.items() if k in {t.name for t in op.inputs}}
        return default_window_config(window_group(op), default_session().binding(op, shapes, {}, "test"))

    assert config(8, 64, 7).variant == "cvec"
    assert config(8, 64, 7, "x").variant == "cvec"
    assert config(8, 64, 7, "weight").variant == "cvec"
    assert config(2, 64, 56, "weight").variant == "cvec"
    assert config(8, 64, 56).variant == "gemm"


@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_weight_gradient_is_a_window_on_the_channel_kernels(stride):
    """A grouped convolution's weight gradient reads the data at ``[n, (co // F) * C + ci, ...]``; restaged, it reads
    the regrouped data ``[ci, (co // F) * N + n, ...]``: a grouped window reduction (failed before: no node of the
    backward op was a window, and it ran node by node in the interpreter, 54 ms against oneDNN's 14 ms for B=8
    C=128 groups=32 28 px, 42 against 1 ms for 64 channels in 2 groups at 14 px). Gradients through
    ``opgen.ops.conv2d`` match float64 autograd (3 groups of 5 -> 7 channels, 11x10, batch 3)."""
    from opgen.ir.passes.split import node_op

    import opgen.ops as ops

    seed = random.randrange(2**31)
    fwd, ins, ref = _case(3, 15, 21, 3, (11, 10), stride, 1, 1, 3, seed)
    back = backward_op(fwd, ("weight",))
    assert any(window_group(node_op(back, k)) is not None for k in range(len(back.nodes)))
    x, w = ins["x"].clone().requires_grad_(), ins["weight"].clone().requires_grad_()
    y = ops.conv2d(x, w, stride=stride, padding=1, groups=3)
    gx, gw = torch.autograd.grad(y, (x, w), ins["grad_out"])
    for what, got in (("out", y), ("grad_x", gx), ("grad_weight", gw)):
        want = ref[what]
        err = float((got.double() - want).abs().max())
        assert err <= TOL * float(want.abs().max()), f"{what} stride {stride}: max error {err} (seed {seed})"
