"""Symbolic differentiation of value expressions with respect to one load (used by the grad transform)."""
from __future__ import annotations

from ..expr import Expr, ExprOp, binary, cast, const, log, sigmoid, where
from ..errors import IRError


def _zero(e: Expr | None) -> bool:
    return e is None


def _mul(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None or b is None:
        return None
    return a * b


def _add(a: Expr | None, b: Expr | None) -> Expr | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def derivative(e: Expr, leaf: Expr) -> Expr | None:
    """d e / d leaf as an Expr, or None when it is identically zero. ``leaf`` is a LOAD node."""
    memo: dict[Expr, Expr | None] = {}
    for n in e.walk():
        memo[n] = _rule(n, leaf, memo)
    return memo[e]


def _rule(n: Expr, leaf: Expr, d: dict) -> Expr | None:  # noqa: C901 (one rule per op kind)
    op = n.op
    if n == leaf:
        return const(1.0, n.dtype if n.dtype.is_float else None)
    if op in (ExprOp.CONST, ExprOp.INDEX, ExprOp.LOAD, ExprOp.ARG):
        return None
    if op in (ExprOp.LT, ExprOp.LE, ExprOp.GT, ExprOp.GE, ExprOp.EQ, ExprOp.NE, ExprOp.AND, ExprOp.OR,
              ExprOp.NOT):
        return None
    if op is ExprOp.CAST:
        dx = d[n.operand]
        return None if dx is None or not n.dtype.is_float else cast(dx, n.dtype)
    if op is ExprOp.NEG:
        dx = d[n.operand]
        return None if dx is None else -dx
    if op is ExprOp.ADD:
        return _add(d[n.lhs], d[n.rhs])
    if op is ExprOp.SUB:
        a, b = d[n.lhs], d[n.rhs]
        return a if b is None else (-b if a is None else a - b)
    if op is ExprOp.MUL:
        return _add(_mul(d[n.lhs], n.rhs), _mul(n.lhs, d[n.rhs]))
    if op is ExprOp.DIV:
        a, b = d[n.lhs], d[n.rhs]
        out = None if a is None else a / n.rhs
        if b is not None:
            out = _add(out, -(b * n.lhs / (n.rhs * n.rhs)))
        return out
    x = n.src[0] if n.src else None
    dx = d[x] if x is not None else None
    if op is ExprOp.EXP:
        return _mul(dx, n)
    if op is ExprOp.LOG:
        return None if dx is None else dx / x
    if op is ExprOp.SQRT:
        return None if dx is None else dx / (n * 2.0)
    if op is ExprOp.SIGMOID:
        return _mul(dx, n * (1.0 - n))
    if op is ExprOp.SOFTPLUS:
        return _mul(dx, sigmoid(x))
    if op is ExprOp.SILU:
        s = sigmoid(x)
        return _mul(dx, s * (1.0 + x * (1.0 - s)))
    if op is ExprOp.TANH:
        return _mul(dx, 1.0 - n * n)
    if op is ExprOp.ABS:
        return None if dx is None else where(x < 0.0, -dx, dx)
    if op in (ExprOp.MAX, ExprOp.MIN):
        a, b = d[n.lhs], d[n.rhs]
        pick = (n.lhs >= n.rhs) if op is ExprOp.MAX else (n.lhs <= n.rhs)
        if a is None and b is None:
            return None
        zero = const(0.0, n.dtype)
        return where(pick, a if a is not None else zero, b if b is not None else zero)
    if op is ExprOp.POW:
        a, b = d[n.lhs], d[n.rhs]
        out = None if a is None else a * n.rhs * binary(ExprOp.POW, n.lhs, n.rhs - 1.0)
        if b is not None:
            # d x**y / dy = x**y * log(x), 0 where x == 0 and y >= 0 (torch's rule: no 0 * -inf)
            zero = const(0.0, n.dtype)
            out = _add(out, b * where(n.lhs.eq(zero) & (n.rhs >= zero), zero, n * log(n.lhs)))
        return out
    if op is ExprOp.WHERE:
        a, b = d[n.then], d[n.otherwise]
        if a is None and b is None:
            return None
        zero = const(0.0, n.dtype)
        return where(n.cond, a if a is not None else zero, b if b is not None else zero)
    raise IRError(f"no derivative rule for {op.value} in {n}")


__all__ = ["derivative"]
