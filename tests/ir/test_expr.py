"""Value expressions: dtype promotion, index folding into sympy, immutability and structural identity."""
from __future__ import annotations

import dataclasses
import math

import pytest
import sympy

from opgen.ir import DType, ExprOp, IRError, accum_dtype, const, exp, index, load, promote, where
from opgen.ir.dtypes import as_dtype
from opgen.ir.symbols import Axis, Dim, dims, make_axes


@pytest.mark.parametrize("a,b,want", [
    (DType.bf16, DType.f16, DType.f32), (DType.bf16, DType.f32, DType.f32), (DType.f32, DType.f64, DType.f64),
    (DType.i32, DType.i64, DType.i64), (DType.i64, DType.f16, DType.f16), (DType.bool, DType.i32, DType.i32),
    (DType.f16, DType.f16, DType.f16),
])
def test_promotion_rule(a, b, want):
    assert promote(a, b) == want
    assert promote(b, a) == want


def test_accumulation_dtype_and_aliases():
    assert accum_dtype(DType.bf16) == DType.f32 and accum_dtype(DType.f16) == DType.f32
    assert accum_dtype(DType.f64) == DType.f64
    assert as_dtype("torch.bfloat16") == DType.bf16 and as_dtype("float") == DType.f32
    with pytest.raises(TypeError, match="unknown dtype"):
        as_dtype("complex64")


def test_python_scalars_are_weak():
    x = load("x", [make_axes("i")], DType.bf16)
    assert (x * 2.0).dtype == DType.bf16
    assert (x + 1).dtype == DType.bf16
    y = load("y", [make_axes("i")], DType.f32)
    assert (x * y).dtype == DType.f32


def test_index_arithmetic_folds_into_one_sympy_predicate():
    i, j = make_axes("i j")
    W = dims("W")
    pred = (index(j) <= index(i)) & (index(i) - index(j) < W)
    assert pred.op is ExprOp.INDEX and pred.dtype == DType.bool
    assert pred.arg == sympy.And(sympy.Le(j, i), sympy.Lt(i - j, W))
    sel = where(index(i) < 3, index(i), index(j))
    assert sel.op is ExprOp.INDEX and isinstance(sel.arg, sympy.Piecewise)


def test_axis_symbols_are_integers_not_predicates():
    i = make_axes("i")
    assert index(i).dtype == DType.i64
    assert isinstance(i, Axis) and not isinstance(dims("N"), Axis) and isinstance(dims("N"), Dim)


def test_nodes_are_immutable_and_structurally_equal():
    i = make_axes("i")
    a = exp(load("x", [i], DType.f32) * 2.0)
    b = exp(load("x", [i], DType.f32) * 2.0)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != exp(load("x", [i], DType.f32) * 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.op = ExprOp.LOG  # type: ignore[misc]


def test_expression_has_no_truth_value():
    x = load("x", [make_axes("i")], DType.f32)
    with pytest.raises(IRError, match="no truth value"):
        bool(x > 0)


def test_non_integer_index_is_rejected():
    i = make_axes("i")
    with pytest.raises(IRError, match="not integer-valued"):
        load("x", [i / 2], DType.f32)


def test_logic_needs_booleans():
    x = load("x", [make_axes("i")], DType.f32)
    with pytest.raises(IRError, match="must be boolean"):
        x & (x > 0)
    with pytest.raises(IRError, match="must be boolean"):
        where(x, x, 0.0)


def test_constants_and_walk_order():
    e = exp(load("x", [make_axes("i")], DType.f32)) + const(math.inf)
    ops = [n.op for n in e.walk()]
    assert ops.index(ExprOp.LOAD) < ops.index(ExprOp.EXP) < ops.index(ExprOp.ADD)
    assert ops[-1] is ExprOp.ADD
