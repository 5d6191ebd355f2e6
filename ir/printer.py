"""Pretty printing of index expressions, value expressions and whole ops.

The output is deterministic (it feeds golden snapshots and the structural fingerprint): floor division prints
as ``//``, modulo as ``%``, and every value expression is printed with minimal parentheses.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import sympy
from sympy.printing.str import StrPrinter

from .expr import COMPARE, Expr, ExprOp

if TYPE_CHECKING:
    from .op import Op


class _IndexPrinter(StrPrinter):
    def _print_floor(self, e):  # noqa: N802 (sympy printer protocol)
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den != 1:
            return f"({self.parenthesize(num, 50)} // {self.parenthesize(den, 60)})"
        return f"floor({self._print(e.args[0])})"

    def _print_Mod(self, e):  # noqa: N802
        a, m = e.args
        return f"({self.parenthesize(a, 50)} % {self.parenthesize(m, 60)})"

    def _print_Piecewise(self, e):  # noqa: N802
        parts = [f"{self._print(v)} if {self._print(c)}" for v, c in e.args[:-1]]
        return "(" + " else ".join(parts + [self._print(e.args[-1][0])]) + ")"

    def _print_And(self, e):  # noqa: N802
        return " & ".join(f"({self._print(a)})" for a in sorted(e.args, key=str))

    def _print_Or(self, e):  # noqa: N802
        return " | ".join(f"({self._print(a)})" for a in sorted(e.args, key=str))

    def _print_Not(self, e):  # noqa: N802
        return f"~({self._print(e.args[0])})"

    def _print_BooleanTrue(self, e):  # noqa: N802
        return "True"

    def _print_BooleanFalse(self, e):  # noqa: N802
        return "False"


_IP = _IndexPrinter({"order": "lex"})


def index_str(e: sympy.Basic) -> str:
    """Print an index expression or predicate."""
    return _IP.doprint(e)


_PREC = {ExprOp.OR: 1, ExprOp.AND: 2, **{op: 3 for op in COMPARE}, ExprOp.ADD: 4, ExprOp.SUB: 4,
         ExprOp.MUL: 5, ExprOp.DIV: 5}


def _fmt_const(v) -> str:
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        if v == float("-inf"):
            return "-inf"
        return repr(v)
    return repr(v)


def expr_str(e: Expr, names: Mapping[str, str] | None = None) -> str:
    """Print a value expression; ``names`` optionally renames tensors."""
    memo: dict[Expr, tuple[str, int]] = {}
    for n in e.walk():
        memo[n] = _node_str(n, memo, names or {})
    return memo[e][0]


def _node_str(n: Expr, memo: dict, names: Mapping[str, str]) -> tuple[str, int]:
    op = n.op
    if op is ExprOp.CONST:
        return _fmt_const(n.arg), 9
    if op is ExprOp.INDEX:
        s = index_str(n.arg)
        return (s, 9) if (n.arg.is_Atom or isinstance(n.arg, sympy.Function)) else (f"({s})", 9)
    if op is ExprOp.ARG:
        return ("acc", "x")[n.arg] if n.arg < 2 else f"arg{n.arg}", 9
    if op is ExprOp.LOAD:
        a = n.arg
        name = names.get(a.tensor, a.tensor)
        pad = ""
        if a.pad is not None and any(lo != 0 or hi != 0 for lo, hi in a.pad):
            pad = ".pad(" + ", ".join(f"({index_str(lo)}, {index_str(hi)})" for lo, hi in a.pad) + ")"
        return f"{name}{pad}[{', '.join(index_str(i) for i in a.index)}]", 9
    if op is ExprOp.CAST:
        return f"{n.dtype}({memo[n.operand][0]})", 9
    if op is ExprOp.NEG:
        s, p = memo[n.operand]
        return f"-{s if p >= 6 else '(' + s + ')'}", 6
    if op is ExprOp.NOT:
        return f"~{_paren(memo[n.operand], 7)}", 7
    if op is ExprOp.WHERE:
        return f"where({', '.join(memo[s][0] for s in n.src)})", 9
    if op in (ExprOp.MAX, ExprOp.MIN, ExprOp.POW):
        return f"{op.value}({memo[n.lhs][0]}, {memo[n.rhs][0]})", 9
    if len(n.src) == 1:
        return f"{op.value}({memo[n.operand][0]})", 9
    p = _PREC[op]
    lhs = _paren(memo[n.lhs], p)
    rhs = _paren(memo[n.rhs], p + (1 if op in (ExprOp.SUB, ExprOp.DIV) or op in COMPARE else 0))
    return f"{lhs} {op.value} {rhs}", p


def _paren(sp: tuple[str, int], prec: int) -> str:
    s, p = sp
    return s if p >= prec else f"({s})"


def op_str(op: "Op", *, verified: bool = False, canonical: bool = False) -> str:
    """Print an op: signature, attributes, nodes; ``verified`` adds axis extents and per-access bound status.

    ``canonical`` renames axes in order of appearance and omits the op name (used by the fingerprint).
    """
    from .nodes import Affine, Map, Reduce, Scan

    rename: dict = {}
    if canonical:
        for i, ax in enumerate(op.axes_in_order()):
            rename[ax] = sympy.Symbol(f"a{i}", integer=True, nonnegative=True)

    def ix(e: sympy.Basic) -> str:
        return index_str(e.xreplace(rename) if rename else e)

    def ex(e: Expr) -> str:
        if rename:
            from .expr import substitute

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
        from .verify import access_report

        for node_out, acc, status in access_report(op):
            lines.append(f"  access {node_out} <- {acc.tensor}[{', '.join(ix(i) for i in acc.index)}]: {status}")
    return "\n".join(lines)
