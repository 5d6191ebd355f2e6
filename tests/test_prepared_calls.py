"""Session.run memoizes a compiled target's prepared kernel call per call signature (op, input names, shapes,
dtypes, devices): a repeated call skips the binding, target and config lookups, and must still compute on the
inputs it is given, convert them as run would, and return fresh outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opgen.ops.conv import declare_conv2d
from opgen.runtime import make_session


@pytest.fixture(scope="module")
def session():
    return make_session()


def _conv(C: int = 5, F_: int = 6):
    return declare_conv2d(padding=(1, 1, 1, 1)), (F_, C, 3, 3)


def test_a_repeated_signature_runs_the_prepared_call_on_fresh_inputs(session):
    op, wshape = _conv()
    before = len(session._prepared)
    outs = []
    for _ in range(3):                                  # fresh data each call: nothing of a call is cached
        x, w = torch.randn(2, 5, 9, 11), torch.randn(*wshape)
        out = session.run(op, {"x": x, "weight": w})["out"]
        torch.testing.assert_close(out, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-4)
        outs.append(out)
    assert len(session._prepared) == before + 1         # one signature, one prepared call
    assert len({o.data_ptr() for o in outs}) == 3       # a fresh output per call, none aliased


def test_a_non_contiguous_input_is_made_contiguous_on_the_prepared_path(session):
    op, wshape = _conv()
    w = torch.randn(*wshape)
    session.run(op, {"x": torch.randn(2, 5, 9, 11), "weight": w})       # prepares this signature
    x = torch.randn(2, 5, 11, 9).transpose(2, 3)                          # same shape, transposed strides
    assert not x.is_contiguous()
    out = session.run(op, {"x": x, "weight": w})["out"]
    torch.testing.assert_close(out, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-4)


def test_another_dtype_or_shape_is_another_signature(session):
    op, wshape = _conv()
    w = torch.randn(*wshape)
    session.run(op, {"x": torch.randn(1, 5, 7, 7), "weight": w})
    n = len(session._prepared)
    x64 = torch.randn(1, 5, 7, 7, dtype=torch.float64)                   # converted to the declared f32
    out = session.run(op, {"x": x64, "weight": w})["out"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.conv2d(x64.float(), w, padding=1), rtol=1e-5, atol=1e-4)
    x = torch.randn(1, 5, 1, 13)                                          # a size-1 axis
    torch.testing.assert_close(session.run(op, {"x": x, "weight": w})["out"], F.conv2d(x, w, padding=1),
                               rtol=1e-5, atol=1e-4)
    assert len(session._prepared) == n + 2


def test_a_call_that_needs_gradients_is_never_prepared(session):
    op, wshape = _conv()
    x, w = torch.randn(1, 5, 6, 6, requires_grad=True), torch.randn(*wshape)
    n = len(session._prepared)
    out = session.run(op, {"x": x, "weight": w})["out"]
    assert out.requires_grad                            # the differentiable reference ran
    assert len(session._prepared) == n
    g, = torch.autograd.grad(out.sum(), x)
    x2 = x.detach().requires_grad_()
    g2, = torch.autograd.grad(F.conv2d(x2, w, padding=1).sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-4)
