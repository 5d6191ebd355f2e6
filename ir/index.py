"""Integer reasoning on index expressions: affine decomposition, interval bounds, proofs.

Everything here works on sympy expressions over :class:`~opgen.ir.symbols.Axis` and
:class:`~opgen.ir.symbols.Dim` symbols. Bounds are symbolic when dims are symbols and exact integers once dims
are bound, so the same code proves accesses at declaration time and checks them at call time.
"""
from __future__ import annotations

from typing import Mapping

import itertools

import sympy

from .symbols import Axis

Bounds = tuple[sympy.Expr, sympy.Expr]


def affine(e: sympy.Expr, axes: set[Axis]) -> tuple[dict[Axis, sympy.Expr], sympy.Expr] | None:
    """Decompose ``e = sum(c_a * a) + c0`` over ``axes`` with axis-free coefficients, or None if not affine."""
    e = sympy.expand(e)
    present = [a for a in axes if e.has(a)]
    if not present:
        return {}, e
    try:
        poly = sympy.Poly(e, *present)
    except sympy.PolynomialError:
        return None
    if poly.total_degree() > 1:
        return None
    coeffs: dict[Axis, sympy.Expr] = {}
    const = sympy.Integer(0)
    for monom, c in poly.terms():
        if c.has(*present):
            return None
        if sum(monom) == 0:
            const = c
        else:
            coeffs[present[monom.index(1)]] = c
    return coeffs, const


def bounds(e: sympy.Basic, extents: Mapping[Axis, sympy.Expr]) -> Bounds:
    """Inclusive (lo, hi) of ``e`` as every axis ranges over ``[0, extent)``; conservative for non-monotone parts."""
    e = sympy.sympify(e)
    if e.is_Integer or e.is_Rational:
        return e, e
    if isinstance(e, Axis):
        if e not in extents:
            raise KeyError(e)
        return sympy.Integer(0), extents[e] - 1
    if e.is_Symbol:
        return e, e
    if not any(isinstance(s, Axis) for s in e.free_symbols):
        return e, e
    if e.is_Add:
        split = _split_mod(e)
        if split is not None:                 # rest + (y - m*floor(y/m)) = rest + (y mod m), in [0, m - 1]
            rest, m = split
            lo, hi = bounds(rest, extents)
            return lo, hi + m - 1
        los, his = zip(*(bounds(t, extents) for t in e.args))
        return sympy.Add(*los), sympy.Add(*his)
    if e.is_Mul:
        const = [t for t in e.args if not any(isinstance(s, Axis) for s in t.free_symbols)]
        var = [t for t in e.args if t not in const]
        c = sympy.Mul(*const)
        if len(var) == 1:
            lo, hi = bounds(var[0], extents)
            if c.is_nonnegative:
                return c * lo, c * hi
            if c.is_nonpositive:
                return c * hi, c * lo
            return sympy.Min(c * lo, c * hi), sympy.Max(c * lo, c * hi)
        vals = [c * x for x in _corner_products([bounds(v, extents) for v in var])]
        return sympy.Min(*vals), sympy.Max(*vals)
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den.is_positive and not any(isinstance(s, Axis) for s in den.free_symbols):
            lo, hi = bounds(num, extents)
            return sympy.floor(lo / den), sympy.floor(hi / den)
        lo, hi = bounds(e.args[0], extents)
        return sympy.floor(lo), sympy.floor(hi)
    if isinstance(e, sympy.Mod):
        x, m = e.args
        if not any(isinstance(s, Axis) for s in m.free_symbols) and m.is_positive:
            lo, hi = bounds(x, extents)
            if _proved(lo >= 0) and _proved(hi < m):
                return lo, hi
            return sympy.Integer(0), m - 1
    if isinstance(e, sympy.Piecewise):
        bs = [bounds(expr, extents) for expr, _ in e.args]
        return sympy.Min(*(b[0] for b in bs)), sympy.Max(*(b[1] for b in bs))
    if isinstance(e, (sympy.Min, sympy.Max)):
        bs = [bounds(a, extents) for a in e.args]
        return type(e)(*(b[0] for b in bs)), type(e)(*(b[1] for b in bs))
    if isinstance(e, sympy.Abs):
        lo, hi = bounds(e.args[0], extents)
        if _proved(lo >= 0):
            return lo, hi
        return sympy.Integer(0), sympy.Max(-lo, hi)
    raise ValueError(f"cannot bound index expression {e}")


def _split_mod(e: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr] | None:
    """``(rest, m)`` when ``e = rest + y - m*floor(y/m)`` for a positive axis-free ``m`` (a remainder written out,
    as the grad transform writes a grouped channel), else None."""
    for t in e.args:
        fl = [a for a in sympy.Mul.make_args(t) if isinstance(a, sympy.floor)]
        if len(fl) != 1:
            continue
        num, den = sympy.fraction(sympy.together(fl[0].args[0]))
        if any(isinstance(x, Axis) for x in den.free_symbols) or not den.is_positive:
            continue
        if sympy.expand(t / fl[0] + den) != 0:
            continue
        return sympy.expand(e - t - num), den
    return None


def _corner_products(bs: list[Bounds]) -> list[sympy.Expr]:
    out = [sympy.Integer(1)]
    for lo, hi in bs:
        out = [x * lo for x in out] + [x * hi for x in out]
    return out


def _proved(rel: sympy.Basic) -> bool:
    """True only when sympy can decide ``rel`` is true for all positive dims. A ``Max`` / ``Min`` term is first
    replaced, where that is sound, by one of its arguments (``Max(0, x) >= x`` and ``>= 0``), so that a padding
    written ``Max(0, need)`` proves without sympy's slow and rarely successful simplification of ``Max``."""
    r = sympy.sympify(rel)
    if r is sympy.true:
        return True
    if r is sympy.false or not isinstance(r, sympy.core.relational.Relational):
        return False
    if isinstance(r, sympy.Equality):
        return bool(sympy.simplify(r.lhs - r.rhs) == 0)
    upper = isinstance(r, (sympy.LessThan, sympy.StrictLessThan))      # prove diff <= 0 (< 0), else >= 0 (> 0)
    diff = sympy.expand(r.lhs - r.rhs)
    variants = [d for d in _minmax_free(diff, upper) if not d.has(sympy.Max, sympy.Min)]
    if any(_sign_holds(d, r) for d in variants):          # decided without simplification (cheap)
        return True
    return any(_sign_holds(sympy.simplify(d), r) for d in variants[:2])    # simplify is slow: two tries


def _sign_holds(diff: sympy.Expr, r: sympy.Basic) -> bool:
    if isinstance(r, sympy.GreaterThan):
        return bool(diff.is_nonnegative)
    if isinstance(r, sympy.StrictGreaterThan):
        return bool(diff.is_positive)
    if isinstance(r, sympy.LessThan):
        return bool(diff.is_nonpositive) or bool(_drop_floors(diff).is_nonpositive)
    return bool(diff.is_negative)


def _minmax_free(e: sympy.Expr, upper: bool, limit: int = 16) -> list[sympy.Expr]:
    """``e`` itself, then bounds of ``e`` (upper bounds if ``upper``, else lower) with its top-level ``Max`` /
    ``Min`` terms replaced by one argument each where the replacement bounds the term the right way: a ``Max``
    whose coefficient's sign makes a smaller value a bound (``Max(a, b) >= a``), a ``Min`` the other way."""
    out = [e]
    choices = []
    for t in sympy.Add.make_args(e):
        coeff, rest = t.as_independent(sympy.Max, sympy.Min)
        if not isinstance(rest, (sympy.Max, sympy.Min)) or not coeff.is_number or coeff == 0:
            continue
        shrink = (coeff < 0) == upper       # replacing the term by a smaller value bounds e the right way
        if isinstance(rest, sympy.Max) == shrink:
            choices.append((t, [coeff * a for a in rest.args]))
    for combo in itertools.islice(itertools.product(*(alts for _, alts in choices)), limit):
        out.append(sympy.expand(e - sum(t for t, _ in choices) + sum(combo)))
    return out


def _drop_floors(e: sympy.Expr) -> sympy.Expr:
    """An upper bound of ``e``: ``floor(y) <= y`` applied to floor terms with a positive coefficient."""
    terms = []
    for t in sympy.Add.make_args(sympy.expand(e)):
        coeff, rest = t.as_independent(sympy.floor)
        if isinstance(rest, sympy.floor) and coeff.is_positive:
            t = coeff * rest.args[0]
        terms.append(t)
    return sympy.simplify(sympy.Add(*terms))


def proved(rel: sympy.Basic) -> bool:
    """Whether ``rel`` (a sympy relation over positive dims) is provably true."""
    return _proved(rel)


def evaluate_int(e: sympy.Basic, values: Mapping[sympy.Symbol, int]) -> int:
    """The integer value of ``e`` with every symbol bound."""
    v = sympy.sympify(e).xreplace({k: sympy.Integer(x) for k, x in values.items()})
    if not v.is_Integer:
        v = sympy.simplify(v)
    if not v.is_Integer:
        raise ValueError(f"{e} does not evaluate to an integer with {dict(values)} (got {v})")
    return int(v)
