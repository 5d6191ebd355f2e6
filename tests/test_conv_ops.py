"""torch.ops.opgen.{conv2d, causal_conv1d, long_conv}: opcheck with requires_grad inputs, fp64 gradcheck, outputs
and gradients against ``F.conv2d`` / ``F.conv1d`` autograd, gradients for a subset of the inputs, and
torch.compile(fullgraph=True, dynamic=True) compiling one frame for two spatial sizes / lengths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from torch._dynamo.testing import CompileCounterWithBackend

import opgen.ops.conv  # noqa: F401  (registers the ops)

D64 = torch.float64
ops = torch.ops.opgen


def _t(*shape, dtype=D64, grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def _ref_conv2d(x, w, b, stride, pads, dil, groups):
    pt, pb, pl, pr = pads
    return Fn.conv2d(Fn.pad(x, (pl, pr, pt, pb)), w, b, stride=stride, dilation=dil, groups=groups)


def _ref_causal(x, w, b, silu):
    y = Fn.conv1d(x, w.unsqueeze(1), b, padding=w.shape[1] - 1, groups=x.shape[1])[..., :x.shape[2]]
    return Fn.silu(y) if silu else y


def _ref_long(u, k):
    return Fn.conv1d(Fn.pad(u, (k.shape[1] - 1, 0)), k.flip(-1).unsqueeze(1), groups=u.shape[1])


# (N, Cin, H, W, Cout, KH, KW, stride, padding (t, b, l, r), dilation, groups, bias)
CONV2D = {
    "stride2-pad1-bias": (2, 2, 5, 4, 3, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1], 1, True),
    "groups2-dilation2-asym": (1, 4, 6, 5, 4, 3, 2, [2, 1], [1, 2, 0, 1], [2, 2], 2, True),
    "depthwise": (1, 3, 4, 4, 3, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 3, False),
}

DENSE = (3, 5, 11, 13, 7, 3, 5, [2, 3], [1, 2, 2, 0], [2, 1], 1, True)  # odd sizes, stride 2x3, dilation 2x1


def _conv2d_args(case, dtype=D64):
    n, cin, h, w, cout, kh, kw, stride, pads, dil, groups, bias = case
    return (_t(n, cin, h, w, dtype=dtype), _t(cout, cin // groups, kh, kw, dtype=dtype),
            _t(cout, dtype=dtype) if bias else None, stride, pads, dil, groups)


# ------------------------------------------------------------------------------------------------ opcheck

@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_opcheck_conv2d(dtype):
    # the shapes of test_conv2d_matches_torch[dense] and test_gradcheck_conv2d[groups2-dilation2-asym]: the session's
    # bindings (bounds checks per op and shape, the costly part of a first call) are shared
    case = DENSE if dtype == torch.float32 else CONV2D["groups2-dilation2-asym"]
    torch.library.opcheck(ops.conv2d, _conv2d_args(case, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_opcheck_causal_conv1d(dtype):
    x, w, b = _t(2, 3, 7, dtype=dtype), _t(3, 3, dtype=dtype), _t(3, dtype=dtype)
    torch.library.opcheck(ops.causal_conv1d, (x, w, b, True))
    torch.library.opcheck(ops.causal_conv1d, (x, w, None, False))


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_opcheck_long_conv(dtype):
    torch.library.opcheck(ops.long_conv, (_t(2, 3, 7, dtype=dtype), _t(3, 4, dtype=dtype)))


def test_opcheck_backward_ops():
    x, w, b = _t(2, 3, 7, grad=False), _t(3, 3, grad=False), _t(3, grad=False)
    g = torch.randn(2, 3, 7, dtype=D64)
    torch.library.opcheck(ops.causal_conv1d_backward, (x, w, b, g, True, [True, False, True]))
    u, k = _t(2, 3, 7, grad=False), _t(3, 4, grad=False)
    torch.library.opcheck(ops.long_conv_backward, (u, k, g, [False, True]))
    # non-contiguous inputs: the fake gradients must have the kernels' (contiguous) strides, or inductor fails
    kt = _t(4, 3, grad=False).t()
    torch.library.opcheck(ops.long_conv_backward, (u, kt, g, [True, True]))
    xt = _t(3, 2, 7, grad=False).transpose(0, 1)
    torch.library.opcheck(ops.causal_conv1d_backward, (xt, w, b, g, False, [True, True, False]))


# ---------------------------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("name", list(CONV2D))
def test_gradcheck_conv2d(name):
    x, w, b, *attrs = _conv2d_args(CONV2D[name])
    tensors = (x, w) + ((b,) if b is not None else ())
    # fast mode (a random projection of the Jacobian): two backward calls instead of one per output element
    assert torch.autograd.gradcheck(lambda *t: ops.conv2d(t[0], t[1], t[2] if len(t) > 2 else None, *attrs),
                                    tensors, fast_mode=True)


def test_gradcheck_causal_conv1d_and_long_conv():
    x, w, b = _t(2, 3, 6), _t(3, 3), _t(3)
    assert torch.autograd.gradcheck(lambda *t: ops.causal_conv1d(*t, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: ops.long_conv(*t), (_t(2, 2, 6), _t(2, 4)))


# --------------------------------------------------------------------------------------- against torch

def _check_against(fn, ref, args, tol):
    """Output and gradients of every requires_grad tensor in ``args`` match ``ref`` autograd."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    y, want = fn(*args), ref(*args)
    torch.testing.assert_close(y, want, **tol)
    gy = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(g, r, **tol)


F32_TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("case", [
    DENSE,
    (2, 6, 9, 7, 9, 3, 3, [1, 2], [1, 1, 1, 1], [1, 1], 3, False),
], ids=["dense", "groups3"])
def test_conv2d_matches_torch(case):
    _check_against(ops.conv2d, _ref_conv2d, _conv2d_args(case, torch.float32), F32_TOL)


@pytest.mark.parametrize("width,bias,silu", [(4, True, True), (3, False, False), (2, True, False)])
def test_causal_conv1d_matches_torch(width, bias, silu):
    x, w, b = _t(3, 5, 13, dtype=torch.float32), _t(5, width, dtype=torch.float32), _t(5, dtype=torch.float32)
    _check_against(ops.causal_conv1d, _ref_causal, (x, w, b if bias else None, silu), F32_TOL)


def test_long_conv_matches_torch():
    _check_against(ops.long_conv, _ref_long, (_t(3, 5, 17, dtype=torch.float32), _t(5, 9, dtype=torch.float32)),
                   F32_TOL)


def test_conv2d_grouped_stride1_data_gradient():
    """Stride 1, groups 2 with 2 channels per group: the generated dx op reads weight[.., g - C*(g // C), ..] (a
    remainder the bounds check proves in range) and is restaged to read a re-laid-out weight, a grouped window
    reduction (tests/ir/test_restage.py); it matches F.conv2d."""
    x, w = _t(1, 4, 5, 5, dtype=torch.float32), _t(4, 2, 3, 3, dtype=torch.float32)
    _check_against(ops.conv2d, _ref_conv2d, (x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 2), F32_TOL)


@pytest.mark.parametrize("case", [
    (2, 5, 13, 12, 6, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1], 1, False),    # odd height
    (1, 4, 9, 1, 4, 5, 1, [3, 1], [2, 1, 0, 0], [1, 1], 2, True),      # grouped, a size-1 width, stride 3
    (1, 6, 11, 10, 6, 7, 7, [2, 2], [3, 3, 3, 3], [1, 1], 6, False),   # depthwise 7x7
], ids=["dense", "grouped-width1", "depthwise7"])
def test_conv2d_strided_gradients_match_torch(case):
    """A strided data gradient runs as one window reduction per phase (tests/ir/test_restage.py); at these sizes
    the session leaves them to the interpreter. Input and weight gradients match F.conv2d autograd in float32."""
    _check_against(ops.conv2d, _ref_conv2d, _conv2d_args(case, torch.float32), F32_TOL)


def test_strided_data_gradient_phases_run_on_window_kernels(tmp_path):
    """With a kernel for every node (``min_node_kernel_work=0``), the four phases of a 3x3 stride-2 data gradient
    run on TVM window kernels, and the backward op equals the interpreter (1e-4 of max |ref|)."""
    pytest.importorskip("tvm")
    from opgen.config import Config
    from opgen.ir import bind
    from opgen.ops.conv import declare_conv2d
    from opgen.runtime import make_session
    from opgen.targets.reference import evaluate

    back = opgen.bridge.backward_op(declare_conv2d(stride=(2, 2), padding=(1, 1, 1, 1)), ("x",))
    x, w = torch.randn(2, 5, 13, 12), torch.randn(6, 5, 3, 3)
    ins = {"x": x, "weight": w, "grad_out": torch.randn(2, 6, 7, 6)}
    b = bind(back, {k: tuple(v.shape) for k, v in ins.items()})
    session = make_session(Config(cache_dir=tmp_path, min_node_kernel_work=0))
    runner = session._node_runner(back, b, "cpu", ins)
    phases = {k: v for k, v in runner.compiled.items() if k.startswith("t0_p")}
    assert len(phases) == 4 and set(phases.values()) == {"tvm"}
    got = session.run(back, ins)["grad_x"]
    want = evaluate(back, ins, b)["grad_x"].double()
    torch.testing.assert_close(got.double(), want, atol=1e-4 * float(want.abs().max()), rtol=0)


def test_conv2d_strided_weight_gradient_on_the_gemm_kernel():
    """8 output channels, 3 input channels, stride 2 on 23x21: the weight gradient is a window reduction with 132
    taps (the output pixels) and a 3x3 output, which the default config runs on the implicit-GEMM kernel
    (3 channels x 3 rows); input and weight gradients match F.conv2d autograd."""
    pytest.importorskip("tvm")
    from opgen.ir import bind
    from opgen.ops.conv import declare_conv2d
    from opgen.targets.tvm.window import default_window_config, window_group
    from opgen.bridge import backward_op as _backward

    x, w = _t(2, 3, 23, 21, dtype=torch.float32), _t(8, 3, 3, 3, dtype=torch.float32)
    _check_against(ops.conv2d, _ref_conv2d, (x, w, None, [2, 2], [1, 1, 1, 1], [1, 1], 1), F32_TOL)
    back = _backward(declare_conv2d(stride=(2, 2), padding=(1, 1, 1, 1)), ("weight",))
    b = bind(back, {"x": (2, 3, 23, 21), "weight": (8, 3, 3, 3), "grad_out": (2, 8, 12, 11)})
    cfg = default_window_config(window_group(back), b)
    assert (cfg.variant, cfg.co_tile, cfg.rows_tile) == ("gemm", 3, 3)


def test_gradients_only_for_inputs_that_need_them():
    """One leaf needs a gradient: the backward op computes that gradient only, the others come back None."""
    x, w, b = _t(2, 3, 9), _t(3, 3, grad=False), _t(3, grad=False)
    y = ops.causal_conv1d(x, w, b, True)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], gy)
    xr = x.detach().requires_grad_()
    torch.testing.assert_close(gx, torch.autograd.grad(_ref_causal(xr, w, b, True), [xr], gy)[0])
    gs = ops.causal_conv1d_backward(x.detach(), w, b, gy, True, [False, True, False])
    assert gs[0].numel() == 0 and gs[2].numel() == 0 and gs[1].shape == w.shape
    x, w = _t(1, 2, 6, 7, grad=False), _t(4, 2, 3, 3)
    y = ops.conv2d(x, w, None, [1, 2], [1, 1, 0, 2], [1, 1], 1)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    wr = w.detach().requires_grad_()
    ref = _ref_conv2d(x, wr, None, [1, 2], [1, 1, 0, 2], [1, 1], 1)
    torch.testing.assert_close(gw, torch.autograd.grad(ref.sum(), [wr])[0])


# ---------------------------------------------------------------------------------------------- compile

def test_compile_one_frame_conv2d():
    """dynamic=True over two spatial sizes (conv2d between pointwise ops, DENSE's stride / padding / dilation):
    one frame; forward and backward equal eager."""
    n, cin, _, _, cout, kh, kw, *attrs, _ = DENSE

    def fn(x, w, b):
        return torch.tanh(ops.conv2d(x * 2.0, w, b, *attrs))

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=cnt, fullgraph=True, dynamic=True)
    for h in (11, 8):
        f32 = dict(dtype=torch.float32)
        args = (_t(n, cin, h, h + 2, **f32), _t(cout, cin, kh, kw, **f32), _t(cout, **f32))
        eager_args = [a.detach().requires_grad_() for a in args]
        out, ref = compiled(*args), fn(*eager_args)
        torch.testing.assert_close(out, ref)
        gy = torch.randn_like(ref)
        for g, r in zip(torch.autograd.grad(out, args, gy), torch.autograd.grad(ref, eager_args, gy)):
            torch.testing.assert_close(g, r, **F32_TOL)
    assert cnt.frame_count == 1, f"{cnt.frame_count} frames for two spatial sizes"
