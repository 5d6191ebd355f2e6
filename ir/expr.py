"""Value expressions: the scalar computation inside a compute node.

One immutable node type, :class:`Expr` (``op``, ``dtype``, ``src``, ``arg``), with the op kinds listed once in
:class:`ExprOp`. Integer index arithmetic and index predicates are folded into a single ``INDEX`` leaf holding a
sympy expression, so masks such as ``(j <= i) & (i - j < W)`` stay sympy all the way down and can be reasoned
about exactly. Tensor values never become sympy.

``==`` on :class:`Expr` is *structural* equality (nodes are hashable); build comparisons with :meth:`Expr.eq`,
:meth:`Expr.ne` or the ``<``/``<=``/``>``/``>=`` operators.

:func:`expr_str` (also ``str(e)``) prints an expression with minimal parentheses and the index printer of
:mod:`opgen.ir.index_printer`; :mod:`opgen.ir.printer` builds the printed form of whole ops on top of it.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence, Union

import sympy

from .dtypes import DType, promote
from .errors import IRError
from .index_printer import index_str
from .names import check_name


class ExprOp(enum.Enum):
    """Every kind of value expression."""

    CONST = "const"      # arg: python number
    INDEX = "index"      # arg: sympy integer expression or sympy boolean (predicate) over axes and dims
    LOAD = "load"        # arg: Access
    ARG = "arg"          # arg: int, operand slot of a custom monoid's combine expression
    NEG = "neg"
    EXP = "exp"
    LOG = "log"
    SQRT = "sqrt"
    ABS = "abs"
    SIGMOID = "sigmoid"
    SOFTPLUS = "softplus"
    SILU = "silu"
    TANH = "tanh"
    NOT = "not"
    CAST = "cast"        # dtype is the target
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    MAX = "max"
    MIN = "min"
    POW = "pow"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="
    AND = "&"
    OR = "|"
    WHERE = "where"


UNARY = frozenset({ExprOp.NEG, ExprOp.EXP, ExprOp.LOG, ExprOp.SQRT, ExprOp.ABS, ExprOp.SIGMOID, ExprOp.SOFTPLUS,
                   ExprOp.SILU, ExprOp.TANH, ExprOp.NOT, ExprOp.CAST})
FLOAT_UNARY = frozenset({ExprOp.EXP, ExprOp.LOG, ExprOp.SQRT, ExprOp.SIGMOID, ExprOp.SOFTPLUS, ExprOp.SILU,
                         ExprOp.TANH})
ARITH = frozenset({ExprOp.ADD, ExprOp.SUB, ExprOp.MUL, ExprOp.DIV, ExprOp.MAX, ExprOp.MIN, ExprOp.POW})
COMPARE = frozenset({ExprOp.LT, ExprOp.LE, ExprOp.GT, ExprOp.GE, ExprOp.EQ, ExprOp.NE})
LOGIC = frozenset({ExprOp.AND, ExprOp.OR})
BINARY = ARITH | COMPARE | LOGIC
LEAVES = frozenset({ExprOp.CONST, ExprOp.INDEX, ExprOp.LOAD, ExprOp.ARG})


@dataclass(frozen=True)
class Access:
    """A read ``tensor[index]``; ``pad[k] = (lo, hi)`` allows indices in ``[-lo, size_k - 1 + hi]`` that read 0."""

    tensor: str
    index: tuple[sympy.Expr, ...]
    pad: tuple[tuple[sympy.Expr, sympy.Expr], ...] | None = None

    def __post_init__(self) -> None:
        check_name("tensor", self.tensor)

    def padding(self, k: int) -> tuple[sympy.Expr, sympy.Expr]:
        """The (lo, hi) zero padding of dimension ``k``."""
        return self.pad[k] if self.pad is not None else (sympy.Integer(0), sympy.Integer(0))


@dataclass(frozen=True, slots=True, eq=False)
class Expr:
    """An immutable value expression node. Build with the module functions or operators, not directly."""

    op: ExprOp
    dtype: DType
    src: tuple["Expr", ...] = ()
    arg: Any = None
    _hash: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.op, self.dtype, self.src, self.arg)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Expr) or self._hash != other._hash:
            return False
        return (self.op, self.dtype, self.arg, self.src) == (other.op, other.dtype, other.arg, other.src)

    # named accessors -------------------------------------------------------------------------------------
    @property
    def operand(self) -> "Expr":
        return self.src[0]

    @property
    def lhs(self) -> "Expr":
        return self.src[0]

    @property
    def rhs(self) -> "Expr":
        return self.src[1]

    @property
    def cond(self) -> "Expr":
        return self.src[0]

    @property
    def then(self) -> "Expr":
        return self.src[1]

    @property
    def otherwise(self) -> "Expr":
        return self.src[2]

    @property
    def access(self) -> Access:
        assert self.op is ExprOp.LOAD
        return self.arg

    @property
    def sym(self) -> sympy.Basic:
        """The sympy expression of an INDEX leaf."""
        assert self.op is ExprOp.INDEX
        return self.arg

    # operators ------------------------------------------------------------------------------------------
    def __add__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.ADD, self, o)

    def __radd__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.ADD, o, self)

    def __sub__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.SUB, self, o)

    def __rsub__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.SUB, o, self)

    def __mul__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.MUL, self, o)

    def __rmul__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.MUL, o, self)

    def __truediv__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.DIV, self, o)

    def __rtruediv__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.DIV, o, self)

    def __pow__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.POW, self, o)

    def __neg__(self) -> "Expr":
        return unary(ExprOp.NEG, self)

    def __lt__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.LT, self, o)

    def __le__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.LE, self, o)

    def __gt__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.GT, self, o)

    def __ge__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.GE, self, o)

    def __and__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.AND, self, o)

    def __rand__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.AND, o, self)

    def __or__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.OR, self, o)

    def __ror__(self, o: "ExprLike") -> "Expr":
        return binary(ExprOp.OR, o, self)

    def __invert__(self) -> "Expr":
        return unary(ExprOp.NOT, self)

    def eq(self, o: "ExprLike") -> "Expr":
        """The elementwise comparison ``self == o`` (``==`` itself is structural equality)."""
        return binary(ExprOp.EQ, self, o)

    def ne(self, o: "ExprLike") -> "Expr":
        """The elementwise comparison ``self != o``."""
        return binary(ExprOp.NE, self, o)

    def __bool__(self) -> bool:
        raise IRError("an IR expression has no truth value; use opgen.where(cond, a, b) instead of Python if/and/or")

    def __str__(self) -> str:
        return expr_str(self)

    def walk(self) -> Iterator["Expr"]:
        """All nodes of the expression DAG, each once, children before parents."""
        seen: set[Expr] = set()
        stack: list[tuple[Expr, bool]] = [(self, False)]
        while stack:
            node, done = stack.pop()
            if done:
                yield node
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((s, False) for s in reversed(node.src))


ExprLike = Union[Expr, int, float, bool, sympy.Basic]


# constructors ------------------------------------------------------------------------------------------

def const(value: int | float | bool, dtype: DType | None = None) -> Expr:
    """A constant; the dtype defaults to bool / i64 / f32 by the Python type."""
    if dtype is None:
        dtype = DType.bool if isinstance(value, bool) else DType.i64 if isinstance(value, int) else DType.f32
    if dtype.is_float:
        value = float(value)
    elif dtype == DType.bool:
        value = bool(value)
    else:
        value = int(value)
    return Expr(ExprOp.CONST, dtype, (), value)


def _is_bool(e: sympy.Basic) -> bool:
    """A sympy predicate (relation, And/Or/Not, true/false); symbols are integers here, not booleans."""
    return isinstance(e, sympy.logic.boolalg.Boolean) and not isinstance(e, sympy.Expr)


def index(e: sympy.Basic | int) -> Expr:
    """An integer index expression or index predicate (sympy) used as a value."""
    e = sympy.sympify(e)
    if _is_bool(e):
        return Expr(ExprOp.INDEX, DType.bool, (), e)
    if not e.is_integer and not e.is_Integer:
        raise IRError(f"index expression {e} is not integer-valued (use // for floor division)")
    return Expr(ExprOp.INDEX, DType.i64, (), e)


def load(tensor: str, idx: Sequence[sympy.Basic | int], dtype: DType,
         pad: Sequence[tuple[Any, Any]] | None = None) -> Expr:
    """A read of ``tensor[idx]`` (an input or an intermediate of the op)."""
    ix = tuple(sympy.sympify(i) for i in idx)
    for i in ix:
        if not (i.is_integer or i.is_Integer):
            raise IRError(f"index {i} of {tensor} is not integer-valued (use // for floor division)")
    p = None if pad is None else tuple((sympy.sympify(lo), sympy.sympify(hi)) for lo, hi in pad)
    return Expr(ExprOp.LOAD, dtype, (), Access(tensor, ix, p))


def arg(slot: int, dtype: DType) -> Expr:
    """Operand ``slot`` (0: accumulator, 1: new value) of a custom monoid's combine expression."""
    return Expr(ExprOp.ARG, dtype, (), slot)


def as_expr(x: ExprLike, like: DType | None = None) -> Expr:
    """Lift a Python number or sympy expression to an :class:`Expr`; numbers take the dtype ``like`` (weak)."""
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool):
        return const(x, DType.bool)
    if isinstance(x, (int, float)):
        if like is not None and (like.is_float or (isinstance(x, int) and like.is_int)):
            return const(x, like)
        return const(x)
    if isinstance(x, sympy.Basic):
        if isinstance(x, sympy.Expr) and not (x.is_integer or x.is_Integer):
            return _sympy_value(x, like if like is not None and like.is_float else DType.f32)
        return index(x)
    raise IRError(f"cannot use {type(x).__name__} {x!r} in an IR expression")


def _fold(op: ExprOp, values: list[Expr]) -> Expr:
    """``values[0] op values[1] op ...``, left to right."""
    out = values[0]
    for v in values[1:]:
        out = binary(op, out, v)
    return out


def _sympy_value(e: sympy.Expr, dt: DType) -> Expr:
    """A non-integer sympy expression of dims and axes used as a value (``1 / E``, ``E ** -0.5``,
    ``sympy.sqrt(E)``, ``t / L``, ``E + 1.0``) as a float value of dtype ``dt``: integer parts stay INDEX leaves
    (cast), reciprocals, square roots, powers and rational / float constants become value ops."""
    if e.is_Integer or e.is_integer:
        return _cast_to(index(e), dt)
    if e.is_number:
        return const(float(e), dt)
    if e.is_Add:
        return _fold(ExprOp.ADD, [_sympy_value(a, dt) for a in e.args])
    if e.is_Mul:
        num, den = sympy.fraction(e)
        if den != 1:
            return binary(ExprOp.DIV, _sympy_value(num, dt), _sympy_value(den, dt))
        return _fold(ExprOp.MUL, [_sympy_value(a, dt) for a in e.args])
    if e.is_Pow:
        base, ex = e.args
        if ex == sympy.Rational(1, 2):
            return sqrt(_sympy_value(base, dt))
        if ex == -sympy.Rational(1, 2):
            return binary(ExprOp.DIV, const(1.0, dt), sqrt(_sympy_value(base, dt)))
        if ex.is_Integer and ex < 0:
            return binary(ExprOp.DIV, const(1.0, dt), _sympy_value(base ** -ex, dt))
        return binary(ExprOp.POW, _sympy_value(base, dt), _sympy_value(ex, dt))
    raise IRError(f"cannot use {e} as a value: only +, -, *, /, powers and sqrt of dims and axes lift to values")


_SYMPY_ARITH = {ExprOp.ADD: lambda a, b: a + b, ExprOp.SUB: lambda a, b: a - b, ExprOp.MUL: lambda a, b: a * b,
                ExprOp.MAX: sympy.Max, ExprOp.MIN: sympy.Min}
_SYMPY_COMPARE = {ExprOp.LT: sympy.Lt, ExprOp.LE: sympy.Le, ExprOp.GT: sympy.Gt, ExprOp.GE: sympy.Ge,
                  ExprOp.EQ: sympy.Eq, ExprOp.NE: sympy.Ne}
_SYMPY_LOGIC = {ExprOp.AND: sympy.And, ExprOp.OR: sympy.Or}


def _index_leaf(e: Expr) -> sympy.Basic | None:
    if e.op is ExprOp.INDEX:
        return e.arg
    if e.op is ExprOp.CONST and (e.dtype.is_int or e.dtype == DType.bool):
        return sympy.true if e.arg is True else sympy.false if e.arg is False else sympy.Integer(e.arg)
    return None


def _fold_index(op: ExprOp, a: Expr, b: Expr) -> Expr | None:
    """Fold integer/boolean arithmetic on two index leaves into one sympy INDEX leaf."""
    sa, sb = _index_leaf(a), _index_leaf(b)
    if sa is None or sb is None or (a.op is ExprOp.CONST and b.op is ExprOp.CONST):
        return None
    is_bool_a = _is_bool(sa)
    is_bool_b = _is_bool(sb)
    if op in _SYMPY_LOGIC and is_bool_a and is_bool_b:
        return index(_SYMPY_LOGIC[op](sa, sb))
    if is_bool_a or is_bool_b:
        return None
    if op in _SYMPY_ARITH:
        return index(_SYMPY_ARITH[op](sa, sb))
    if op in _SYMPY_COMPARE:
        return index(_SYMPY_COMPARE[op](sa, sb))
    return None


def binary(op: ExprOp, a: ExprLike, b: ExprLike) -> Expr:
    """A binary expression with dtype promotion (Python numbers are weak)."""
    if not isinstance(a, Expr) and not isinstance(b, Expr):
        a = as_expr(a)
    ea = as_expr(a, b.dtype if isinstance(b, Expr) else None)
    eb = as_expr(b, ea.dtype)
    folded = _fold_index(op, ea, eb)
    if folded is not None:
        return folded
    if op in LOGIC:
        for side in (ea, eb):
            if side.dtype != DType.bool:
                raise IRError(f"operands of '{op.value}' must be boolean, got {side.dtype} in {side}")
        return Expr(op, DType.bool, (ea, eb))
    dt = promote(ea.dtype, eb.dtype)
    if op is ExprOp.DIV and not dt.is_float:
        dt = DType.f32
    if op is ExprOp.POW and not dt.is_float:
        dt = DType.f32
    out = DType.bool if op in COMPARE else dt
    return Expr(op, out, (_cast_to(ea, dt), _cast_to(eb, dt)))


def _cast_to(e: Expr, dt: DType) -> Expr:
    if e.dtype == dt:
        return e
    if e.op is ExprOp.CONST:
        return const(e.arg, dt)
    return Expr(ExprOp.CAST, dt, (e,))


def unary(op: ExprOp, x: ExprLike) -> Expr:
    """A unary expression; float functions promote integer operands to f32."""
    e = as_expr(x)
    if op is ExprOp.NOT:
        if e.dtype != DType.bool:
            raise IRError(f"'~' needs a boolean operand, got {e.dtype} in {e}")
        leaf = _index_leaf(e)
        if leaf is not None and e.op is ExprOp.INDEX:
            return index(sympy.Not(leaf))
        return Expr(op, DType.bool, (e,))
    if op is ExprOp.ABS and e.op is ExprOp.INDEX and e.dtype.is_int:
        return index(sympy.Abs(e.arg))
    if op is ExprOp.NEG and e.op is ExprOp.INDEX and e.dtype.is_int:
        return index(-e.arg)
    if op is ExprOp.NEG and e.op is ExprOp.CONST:
        return const(-e.arg, e.dtype)
    if op in FLOAT_UNARY and not e.dtype.is_float:
        e = _cast_to(e, DType.f32)
    return Expr(op, e.dtype, (e,))


def cast(x: ExprLike, dtype: DType) -> Expr:
    """Convert ``x`` to ``dtype``."""
    return _cast_to(as_expr(x), dtype)


def where(cond: ExprLike, a: ExprLike, b: ExprLike) -> Expr:
    """``a`` where ``cond`` holds, else ``b``. Folds to a sympy Piecewise when all three are index values."""
    c = as_expr(cond)
    if c.dtype != DType.bool:
        raise IRError(f"the condition of where() must be boolean, got {c.dtype} in {c}")
    ea = as_expr(a, b.dtype if isinstance(b, Expr) else None)
    eb = as_expr(b, ea.dtype)
    sc, sa, sb = _index_leaf(c), _index_leaf(ea), _index_leaf(eb)
    if (c.op is ExprOp.INDEX and sa is not None and sb is not None
            and not _is_bool(sa) and not _is_bool(sb)):
        return index(sympy.Piecewise((sa, sc), (sb, True)))
    dt = promote(ea.dtype, eb.dtype)
    return Expr(ExprOp.WHERE, dt, (c, _cast_to(ea, dt), _cast_to(eb, dt)))


def exp(x: ExprLike) -> Expr:
    """``e ** x``."""
    return unary(ExprOp.EXP, x)


def log(x: ExprLike) -> Expr:
    """Natural logarithm."""
    return unary(ExprOp.LOG, x)


def sqrt(x: ExprLike) -> Expr:
    """Square root."""
    return unary(ExprOp.SQRT, x)


def absolute(x: ExprLike) -> Expr:
    """``|x|`` (folds to sympy ``Abs`` on index values)."""
    return unary(ExprOp.ABS, x)


def sigmoid(x: ExprLike) -> Expr:
    """``1 / (1 + exp(-x))``."""
    return unary(ExprOp.SIGMOID, x)


def softplus(x: ExprLike) -> Expr:
    """``log(1 + exp(x))`` (torch's threshold 20 is applied by backends)."""
    return unary(ExprOp.SOFTPLUS, x)


def silu(x: ExprLike) -> Expr:
    """``x * sigmoid(x)``."""
    return unary(ExprOp.SILU, x)


def tanh(x: ExprLike) -> Expr:
    """Hyperbolic tangent."""
    return unary(ExprOp.TANH, x)


def maximum(a: ExprLike, b: ExprLike) -> Expr:
    """Elementwise maximum."""
    return binary(ExprOp.MAX, a, b)


def minimum(a: ExprLike, b: ExprLike) -> Expr:
    """Elementwise minimum."""
    return binary(ExprOp.MIN, a, b)


NEG_INF = -math.inf


def loads(e: Expr) -> list[Access]:
    """Every tensor access in ``e`` (each distinct node once)."""
    return [n.arg for n in e.walk() if n.op is ExprOp.LOAD]


def free_symbols(e: Expr) -> set[sympy.Symbol]:
    """All sympy symbols (axes and dims) that ``e`` depends on."""
    out: set[sympy.Symbol] = set()
    for n in e.walk():
        if n.op is ExprOp.INDEX:
            out |= n.arg.free_symbols
        elif n.op is ExprOp.LOAD:
            for i in n.arg.index:
                out |= i.free_symbols
    return out


def substitute(e: Expr, mapping: dict) -> Expr:
    """Replace sympy symbols in every index of ``e`` (used for axis renaming and traversal maps)."""
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        if n.op is ExprOp.INDEX:
            memo[n] = index(n.arg.xreplace(mapping))
        elif n.op is ExprOp.LOAD:
            a = n.arg
            pad = None if a.pad is None else tuple((lo.xreplace(mapping), hi.xreplace(mapping)) for lo, hi in a.pad)
            memo[n] = Expr(ExprOp.LOAD, n.dtype, (), Access(a.tensor, tuple(i.xreplace(mapping) for i in a.index), pad))
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


# ------------------------------------------------------------------------------------------------ printing

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
