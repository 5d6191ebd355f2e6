"""Algorithm variants derived from the declared recurrence (not per op by hand)."""
from __future__ import annotations

import enum

from ..expr import Expr, ExprOp, loads
from ..symbols import axes_in
from .fuse import ScanGroup


class ScanVariant(enum.Enum):
    """How a fused scan is computed."""

    SEQUENTIAL = "sequential"          # state in registers, serial over steps, parallel over lanes
    CHUNKED = "chunked"                # parallel inside a chunk, state carried between chunks
    CHUNKED_MATMUL = "chunked-matmul"  # decayed outer-product update: intra-chunk masked matmuls (GLA / SSD)


def _axes_of(e: Expr) -> set:
    out = set()
    for acc in loads(e):
        for i in acc.index:
            out |= axes_in(i)
    for n in e.walk():
        if n.op is ExprOp.INDEX:
            out |= axes_in(n.arg)
    return out


def _outer_product(b: Expr, u, v) -> bool:
    """``b`` is a product of factors each depending on at most one of the two state axes ``u``, ``v``."""
    def factors(e: Expr) -> list[Expr]:
        return factors(e.lhs) + factors(e.rhs) if e.op is ExprOp.MUL else [e]
    fs = factors(b)
    return (all(not ({u, v} <= _axes_of(f)) for f in fs) and any(u in _axes_of(f) for f in fs)
            and any(v in _axes_of(f) for f in fs))


def derive_scan_variants(group: ScanGroup) -> tuple[ScanVariant, ...]:
    """The variants valid for ``group``, best-known first for its structure."""
    variants = [ScanVariant.SEQUENTIAL, ScanVariant.CHUNKED]
    comb = group.scan.combine
    if len(group.state) == 2:
        u, v = group.state
        a_axes = _axes_of(comb.a)
        if v not in a_axes and _outer_product(comb.b, u, v) and group.projection is not None \
                and set(group.projection.raxes) == {u}:
            variants.insert(0, ScanVariant.CHUNKED_MATMUL)
    return tuple(variants)
