"""torch.ops.opgen.*: opcheck with requires_grad inputs, fp64 gradcheck, and torch.compile(fullgraph=True) with a
dynamic length compiling exactly one frame for three lengths, forward and backward."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import opgen
import opgen.ops  # noqa: F401  (registers the ops)

D64 = torch.float64


def _ls_args(p=2, l=5, q=3, dtype=D64, initial=True):
    a = (torch.rand(p, l, q, dtype=dtype) * 0.5 + 0.5).requires_grad_()
    b = torch.randn(p, l, q, dtype=dtype, requires_grad=True)
    i0 = torch.randn(p, q, dtype=dtype, requires_grad=True) if initial else None
    return a, b, i0


def _ss_args(b=2, d=4, l=5, n=3, grouped=False, dtype=D64):
    t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    B = t(b, 2, n, l) if grouped else t(b, n, l)
    return (t(b, d, l), (torch.rand(b, d, l, dtype=dtype) * 0.5).requires_grad_(), (-torch.rand(d, n, dtype=dtype))
            .requires_grad_(), B, t(b, n, l), t(d), t(b, d, l), t(d))


def _gla_args(b=2, t=5, h=2, k=3, v=4, dtype=D64):
    r = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    g = (-torch.rand(b, t, h, k, dtype=dtype)).requires_grad_()
    return r(b, t, h, k), r(b, t, h, k), r(b, t, h, v), g, r(b, h, k, v)


@pytest.mark.parametrize("initial", [True, False])
def test_linear_scan_opcheck_and_gradcheck(initial):
    a, b, i0 = _ls_args(initial=initial)
    torch.library.opcheck(torch.ops.opgen.linear_scan, (a, b, i0, False))
    torch.library.opcheck(torch.ops.opgen.linear_scan, (a, b, i0, True))
    args = (a, b) + ((i0,) if initial else ())
    assert torch.autograd.gradcheck(lambda *x: opgen.ops.linear_scan(x[0], x[1], dim=1, reverse=True,
                                                                     initial=x[2] if initial else None), args)


def test_backward_fakes_are_contiguous_for_transposed_inputs():
    """The kernels return contiguous gradients; the fake implementations must say so for any input strides."""
    a = torch.rand(5, 4, 1, dtype=D64).transpose(0, 1)            # [4, 5, 1], not contiguous
    b = torch.randn(4, 5, 1, dtype=D64)
    g = torch.randn(4, 5, 1, dtype=D64)
    assert not a.is_contiguous()
    torch.library.opcheck(torch.ops.opgen.linear_scan_backward, (a, b, None, g, False))


@pytest.mark.parametrize("grouped", [False, True])
def test_selective_scan_opcheck_and_gradcheck(grouped):
    args = _ss_args(grouped=grouped)
    torch.library.opcheck(torch.ops.opgen.selective_scan, (*args, True))
    u, delta, A, B, C, D, z, bias = args
    fn = lambda *x: opgen.ops.selective_scan(*x[:5], D=x[5], z=x[6], delta_bias=x[7], delta_softplus=True,  # noqa
                                             return_last_state=True)
    assert torch.autograd.gradcheck(fn, args)


def test_chunk_gla_opcheck_and_gradcheck():
    args = _gla_args()
    torch.library.opcheck(torch.ops.opgen.chunk_gla, (*args, 0.5))
    fn = lambda *x: opgen.ops.chunk_gla(*x[:4], scale=0.5, initial_state=x[4], output_final_state=True)  # noqa
    assert torch.autograd.gradcheck(fn, args)


def _one_frame(fn, make, lengths, dim):
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=cnt, fullgraph=True)
    for length in lengths:
        args = make(length)
        for x in args:
            if x is not None and x.dim() > dim and x.shape[dim] == length:
                torch._dynamo.mark_dynamic(x, dim)
        out = compiled(*args)
        ref = fn(*[x.detach().requires_grad_() if x is not None else None for x in args])
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        assert all(x.grad is not None for x in args if x is not None)
    assert cnt.frame_count == 1, f"compiled {cnt.frame_count} frames for lengths {lengths}"


def test_compile_one_frame_linear_scan():
    make = lambda n: tuple(torch.randn(3, n, dtype=torch.float32, requires_grad=True) for _ in range(2))  # noqa
    _one_frame(lambda a, b: opgen.ops.linear_scan(torch.sigmoid(a), b, dim=1) * 2.0, make, (7, 12, 19), 1)


def test_compile_one_frame_selective_scan():
    def make(n):
        return tuple(x.float().detach().requires_grad_() for x in _ss_args(l=n))

    def fn(u, delta, A, B, C, D, z, bias):
        return opgen.ops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)

    torch._dynamo.reset()
    _one_frame(fn, make, (6, 9, 13), 2)


def test_compile_one_frame_chunk_gla():
    def make(n):
        return tuple(x.float().detach().requires_grad_() for x in _gla_args(t=n))

    torch._dynamo.reset()
    _one_frame(lambda q, k, v, g, s: opgen.ops.chunk_gla(q, k, v, g, initial_state=s)[0], make, (5, 8, 11), 1)


def test_inductor_compiles_around_the_opaque_op():
    """The default backend (inductor) with dynamic length: one frame, results equal eager."""
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")
    fn = lambda a, b: opgen.ops.linear_scan(torch.sigmoid(a), b * 2.0, dim=1)  # noqa: E731
    compiled = torch.compile(fn, backend=cnt, fullgraph=True)
    for n in (9, 14, 21):
        a, b = torch.randn(2, n), torch.randn(2, n)
        torch._dynamo.mark_dynamic(a, 1)
        torch._dynamo.mark_dynamic(b, 1)
        torch.testing.assert_close(compiled(a, b), fn(a, b))
    assert cnt.frame_count == 1
