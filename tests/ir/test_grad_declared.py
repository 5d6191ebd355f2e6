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



@opgen.op
def replicate_shift(x: F64["B L"]):
    """x[t + 1] with the last position repeated (replicate padding): not injective, general adjoint."""
    b = opgen.axes("b")
    L = opgen.dims("L")
    t = opgen.axis("t", L)
    return opgen.compute(x[b, sympy.Min(t + 1, L - 1)] * x[b, t] + x[b, (t + 2) % L], (b, t))


@opgen.op
def circular_sum_over_t(x: F64["B L"], s: F64["B L"]):
    """A circular read along the reduced axis: a bijection of the reduction axis, inverted (no predicate)."""
    b = opgen.axes("b")
    L = opgen.dims("L")
    t = opgen.axis("t", L)
    return opgen.sum(t, x[b, (L - t + 1) % L] * s[b, t], axes=(b,))


@pytest.mark.parametrize("shape", [(2, 6), (1, 1), (3, 2)])
@pytest.mark.parametrize("make", [replicate_shift, circular_sum_over_t])
def test_clamped_and_reduced_axis_reads(make, shape):
    op = make.build()
    _check(op, {t.name: _r(*shape) for t in op.inputs})


# 2. scans in a traversal order ---------------------------------------------------------------------------

_TRAVERSALS = {
    "zigzag": lambda g: opgen.zigzag(g), "zigzag_reversed": lambda g: opgen.zigzag(g, reverse=True),
    "row": lambda g: opgen.row_major(g), "row_reversed": lambda g: opgen.row_major(g, reverse=True),
    "column": lambda g: opgen.column_major(g), "column_reversed": lambda g: opgen.column_major(g, reverse=True),
}


def _grid_scan(kind: str, with_init: bool):
    @opgen.op(name=f"grid_scan_{kind}")
    def grid_scan(f: F64["C H W"], x: F64["C H W"], h0: F64["C"]):
        c, r, w = opgen.axes("c r w")
        H, W = opgen.dims("H W")
        h = opgen.scan((r, w), a=opgen.sigmoid(f[c, r, w]), b=x[c, r, w] * f[c, r, w],
                       init=h0[c] if with_init else None, traversal=_TRAVERSALS[kind]((H, W)))
        return opgen.compute(h[c, r, w] * x[c, r, w], (c, r, w))
    return grid_scan.build()


@pytest.mark.parametrize("kind", list(_TRAVERSALS))
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 1), (2, 1, 3)])
def test_traversal_scan_adjoint_is_the_reverse_traversal(kind, shape):
    op = _grid_scan(kind, with_init=True)
    back = _check(op, dict(f=_r(*shape), x=_r(*shape), h0=_r(shape[0])))
    fwd = [n for n in op.nodes if isinstance(n, Scan)][0].traversal
    adj = [n for n in back.nodes if isinstance(n, Scan) and n.out.startswith("adj_")]
    assert len(adj) == 1 and adj[0].traversal.grid == fwd.grid
    want = kind[:-len("_reversed")] if kind.endswith("_reversed") else kind + "_reversed"
    assert adj[0].traversal.name == want


def test_zigzag_ema_example():
    @opgen.op
    def zigzag_ema(img: F64["C H W"], *, decay: float):
        c, r, w = opgen.axes("c r w")
        H, W = opgen.dims("H W")
        return opgen.scan((r, w), a=decay, b=(1 - decay) * img[c, r, w], traversal=opgen.zigzag((H, W)))

    _check(zigzag_ema.build(decay=0.75), dict(img=_r(2, 3, 7)))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 4), (2, 2, 1)])
def test_strided_traversal_scan(reverse, shape):
    @opgen.op(name="atrous_scan")
    def atrous(f: F64["C H W"], x: F64["C H W"], h0: F64["C"]):
        c, r, w = opgen.axes("c r w")
        H, W = opgen.dims("H W")
        return opgen.scan((r, w), a=opgen.sigmoid(f[c, r, w]), b=x[c, r, w], init=h0[c] * 2.0,
                          traversal=opgen.strided((H, W), 3, reverse=reverse))

    _check(atrous.build(), dict(f=_r(*shape), x=_r(*shape), h0=_r(shape[0])))


def test_one_axis_strided_scan_is_not_mistaken_for_a_reverse_scan():
    @opgen.op(name="atrous_1d")
    def atrous(x: F64["B L"]):
        b, t = opgen.axes("b t")
        L = opgen.dims("L")
        return opgen.scan(t, a=0.5, b=x[b, t], traversal=opgen.strided((L,), 2))

    _check(atrous.build(), dict(x=_r(2, 7)))


def test_unknown_traversal_is_reported_with_the_node():
    import dataclasses

    @opgen.op(name="odd_order")
    def odd(x: F64["H W"]):
        r, w = opgen.axes("r w")
        H, W = opgen.dims("H W")
        tr = dataclasses.replace(opgen.row_major((H, W)), name="spiral")
        return opgen.scan((r, w), a=0.5, b=x[r, w], traversal=tr)

    with pytest.raises(IRError, match=r"odd_order: node \w+ \(Scan\).*traversal 'spiral'"):
        grad_op(odd.build(), ["x"])


# 3. several outputs -------------------------------------------------------------------------------------------

@opgen.op
def two_outputs(x: F64["B L"], y: F64["B L"]):
    b, t = opgen.axes("b t")
    s = opgen.compute(x[b, t] * y[b, t], (b, t))
    return {"s": s, "d": opgen.compute(opgen.exp(s[b, t]) - y[b, t], (b, t))}


@opgen.op
def scan_and_total(x: F64["B L"], f: F64["B L"], y: F64["B"]):
    b, t = opgen.axes("b t")
    h = opgen.scan(t, a=opgen.sigmoid(f[b, t]), b=x[b, t])
    return {"h": h, "total": opgen.sum(t, h[b, t] * x[b, t]), "yy": opgen.compute(y[b] * 2.0, (b,))}


@pytest.mark.parametrize("zero", [(), ("s",), ("d",), ("s", "d")])
@pytest.mark.parametrize("shape", [(3, 7), (1, 1)])
def test_two_outputs_one_read_by_the_other(zero, shape):
    _check(two_outputs.build(), dict(x=_r(*shape), y=_r(*shape)), zero_grads=zero)


@pytest.mark.parametrize("zero", [(), ("h",), ("total",), ("yy",)])
@pytest.mark.parametrize("wrt", [("x", "f", "y"), ("x",), ("y",)])
def test_scan_output_also_read_by_another_output(zero, wrt):
    _check(scan_and_total.build(), dict(x=_r(2, 5), f=_r(2, 5), y=_r(2)), wrt=wrt, zero_grads=zero)


def test_an_output_independent_of_the_requested_inputs_is_not_differentiated():
    """The max-reduction output depends only on x: asking for dy must not need a rule for max."""
    @opgen.op
    def max_and_product(x: F64["B L"], y: F64["B L"]):
        b, t = opgen.axes("b t")
        return {"m": opgen.max(t, x[b, t]), "s": opgen.compute(y[b, t] * x[b, t], (b, t))}

    op = max_and_product.build()
    _check(op, dict(x=_r(2, 5), y=_r(2, 5)), wrt=["y"])
    with pytest.raises(IRError, match=r"max_and_product: node m \(Reduce\) is not differentiated: a max reduction "
                                      r"over t has no adjoint rule .*gradient of x flows through it"):
        grad_op(op, ["x", "y"])


def test_undifferentiable_scan_names_the_node():
    @opgen.op
    def running_max(x: F64["B L"]):
        b, t = opgen.axes("b t")
        return opgen.scan(t, combine=opgen.ir.nodes.MAX, value=x[b, t])

    with pytest.raises(IRError, match=r"running_max: node out \(Scan\) is not differentiated: a scan with the max"):
        grad_op(running_max.build(), ["x"])


def test_pow_with_a_variable_exponent():
    @opgen.op
    def powers(x: F64["B L"], p: F64["B L"]):
        b, t = opgen.axes("b t")
        return opgen.compute(x[b, t] ** p[b, t], (b, t))

    _check(powers.build(), dict(x=torch.rand(2, 5, dtype=T) + 0.1, p=_r(2, 5)))


# 4. dims in value expressions ------------------------------------------------------------------------------------
# A dim (or an axis) in a value is lifted to an INDEX leaf and cast to float where it meets a float (x / E, E * x,
# opgen.sqrt(E)); the grad transform passes such leaves through untouched (their derivative is 0). Sympy arithmetic
# that leaves the integers before it meets a value (1 / E, E ** -0.5, sympy.sqrt(E), E + 1.0, t / L) is lifted to a
# float value by ir/expr.py as_expr (it was rejected as "index expression 1/E is not integer-valued").



def _dim_scaled(form: str):
    @opgen.op(name=f"dim_scaled_{form}")
    def dim_scaled(x: F64["B E"], w: F64["E"]):
        b, e = opgen.axes("b e")
        E = opgen.dims("E")
        scale = {"opgen_sqrt": lambda: 1 / opgen.sqrt(E), "sympy_sqrt": lambda: 1 / sympy.sqrt(E),
                 "power": lambda: E ** -0.5, "reciprocal": lambda: 1 / E}[form]()
        y = opgen.compute(x[b, e] * scale + x[b, e] * w[e] / E + E * w[e], (b, e))
        return {"y": y, "n": opgen.sum(e, y[b, e] * y[b, e] / E)}
    return dim_scaled.build()


@pytest.mark.parametrize("form", ["opgen_sqrt", "sympy_sqrt", "power", "reciprocal"])
@pytest.mark.parametrize("b,e", [(3, 7), (1, 1)])
def test_dims_in_value_expressions(form, b, e):
    _check(_dim_scaled(form), dict(x=_r(b, e), w=_r(e)))


@opgen.op
def dim_scaled_scan(x: F64["B L"], f: F64["B L"]):
    b, t = opgen.axes("b t")
    L = opgen.dims("L")
    h = opgen.scan(t, a=opgen.sigmoid(f[b, t]) * L / (L + opgen.sqrt(L)), b=x[b, t] * (1 / opgen.sqrt(L)) * t)
    return opgen.compute(h[b, t] / L, (b, t))


@opgen.op
def dim_scaled_window(x: F64["B L"], w: F64["K"]):
    b, t, k = opgen.axes("b t k")
    K = opgen.dims("K")
    return opgen.sum(k, x.pad((0, 0), (2, 0))[b, t + k - 2] * w[k] * (1 / opgen.sqrt(K)) * k / K, axes=(b, t))


@pytest.mark.parametrize("b,l", [(3, 7), (1, 1)])
def test_dims_in_scan_coefficients(b, l):
    _check(dim_scaled_scan.build(), dict(x=_r(b, l), f=_r(b, l)))


@pytest.mark.parametrize("l", [7, 1])
def test_dims_in_a_window_reduction_value(l):
    _check(dim_scaled_window.build(), dict(x=_r(2, l), w=_r(3)))


def test_sympy_arithmetic_of_dims_and_axes_as_a_value():
    @opgen.op
    def ramp(x: F64["B L"]):
        b, t = opgen.axes("b t")
        L = opgen.dims("L")
        return opgen.compute(x[b, t] * (t + 1.0) / (L + 1.0), (b, t))

    _check(ramp.build(), dict(x=_r(2, 5)))
