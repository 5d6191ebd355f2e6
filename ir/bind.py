"""Binding concrete sizes to an op's symbolic dims, with errors that name the arguments that disagree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import sympy

from .errors import ShapeError
from .index import bounds, evaluate_int
from .printer import index_str
from .symbols import Axis, Dim
from .verify import access_report


@dataclass(frozen=True)
class Binding:
    """Concrete values of every dim and axis extent, and the concrete shape of every tensor."""

    dims: Mapping[Dim, int]
    extents: Mapping[Axis, int]
    shapes: Mapping[str, tuple[int, ...]]

    def value(self, e: sympy.Basic) -> int:
        """The integer value of a size expression under this binding."""
        return evaluate_int(e, {**self.dims, **self.extents})


def reduction_terms(node, binding: Binding) -> int:
    """Output elements times reduction extent of a Reduce ``node`` at ``binding``'s sizes (its multiply-adds)."""
    n = 1
    for a in tuple(node.axes) + tuple(node.raxes):
        n *= int(binding.extents[a])
    return n


def _shape_str(shape: Sequence[sympy.Expr]) -> str:
    return "[" + ", ".join(index_str(s) for s in shape) + "]"


def bind(op, shapes: Mapping[str, Sequence[int]], dims: Mapping[str, int] | None = None,
         who: str | None = None) -> Binding:
    """Bind the input ``shapes`` (by tensor name) and any extra ``dims`` (by name) of ``op``.

    Raises :class:`ShapeError` naming the argument, the dim and both sources when sizes disagree, when a dim
    would not be a positive integer, when a declared constraint fails, or when an access that could not be
    proven in bounds reads outside its tensor.
    """
    who = who or f"op {op.name}"
    known: dict[Dim, int] = {}
    source: dict[Dim, str] = {}
    by_name = {d.name: d for d in op.dims}
    for name, v in (dims or {}).items():
        if name not in by_name:
            raise ShapeError(f"{who}: unknown dim {name!r}; the op has dims {sorted(by_name)}")
        known[by_name[name]] = int(v)
        source[by_name[name]] = "the call's parameters"
    pending = []
    for t in op.inputs:
        if t.name not in shapes:
            raise ShapeError(f"{who}: no shape given for input {t.name!r}")
        actual = tuple(int(s) for s in shapes[t.name])
        if len(actual) != t.rank:
            raise ShapeError(f"{who}: argument '{t.name}' expected a {t.rank}-D tensor of shape "
                             f"{_shape_str(t.shape)}, got {len(actual)}-D shape {tuple(actual)}")
        pending += [(t, k, actual) for k in range(t.rank)]
    progress = True
    while pending and progress:
        progress = False
        for item in list(pending):
            t, k, actual = item
            e = sympy.sympify(t.shape[k]).xreplace({d: sympy.Integer(v) for d, v in known.items()})
            free = [s for s in e.free_symbols if isinstance(s, Dim)]
            if not free:
                if int(e) != actual[k]:
                    raise ShapeError(_mismatch(who, t, k, actual, known, source))
                pending.remove(item)
                progress = True
            elif len(free) == 1:
                d = free[0]
                sol = sympy.solve(sympy.Eq(e, actual[k]), d)
                if len(sol) != 1 or not sol[0].is_Integer or sol[0] < 1:
                    raise ShapeError(f"{who}: argument '{t.name}' has shape {tuple(actual)}: dim {k} must equal "
                                     f"{index_str(t.shape[k])} for a positive integer {d}, but {actual[k]} does not")
                known[d] = int(sol[0])
                source[d] = f"argument '{t.name}' ({t.name}.shape[{k}] = {actual[k]})"
                pending.remove(item)
                progress = True
    for d, e in op.derived:
        v = sympy.sympify(e).xreplace({x: sympy.Integer(y) for x, y in known.items()})
        if not v.is_Integer or v < 1:
            vals = ", ".join(f"{s}={known.get(s, '?')}" for s in sorted(e.free_symbols, key=str))
            raise ShapeError(f"{who}: dim {d} = {index_str(e)} must be a positive integer, got {v} with {vals}")
        known[d] = int(v)
        source[d] = f"{d} = {index_str(e)}"
    if pending:
        missing = sorted({str(s) for t, k, _ in pending for s in sympy.sympify(t.shape[k]).free_symbols
                          if isinstance(s, Dim) and s not in known})
        raise ShapeError(f"{who}: cannot determine dims {missing} from the argument shapes")
    unbound = [d for d in op.dims if d not in known]
    if unbound:
        raise ShapeError(f"{who}: dims {[str(d) for d in unbound]} are not determined by any argument; pass them")
    for rel, msg in op.constraints:
        ok = sympy.sympify(rel).xreplace({d: sympy.Integer(v) for d, v in known.items()})
        if ok is not sympy.true:
            vals = ", ".join(f"{s}={known[s]}" for s in sorted(rel.free_symbols, key=str))
            raise ShapeError(f"{who}: {msg} (requires {index_str(rel)}; got {vals})")
    extents: dict[Axis, int] = {}
    for a, e in op.extents:
        v = evaluate_int(e, known)
        if v < 1:
            vals = ", ".join(f"{s}={known[s]}" for s in sorted(e.free_symbols, key=str) if s in known)
            raise ShapeError(f"{who}: axis {a} would have extent {v} (= {index_str(e)} with {vals}); "
                             f"the input is too small for this configuration")
        extents[a] = v
    binding = Binding(known, extents, {t.name: tuple(evaluate_int(s, known) for s in t.shape) for t in op.tensors})
    _check_accesses(op, binding, who)
    return binding


def _mismatch(who, t, k, actual, known, source) -> str:
    syms = sorted((s for s in sympy.sympify(t.shape[k]).free_symbols if isinstance(s, Dim)), key=str)
    expected = tuple(_try_int(s, known) for s in t.shape)
    origin = "; ".join(f"{s} = {known[s]} from {source[s]}" for s in syms)
    return (f"{who}: argument '{t.name}' has shape {tuple(actual)} but expected {_shape_str(t.shape)} = "
            f"{expected}: dim {k} is {actual[k]}, expected {index_str(t.shape[k])} ({origin})")


def _try_int(e, known):
    v = sympy.sympify(e).xreplace({d: sympy.Integer(x) for d, x in known.items()})
    return int(v) if v.is_Integer else index_str(v)


def _check_accesses(op, b: Binding, who: str) -> None:
    ext = {a: sympy.Integer(v) for a, v in b.extents.items()}
    sub = {d: sympy.Integer(v) for d, v in b.dims.items()}
    for node_out, acc, status in access_report(op):
        if status.proven or status.guarded:
            continue
        shape = b.shapes[acc.tensor]
        for k, ie in enumerate(acc.index):
            lo, hi = bounds(ie.xreplace(sub), ext)
            lo_pad, hi_pad = (int(sympy.sympify(p).xreplace(sub)) for p in acc.padding(k))
            lo, hi = int(sympy.simplify(lo)), int(sympy.simplify(hi))
            if lo < -lo_pad or hi > shape[k] - 1 + hi_pad:
                raise ShapeError(f"{who}: computing {node_out} reads {acc.tensor}[..., {index_str(ie)}, ...] at "
                                 f"positions {lo}..{hi} of dim {k}, outside [0, {shape[k]}) of shape {shape}")
