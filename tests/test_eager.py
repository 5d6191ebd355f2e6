"""opgen.eager: plain eager calls skip torch's dispatcher; everything else goes through the custom op."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opgen
from opgen.eager import direct_ok


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_when_a_call_may_skip_the_dispatcher():
    x = torch.randn(3, 4)
    assert direct_ok(x, None, 2.0, True)
    w = torch.randn(3, 4, requires_grad=True)
    assert not direct_ok(x, w)                       # autograd must see the op
    with torch.no_grad():
        assert direct_ok(x, w)
    assert not direct_ok(x.as_subclass(_Sub))        # a subclass may override dispatch
    assert not direct_ok(torch.empty(3, 4, device="meta"))
    with _Recorder():
        assert not direct_ok(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(direct_ok(t)) or t)(x)
    assert seen == [False]
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not direct_ok(fwAD.make_dual(x, torch.ones_like(x)))


def test_a_jit_trace_records_the_op():
    """Under torch.jit.trace the custom op runs, so the trace holds it (a direct call would bake the output in)."""
    a, b = torch.rand(3, 9) * 0.5 + 0.5, torch.randn(3, 9)
    traced = torch.jit.trace(lambda a_, b_: opgen.ops.linear_scan(a_, b_), (a, b), check_trace=False)
    assert "opgen::linear_scan" in str(traced.graph)
    a2, b2 = torch.rand(3, 9) * 0.5 + 0.5, torch.randn(3, 9)
    torch.testing.assert_close(traced(a2, b2), opgen.ops.linear_scan(a2, b2))


def test_plain_and_dispatched_calls_agree_and_modes_see_the_op():
    a = torch.rand(5, 37) * 0.5 + 0.5
    b = torch.randn(5, 37)
    plain = opgen.ops.linear_scan(a, b)
    ref = torch.zeros(5, dtype=torch.float64)
    loop = []
    for t in range(37):
        ref = a[:, t].double() * ref + b[:, t].double()
        loop.append(ref)
    torch.testing.assert_close(plain.double(), torch.stack(loop, 1), rtol=1e-5, atol=1e-5)
    with _Recorder() as rec:
        dispatched = opgen.ops.linear_scan(a, b)
    assert any("opgen.linear_scan" in op for op in rec.ops), rec.ops
    torch.testing.assert_close(dispatched, plain, rtol=0, atol=0)
    # with gradients the custom op's autograd runs
    a2 = a.clone().requires_grad_()
    opgen.ops.linear_scan(a2, b).sum().backward()
    assert a2.grad is not None and a2.grad.shape == a.shape
