"""The grad transform on ops users declare: gather-style reads (reversed, serpentine, circular), traversal scans,
several outputs, dims in value expressions. Each backward op runs in the reference interpreter and is compared
with torch autograd through the forward reference (fp64, random data, sizes that are not powers of two, size-1 axes).
"""
from __future__ import annotations

import pytest
import sympy
import torch

import opgen
from opgen import F64
from opgen.ir import IRError, bind
from opgen.ir.nodes import Reduce, Scan
from opgen.ir.passes.grad import grad_op
from opgen.targets.reference import evaluate

T = torch.float64


def _check(op, ins, wrt=None, zero_grads=()):
    """backward op == torch autograd through the forward reference; returns the backward op."""
    wrt = list(wrt or ins)
    back = grad_op(op, wrt)
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in ins.items()}
    outs = evaluate(op, leaves, bind(op, {k: v.shape for k, v in ins.items()}))
    grads = {k: (torch.zeros_like(v) if k in zero_grads else torch.randn_like(v)) for k, v in outs.items()}
    used = [k for k in outs if outs[k].requires_grad]
    want = torch.autograd.grad([outs[k] for k in used], [leaves[k] for k in wrt], [grads[k] for k in used],
                               allow_unused=True)
    bins = {**ins, **{f"grad_{k}": v for k, v in grads.items()}}
    got = evaluate(back, bins, bind(back, {k: v.shape for k, v in bins.items()}))
    for k, w in zip(wrt, want):
        w = torch.zeros_like(ins[k]) if w is None else w
        assert got[f"grad_{k}"].shape == w.shape
        torch.testing.assert_close(got[f"grad_{k}"], w, atol=1e-10, rtol=1e-10, msg=f"{op.name} d{k}")
    return back


def _r(*shape):
    return torch.randn(*shape, dtype=T)


# 1. reads through Piecewise / Mod / reversed indices ------------------------------------------------------

@opgen.op
def reversed_read(x: F64["B L"], s: F64["B L"]):
    b, t = opgen.axes("b t")
    L = opgen.dims("L")
    return opgen.compute(opgen.tanh(x[b, L - 1 - t]) * s[b, t], (b, t))


@opgen.op
def serpentine(x: F64["C H W"], s: F64["C H W"]):
    c, r = opgen.axes("c r")
    H, W = opgen.dims("H W")
    w = opgen.axis("w", W)
    col = sympy.Piecewise((w, sympy.Eq(r % 2, 0)), (W - 1 - w, True))
    return opgen.compute(x[c, r, col] * s[c, r, w] + x[c, r, col] ** 2.0, (c, r, w))


@opgen.op
def circular(x: F64["B L"], s: F64["B L"]):
    b = opgen.axes("b")
    L = opgen.dims("L")
    t = opgen.axis("t", L)
    return opgen.compute(opgen.sigmoid(x[b, (t + 3) % L]) * s[b, t], (b, t))


@opgen.op
def circular_back(x: F64["B L"]):
    b = opgen.axes("b")
    L = opgen.dims("L")
    t = opgen.axis("t", L)
    return opgen.compute(x[b, (2 - t) % L] * 3.0, (b, t))


@opgen.op
def circular_sum(x: F64["B L"], w: F64["K"]):
    """A circular convolution: the read (t + k) % L is not a bijection of the frame (t, k): general adjoint."""
    b = opgen.axes("b")
    L, K = opgen.dims("L K")
    t, k = opgen.axis("t", L), opgen.axis("k", K)
    return opgen.sum(k, x[b, (t + k) % L] * w[k], axes=(b, t))


@pytest.mark.parametrize("shape", [(3, 7), (2, 1), (1, 5)])
def test_reversed_read(shape):
    _check(reversed_read.build(), dict(x=_r(*shape), s=_r(*shape)))


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 3), (2, 1, 6), (2, 5, 1)])
def test_serpentine_read_is_a_gather(shape):
    back = _check(serpentine.build(), dict(x=_r(*shape), s=_r(*shape)))
    # a bijective read's adjoint is a gather through the inverse map: no reduction node
    assert not any(isinstance(n, Reduce) for n in back.nodes)


@pytest.mark.parametrize("shape", [(3, 7), (2, 1), (1, 2), (2, 5)])
@pytest.mark.parametrize("make", [circular, circular_back])
def test_circular_shift_read(make, shape):
    op = make.build()
    back = _check(op, {t.name: _r(*shape) for t in op.inputs})
    assert not any(isinstance(n, Reduce) for n in back.nodes)


@pytest.mark.parametrize("l,k", [(7, 3), (5, 5), (1, 2), (6, 1)])
def test_non_bijective_modular_read_falls_back_to_a_predicated_sum(l, k):
    _check(circular_sum.build(), dict(x=_r(2, l), w=_r(k)))
