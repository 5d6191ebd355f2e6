"""Evaluate sympy index expressions and predicates as broadcast torch integer / bool tensors."""
from __future__ import annotations

from typing import Mapping

import sympy
import torch


def eval_index(e: sympy.Basic, env: Mapping[sympy.Symbol, object]) -> torch.Tensor | int | bool:
    """Evaluate ``e`` with symbols bound to ints or int64 tensors (broadcasting); exact integer arithmetic."""
    if e is sympy.true or e is True:
        return True
    if e is sympy.false or e is False:
        return False
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        try:
            return env[e]
        except KeyError:
            raise KeyError(f"index symbol {e} is not bound") from None
    if e.is_Add:
        out = 0
        for t in e.args:
            out = out + eval_index(t, env)
        return out
    if e.is_Mul:
        num, den = sympy.fraction(e)
        if den != 1:
            raise ValueError(f"index expression {e} is not integer-valued")
        out = 1
        for t in e.args:
            out = out * eval_index(t, env)
        return out
    if e.is_Pow:
        base, ex = e.args
        if not ex.is_Integer or ex < 0:
            raise ValueError(f"unsupported power in index expression {e}")
        return eval_index(base, env) ** int(ex)
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return _floordiv(eval_index(num, env), eval_index(den, env))
    if isinstance(e, sympy.ceiling):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return -_floordiv(-eval_index(num, env), eval_index(den, env))
    if isinstance(e, sympy.Mod):
        a, m = (eval_index(x, env) for x in e.args)
        return torch.remainder(a, m) if isinstance(a, torch.Tensor) or isinstance(m, torch.Tensor) else a % m
    if isinstance(e, sympy.Abs):
        a = eval_index(e.args[0], env)
        return a.abs() if isinstance(a, torch.Tensor) else abs(a)
    if isinstance(e, (sympy.Min, sympy.Max)):
        f = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
        vals = [eval_index(a, env) for a in e.args]
        out = vals[0]
        for v in vals[1:]:
            if isinstance(out, torch.Tensor) or isinstance(v, torch.Tensor):
                out = f(torch.as_tensor(out), torch.as_tensor(v))
            else:
                out = min(out, v) if isinstance(e, sympy.Min) else max(out, v)
        return out
    if isinstance(e, sympy.Piecewise):
        result = None
        for val, cond in reversed(e.args):
            v = eval_index(val, env)
            if result is None:
                result = v
                continue
            c = eval_index(cond, env)
            result = torch.where(torch.as_tensor(c), torch.as_tensor(v), torch.as_tensor(result))
        return result
    if isinstance(e, sympy.core.relational.Relational):
        a, b = eval_index(e.lhs, env), eval_index(e.rhs, env)
        return _REL[type(e)](a, b)
    if isinstance(e, sympy.And):
        out = True
        for a in e.args:
            out = _and(out, eval_index(a, env))
        return out
    if isinstance(e, sympy.Or):
        out = False
        for a in e.args:
            out = _or(out, eval_index(a, env))
        return out
    if isinstance(e, sympy.ITE):
        c, a, b = (eval_index(x, env) for x in e.args)
        return torch.where(torch.as_tensor(c), torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(e, (sympy.Xor,)):
        a, b = (eval_index(x, env) for x in e.args)
        return torch.logical_xor(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(e, sympy.Not):
        a = eval_index(e.args[0], env)
        return ~a if isinstance(a, torch.Tensor) else not a
    raise ValueError(f"unsupported index expression {e} ({type(e).__name__})")


def _floordiv(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.div(torch.as_tensor(a), b, rounding_mode="floor")
    return a // b


def _and(a, b):
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    return torch.logical_and(torch.as_tensor(a), torch.as_tensor(b))


def _or(a, b):
    if isinstance(a, bool) and isinstance(b, bool):
        return a or b
    return torch.logical_or(torch.as_tensor(a), torch.as_tensor(b))


_REL = {
    sympy.StrictLessThan: lambda a, b: a < b, sympy.LessThan: lambda a, b: a <= b,
    sympy.StrictGreaterThan: lambda a, b: a > b, sympy.GreaterThan: lambda a, b: a >= b,
    sympy.Equality: lambda a, b: a == b, sympy.Unequality: lambda a, b: a != b,
}
