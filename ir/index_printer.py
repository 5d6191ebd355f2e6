"""Printing of index expressions and predicates (sympy over axes and dims), the bottom of the printing stack.

It needs sympy alone, so every module of ``opgen.ir`` may use it: :mod:`opgen.ir.expr` prints value expressions
with it, :mod:`opgen.ir.verify` words its errors with it, and :mod:`opgen.ir.printer` prints whole ops. The output
is deterministic (it feeds golden snapshots and the structural fingerprint): floor division prints as ``//`` and
modulo as ``%``.
"""
from __future__ import annotations

import sympy
from sympy.printing.str import StrPrinter


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
