"""The grad transform: backward ops generated in the IR match torch autograd through the forward reference.

fp64, fresh random data, odd sizes; tolerance 1e-10 (both sides are exact fp64 evaluations of the same math).
"""
from __future__ import annotations

import pytest
import torch

from opgen.ir import DType, IRError, bind
from opgen.ir.passes.grad import grad_op
from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan
from opgen.targets.reference import evaluate

F, T = DType.f64, torch.float64


def _check(op, ins, wrt):
    back = grad_op(op, wrt)
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in ins.items()}
    outs = evaluate(op, leaves, bind(op, {k: v.shape for k, v in ins.items()}))
    grads = {k: torch.randn_like(v) for k, v in outs.items()}
    want = torch.autograd.grad(list(outs.values()), [leaves[k] for k in wrt], [grads[k] for k in outs])
    bins = {**ins, **{f"grad_{k}": v for k, v in grads.items()}}
    got = evaluate(back, bins, bind(back, {k: v.shape for k, v in bins.items()}))
    for k, w in zip(wrt, want):
        assert got[f"grad_{k}"].shape == w.shape
        torch.testing.assert_close(got[f"grad_{k}"], w, atol=1e-10, rtol=1e-10, msg=f"{op.name} d{k}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("p,l,q", [(2, 5, 3), (1, 1, 1), (3, 9, 1)])
def test_linear_scan_adjoint_is_a_reverse_scan(reverse, p, l, q):
    op = declare_linear_scan(F, F, reverse, F)
    _check(op, dict(a=torch.rand(p, l, q, dtype=T), b=torch.randn(p, l, q, dtype=T),
                    initial=torch.randn(p, q, dtype=T)), ["a", "b", "initial"])
    back = grad_op(op, ["a"])
    scans = [n for n in back.nodes if type(n).__name__ == "Scan"]
    assert len(scans) == 2 and scans[1].traversal.name == ("forward" if reverse else "reverse")


@pytest.mark.parametrize("layout", ["variable", "grouped", "shared"])
def test_selective_scan_all_inputs(layout):
    op = declare_selective_scan(F, F, F, F, F, layout, "variable", F, F, F, True, True)
    b, d, l, n, g = 2, 6, 7, 3, 2
    bm = {"variable": (b, n, l), "grouped": (b, g, n, l), "shared": (d, n)}[layout]
    ins = dict(u=torch.randn(b, d, l, dtype=T), delta=torch.randn(b, d, l, dtype=T), A=-torch.rand(d, n, dtype=T),
               B=torch.randn(*bm, dtype=T), C=torch.randn(b, n, l, dtype=T), D=torch.randn(d, dtype=T),
               z=torch.randn(b, d, l, dtype=T), delta_bias=torch.randn(d, dtype=T))
    _check(op, ins, list(ins))


def test_chunk_gla_matrix_state():
    op = declare_chunk_gla(F, F, F, F, 0.3, F, True)
    b, t, h, k, v = 2, 6, 2, 3, 5
    ins = dict(q=torch.randn(b, t, h, k, dtype=T), k=torch.randn(b, t, h, k, dtype=T),
               v=torch.randn(b, t, h, v, dtype=T), g=-torch.rand(b, t, h, k, dtype=T),
               initial_state=torch.randn(b, h, k, v, dtype=T))
    _check(op, ins, list(ins))


def test_gradients_of_non_inputs_are_reported():
    with pytest.raises(IRError, match="not a floating input"):
        grad_op(declare_linear_scan(F, F), ["h"])
