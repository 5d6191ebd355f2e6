"""Block sparsity of attention masks: which (query tile, key tile) pairs are empty, partial or full.

The mask predicate (a sympy boolean over the axes ``b, h, i, j``) is never evaluated at all ``L x S`` points.
Instead it is compiled once into a straight-line program of small closures that evaluates the predicate over
*boxes* of indices with interval arithmetic: integer sub-expressions give ``(lo, hi)`` arrays (inclusive) and
predicates a three-valued answer ``(may_be_true, may_be_false)``. One run over the broadcast tile grid
(query tiles along one axis, key tiles along the other) classifies every tile pair with a handful of numpy ops.
Tiles the intervals cannot decide are refined by evaluating sub-boxes (bisection, plus exact point samples),
within a work budget; an undecided tile stays *partial*, which is always sound.

Data-dependent masks (``doc[i] == doc[j]``, a routing table ``route[b, h, i // 64, j // 64]``) use the same
interval logic at run time: each load's ``[min, max]`` over a tile's index range comes from a sparse table of
range minima / maxima built with torch on the tensor's device (:func:`classify_tiles_runtime`).

For predicates that are conjunctions of affine inequalities in ``i`` and ``j`` the visited key-tile range of a
query tile is also derived symbolically (:func:`kv_tile_bounds`), so kernels can loop over it directly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import sympy
from sympy.core.relational import Relational

from ..dtypes import DType
from ..errors import IRError
from ..expr import Expr, ExprOp, free_symbols, substitute

__all__ = ["EMPTY", "PARTIAL", "FULL", "TileTable", "interval", "compile_interval", "classify_tiles",
           "classify_tiles_runtime", "kv_tile_bounds", "describe"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_WHO = "block sparsity"
_REFINE_BUDGET = 1 << 22     # element-steps (program steps x boxes) the refinement may spend

Array = Any   # a numpy array / scalar or a torch tensor


# ---------------------------------------------------------------------------------------------------------------
# array backends: the same compiled program runs on numpy (compile time) and torch (run time, on device)

class _Numpy:
    def const(self, v: int | bool) -> Array:
        return np.bool_(v) if isinstance(v, (bool, np.bool_)) else np.int64(v)

    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    where = staticmethod(np.where)


class _Torch:
    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def const(self, v: int | bool | float) -> Array:
        if isinstance(v, bool):
            return self.torch.tensor(v, device=self.device)
        dt = self.torch.float64 if isinstance(v, float) else self.torch.int64
        return self.torch.tensor(v, dtype=dt, device=self.device)

    def minimum(self, a: Array, b: Array) -> Array:
        return self.torch.minimum(self._t(a), self._t(b))

    def maximum(self, a: Array, b: Array) -> Array:
        return self.torch.maximum(self._t(a), self._t(b))

    def where(self, c: Array, a: Array, b: Array) -> Array:
        return self.torch.where(self._t(c), self._t(a), self._t(b))

    def _t(self, x: Array) -> Array:
        return x if isinstance(x, self.torch.Tensor) else self.const(x)


_NP = _Numpy()


def _backend_of(env: Mapping) -> Any:
    for v in env.values():
        for a in v:
            if type(a).__module__.startswith("torch"):
                return _Torch(a.device)
    return _NP


# ---------------------------------------------------------------------------------------------------------------
# compiling a sympy expression into a straight-line interval program

Step = Callable[..., Any]


class _Program:
    """A compiled sympy expression: ``steps[k](X, env, *operands)`` computes slot ``k`` (CSE by construction)."""

    def __init__(self, expr: sympy.Basic) -> None:
        self.expr = expr
        self.steps: list[tuple[Step, tuple[int, ...]]] = []
        self.slot: dict[sympy.Basic, int] = {}
        self.kinds: list[str] = []           # "int" or "bool" per slot
        self.families: dict[sympy.Symbol, set[tuple[int, int]]] = {}   # symbol -> {(period, residue)} jumps
        self.symbols = sorted(expr.free_symbols, key=str)
        self.out = self._node(expr)

    @property
    def is_bool(self) -> bool:
        return self.kinds[self.out] == "bool"

    def run(self, env: Mapping[sympy.Symbol, tuple[Array, Array]], X: Any) -> tuple[Array, Array]:
        vals: list[Any] = []
        for fn, args in self.steps:
            vals.append(fn(X, env, *[vals[a] for a in args]))
        return vals[self.out]

    # construction ---------------------------------------------------------------------------------------------
    def _emit(self, e: sympy.Basic, kind: str, fn: Step, args: Sequence[int] = ()) -> int:
        self.steps.append((fn, tuple(args)))
        self.kinds.append(kind)
        self.slot[e] = len(self.steps) - 1
        return self.slot[e]

    def _int(self, e: sympy.Basic) -> int:
        k = self._node(e)
        if self.kinds[k] != "int":
            raise IRError(f"{_WHO}: expected an integer expression, got the predicate {e}")
        return k

    def _bool(self, e: sympy.Basic) -> int:
        k = self._node(e)
        if self.kinds[k] != "bool":
            raise IRError(f"{_WHO}: expected a predicate, got the integer expression {e}")
        return k

    def _node(self, e: sympy.Basic) -> int:
        if e in self.slot:
            return self.slot[e]
        if e is sympy.true or e is True:
            return self._emit(e, "bool", lambda X, env: (X.const(True), X.const(False)))
        if e is sympy.false or e is False:
            return self._emit(e, "bool", lambda X, env: (X.const(False), X.const(True)))
        if isinstance(e, sympy.Integer):
            v = int(e)

            def integer(X, env):
                c = X.const(v)
                return c, c
            return self._emit(e, "int", integer)
        if isinstance(e, sympy.Symbol):
            def sym(X, env, s=e):
                try:
                    return env[s]
                except KeyError:
                    raise IRError(f"{_WHO}: symbol {s} of {self.expr} has no range (bind it in dims=)") from None
            return self._emit(e, "int", sym)
        for types, build in _BUILDERS:
            if isinstance(e, types):
                return build(self, e)
        raise IRError(f"{_WHO}: unsupported construct {type(e).__name__} in {e}")

    def _add(self, e: sympy.Add) -> int:
        ks = [self._int(t) for t in e.args]

        def add(X, env, *ts):
            if all(a is b for a, b in ts):          # points (lo is hi): one pass
                v = ts[0][0]
                for a, _ in ts[1:]:
                    v = v + a
                return v, v
            lo, hi = ts[0]
            for a, b in ts[1:]:
                lo, hi = lo + a, hi + b
            return lo, hi
        return self._emit(e, "int", add, ks)

    def _mul(self, e: sympy.Mul) -> int:
        coeff, rest = e.as_coeff_Mul()
        if not coeff.is_Integer:
            raise IRError(f"{_WHO}: non-integer sub-expression {e} (a rational factor outside floor / a comparison)")
        c = int(coeff)
        factors = list(rest.args) if isinstance(rest, sympy.Mul) else [rest]
        ks = [self._int(f) for f in factors]

        def mul(X, env, *ts):
            if all(a is b for a, b in ts):
                v = ts[0][0]
                for a, _ in ts[1:]:
                    v = v * a
                v = v * c
                return v, v
            lo, hi = ts[0]
            for a, b in ts[1:]:
                lo, hi = _corners(X, lo * a, lo * b, hi * a, hi * b)
            if c >= 0:
                return lo * c, hi * c
            return hi * c, lo * c
        return self._emit(e, "int", mul, ks)

    def _pow(self, e: sympy.Pow) -> int:
        base, ex = e.args
        if not (ex.is_Integer and int(ex) >= 0):
            raise IRError(f"{_WHO}: unsupported power {e} (only non-negative integer exponents)")
        n = int(ex)
        k = self._int(base)

        def pw(X, env, t):
            lo, hi = t
            if n % 2 == 1:
                return lo ** n, hi ** n
            alo, ahi = _abs(X, lo, hi)
            return alo ** n, ahi ** n
        return self._emit(e, "int", pw, [k])

    def _floor(self, e: sympy.Basic) -> int:
        num, den = _integer_fraction(e.args[0], e)
        k = self._int(num)
        self._breakpoints(num, den, 0 if isinstance(e, sympy.floor) else 1)
        sign = 1 if isinstance(e, sympy.floor) else -1          # ceiling(x) = -floor(-x)

        def fl(X, env, t):
            lo = sign * ((sign * t[0]) // den)
            return (lo, lo) if t[0] is t[1] else (lo, sign * ((sign * t[1]) // den))
        return self._emit(e, "int", fl, [k])

    def _breakpoints(self, num: sympy.Expr, den: int, shift: int) -> None:
        """Record where ``floor(num / den)`` / ``Mod(num, den)`` jump when ``num = x + c`` for an axis ``x``: at
        ``x = -c (+ shift) mod den``; the refinement splits boxes there."""
        syms = num.free_symbols
        if len(syms) != 1 or den < 2:
            return
        (x,) = syms
        c = num - x
        if c.free_symbols or not c.is_Integer:
            return
        self.families.setdefault(x, set()).add((den, (-int(c) + shift) % den))

    def _mod(self, e: sympy.Mod) -> int:
        a, m = e.args
        if not m.is_Integer or int(m) == 0:
            raise IRError(f"{_WHO}: unsupported Mod with a non-constant or zero divisor in {e}")
        d = int(m)
        k = self._int(a)
        self._breakpoints(a, d, 0)
        full_lo, full_hi = (0, d - 1) if d > 0 else (d + 1, 0)

        def mod(X, env, t):
            lo, hi = t
            if lo is hi:
                v = lo % d
                return v, v
            same = (lo // d) == (hi // d)
            return X.where(same, lo % d, full_lo), X.where(same, hi % d, full_hi)
        return self._emit(e, "int", mod, [k])

    def _minmax(self, e: sympy.Basic) -> int:
        ks = [self._int(a) for a in e.args]
        pick = "minimum" if isinstance(e, sympy.Min) else "maximum"

        def mm(X, env, *ts):
            f = getattr(X, pick)
            if all(a is b for a, b in ts):
                v = ts[0][0]
                for a, _ in ts[1:]:
                    v = f(v, a)
                return v, v
            lo, hi = ts[0]
            for a, b in ts[1:]:
                lo, hi = f(lo, a), f(hi, b)
            return lo, hi
        return self._emit(e, "int", mm, ks)

    def _absolute(self, e: sympy.Abs) -> int:
        k = self._int(e.args[0])
        def ab(X, env, t):
            if t[0] is t[1]:
                v = abs(t[0])
                return v, v
            return _abs(X, *t)
        return self._emit(e, "int", ab, [k])

    def _piecewise(self, e: sympy.Piecewise) -> int:
        if e.args[-1].cond is not sympy.true:
            raise IRError(f"{_WHO}: Piecewise without a final 'otherwise' branch in {e}")
        kind = "bool" if isinstance(e.args[0].expr, sympy.logic.boolalg.Boolean) \
            and not isinstance(e.args[0].expr, sympy.Expr) else "int"
        ks: list[int] = []
        for val, cond in e.args:
            ks += [self._bool(val) if kind == "bool" else self._int(val), self._bool(cond)]
        n = len(e.args)

        def pw(X, env, *ts):
            reach = X.const(True)
            parts = []
            for k in range(n):
                (v0, v1), (ct, cf) = ts[2 * k], ts[2 * k + 1]
                parts.append((reach & ct, v0, v1))
                reach = reach & cf
            return _union(X, parts, kind)
        return self._emit(e, kind, pw, ks)

    def _relational(self, e: Relational) -> int:
        lhs, rhs = e.args
        if _is_pred(lhs) or _is_pred(rhs):
            if not isinstance(e, (sympy.Eq, sympy.Ne)):
                raise IRError(f"{_WHO}: unsupported ordering of predicates in {e}")
            return self._equivalent(e, [lhs, rhs], negate=isinstance(e, sympy.Ne))
        d = lhs - rhs
        if any(not r.is_Integer for r in d.atoms(sympy.Rational)):
            d, _ = _integer_fraction(d, e)        # multiply through by the (positive) denominator
        k = self._int(d)
        test = _REL_TESTS[type(e)]

        def rel(X, env, t):
            if t[0] is t[1]:
                may_t = test(t[0], t[0])[0]
                return may_t, ~may_t
            return test(*t)
        return self._emit(e, "bool", rel, [k])

    def _equivalent(self, e: sympy.Basic, args: Sequence[sympy.Basic], negate: bool = False) -> int:
        ks = [self._bool(a) for a in args]

        def eqv(X, env, *ts):
            (at, af), rest = ts[0], ts[1:]
            may_t, may_f = at, af          # three-valued "all equal" folded pairwise against the first
            for bt, bf in rest:
                may_t, may_f = may_t & ((at & bt) | (af & bf)), may_f | (at & bf) | (af & bt)
            return (may_f, may_t) if negate else (may_t, may_f)
        return self._emit(e, "bool", eqv, ks)

    def _logic(self, e: sympy.Basic) -> int:
        if isinstance(e, sympy.Equivalent):
            return self._equivalent(e, e.args)
        if isinstance(e, sympy.Implies):
            return self._node(sympy.Or(sympy.Not(e.args[0]), e.args[1], evaluate=False))
        ks = [self._bool(a) for a in e.args]
        if isinstance(e, sympy.Not):
            return self._emit(e, "bool", lambda X, env, t: (t[1], t[0]), ks)
        if isinstance(e, sympy.ITE):
            def ite(X, env, c, a, b):
                return (c[0] & a[0]) | (c[1] & b[0]), (c[0] & a[1]) | (c[1] & b[1])
            return self._emit(e, "bool", ite, ks)
        if isinstance(e, sympy.And):
            def conj(X, env, *ts):
                t, f = ts[0]
                for a, b in ts[1:]:
                    t, f = t & a, f | b
                return t, f
            return self._emit(e, "bool", conj, ks)
        if isinstance(e, sympy.Or):
            def disj(X, env, *ts):
                t, f = ts[0]
                for a, b in ts[1:]:
                    t, f = t | a, f & b
                return t, f
            return self._emit(e, "bool", disj, ks)
        if isinstance(e, sympy.Xor):
            def xor(X, env, *ts):
                t, f = ts[0]
                for a, b in ts[1:]:
                    t, f = (t & b) | (f & a), (t & a) | (f & b)
                return t, f
            return self._emit(e, "bool", xor, ks)
        raise IRError(f"{_WHO}: unsupported construct {type(e).__name__} in {e}")


def _is_pred(e: sympy.Basic) -> bool:
    return isinstance(e, sympy.logic.boolalg.Boolean) and not isinstance(e, sympy.Expr)


def _integer_fraction(arg: sympy.Basic, where_: sympy.Basic) -> tuple[sympy.Expr, int]:
    """``arg = num / den`` with an integer expression ``num`` and a positive integer constant ``den``."""
    num, den = sympy.fraction(sympy.together(arg))
    if not den.is_Integer or int(den) == 0:
        raise IRError(f"{_WHO}: unsupported division by a non-constant {den} in {where_}")
    if int(den) < 0:
        num, den = -num, -den
    return num, int(den)


def _corners(X: Any, *vals: Array) -> tuple[Array, Array]:
    lo = hi = vals[0]
    for v in vals[1:]:
        lo, hi = X.minimum(lo, v), X.maximum(hi, v)
    return lo, hi


def _abs(X: Any, lo: Array, hi: Array) -> tuple[Array, Array]:
    alo = X.where(lo >= 0, lo, X.where(hi <= 0, -hi, 0))
    ahi = X.maximum(-lo, hi)
    return alo, ahi


def _union(X: Any, parts: list[tuple[Array, Array, Array]], kind: str) -> tuple[Array, Array]:
    """Hull of the values of the branches that may be taken (``parts``: (possible, a, b) per branch)."""
    if kind == "bool":
        t = f = X.const(False)
        for p, a, b in parts:
            t, f = t | (p & a), f | (p & b)
        return t, f
    p0, lo, hi = parts[-1]          # the final branch (its condition is True) is taken wherever none before is
    seen = p0
    for p, a, b in reversed(parts[:-1]):
        lo = X.where(p, X.where(seen, X.minimum(lo, a), a), lo)
        hi = X.where(p, X.where(seen, X.maximum(hi, b), b), hi)
        seen = seen | p
    return lo, hi


_REL_TESTS: dict[type, Callable[[Array, Array], tuple[Array, Array]]] = {
    sympy.StrictLessThan: lambda lo, hi: (lo < 0, hi >= 0),
    sympy.LessThan: lambda lo, hi: (lo <= 0, hi > 0),
    sympy.StrictGreaterThan: lambda lo, hi: (hi > 0, lo <= 0),
    sympy.GreaterThan: lambda lo, hi: (hi >= 0, lo < 0),
    sympy.Equality: lambda lo, hi: ((lo <= 0) & (hi >= 0), (lo != 0) | (hi != 0)),
    sympy.Unequality: lambda lo, hi: ((lo != 0) | (hi != 0), (lo <= 0) & (hi >= 0)),
}

_BUILDERS: tuple[tuple[Any, Callable[[_Program, Any], int]], ...] = (
    (sympy.Add, _Program._add),
    (sympy.Mul, _Program._mul),
    (sympy.Pow, _Program._pow),
    ((sympy.floor, sympy.ceiling), _Program._floor),
    (sympy.Mod, _Program._mod),
    ((sympy.Min, sympy.Max), _Program._minmax),
    (sympy.Abs, _Program._absolute),
    (sympy.Piecewise, _Program._piecewise),
    (Relational, _Program._relational),
    ((sympy.And, sympy.Or, sympy.Not, sympy.Xor, sympy.ITE, sympy.Equivalent, sympy.Implies), _Program._logic),
)


@functools.lru_cache(maxsize=512)
def compile_interval(expr: sympy.Basic) -> _Program:
    """Compile ``expr`` once into an interval program (cached); see :func:`interval`."""
    return _Program(sympy.sympify(expr))


def interval(expr: sympy.Basic, env: Mapping[sympy.Symbol, tuple[Array, Array]]) -> tuple[Array, Array]:
    """Evaluate ``expr`` over boxes: ``env`` maps each symbol to inclusive ``(lo, hi)`` int64 arrays (numpy or
    torch, broadcastable). An integer expression gives its ``(lo, hi)`` bounds, a predicate ``(may_be_true,
    may_be_false)`` bool arrays (definitely true: ``~may_be_false``; definitely false: ``~may_be_true``).
    Sound for every box; exact for linear combinations of distinct symbols and their comparisons."""
    prog = compile_interval(expr)
    X = _backend_of(env)
    a, b = prog.run(env, X)
    if X is _NP:
        shape = np.broadcast_shapes(*[np.shape(x) for v in env.values() for x in v], np.shape(a), np.shape(b))
        return np.broadcast_to(a, shape), np.broadcast_to(b, shape)
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# tile tables

@dataclass(frozen=True, eq=False)
class TileTable:
    """Classification of (query tile, key tile) pairs: ``kind[Bt, Ht, NQ, NK]`` int8 (0 empty, 1 partial, 2 full).

    ``Bt`` / ``Ht`` are 1 unless the mask depends on ``b`` / ``h``. ``kind`` is a numpy array for masks classified
    at compile time and a torch tensor (on the mask tensors' device) for data-dependent masks. Query tile ``t``
    covers rows ``[t * block_m, min((t + 1) * block_m, L) - 1]``; key tiles likewise with ``block_n`` and ``S``.
    A ragged tile whose in-range elements all satisfy the mask is full (kernels bound-check ragged tiles).
    """

    block_m: int
    block_n: int
    q_tiles: int
    kv_tiles: int
    kind: Any
    L: int = 0
    S: int = 0

    def counts(self) -> dict[str, int]:
        """Number of empty / partial / full pairs over all ``Bt * Ht`` tables."""
        k = self.kind
        return {name: int((k == v).sum()) for name, v in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}

    @property
    def density(self) -> float:
        """Fraction of tile pairs visited (partial or full)."""
        c = self.counts()
        total = sum(c.values())
        return (c["partial"] + c["full"]) / total if total else 0.0

    def rows(self, device: Any = None, width: int | None = None):
        """Per query tile, the key tiles to visit: int32 torch tensors ``count[Bt, Ht, NQ]``,
        ``index[Bt, Ht, NQ, W]`` (ascending key tiles, padded with 0) and ``masked[Bt, Ht, NQ, W]`` (1: partial).
        ``W`` is the largest count (at least 1) unless ``width`` is given (at least the largest count, e.g.
        ``kv_tiles``; avoids a device sync for run-time tables)."""
        return _lists(self.kind, device, width, transpose=False)

    def cols(self, device: Any = None, width: int | None = None):
        """Per key tile, the query tiles to visit (the transposed form used by the backward pass)."""
        return _lists(self.kind, device, width, transpose=True)


def _lists(kind: Any, device: Any, width: int | None, transpose: bool):
    import torch

    k = torch.from_numpy(np.array(kind)) if isinstance(kind, np.ndarray) else kind
    if device is not None:
        k = k.to(device)
    if transpose:
        k = k.transpose(-1, -2)
    visited = k > 0
    count = visited.sum(-1, dtype=torch.int32)
    n = k.shape[-1]
    if width is None:
        w = max(1, int(count.max())) if count.numel() else 1
    else:
        w = int(width)
        if w < 1 or (k.device.type == "cpu" and count.numel() and w < int(count.max())):
            raise IRError(f"{_WHO}: width {width} is smaller than the longest list ({int(count.max())} tiles)")
    order = torch.argsort((~visited).to(torch.int8), dim=-1, stable=True)[..., :min(w, n)]
    keep = torch.arange(order.shape[-1], device=k.device) < count.unsqueeze(-1)
    index = torch.where(keep, order, 0).to(torch.int32)
    masked = (keep & (k.gather(-1, order) == PARTIAL)).to(torch.int32)
    if w > n:                           # an explicit width wider than the row: pad
        pad = (0, w - n)
        index, masked = torch.nn.functional.pad(index, pad), torch.nn.functional.pad(masked, pad)
    return count.contiguous(), index.contiguous(), masked.contiguous()


def _axes(symbols: set[sympy.Symbol], axes: Sequence[sympy.Symbol] | None) -> tuple[sympy.Symbol, ...]:
    """The ``(b, h, i, j)`` symbols: given, or found by name among the mask's free ``symbols``."""
    if axes is not None:
        if len(axes) != 4:
            raise IRError(f"{_WHO}: argument 'axes' expected the four symbols (b, h, i, j), got {axes!r}")
        return tuple(axes)
    by_name = {str(s): s for s in symbols}
    return tuple(by_name.get(n, sympy.Symbol(n, integer=True, nonnegative=True)) for n in "bhij")


def _bind_dims(predicate: sympy.Basic, axes: Sequence[sympy.Symbol], dims: Mapping, sizes: Mapping[str, int]
               ) -> sympy.Basic:
    """Substitute every non-axis symbol: from ``dims`` (by symbol or name), else the attention extents by name."""
    sub = {}
    for s in predicate.free_symbols - set(axes):
        if s in dims:
            sub[s] = sympy.Integer(int(dims[s]))
        elif str(s) in dims:
            sub[s] = sympy.Integer(int(dims[str(s)]))
        elif str(s) in sizes:
            sub[s] = sympy.Integer(sizes[str(s)])
        else:
            raise IRError(f"{_WHO}: the mask predicate {predicate} uses the size {s}; pass its value in dims=")
    return predicate.xreplace(sub) if sub else predicate


def _predicate(predicate: Any) -> sympy.Basic:
    if predicate is None or predicate is True:
        return sympy.true
    if isinstance(predicate, Expr):
        if predicate.op is not ExprOp.INDEX:
            raise IRError(f"{_WHO}: the mask {predicate} reads tensors; use classify_tiles_runtime")
        return predicate.sym
    if not isinstance(predicate, sympy.Basic) or not _is_pred(predicate):
        raise IRError(f"{_WHO}: argument 'predicate' expected a sympy predicate, got {predicate!r}")
    return predicate


def _check_sizes(**kw: int) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise IRError(f"{_WHO}: argument '{name}' expected a positive int, got {v!r}")


def _tile_ranges(n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index range of each tile of ``block`` over ``[0, n)`` (the last one ragged)."""
    lo = np.arange(-(-n // block), dtype=np.int64) * block
    return lo, np.minimum(lo + block, n) - 1


def classify_tiles(predicate: Any, *, L: int, S: int, block_m: int, block_n: int, B: int = 1, H: int = 1,
                   dims: Mapping = {}, axes: Sequence[sympy.Symbol] | None = None,  # noqa: B006 (read only)
                   refine: bool | int = True) -> TileTable:
    """Classify every (query tile, key tile) pair of an ``L x S`` attention under the mask ``predicate`` (a sympy
    predicate over ``b, h, i, j``, an INDEX :class:`Expr`, or ``sympy.true`` / None for no mask).

    Sound: *full* tiles have every in-range element true, *empty* tiles none. Tiles that interval arithmetic
    over whole tiles cannot decide are refined (exact point samples, then bisection into sub-boxes) within a
    budget of ``refine`` element-steps (program steps times boxes; True: the default ``_REFINE_BUDGET``,
    False / 0: none); a tile left undecided is partial. ``dims`` binds other sizes in the predicate (by symbol
    or name); symbols named ``L``, ``S``, ``B``, ``HQ`` default to the given sizes. ``axes``: the ``(b, h, i, j)``
    symbols when they are not named so.
    """
    _check_sizes(L=L, S=S, block_m=block_m, block_n=block_n, B=B, H=H)
    pred = _predicate(predicate)
    ax = _axes(pred.free_symbols, axes)
    pred = _bind_dims(pred, ax, dims, {"L": L, "S": S, "B": B, "HQ": H})
    b, h, i, j = ax
    nq, nk = -(-L // block_m), -(-S // block_n)
    bt = B if b in pred.free_symbols else 1
    ht = H if h in pred.free_symbols else 1
    shape = (bt, ht, nq, nk)
    if pred is sympy.true or pred is sympy.false:
        kind = np.full(shape, FULL if pred is sympy.true else EMPTY, dtype=np.int8)
        kind.flags.writeable = False
        return TileTable(block_m, block_n, nq, nk, kind, L, S)
    qlo, qhi = _tile_ranges(L, block_m)
    klo, khi = _tile_ranges(S, block_n)
    bb = np.arange(bt, dtype=np.int64).reshape(bt, 1, 1, 1)
    hh = np.arange(ht, dtype=np.int64).reshape(1, ht, 1, 1)
    env = {b: (bb, bb), h: (hh, hh), i: (qlo.reshape(1, 1, nq, 1), qhi.reshape(1, 1, nq, 1)),
           j: (klo.reshape(1, 1, 1, nk), khi.reshape(1, 1, 1, nk))}
    prog = compile_interval(pred)
    if not prog.is_bool:
        raise IRError(f"{_WHO}: the mask {pred} is not a predicate")
    may_t, may_f = prog.run(env, _NP)
    may_t, may_f = np.broadcast_to(may_t, shape), np.broadcast_to(may_f, shape)
    kind = np.where(~may_t, EMPTY, np.where(~may_f, FULL, PARTIAL)).astype(np.int8)
    budget = _REFINE_BUDGET if refine is True else int(refine)
    if budget > 0:
        _refine(prog, ax, kind, (qlo, qhi), (klo, khi), budget)
    kind.flags.writeable = False
    return TileTable(block_m, block_n, nq, nk, kind, L, S)


# refinement ------------------------------------------------------------------------------------------------------

def _refine(prog: _Program, ax: Sequence[sympy.Symbol], kind: np.ndarray, q: tuple[np.ndarray, np.ndarray],
            k: tuple[np.ndarray, np.ndarray], budget: int) -> None:
    """Decide undecided (partial) tiles in place, spending at most ``budget`` element-steps of the program.

    Exact point samples first look for witnesses of both values (the tile is then truly partial); the remaining
    tiles are bisected breadth-first into sub-boxes, split where a ``floor`` / ``Mod`` of the axis jumps (else
    at an aligned midpoint), until every sub-box is decided or the budget is spent (the tile stays partial)."""
    b, h, i, j = ax
    tiles = np.argwhere(kind == PARTIAL)                       # rows: (bt, ht, tq, tk)
    n = len(tiles)
    steps = max(1, len(prog.steps))
    if not n:
        return
    ilo, ihi = q[0][tiles[:, 2]], q[1][tiles[:, 2]]
    jlo, jhi = k[0][tiles[:, 3]], k[1][tiles[:, 3]]
    has_t, has_f = np.zeros(n, bool), np.zeros(n, bool)

    def run(idx, a0, a1, c0, c1):
        env = {b: (tiles[idx, 0],) * 2, h: (tiles[idx, 1],) * 2, i: (a0, a1), j: (c0, c1)}
        t, f = prog.run(env, _NP)
        t, f = np.broadcast_to(t, idx.shape), np.broadcast_to(f, idx.shape)
        has_t[np.bincount(idx[t & ~f], minlength=n) > 0] = True
        has_f[np.bincount(idx[f & ~t], minlength=n) > 0] = True
        return t & f

    for u, v in _SAMPLE_GRID:                                  # fixed points first, then pseudo-random ones
        idx = np.nonzero(~(has_t & has_f))[0]
        cost = len(idx) * len(u) * steps // 2                  # a point costs about half a box
        if not len(idx) or cost > budget:
            break
        budget -= cost
        rep = np.repeat(idx, len(u))
        pi = _sample(ilo[rep], ihi[rep], np.tile(u, len(idx)))
        pj = _sample(jlo[rep], jhi[rep], np.tile(v, len(idx)))
        run(rep, pi, pi, pj, pj)
    stuck = np.zeros(n, bool)
    idx = np.nonzero(~(has_t & has_f))[0]
    boxes = _split((idx, ilo[idx], ihi[idx], jlo[idx], jhi[idx]), prog.families.get(i, ()),
                   prog.families.get(j, ()))
    while len(boxes[0]) and len(boxes[0]) * steps <= budget:
        budget -= len(boxes[0]) * steps
        bi, a0, a1, c0, c1 = boxes
        unknown = run(*boxes) & ~(has_t & has_f)[bi]
        point = (a0 == a1) & (c0 == c1)
        stuck[bi[unknown & point]] = True                      # cannot happen for supported constructs
        keep = unknown & ~point
        boxes = _split(tuple(x[keep] for x in boxes), prog.families.get(i, ()), prog.families.get(j, ()))
    undecided = stuck
    undecided[boxes[0]] = True                                 # boxes left when the budget ran out
    decided = ~undecided | (has_t & has_f)
    sel = tuple(tiles[:, d] for d in range(4))
    kind[sel] = np.where(decided & ~has_t, EMPTY, np.where(decided & ~has_f, FULL, PARTIAL))


def _sample(lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The point at fraction ``u`` in ``[0, 1]`` of each range ``[lo, hi]``."""
    return np.minimum(lo + np.floor(u * (hi - lo + 1)).astype(np.int64), hi)


_rng = np.random.default_rng(0)
_SAMPLE_GRID = (  # (fractions along i, fractions along j): corners, centre, quarter points; then 12 random points
    (np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 0.75]), np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.25, 0.75])),
    (_rng.random(12), _rng.random(12)),
)


def _split(boxes: tuple[np.ndarray, ...], fam_i: Any, fam_j: Any) -> tuple[np.ndarray, ...]:
    """Split every box in two along its longer side (see :func:`_split_point`)."""
    bi, a0, a1, c0, c1 = boxes
    on_i = (a1 - a0) >= (c1 - c0)
    cut_i, cut_j = _split_point(a0, a1, fam_i), _split_point(c0, c1, fam_j)
    return (np.concatenate([bi, bi]),
            np.concatenate([a0, np.where(on_i, cut_i, a0)]),
            np.concatenate([np.where(on_i, cut_i - 1, a1), a1]),
            np.concatenate([c0, np.where(on_i, c0, cut_j)]),
            np.concatenate([np.where(on_i, c1, cut_j - 1), c1]))


def _split_point(lo: np.ndarray, hi: np.ndarray, families: Any = ()) -> np.ndarray:
    """First element of the upper piece of ``[lo, hi]`` (``lo < hi``): a jump of a ``floor`` / ``Mod`` of this
    axis (``families``: ``(period, residue)``) with a period longer than half the range, nearest the middle;
    else the multiple of the largest power of two inside ``(lo, hi]`` (aligned halves)."""
    span = hi - lo
    diff = np.maximum(lo ^ hi, 1)
    p = np.left_shift(np.int64(1), np.floor(np.log2(diff)).astype(np.int64))
    out = np.maximum((hi // p) * p, lo + 1)
    best = np.full(lo.shape, np.iinfo(np.int64).max)
    mid2 = lo + hi + 1                                          # twice the middle
    for period, residue in families:
        cand = lo + 1 + (residue - lo - 1) % period
        dist = np.abs(2 * cand - mid2)
        ok = (cand <= hi) & (2 * period > span) & (dist < best)
        out, best = np.where(ok, cand, out), np.where(ok, dist, best)
    return out


# ---------------------------------------------------------------------------------------------------------------
# loop bounds derived from the predicate

def _linear_constraints(pred: sympy.Basic, i: sympy.Symbol, j: sympy.Symbol
                        ) -> list[tuple[int, int, sympy.Expr]] | None:
    """``pred`` as ``[(a, b, c)]`` meaning ``a*i + b*j + c >= 0`` for all, or None when it is not a conjunction
    of affine inequalities in ``i`` and ``j`` (with integer coefficients; ``c`` may hold other symbols)."""
    if pred is sympy.true:
        return []
    atoms = list(pred.args) if isinstance(pred, sympy.And) else [pred]
    out: list[tuple[int, int, sympy.Expr]] = []
    for atom in atoms:
        if not isinstance(atom, (sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge, sympy.Eq)):
            return None
        small, big = (atom.lhs, atom.rhs) if isinstance(atom, (sympy.Lt, sympy.Le)) else (atom.rhs, atom.lhs)
        strict = isinstance(atom, (sympy.Lt, sympy.Gt))
        if isinstance(atom, sympy.Eq):
            parts = [(atom.rhs, atom.lhs, False), (atom.lhs, atom.rhs, False)]
        elif isinstance(small, sympy.Abs) and not big.has(i, j):          # |u| < v: -v < u < v
            parts = [(small.args[0], big, strict), (-small.args[0], big, strict)]
        else:
            parts = [(small, big, strict)]
        for lo_side, hi_side, st in parts:                                 # hi_side - lo_side (- 1) >= 0
            form = _affine(hi_side - lo_side - (1 if st else 0), i, j)
            if form is None:
                return None
            out.append(form)
    return out


def _affine(d: sympy.Expr, i: sympy.Symbol, j: sympy.Symbol) -> tuple[int, int, sympy.Expr] | None:
    num, den = sympy.fraction(sympy.together(d))
    if not (den.is_Integer and int(den) > 0):
        return None
    num = sympy.expand(num)
    a, b = num.coeff(i), num.coeff(j)
    c = sympy.expand(num - a * i - b * j)
    if not (a.is_Integer and b.is_Integer) or c.has(i, j):
        return None
    return int(a), int(b), c


def kv_tile_bounds(predicate: Any, i_sym: sympy.Symbol, j_sym: sympy.Symbol, block_m: int, block_n: int, *,
                   t: sympy.Symbol | None = None, q_len: Any = None, kv_len: Any = None
                   ) -> tuple[sympy.Expr, sympy.Expr] | None:
    """The key tiles ``[first, stop)`` a query tile ``t`` must visit, as sympy expressions of ``t`` (and the sizes
    or heads the predicate mentions), derived when ``predicate`` is a conjunction of affine inequalities in
    ``i`` and ``j`` (None otherwise). Causal ``i >= j`` gives ``(0, floor((t*bm + bm - 1)/bn) + 1)``.

    Every non-empty key tile of the query tile lies in the range (it is exact for one bound on each side).
    ``first`` is clamped at 0; ``stop`` is clamped at ``ceil(kv_len / bn)`` when ``kv_len`` is given (else it may
    pass the last key tile; clamp it in the kernel). ``q_len`` bounds the last (ragged) query tile.
    """
    _check_sizes(block_m=block_m, block_n=block_n)
    pred = _predicate(predicate)
    cons = _linear_constraints(pred, i_sym, j_sym)
    if cons is None:
        return None
    t = t if t is not None else sympy.Symbol("t", integer=True, nonnegative=True)
    i_lo = t * block_m
    i_hi = t * block_m + block_m - 1
    if q_len is not None:
        i_hi = sympy.Min(i_hi, sympy.sympify(q_len) - 1)
    lows, highs = [], []
    for a, b, c in cons:
        if b > 0:            # j >= ceil((-a*i - c) / b), smallest at the i end where -a*i is smallest
            ii = i_hi if a > 0 else i_lo
            lows.append(sympy.ceiling((-a * ii - c) / b))
        elif b < 0:          # j <= floor((a*i + c) / -b), largest where a*i is largest
            ii = i_hi if a >= 0 else i_lo
            highs.append(sympy.floor((a * ii + c) / -b))
    first = sympy.Max(0, sympy.floor(sympy.Max(*lows) / block_n)) if lows else sympy.Integer(0)
    n_kv = sympy.ceiling(sympy.sympify(kv_len) / block_n) if kv_len is not None else None
    if highs:
        stop = sympy.floor(sympy.Min(*highs) / block_n) + 1
        if n_kv is not None:
            stop = sympy.Min(stop, n_kv)
    else:
        stop = n_kv if n_kv is not None else sympy.ceiling(sympy.Symbol("S", integer=True, positive=True) / block_n)
    return first, stop


# ---------------------------------------------------------------------------------------------------------------
# data-dependent masks: the same interval logic at run time, with per-tile [min, max] of the loaded tensors

_FLOAT_SLACK = 2.0 ** -7       # relative widening of float arithmetic (covers bf16 rounding in kernels)


def classify_tiles_runtime(mask: Expr, tensors: Mapping[str, Any], *, L: int, S: int, block_m: int, block_n: int,
                           B: int = 1, H: int = 1, dims: Mapping = {},  # noqa: B006 (read only)
                           axes: Sequence[sympy.Symbol] | None = None) -> TileTable:
    """Classify tile pairs for a mask that loads captured tensors (``tensors``: name -> torch tensor), e.g.
    ``doc[i] == doc[j]`` or ``route[b, h, i // 64, j // 64]``. Each load's ``[min, max]`` over a tile's index box
    comes from a sparse table of range minima / maxima built with torch on the tensors' device; the mask is then
    evaluated with interval logic. Sound for every input; ``kind`` is a torch int8 tensor on that device."""
    import torch

    _check_sizes(L=L, S=S, block_m=block_m, block_n=block_n, B=B, H=H)
    if not isinstance(mask, Expr) or mask.dtype is not DType.bool:
        raise IRError(f"{_WHO}: argument 'mask' expected a boolean IR expression, got {mask!r}")
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    syms = free_symbols(mask)
    ax = _axes(syms, axes)
    sizes = {"L": L, "S": S, "B": B, "HQ": H}
    for name, t in tensors.items():
        for k, n in enumerate(getattr(t, "shape", ())):
            sizes[f"{name}_{k}"] = int(n)
    sub = {}
    for s in syms - set(ax):
        v = dims.get(s, dims.get(str(s), sizes.get(str(s))))
        if v is None:
            raise IRError(f"{_WHO}: the mask {mask} uses the size {s}; pass its value in dims=")
        sub[s] = sympy.Integer(int(v))
    if sub:
        mask = substitute(mask, sub)
    b, h, i, j = ax
    nq, nk = -(-L // block_m), -(-S // block_n)
    bt, ht = (B if b in syms else 1), (H if h in syms else 1)
    X = _Torch(device)
    qlo, qhi = _tile_ranges(L, block_m)
    klo, khi = _tile_ranges(S, block_n)

    def tt(a, shape):
        return torch.as_tensor(a, dtype=torch.int64, device=device).reshape(shape)
    bb, hh = tt(np.arange(bt), (bt, 1, 1, 1)), tt(np.arange(ht), (1, ht, 1, 1))
    env = {b: (bb, bb), h: (hh, hh), i: (tt(qlo, (1, 1, nq, 1)), tt(qhi, (1, 1, nq, 1))),
           j: (tt(klo, (1, 1, 1, nk)), tt(khi, (1, 1, 1, nk)))}
    may_t, may_f, nan = _eval_expr(mask, env, tensors, X, (i, j))
    shape = (bt, ht, nq, nk)
    kind = torch.where(~may_t, EMPTY, torch.where(~may_f, FULL, PARTIAL))
    kind = torch.where(nan, PARTIAL, kind).to(torch.int8)     # NaN loads defeat interval logic: stay partial
    return TileTable(block_m, block_n, nq, nk, kind.expand(shape).contiguous(), L, S)


def _eval_expr(mask: Expr, env: Mapping, tensors: Mapping[str, Any], X: _Torch, ij: tuple
               ) -> tuple[Array, Array, Array]:
    """Interval / three-valued evaluation of an IR expression over the tile boxes of ``env``; also says which
    boxes read a NaN (where the intervals of the other values say nothing about the mask)."""
    torch = X.torch
    memo: dict[Expr, tuple[Array, Array]] = {}
    nan = X.const(False)
    for n in mask.walk():
        op, s = n.op, [memo[x] for x in n.src]
        if op is ExprOp.CONST:
            c = X.const(n.arg)
            memo[n] = (c, ~c) if n.dtype is DType.bool else _widen((c, c), n.dtype.is_float, X)
        elif op is ExprOp.INDEX:
            memo[n] = compile_interval(n.arg).run(env, X)
        elif op is ExprOp.LOAD:
            lo, hi, has_nan = _load_range(n.arg, tensors, env, X, ij)
            nan = nan | has_nan
            memo[n] = (hi != 0, lo == 0) if n.dtype is DType.bool else (lo, hi)
        elif op in _TRI_OPS:
            memo[n] = _TRI_OPS[op](*s)
        elif op in _COMPARE:
            memo[n] = _compare(op, s[0], s[1], n.src[0].dtype is DType.bool)
        elif op is ExprOp.WHERE:
            (ct, cf), (a0, a1), (b0, b1) = s
            if n.dtype is DType.bool:
                memo[n] = ((ct & a0) | (cf & b0), (ct & a1) | (cf & b1))
            else:
                lo = torch.where(ct & cf, torch.minimum(a0, b0), torch.where(ct, a0, b0))
                hi = torch.where(ct & cf, torch.maximum(a1, b1), torch.where(ct, a1, b1))
                memo[n] = (lo, hi)
        elif op is ExprOp.CAST:
            memo[n] = _cast(n.src[0].dtype, n.dtype, s[0], X)
        elif op in _ARITH:
            memo[n] = _widen(_ARITH[op](X, *s), n.dtype.is_float, X)
        else:
            raise IRError(f"{_WHO}: unsupported construct '{op.value}' in the data-dependent mask {mask}")
    t, f = memo[mask]
    return torch.as_tensor(t, device=X.device), torch.as_tensor(f, device=X.device), nan


def _compare(op: ExprOp, a: tuple, b: tuple, boolean: bool) -> tuple[Array, Array]:
    (a0, a1), (b0, b1) = a, b
    if boolean:                              # equality of three-valued booleans
        eq = ((a0 & b0) | (a1 & b1), (a0 & b1) | (a1 & b0))
        if op is ExprOp.EQ:
            return eq
        if op is ExprOp.NE:
            return eq[1], eq[0]
        raise IRError(f"{_WHO}: ordering comparison '{op.value}' of booleans in a mask")
    if op is ExprOp.LT:
        return a0 < b1, a1 >= b0
    if op is ExprOp.LE:
        return a0 <= b1, a1 > b0
    if op is ExprOp.GT:
        return a1 > b0, a0 <= b1
    if op is ExprOp.GE:
        return a1 >= b0, a0 < b1
    overlap = (a0 <= b1) & (b0 <= a1)
    single = (a0 == a1) & (b0 == b1) & (a0 == b0)
    return (overlap, ~single) if op is ExprOp.EQ else (~single, overlap)


def _cast(src: DType, dst: DType, v: tuple, X: _Torch) -> tuple[Array, Array]:
    torch = X.torch
    if dst is DType.bool:
        if src is DType.bool:
            return v
        lo, hi = v
        return (lo != 0) | (hi != 0), (lo <= 0) & (hi >= 0)
    if src is DType.bool:                        # (may_true, may_false) -> [lo, hi] within {0, 1}
        return X.where(v[1], 0, 1), X.where(v[0], 1, 0)
    lo, hi = X._t(v[0]), X._t(v[1])
    if dst.is_float:
        return lo.double(), hi.double()
    if lo.is_floating_point():               # truncation is monotone
        return torch.trunc(lo).to(torch.int64), torch.trunc(hi).to(torch.int64)
    return lo, hi


def _widen(v: tuple, is_float: bool, X: _Torch) -> tuple[Array, Array]:
    if not is_float:
        return v
    lo, hi = v
    return lo - lo.abs() * _FLOAT_SLACK - 1e-30, hi + hi.abs() * _FLOAT_SLACK + 1e-30


def _div(X: _Torch, a: tuple, b: tuple) -> tuple[Array, Array]:
    torch = X.torch
    a0, a1 = a[0].double(), a[1].double()
    b0, b1 = b[0].double(), b[1].double()
    q = _corners(X, a0 / b0, a0 / b1, a1 / b0, a1 / b1)
    spans_zero = (b0 <= 0) & (b1 >= 0)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=X.device)
    return torch.where(spans_zero, -inf, q[0]), torch.where(spans_zero, inf, q[1])


def _monotone(fn: str) -> Callable:
    def f(X: _Torch, a: tuple) -> tuple[Array, Array]:
        g = getattr(X.torch, fn) if fn != "softplus" else X.torch.nn.functional.softplus
        return g(a[0].double()), g(a[1].double())
    return f


_TRI_OPS: dict[ExprOp, Callable] = {
    ExprOp.AND: lambda a, b: (a[0] & b[0], a[1] | b[1]),
    ExprOp.OR: lambda a, b: (a[0] | b[0], a[1] & b[1]),
    ExprOp.NOT: lambda a: (a[1], a[0]),
}
_COMPARE = frozenset({ExprOp.LT, ExprOp.LE, ExprOp.GT, ExprOp.GE, ExprOp.EQ, ExprOp.NE})
_ARITH: dict[ExprOp, Callable] = {
    ExprOp.NEG: lambda X, a: (-a[1], -a[0]),
    ExprOp.ABS: lambda X, a: _abs(X, *a),
    ExprOp.ADD: lambda X, a, b: (a[0] + b[0], a[1] + b[1]),
    ExprOp.SUB: lambda X, a, b: (a[0] - b[1], a[1] - b[0]),
    ExprOp.MUL: lambda X, a, b: _corners(X, a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]),
    ExprOp.DIV: _div,
    ExprOp.MIN: lambda X, a, b: (X.minimum(a[0], b[0]), X.minimum(a[1], b[1])),
    ExprOp.MAX: lambda X, a, b: (X.maximum(a[0], b[0]), X.maximum(a[1], b[1])),
    ExprOp.EXP: _monotone("exp"), ExprOp.LOG: _monotone("log"), ExprOp.SQRT: _monotone("sqrt"),
    ExprOp.SIGMOID: _monotone("sigmoid"), ExprOp.TANH: _monotone("tanh"), ExprOp.SOFTPLUS: _monotone("softplus"),
}


def _load_range(acc: Any, tensors: Mapping[str, Any], env: Mapping, X: _Torch, ij: tuple
                ) -> tuple[Array, Array, Array]:
    """``[min, max]`` of ``tensor[index]`` over each tile box (NaNs ignored), and whether the box holds a NaN:
    one range reduction per indexed dimension."""
    torch = X.torch
    if acc.tensor not in tensors:
        raise IRError(f"{_WHO}: the mask loads '{acc.tensor}' but no tensor of that name was given "
                      f"(have {sorted(tensors)})")
    src = tensors[acc.tensor]
    if src.dim() != len(acc.index):
        raise IRError(f"{_WHO}: '{acc.tensor}' has {src.dim()} dims but the mask indexes {len(acc.index)}")
    src = src.to(X.device)
    if src.dtype == torch.bool:
        src = src.to(torch.uint8)
    src = src.reshape((1, 1, 1, 1) + tuple(src.shape))
    mn = mx = src
    nan = None
    if src.is_floating_point():
        isnan = torch.isnan(src)
        mn, mx = torch.where(isnan, math.inf, src), torch.where(isnan, -math.inf, src)
        nan = isnan.to(torch.uint8)
    for ie in acc.index:
        lo, hi = compile_interval(ie).run(env, X)
        lo, hi = (torch.as_tensor(x, device=X.device) for x in (lo, hi))
        lo, hi = (x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)) for x in (lo, hi))
        n = mn.shape[4]
        lo, hi = lo.clamp(0, n - 1), hi.clamp(0, n - 1)
        hi = torch.maximum(hi, lo)
        point = not (ie.has(*ij)) or bool(torch.equal(lo, hi))
        mn = _range_reduce(mn, lo, hi, torch.minimum, point)
        mx = _range_reduce(mx, lo, hi, torch.maximum, point)
        if nan is not None:
            nan = _range_reduce(nan, lo, hi, torch.maximum, point)
    return mn, mx, (nan > 0) if nan is not None else X.const(False)


def _range_reduce(x: Array, lo: Array, hi: Array, op: Callable, point: bool) -> Array:
    """Reduce axis 4 of ``x`` (4 broadcast axes, then data axes) over ``[lo, hi]`` (4-D index tensors) with a
    sparse table of ``op`` over power-of-two windows: two lookups per query."""
    import torch

    n = x.shape[4]
    lead = torch.broadcast_shapes(tuple(x.shape[:4]), tuple(lo.shape))
    idx = [torch.arange(x.shape[a], device=x.device).reshape([-1 if d == a else 1 for d in range(4)])
           if x.shape[a] > 1 else torch.zeros((1, 1, 1, 1), dtype=torch.int64, device=x.device) for a in range(4)]
    if point:
        return x[idx[0], idx[1], idx[2], idx[3], lo].reshape(lead + tuple(x.shape[5:]))
    levels = [x]
    w = 1
    while 2 * w <= n:
        prev = levels[-1]
        nxt = op(prev.narrow(4, 0, n - w), prev.narrow(4, w, n - w))
        levels.append(torch.cat([nxt, prev.narrow(4, n - w, w)], dim=4))   # pad back to n (never read)
        w *= 2
    table = torch.stack(levels)
    length = hi - lo + 1
    k = torch.floor(torch.log2(length.double())).to(torch.int64)
    span = torch.bitwise_left_shift(torch.ones_like(k), k)
    a = table[k, idx[0], idx[1], idx[2], idx[3], lo]
    b = table[k, idx[0], idx[1], idx[2], idx[3], hi - span + 1]
    return op(a, b).reshape(lead + tuple(x.shape[5:]))


# ---------------------------------------------------------------------------------------------------------------
# printing

def describe(table: TileTable, max_picture: int = 64) -> str:
    """A few lines for ``opgen show attention --stage plan``: tile sizes, counts per class, density and, when
    the table has at most ``max_picture`` tiles per side, a picture of the first (b, h) table
    (``#`` full, ``+`` partial, ``.`` empty; query tiles down, key tiles across)."""
    kind = table.kind
    if not isinstance(kind, np.ndarray):
        kind = kind.detach().cpu().numpy()
    bt, ht = kind.shape[:2]
    c = table.counts()
    per = "" if bt * ht == 1 else f" ({bt} x {ht} tables over b x h)"
    lines = [f"tiles {table.block_m} x {table.block_n}: {table.q_tiles} query x {table.kv_tiles} key tiles{per}",
             f"  full {c['full']}, partial {c['partial']}, empty {c['empty']}; density {table.density:.1%}"]
    if table.q_tiles <= max_picture and table.kv_tiles <= max_picture:
        if bt * ht > 1:
            lines.append("  b=0, h=0:")
        chars = np.array([".", "+", "#"])
        lines += ["  " + "".join(row) for row in chars[kind[0, 0]]]
    return "\n".join(lines)
