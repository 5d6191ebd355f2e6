"""ir.serialize: lossless JSON of value expressions.

Round trips: ``==`` on the Expr after ``expr_from_json(expr_to_json(e))``, identical JSON text when written again,
and an identical ``fingerprint`` of the attention op declared from the round-tripped expressions; covers every
mask and score mod of opgen.masks / opgen.scores (a test fails when one is added without a case here),
hand-written mods (document mask with a captured tensor, relative-position bias table, softcap), every ExprOp,
every DType, padded accesses, custom-monoid ARG leaves, float specials, and every expression in the library's
declared ops and a backward op. Safety: sympy text is parsed without eval; anything but sympy index classes with
literal arguments is refused.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import sympy
import torch

import opgen.masks as masks
import opgen.scores as scores
from opgen.ir import DType, Expr, ExprOp, IRError, expr as E
from opgen.ir.serialize import expr_from_json, expr_to_json, sympy_from_str, sympy_to_str
from opgen.ir.symbols import Axis, Dim, make_axes
from opgen.ops.attention import declare_attention, trace


def roundtrip(e: Expr) -> Expr:
    text = expr_to_json(e)
    back = expr_from_json(text)
    assert back == e and hash(back) == hash(e)
    assert expr_to_json(back) == text
    json.loads(text)                                      # strict JSON (no NaN / Infinity tokens)
    return back


# ------------------------------------------------------------------------------------------- the mods

DOCS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2], dtype=torch.int32)
REL_TABLE = torch.randn(4, 15)                            # [heads, 2 * max_len - 1]


def document_mask(b, h, q_idx, kv_idx):
    return (DOCS[q_idx] == DOCS[kv_idx]) & (q_idx >= kv_idx)


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + REL_TABLE[h, q_idx - kv_idx + 7]


def tanh_softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def kitchen_sink(score, b, h, q_idx, kv_idx):
    """Every traced construct: where, clamp, exp/log/sqrt/sigmoid, pow, min/max, neg, abs, casts, int division."""
    x = torch.where(q_idx % 3 == 0, score.exp().clamp(max=4.0), -score.abs())
    x = torch.minimum(x, torch.maximum(score.sigmoid(), (score * score + 1.0).sqrt().log()))
    x = torch.where(q_idx > 100, float("-inf"), x + (score ** 2) * 0.5 - (q_idx // 2 - kv_idx))
    return x.to(torch.float64).float()


def not_mask(b, h, q_idx, kv_idx):
    return ~(q_idx < kv_idx) | (h == 1) & (b != 0)


LIBRARY_CASES = {
    "causal": (None, masks.causal),
    "sliding_window": (None, masks.sliding_window(7)),
    "sliding_window non-causal": (None, masks.sliding_window(5, causal=False)),
    "neighborhood_1d": (None, masks.neighborhood_1d(3)),
    "neighborhood_1d dilated, length": (None, masks.neighborhood_1d(5, dilation=2, length=40)),
    "neighborhood_2d": (None, masks.neighborhood_2d(5, 7, 3)),
    "neighborhood_2d pairs": (None, masks.neighborhood_2d(6, 9, (3, 5), (2, 1))),
    "swin_window": (None, masks.swin_window(6, 9, 3)),
    "swin_window shifted": (None, masks.swin_window(8, 8, 4, shift=2)),
    "alibi": (scores.alibi(scores.alibi_slopes(4)), None),
    "softcap": (scores.softcap(20.0), masks.causal),
}
HAND_CASES = {
    "document mask (captured int32 tensor)": (None, document_mask),
    "relative-position bias table": (relative_bias, masks.causal),
    "tanh softcap": (tanh_softcap, None),
    "kitchen sink": (kitchen_sink, not_mask),
}


def test_every_library_mod_has_a_case():
    names = {name for mod in (masks, scores) for name, obj in vars(mod).items()
             if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "") == mod.__name__
             and name != "alibi_slopes"}
    covered = {type(m).__name__ if not inspect.isfunction(m) else m.__name__
               for pair in LIBRARY_CASES.values() for m in pair if m is not None}
    assert names <= covered, f"no round-trip case for {sorted(names - covered)}"


@pytest.mark.parametrize("score_dtype", [DType.f32, DType.f64])
@pytest.mark.parametrize("case", list(LIBRARY_CASES) + list(HAND_CASES))
def test_traced_mods_round_trip(case, score_dtype):
    score_mod, mask_mod = {**LIBRARY_CASES, **HAND_CASES}[case]
    traced = trace("test", score_mod, mask_mod, score_dtype)
    score = roundtrip(traced.score)
    mask = roundtrip(traced.mask) if traced.mask is not None else None
    caps = tuple((DType(str(_ir(t))), d) for t, d in zip(traced.captures, traced.capture_dims))
    ops = [declare_attention.__wrapped__(DType.f32, DType.f32, DType.f32, 0.5, False, s, m, caps)
           for s, m in ((traced.score, traced.mask), (score, mask))]
    assert ops[0].fingerprint == ops[1].fingerprint
    for e in (score, mask):                               # axes and dims come back as their own classes
        for sym in (E.free_symbols(e) if e is not None else ()):
            assert type(sym) in (Axis, Dim), (sym, type(sym))


def _ir(t: torch.Tensor) -> DType:
    from opgen.ir import as_dtype

    return as_dtype(t.dtype)


def test_axes_and_dims_keep_their_class():
    traced = trace("test", None, masks.neighborhood_1d(3))           # the length is the Dim S
    back = roundtrip(traced.mask)
    syms = {s.name: s for s in back.arg.free_symbols}
    assert type(syms["i"]) is Axis and type(syms["j"]) is Axis and type(syms["S"]) is Dim
    assert syms["S"].is_positive and syms["i"].is_nonnegative


# ---------------------------------------------------------------------------------- every op and dtype

i, j = make_axes("i j")
N = Dim("N")


def _leaves(dt: DType) -> list[Expr]:
    vals = {DType.bool: True, DType.i32: -7, DType.i64: 2 ** 70}.get(dt, 0.1)
    return [Expr(ExprOp.CONST, dt, (), vals), E.load("x", (i, j + 1), dt),
            E.load("p", (i - 1, N - j), dt, pad=((1, 0), (0, N))), Expr(ExprOp.ARG, dt, (), 1)]


@pytest.mark.parametrize("dt", list(DType))
def test_every_expr_op_and_dtype_round_trips(dt):
    a, b = _leaves(dt)[1], _leaves(dt)[2]
    c = E.load("c", (i,), DType.bool)
    nodes = [Expr(op, dt, (a,)) for op in E.UNARY] + [Expr(op, dt, (a, b)) for op in E.BINARY]
    nodes += [Expr(ExprOp.WHERE, dt, (c, a, b)), *_leaves(dt)]
    nodes += [E.index(i * 2 + sympy.floor(j / 3) - sympy.Mod(N, 5)), E.index(sympy.And(i < j, sympy.Ne(i, 4)))]
    covered = {n.op for n in nodes}
    assert covered == set(ExprOp)
    for n in nodes:
        roundtrip(n)
    big = nodes[0]
    for n in nodes[1:]:                                   # one DAG with shared subexpressions
        big = Expr(ExprOp.WHERE, dt, (c, big, n)) if n.dtype == dt else big
    back = roundtrip(big)
    assert len(json.loads(expr_to_json(back))["nodes"]) == len(set(big.walk()))


@pytest.mark.parametrize("x", [0.1, -0.0, 1e-310, 1.7976931348623157e308, math.inf, -math.inf, 1 / 3])
def test_float_constants_are_exact(x):
    back = expr_from_json(expr_to_json(E.const(x, DType.f64)))
    assert back.arg == x and math.copysign(1.0, back.arg) == math.copysign(1.0, x)


def test_nan_constant():
    back = expr_from_json(expr_to_json(E.const(math.nan, DType.f32)))
    assert back.op is ExprOp.CONST and back.dtype == DType.f32 and math.isnan(back.arg)


def _exprs_of(obj, seen=None):
    """Every Expr held (at any depth) by the dataclass fields of an op's nodes."""
    seen = set() if seen is None else seen
    if isinstance(obj, Expr):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type) and id(obj) not in seen:
        seen.add(id(obj))
        for f in dataclasses.fields(obj):
            yield from _exprs_of(getattr(obj, f.name), seen)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _exprs_of(x, seen)


def test_every_expression_of_the_library_ops_round_trips():
    from opgen.ir.passes.grad import grad_op
    from opgen.library import LIBRARY

    ops = [entry.declare() for entry in LIBRARY]
    scan = next(o for o, e in zip(ops, LIBRARY) if e.name == "selective_scan")
    ops.append(grad_op(scan, tuple(t.name for t in scan.inputs)))
    count = 0
    for op in ops:
        for node in op.nodes:
            for e in _exprs_of(node):
                roundtrip(e)
                count += 1
    assert count > 40
    assert any(a.pad is not None for op in ops for n in op.nodes for e in _exprs_of(n) for a in E.loads(e))


# ------------------------------------------------------------------------------------------- safety

@pytest.mark.parametrize("text", [
    "__import__('os').system('echo pwned')",
    "Integer(1).__class__",
    "Symbol('x', integer=__import__('os'))",
    "exec('import os')",
    "Add(*[Integer(1), Integer(2)])",
    "(lambda: 1)()",
    "Integer(1) + Integer(2)",
    "Axis('i', integer=True)",                            # an Axis must carry exactly the Axis assumptions
    "Dim('N', integer=True, nonnegative=True)",
    "Integer('1')",
    "[Integer(1)]",
    "Symbol(Integer(1))",
    "Add(Integer(1), Integer(2)",
    "x",
])
def test_sympy_text_is_parsed_without_eval(text, capfd):
    with pytest.raises(IRError, match="opgen.ir.serialize"):
        sympy_from_str(text)
    assert "pwned" not in capfd.readouterr().out


def test_sympy_text_round_trip_keeps_classes():
    e = sympy.Piecewise((Dim("L") - Axis("t"), sympy.Lt(Axis("t"), 3)), (sympy.Symbol("z", integer=True), True))
    back = sympy_from_str(sympy_to_str(e))
    assert back == e and sympy.srepr(back) == sympy.srepr(e)
    assert sympy_from_str(sympy_to_str(-sympy.oo)) == -sympy.oo
    assert sympy_from_str(sympy_to_str(sympy.Float(0.25))) == sympy.Float(0.25)


@pytest.mark.parametrize("text, match", [
    ("not json", "not valid JSON"),
    ('{"format": "other"}', "not an opgen expression"),
    ('{"format": "opgen.expr", "version": 99, "nodes": [], "root": 0}', "version 99"),
    ('{"format": "opgen.expr", "version": 1, "nodes": [], "root": 0}', "malformed"),
    ('{"format": "opgen.expr", "version": 1, "root": 0, "nodes": [{"op": "exp", "dtype": "f32", "src": [0]}]}',
     "operands must be indices of earlier nodes"),
    ('{"format": "opgen.expr", "version": 1, "root": 0, "nodes": [{"op": "sin", "dtype": "f32"}]}', "unknown op"),
    ('{"format": "opgen.expr", "version": 1, "root": 0, "nodes": [{"op": "const", "dtype": "f8"}]}',
     "unknown op 'const' or dtype 'f8'"),
    ('{"format": "opgen.expr", "version": 1, "root": 0, "nodes": [{"op": "const", "dtype": "f32"}]}', "no 'arg'"),
    ('{"format": "opgen.expr", "version": 1, "root": 0, "nodes": [{"op": "load", "dtype": "f32", "arg": 3}]}',
     "malformed 'arg'"),
])
def test_malformed_json_is_a_clear_error(text, match):
    with pytest.raises(IRError, match=match):
        expr_from_json(text)


def test_non_expr_input_is_refused():
    with pytest.raises(IRError, match="expected an Expr"):
        expr_to_json(sympy.Integer(1))  # type: ignore[arg-type]
