"""Tag every compute node with its kind: the first stage of lowering."""
from __future__ import annotations

import enum

from ..expr import Expr, ExprOp, loads
from ..index import affine
from ..nodes import SUM, Affine, Map, Reduce, Scan
from ..op import Op
from ..symbols import axes_in


class NodeClass(enum.Enum):
    """What kind of computation a node is (drives fusion and algorithm choice)."""

    POINTWISE = "pointwise"
    REDUCTION = "reduction"
    CONTRACTION = "contraction"
    WINDOW = "window reduction"
    LINEAR_SCAN = "linear scan"
    ASSOCIATIVE_SCAN = "associative scan"


def _factors(e: Expr) -> list[Expr]:
    return _factors(e.lhs) + _factors(e.rhs) if e.op is ExprOp.MUL else [e]


def _is_window(n: Reduce) -> bool:
    """Some access mixes an output axis and a reduction axis in one affine index (a sliding window)."""
    r, o = set(n.raxes), set(n.axes)
    for acc in loads(n.value):
        for ie in acc.index:
            ax = axes_in(ie)
            if ax & r and ax & o and affine(ie, ax) is not None:
                return True
    return False


def classify_node(n) -> NodeClass:
    """The class of one node."""
    if isinstance(n, Map):
        return NodeClass.POINTWISE
    if isinstance(n, Scan):
        return NodeClass.LINEAR_SCAN if isinstance(n.combine, Affine) else NodeClass.ASSOCIATIVE_SCAN
    assert isinstance(n, Reduce)
    if n.monoid == SUM and _is_window(n):
        return NodeClass.WINDOW
    if n.monoid == SUM and sum(1 for f in _factors(n.value) if loads(f)) >= 2:
        return NodeClass.CONTRACTION
    return NodeClass.REDUCTION


def classify(op: Op) -> dict[str, NodeClass]:
    """``{node output name: class}`` for every node of ``op``."""
    return {n.out: classify_node(n) for n in op.nodes}
