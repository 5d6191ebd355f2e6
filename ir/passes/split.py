"""Splitting an op into single-node ops, so each node can run on the best target for it."""
from __future__ import annotations

from ..expr import loads
from ..nodes import TensorParam
from ..op import Op
from ..symbols import axes_in


def node_op(op: Op, index: int) -> Op:
    """Node ``index`` of ``op`` as an op of its own: the tensors it reads become inputs (intermediates keep their
    stored dtype) and its result is the output."""
    node = op.nodes[index]
    reads: list[str] = []
    for e in node.exprs():
        for acc in loads(e):
            if acc.tensor not in reads:
                reads.append(acc.tensor)
    tensors = []
    for name in reads:
        t = op.tensor(name)
        tensors.append(TensorParam(t.name, t.shape, t.dtype, "input", t.lookup))
    out = op.tensor(node.out)
    tensors.append(TensorParam(out.name, out.shape, out.dtype, "output"))
    used = set(node.axes) | set(getattr(node, "raxes", ()))
    for e in node.exprs():
        for acc in loads(e):
            for i in acc.index:
                used |= axes_in(i)
    extents = tuple((a, e) for a, e in op.extents if a in used)
    return Op(f"{op.name}.{node.out}", tuple(tensors), (node,), extents, op.derived, (), op.attrs)
