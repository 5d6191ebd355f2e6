"""Range inference (including convolution-style affine indices with padding) and verification errors."""
from __future__ import annotations

import random

import pytest
import sympy

import opgen
from opgen.ir import DType, IRError, OpBuilder, ShapeError, access_report, bind, dims
from opgen.ir.symbols import Dim
from opgen.ir.symbols import make_axes


def _conv_op(s: int, p: int, d: int):
    N, C, H, W, F, KH, KW = dims("N C H W F KH KW")
    with OpBuilder("conv") as bld:
        x = bld.input("x", (N, C, H, W), DType.f32)
        w = bld.input("w", (F, C, KH, KW), DType.f32)
        n, f, oh, ow, c, kh, kw = make_axes("n f oh ow c kh kw")
        y = bld.reduce((c, kh, kw), x.pad(0, 0, p, p)[n, c, oh * s + kh * d - p, ow * s + kw * d - p] * w[f, c, kh, kw],
                       axes=(n, f, oh, ow))
        return bld.build({"y": y})


@pytest.mark.parametrize("s,p,d", [(1, 0, 1), (2, 1, 1), (3, 2, 2), (1, 3, 3), (2, 0, 2)])
def test_conv_output_size_matches_torch_formula(s, p, d):
    op = _conv_op(s, p, d)
    H, KH = dims("H KH")
    oh_extent = dict(op.extents)[make_axes("oh")]
    for _ in range(20):
        h, kh = random.randint(1, 40), random.randint(1, 7)
        want = (h + 2 * p - d * (kh - 1) - 1) // s + 1
        if want < 1:
            continue
        assert int(oh_extent.subs({H: h, KH: kh})) == want, (h, kh, oh_extent)
    statuses = {acc.tensor: str(st) for _, acc, st in access_report(op)}
    assert statuses["w"] == "in-bounds"
    assert statuses["x"].startswith("padded") if p else statuses["x"] == "in-bounds"


def test_output_shape_is_derived():
    op = _conv_op(2, 1, 1)
    (y,) = op.outputs
    b = bind(op, {"x": (2, 3, 11, 8), "w": (5, 3, 3, 3)})
    assert b.shapes["y"] == (2, 5, 6, 4)


def test_disagreeing_dims_name_tensors_and_dims():
    K1, K2, M, N = dims("K1 K2 M N")
    with OpBuilder("matmul") as bld:
        a = bld.input("a", (M, K1), DType.f32)
        b = bld.input("b", (K2, N), DType.f32)
        i, j, k = make_axes("i j k")
        with pytest.raises(IRError) as ei:
            bld.build({"c": bld.reduce(k, a[i, k] * b[k, j], axes=(i, j))})
    msg = str(ei.value)
    assert "axis k" in msg and "K1" in msg and "K2" in msg and "a.shape[1]" in msg and "b.shape[0]" in msg


def test_axis_without_extent_is_reported():
    L = dims("L")
    with OpBuilder("shift") as bld:
        x = bld.input("x", (L,), DType.f32)
        t, s = make_axes("t s")
        with pytest.raises(IRError, match="cannot infer the extent of axis"):
            bld.build({"y": bld.reduce(s, x[t + s * s], axes=(t,))})


def test_declared_extent_is_used_and_checked():
    L = dims("L")
    with OpBuilder("lag") as bld:
        x = bld.input("x", (L,), DType.f32)
        t = bld.axis("t", L - 1)
        op = bld.build({"y": bld.map(x[t + 1] - x[t], (t,))})
    assert dict(op.extents)[t] == L - 1
    assert all(st.proven for _, _, st in access_report(op))


def test_structural_errors():
    L = dims("L")
    with OpBuilder("bad") as bld:
        x = bld.input("x", (L,), DType.f32)
        t, u = make_axes("t u")
        with pytest.raises(IRError, match="rank 1 but is indexed with 2"):
            x[t, u]
        y = bld.map(x[t] * 2.0, (t,))
        with pytest.raises(IRError, match="neither output nor reduction axes"):
            bld.map(x[u], (t,))
            bld.build({"y": y})


def test_reads_of_unknown_tensors_are_rejected():
    from opgen.ir import load

    L = dims("L")
    with OpBuilder("bad2") as bld:
        bld.input("x", (L,), DType.f32)
        t = make_axes("t")
        bld.map(load("nope", [t], DType.f32), (t,))
        with pytest.raises(IRError, match="not an input or an earlier result"):
            bld.build({"y": bld.map(load("x", [t], DType.f32), (t,))})


def test_floor_division_index_is_checked_at_bind_time():
    from opgen.ops.scan import declare_selective_scan

    op = declare_selective_scan(B_layout="grouped", C_layout="grouped")
    st = {acc.tensor: str(s) for _, acc, s in access_report(op)}
    assert st["B"] == "checked at call" and st["u"] == "in-bounds"
    ok = bind(op, {"u": (1, 6, 5), "delta": (1, 6, 5), "A": (6, 3), "B": (1, 2, 3, 5), "C": (1, 3, 3, 5)})
    assert ok.dims[Dim("DgB")] == 3 and ok.dims[Dim("DgC")] == 2
    with pytest.raises(ShapeError, match=r"dim DgB = D/GB must be a positive integer, got 3/2"):
        bind(op, {"u": (1, 6, 5), "delta": (1, 6, 5), "A": (6, 3), "B": (1, 4, 3, 5), "C": (1, 3, 3, 5)})


def test_unproven_access_out_of_range_fails_at_bind():
    L, M = dims("L M")
    with OpBuilder("gather2") as bld:
        x = bld.input("x", (M,), DType.f32)
        t = bld.axis("t", L)
        op = bld.build({"y": bld.map(x[2 * t], (t,))})
    assert [str(s) for _, _, s in access_report(op)] == ["checked at call"]
    assert bind(op, {"x": (9,)}, dims={"L": 5}).shapes["y"] == (5,)
    with pytest.raises(ShapeError, match=r"reads x\[\.\.\., 2\*t, \.\.\.\] at positions 0\.\.10 of dim 0, outside \[0, 9\)"):
        bind(op, {"x": (9,)}, dims={"L": 6})


def test_dsl_outside_an_op_is_an_error():
    with pytest.raises(IRError, match="no op is being declared"):
        opgen.scan(make_axes("t"), b=1.0)
