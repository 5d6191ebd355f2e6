"""The grad transform on window reductions: conv backward ops generated in the IR (transposed window reductions
for the data, correlations for the weight, sums for the bias) match torch autograd of ``F.conv2d`` /
``F.conv1d`` (an independent reference, not the forward interpreter).

fp64, fresh random data, odd sizes and size-1 axes; tolerance 1e-10.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

from opgen.ir import DType
from opgen.ir.nodes import Reduce
from opgen.ir.passes.grad import grad_op
from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_long_conv
from opgen.config import Config
from opgen.runtime import make_session

F, T = DType.f64, torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def session():
    return make_session(Config(backend="reference"))


def _backward(session, op, ins: dict, grad_out: torch.Tensor, wrt) -> dict:
    """Run the generated backward op on the reference interpreter (named like torch_ops._run_backward)."""
    back = grad_op(op, wrt)
    (out,) = op.outputs
    return session.run(back, {**ins, f"grad_{out.name}": grad_out})


def _autograd(fn, ins: dict, wrt):
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in ins.items()}
    y = fn(**leaves)
    gy = torch.randn_like(y)
    return gy, dict(zip(wrt, torch.autograd.grad(y, [leaves[k] for k in wrt], gy)))


def _compare(got: dict, want: dict, what: str) -> None:
    for k, w in want.items():
        g = got[f"grad_{k}"]
        assert g.shape == w.shape, f"{what} d{k}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{what} d{k}: {m}")


# ------------------------------------------------------------------------------------------------- conv2d

CONV2D = [
    # (N, Cin, H, W, Cout, KH, KW, stride, padding (t, b, l, r), dilation, groups, bias)
    (2, 3, 7, 9, 4, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 1, False),   # valid, stride 1
    (2, 3, 7, 9, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, True),    # "same"
    (2, 3, 7, 9, 5, 3, 2, (2, 2), (1, 1, 1, 1), (1, 1), 1, True),    # stride 2
    (1, 2, 7, 9, 3, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, False),   # dilation 2
    (2, 4, 7, 9, 6, 3, 3, (2, 1), (1, 2, 0, 1), (1, 2), 2, True),    # asymmetric padding, mixed, groups 2
    (2, 4, 7, 9, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, False),   # depthwise
    (1, 3, 7, 9, 6, 3, 3, (2, 2), (1, 1, 1, 1), (2, 1), 3, True),    # depthwise, multiplier 2, stride 2
    (2, 2, 8, 7, 2, 2, 3, (2, 3), (0, 1, 2, 0), (3, 2), 2, False),   # stride 3 / dilation 3, odd paddings
    (1, 1, 1, 9, 1, 1, 3, (1, 2), (0, 0, 1, 1), (1, 1), 1, True),    # size-1 axes (N, C, H, KH)
    (3, 2, 5, 1, 1, 2, 1, (1, 1), (1, 0, 0, 0), (1, 1), 1, False),   # size-1 W and KW, one-sided padding
]


@pytest.mark.parametrize("case", CONV2D, ids=lambda c: f"s{c[7]}p{c[8]}d{c[9]}g{c[10]}{'b' if c[11] else ''}")
def test_conv2d_backward_matches_torch(session, case):
    n, cin, h, w, cout, kh, kw, stride, pads, dil, groups, bias = case
    op = declare_conv2d(F, F, F if bias else None, stride, pads, dil, groups)
    ins = dict(x=torch.randn(n, cin, h, w, dtype=T), weight=torch.randn(cout, cin // groups, kh, kw, dtype=T))
    if bias:
        ins["bias"] = torch.randn(cout, dtype=T)
    pt, pb, pl, pr = pads

    def ref(x, weight, bias=None):
        return Fn.conv2d(Fn.pad(x, (pl, pr, pt, pb)), weight, bias, stride=stride, dilation=dil, groups=groups)

    wrt = list(ins)
    gy, want = _autograd(ref, ins, wrt)
    _compare(_backward(session, op, ins, gy, wrt), want, f"conv2d {case}")
    if bias or stride != (1, 1):
        return
    # each input on its own (the backward op then carries only what that gradient needs)
    for k in wrt:
        _compare(_backward(session, op, ins, gy, [k]), {k: want[k]}, f"conv2d {case} only d{k}")


# ------------------------------------------------------------------------------------------ causal_conv1d


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("bias,act", [(False, None), (True, None), (True, "silu"), (False, "silu")])
def test_causal_conv1d_backward_matches_torch(session, width, bias, act):
    b, d, length = 2, 5, 9
    op = declare_causal_conv1d(F, F, F if bias else None, act)
    ins = dict(x=torch.randn(b, d, length, dtype=T), weight=torch.randn(d, width, dtype=T))
    if bias:
        ins["bias"] = torch.randn(d, dtype=T)

    def ref(x, weight, bias=None):
        y = Fn.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=d)[..., :length]
        return Fn.silu(y) if act else y

    wrt = list(ins)
    gy, want = _autograd(ref, ins, wrt)
    _compare(_backward(session, op, ins, gy, wrt), want, f"causal_conv1d W={width} bias={bias} act={act}")


def test_causal_conv1d_short_sequence(session):
    """L = 1 < W: every window reaches into the padding."""
    op = declare_causal_conv1d(F, F, F, "silu")
    ins = dict(x=torch.randn(1, 3, 1, dtype=T), weight=torch.randn(3, 4, dtype=T), bias=torch.randn(3, dtype=T))

    def ref(x, weight, bias):
        return Fn.silu(Fn.conv1d(x, weight.unsqueeze(1), bias, padding=3, groups=3)[..., :1])

    gy, want = _autograd(ref, ins, list(ins))
    _compare(_backward(session, op, ins, gy, list(ins)), want, "causal_conv1d L=1")


# ---------------------------------------------------------------------------------------------- long_conv


@pytest.mark.parametrize("bt,h,length,lk", [(2, 3, 9, 4), (1, 1, 7, 7), (2, 2, 5, 1)])
def test_long_conv_backward_matches_torch(session, bt, h, length, lk):
    op = declare_long_conv(F, F)
    ins = dict(u=torch.randn(bt, h, length, dtype=T), k=torch.randn(h, lk, dtype=T))

    def ref(u, k):  # y[t] = sum_j k[j] u[t - j]: a correlation with the flipped filter, causal
        return Fn.conv1d(Fn.pad(u, (lk - 1, 0)), k.flip(-1).unsqueeze(1), groups=h)

    gy, want = _autograd(ref, ins, ["u", "k"])
    _compare(_backward(session, op, ins, gy, ["u", "k"]), want, f"long_conv {bt, h, length, lk}")


# ------------------------------------------------------------------------------------------------- shapes


def test_data_gradient_is_a_transposed_window_reduction():
    """Stride 1: dx reads the adjoint through padded windows and needs no predicate; stride 2 adds a divisibility
    predicate; the weight gradient is a plain correlation (no predicate)."""
    back = grad_op(declare_conv2d(F, F, None, (1, 1), (1, 1, 1, 1)), ["x"])
    (red,) = [n for n in back.nodes if isinstance(n, Reduce)]
    assert red.predicate is None and "grad_out.pad" in str(back)
    back = grad_op(declare_conv2d(F, F, None, (2, 2), (1, 1, 1, 1)), ["x"])
    (red,) = [n for n in back.nodes if isinstance(n, Reduce)]
    assert red.predicate is not None and "% 2" in str(red.predicate)
    back = grad_op(declare_conv2d(F, F, None, (2, 2), (1, 1, 1, 1)), ["weight"])
    (red,) = [n for n in back.nodes if isinstance(n, Reduce)]
    assert red.predicate is None


@pytest.mark.parametrize("make,wrt", [
    (lambda: declare_conv2d(F, F, None, (1, 1), (1, 1, 1, 1)), "x"),
    (lambda: declare_conv2d(F, F, F, (1, 1), (0, 1, 2, 0), (2, 2)), "x"),
    (lambda: declare_conv2d(F, F, F, (1, 1), (1, 1, 1, 1)), "weight"),
    (lambda: declare_conv2d(F, F, None, (2, 2), (1, 1, 1, 1), (1, 2)), "weight"),
    (lambda: declare_causal_conv1d(F, F), "x"),
    (lambda: declare_long_conv(F, F), "u"),
], ids=["conv-dx", "conv-dx-dil2-asym-bias", "conv-dw-bias", "conv-dw-stride2", "causal-dx", "long-du"])
def test_fuse_window_recognizes_single_gradients(make, wrt):
    """One gradient at a time, stride 1 data / dense weight gradients are window reductions the TVM window
    kernels take: a transposed window (negative dilation, or the flipped long-conv window) for the data, and a
    correlation (stride and dilation swapped, the batch as the contracted channel) for a dense weight."""
    from opgen.ir.passes.window import fuse_window

    back = grad_op(make(), [wrt])
    group = fuse_window(back)
    assert group is not None, str(back)
    assert group.out == f"grad_{wrt}" and group.reduce.predicate is None


def test_window_read_in_a_nonlinear_value(session):
    """A windowed read whose derivative still depends on the output position (``sum_j w[j] * x[t+j-1]**2``
    with a tanh epilogue): the transposed reduction bounds the eliminated axis with a predicate."""
    from opgen.ir import OpBuilder, dims, tanh
    from opgen.ir.symbols import make_axes

    B, L, K = dims("B L K")
    with OpBuilder("sq_window") as bld:
        x = bld.input("x", (B, L), F)
        w = bld.input("w", (K,), F)
        b, t, j = make_axes("b t j")
        xv = x.pad(0, (1, K))[b, 2 * t + j - 1]
        acc = bld.reduce(j, xv * xv * w[j], axes=(b, t), name="acc")
        op = bld.build({"y": bld.map(tanh(acc[b, t]), (b, t), name="y", dtype=F)})
    ins = dict(x=torch.randn(2, 9, dtype=T), w=torch.randn(3, dtype=T))

    def ref(x, w):
        win = Fn.pad(x, (1, 3)).unfold(1, 3, 2)              # [b, t, j] = xpad[2t + j]
        return torch.tanh((win * win * w).sum(-1))

    gy, want = _autograd(ref, ins, ["x", "w"])
    _compare(_backward(session, op, ins, gy, ["x", "w"]), want, "sq_window")
