"""Pretty printing of whole ops; the printers of index and value expressions are re-exported from below.

The output is deterministic (it feeds golden snapshots and the structural fingerprint): floor division prints
as ``//``, modulo as ``%``, and every value expression is printed with minimal parentheses. The layers, lowest
first: :func:`index_str` (:mod:`opgen.ir.index_printer`, sympy alone), :func:`expr_str` (:mod:`opgen.ir.expr`),
:func:`op_str` (here, above :mod:`opgen.ir.nodes` and :mod:`opgen.ir.verify`; :class:`~opgen.ir.op.Op` calls
it for ``pretty``, ``str`` and ``fingerprint``, and is needed here only for type checking).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import sympy

from .expr import Expr, expr_str, substitute
from .index_printer import index_str
from .nodes import Affine, Map, Reduce, Scan
from .verify import access_report

if TYPE_CHECKING:
    from .op import Op

__all__ = ["expr_str", "index_str", "op_str"]


def op_str(op: "Op", *, verified: bool = False, canonical: bool = False) -> str:
    """Print an op: signature, attributes, nodes; ``verified`` adds axis extents and per-access bound status.

    ``canonical`` renames axes in order of appearance and omits the op name (used by the fingerprint).
    """
    rename: dict = {}
    if canonical:
        for i, ax in enumerate(op.axes_in_order()):
            rename[ax] = sympy.Symbol(f"a{i}", integer=True, nonnegative=True)

    def ix(e: sympy.Basic) -> str:
        return index_str(e.xreplace(rename) if rename else e)

    def ex(e: Expr) -> str:
        if rename:
            e = substitute(e, rename)
        return expr_str(e)

    def sig(t) -> str:
        return f"{t.name}: {'lookup ' if t.lookup else ''}{t.dtype}[{', '.join(ix(s) for s in t.shape)}]"

    lines = [f"op {'_' if canonical else op.name}({', '.join(sig(t) for t in op.inputs)})"
             f" -> ({', '.join(sig(t) for t in op.outputs)})"]
    if op.attrs:
        lines.append("  attrs " + ", ".join(f"{k}={v!r}" for k, v in op.attrs))
    for d, e in op.derived:
        lines.append(f"  dim {d} = {ix(e)}")
    for rel, msg in op.constraints:
        lines.append(f"  require {ix(rel)}")
    for n in op.nodes:
        t = op.tensor(n.out)
        head = f"  {n.out}[{', '.join(ix(a) for a in n.axes)}]: {t.dtype} = "
        if isinstance(n, Map):
            lines.append(head + ex(n.value))
        elif isinstance(n, Reduce):
            pred = f" where {ex(n.predicate)}" if n.predicate is not None else ""
            lines.append(head + f"{n.monoid}[{', '.join(ix(a) for a in n.raxes)}]({ex(n.value)}){pred}")
        elif isinstance(n, Scan):
            state = f", state=({', '.join(ix(a) for a in n.state_axes)})" if n.state_axes else ""
            init = f", init={ex(n.init)}" if n.init is not None else ""
            over = ", ".join(ix(a) for a in n.scan_axes)
            if isinstance(n.combine, Affine):
                body = f"{ex(n.combine.a)} * {n.out}[prev] + {ex(n.combine.b)}"
            else:
                body = f"{n.combine.monoid}({n.out}[prev], {ex(n.combine.value)})"
            lines.append(head + f"scan[{over}; {n.traversal}{state}{init}] {body}")
    if verified:
        lines.append("  axes " + ", ".join(f"{ix(a)} < {ix(e)}" for a, e in op.extents))
        for node_out, acc, status in access_report(op):
            lines.append(f"  access {node_out} <- {acc.tensor}[{', '.join(ix(i) for i in acc.index)}]: {status}")
    return "\n".join(lines)
