"""Range inference and verification of an op under construction.

:func:`infer_extents` gives every axis an extent from the tensors it indexes, including convolution-style affine
indices with zero padding (``x.pad(...)[n, c, h*s + kh*d - p, ...]``). :func:`verify_structure` checks the
structural rules, and :func:`access_report` says for each tensor access whether it is proven in bounds, reads a
zero-padded halo, is guarded by a predicate, or must be checked when sizes are bound.
"""
from __future__ import annotations

import functools

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import sympy

from .dtypes import DType
from .errors import IRError
from .expr import Access, free_symbols, loads
from .index import affine, bounds, proved
from .index_printer import index_str
from .nodes import Node, Reduce, Scan, TensorParam
from .symbols import Axis, axes_in

if TYPE_CHECKING:
    from .op import Op


@dataclass(frozen=True)
class _Candidate:
    extent: sympy.Expr
    source: str
    exact: bool


def _accesses(nodes: Iterable[Node]):
    for n in nodes:
        for e in n.exprs():
            for acc in loads(e):
                yield n, acc


def _candidate(acc: Access, k: int, size: sympy.Expr, axis: Axis, ext: Mapping[Axis, sympy.Expr]):
    ie = acc.index[k]
    lo_pad, hi_pad = acc.padding(k)
    if ie == axis and lo_pad == 0 and hi_pad == 0:
        return _Candidate(size, f"{acc.tensor}.shape[{k}] = {index_str(size)} (index {axis})", True)
    present = axes_in(ie)
    aff = affine(ie, present)
    if aff is None:
        return None
    coeffs, c0 = aff
    c = coeffs[axis]
    others = [(b, cb) for b, cb in coeffs.items() if b != axis]
    if any(b not in ext for b, _ in others):
        return None
    hi_others = sum((cb * (ext[b] - 1) for b, cb in others if cb.is_positive), sympy.Integer(0))
    lo_others = sum((cb * (ext[b] - 1) for b, cb in others if cb.is_negative), sympy.Integer(0))
    if c.is_positive:
        e = sympy.floor((size - 1 + hi_pad - c0 - hi_others) / c) + 1
    elif c.is_negative:
        e = sympy.floor((c0 + lo_others + lo_pad) / (-c)) + 1
    else:
        return None
    e = sympy.simplify(e)
    return _Candidate(e, f"{acc.tensor}.shape[{k}] = {index_str(size)} (index {index_str(ie)})", False)


def infer_extents(shapes: dict[str, tuple[sympy.Expr, ...] | None], nodes: tuple[Node, ...],
                  declared: Mapping[Axis, sympy.Expr], op_name: str) -> dict[Axis, sympy.Expr]:
    """Extents of every axis used by ``nodes``; raises :class:`IRError` naming the tensors that disagree."""
    ext: dict[Axis, sympy.Expr] = dict(declared)
    used: set[Axis] = set()
    for n in nodes:
        used |= set(n.axes) | set(getattr(n, "raxes", ()))
        for e in n.exprs():
            for acc in loads(e):
                for ie in acc.index:
                    used |= axes_in(ie)
    exact_seen: dict[Axis, _Candidate] = {}
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if shapes.get(n.out) is None and all(a in ext for a in n.axes):
                shapes[n.out] = tuple(ext[a] for a in n.axes)
                changed = True
        found: dict[Axis, list[_Candidate]] = defaultdict(list)
        for _, acc in _accesses(nodes):
            shape = shapes.get(acc.tensor)
            if shape is None:
                continue
            for k, ie in enumerate(acc.index):
                for a in axes_in(ie):
                    unknown = [b for b in axes_in(ie) if b not in ext and b != a]
                    if unknown:
                        continue
                    cand = _candidate(acc, k, shape[k], a, ext)
                    if cand is None:
                        continue
                    if cand.exact:
                        _check_exact(a, cand, exact_seen, ext, declared, op_name)
                    if a not in ext:
                        found[a].append(cand)
        for a, cands in found.items():
            exact = [c for c in cands if c.exact]
            pool = exact or cands
            distinct = {c.extent for c in pool}
            if len(distinct) > 1:
                detail = "; ".join(f"{index_str(c.extent)} from {c.source}" for c in pool)
                raise IRError(f"op {op_name}: the extent of axis {a} is ambiguous: {detail}. "
                              f"Declare it with opgen.axis('{a}', extent).")
            ext[a] = pool[0].extent
            changed = True
    missing = sorted((a for a in used if a not in ext), key=str)
    if missing:
        raise IRError(f"op {op_name}: cannot infer the extent of axis {', '.join(map(str, missing))}: no tensor "
                      f"dimension is indexed by it alone or by an affine index; declare it with "
                      f"opgen.axis('{missing[0]}', extent)")
    return ext


def _check_exact(a: Axis, cand: _Candidate, seen: dict, ext: Mapping, declared: Mapping, op_name: str) -> None:
    if a in declared:  # a declared extent wins; access_report proves (or bind checks) the accesses fit
        return
    prev = seen.get(a)
    if prev is not None and sympy.simplify(prev.extent - cand.extent) != 0:
        raise IRError(f"op {op_name}: axis {a} indexes dims that disagree: {index_str(prev.extent)} from "
                      f"{prev.source} but {index_str(cand.extent)} from {cand.source}")
    seen.setdefault(a, cand)


def verify_structure(tensors: Mapping[str, TensorParam | None], nodes: tuple[Node, ...], op_name: str) -> None:
    """Structural rules: tensors exist, ranks match, each is written once before it is read, axes are bound."""
    written: set[str] = set()
    for n in nodes:
        where = f"op {op_name}, node {n.out}"
        if len(set(n.axes)) != len(n.axes):
            raise IRError(f"{where}: output axes {n.axes} repeat an axis")
        bound = set(n.axes) | set(getattr(n, "raxes", ()))
        if isinstance(n, Reduce) and set(n.raxes) & set(n.axes):
            raise IRError(f"{where}: reduction axes {n.raxes} overlap the output axes {n.axes}")
        if isinstance(n, Reduce) and n.predicate is not None and n.predicate.dtype != DType.bool:
            raise IRError(f"{where}: the predicate must be boolean, got {n.predicate.dtype}")
        if isinstance(n, Scan):
            if not set(n.scan_axes) <= set(n.axes):
                raise IRError(f"{where}: scan axes {n.scan_axes} must be among the output axes {n.axes}")
            if not set(n.state_axes) <= set(n.axes) - set(n.scan_axes):
                raise IRError(f"{where}: state axes {n.state_axes} must be non-scan output axes")
            if n.init is not None and axes_in_expr(n.init) & set(n.scan_axes):
                raise IRError(f"{where}: the initial state must not depend on the scan axes {n.scan_axes}")
        for e in n.exprs():
            free = axes_in_expr(e)
            if not free <= bound:
                raise IRError(f"{where}: uses axes {sorted(map(str, free - bound))} that are neither output nor "
                              f"reduction axes of this node (bound: {sorted(map(str, bound))})")
            for acc in loads(e):
                t = tensors.get(acc.tensor)
                if t is None and acc.tensor not in written:
                    raise IRError(f"{where}: reads {acc.tensor!r}, which is not an input or an earlier result")
                rank = t.rank if t is not None else None
                if rank is not None and rank != len(acc.index):
                    raise IRError(f"{where}: {acc.tensor} has rank {rank} but is indexed with {len(acc.index)} "
                                  f"indices [{', '.join(map(index_str, acc.index))}]")
        if n.out in written:
            raise IRError(f"{where}: tensor {n.out!r} is written twice")
        written.add(n.out)


def axes_in_expr(e) -> set[Axis]:
    """Axes an Expr depends on."""
    return {s for s in free_symbols(e) if isinstance(s, Axis)}


@dataclass(frozen=True)
class AccessStatus:
    """How a tensor access is kept in bounds."""

    proven: bool      # proven inside the allowed range (the padded range for padded accesses)
    padded: bool      # reads outside [0, size) give zero
    guarded: bool     # inside a predicated reduction: out-of-range reads give zero

    @property
    def needs_mask(self) -> bool:
        return self.padded or self.guarded or not self.proven

    def __str__(self) -> str:
        if self.padded:
            return "padded" if self.proven else "padded, checked at call"
        if self.proven:
            return "in-bounds"
        return "guarded by predicate" if self.guarded else "checked at call"


def access_status(acc: Access, shape: tuple[sympy.Expr, ...], ext: Mapping[Axis, sympy.Expr],
                  guarded: bool) -> AccessStatus:
    """Classify one access (symbolic sizes: proofs that sympy cannot decide count as not proven)."""
    proven = True
    padded = False
    for k, ie in enumerate(acc.index):
        lo_pad, hi_pad = acc.padding(k)
        padded = padded or lo_pad != 0 or hi_pad != 0
        lo, hi = bounds(ie, ext)
        if not (proved(sympy.Ge(lo, -lo_pad)) and proved(sympy.Le(hi, shape[k] - 1 + hi_pad))):
            proven = False
    return AccessStatus(proven, padded, guarded and not proven)


@functools.lru_cache(maxsize=256)
def access_report(op: "Op") -> tuple[tuple[str, Access, AccessStatus], ...]:
    """(node output, access, status) for every distinct access of every node; computed once per op (the proofs
    are symbolic, ~0.1 s an access, and every binding of the op at new sizes asks)."""
    ext = dict(op.extents)
    out = []
    for n in op.nodes:
        guarded = isinstance(n, Reduce) and n.predicate is not None
        seen = set()
        for e in n.exprs():
            for acc in loads(e):
                if acc in seen:
                    continue
                seen.add(acc)
                out.append((n.out, acc, access_status(acc, op.tensor(acc.tensor).shape, ext, guarded)))
    return tuple(out)
