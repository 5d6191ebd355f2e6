"""Rendering opgen expressions to Triton source text.

Two pieces, both pure functions of the IR (no triton import):

* :func:`render_index` prints a sympy index expression or predicate. In ``"triton"`` mode integer division and
  modulo follow Python's floor semantics even for negative operands (Triton's ``//`` and ``%`` truncate like C,
  on the GPU and in the interpreter), ``Piecewise``/``ITE`` become ``tl.where`` and predicates use ``&``/``|``.
  In ``"python"`` mode the same expression is printed for the host-side launcher.
* :class:`ValueRenderer` turns an :class:`~opgen.ir.Expr` DAG into straight-line SSA assignments inside
  :class:`Section` s (a kernel prologue, a loop body, an epilogue...). Each node is computed once per section
  (common subexpressions are shared), loop-invariant nodes are hoisted into an enclosing section, tensor reads
  become masked ``tl.load`` s (``mask=..., other=0`` keywords: lane and state-padding tails, zero-padded and
  predicate-guarded accesses), and values are computed in the accumulation dtype of their IR dtype (bf16/f16
  -> fp32, fp64 stays fp64).

Math follows the reference backend: ``softplus`` uses torch's threshold 20 with an accurate ``log1p``, ``tanh``
is built from an accurate ``expm1`` (``tl`` has no tanh and libdevice stubs fail in the interpreter), ``max``/
``min`` propagate NaN like ``torch.maximum``.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import sympy

from opgen.ir import Access, DType, Expr, ExprOp, accum_dtype
from opgen.ir.symbols import Axis

TL_DTYPE = {DType.bool: "tl.int1", DType.i32: "tl.int32", DType.i64: "tl.int64", DType.f16: "tl.float16",
            DType.bf16: "tl.bfloat16", DType.f32: "tl.float32", DType.f64: "tl.float64"}

# the Triton pointer element names used in signatures (``triton.compile`` / ``ASTSource``)
TL_SIGNATURE = {DType.bool: "*i1", DType.i32: "*i32", DType.i64: "*i64", DType.f16: "*fp16",
                DType.bf16: "*bf16", DType.f32: "*fp32", DType.f64: "*fp64"}


def compute_dtype(d: DType) -> DType:
    """The dtype a value of IR dtype ``d`` is computed in (f16/bf16 -> f32)."""
    return accum_dtype(d) if d.is_float else d


# ------------------------------------------------------------------------------------------ helper functions

# Each helper is a @triton.jit function emitted into a generated module only when used. Only ``tl`` primitives
# are used, so the same text runs compiled (triton 3.6 to 3.9) and in the interpreter.
HELPERS: dict[str, str] = {
    "_log1p": '''@triton.jit
def _log1p(x):
    # log(1 + x) without cancellation for small x (Kahan); only tl primitives (libdevice fails in the interpreter)
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
''',
    "_expm1": '''@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation for small x (Kahan)
    u = tl.exp(x)
    lu = tl.log(u)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / tl.where(lu == 0.0, 1.0, lu))))
''',
    "_softplus": '''@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with threshold 20: x where x > 20, else log(1 + exp(x))
    return tl.where(x > 20.0, x, _log1p(tl.exp(tl.minimum(x, 20.0))))
''',
    "_silu": '''@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)
''',
    "_tanh": '''@triton.jit
def _tanh(x):
    # tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)), odd extension
    e = _expm1(-2.0 * tl.abs(x))
    r = -e / (2.0 + e)
    return tl.where(x < 0.0, -r, r)
''',
    "_pow": '''@triton.jit
def _pow(x, y):
    # x ** y for real x, y like torch.pow: negative bases allowed for integral exponents
    r = tl.exp(y * tl.log(tl.abs(x)))
    integral = y == tl.floor(y)
    odd = integral & (y - 2.0 * tl.floor(0.5 * y) == 1.0)
    r = tl.where(x < 0.0, tl.where(integral, tl.where(odd, -r, r), float("nan")), r)
    return tl.where(y == 0.0, 1.0, r)
''',
}
HELPER_DEPS = {"_softplus": ("_log1p",), "_tanh": ("_expm1",)}


def helper_source(used: Iterable[str]) -> str:
    """The text of the helpers in ``used`` and their dependencies, dependencies first, in a stable order."""
    need: list[str] = []

    def add(name: str) -> None:
        for d in HELPER_DEPS.get(name, ()):
            add(d)
        if name not in need:
            need.append(name)

    for name in sorted(used):
        add(name)
    return "\n\n".join(HELPERS[n] for n in need)


# ------------------------------------------------------------------------------------------- index printing


def _nonneg(e: sympy.Basic) -> bool:
    return bool(e.is_nonnegative)


def _pos(e: sympy.Basic) -> bool:
    return bool(e.is_positive)


def render_index(e: sympy.Basic, names: Callable[[sympy.Symbol], str], mode: str = "triton") -> str:
    """Print the integer expression or predicate ``e``; ``names`` maps each free symbol to its variable.

    ``mode`` is ``"triton"`` (kernel code) or ``"python"`` (host code, plain ints)."""
    py = mode == "python"
    r = lambda x: render_index(x, names, mode)  # noqa: E731
    if e is sympy.true or e is True:
        return "True"
    if e is sympy.false or e is False:
        return "False"
    if e.is_Integer:
        v = int(e)
        return str(v) if v >= 0 else f"({v})"
    if e.is_Symbol:
        return names(e)
    if e.is_Add:
        terms = sorted(e.args, key=lambda t: (t.is_Number, sympy.default_sort_key(t)))
        out = r(terms[0])
        for t in terms[1:]:
            if t.is_Number and t < 0:
                out += f" - {-int(t)}"
            elif t.is_Mul and t.args[0].is_Number and t.args[0] < 0:
                out += f" - {r(-t)}"
            else:
                out += f" + {r(t)}"
        return f"({out})"
    if e.is_Mul:
        num, den = sympy.fraction(e)
        if den != 1:
            raise ValueError(f"index expression {e} is not integer-valued (use // for division)")
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{r(rest)})"
        return "(" + " * ".join(r(a) for a in e.args) + ")"
    if e.is_Pow:
        base, ex = e.args
        if not ex.is_Integer or int(ex) < 0:
            raise ValueError(f"unsupported power in index expression {e}")
        if int(ex) == 0:
            return "1"
        return "(" + " * ".join([r(base)] * int(ex)) + ")"
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den == 1:
            return r(num)
        return _floordiv(r(num), r(den), _nonneg(num) and _pos(den), py, _pos(den))
    if isinstance(e, sympy.ceiling):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den == 1:
            return r(num)
        return f"(-{_floordiv(r(-num), r(den), _nonneg(-num) and _pos(den), py, _pos(den))})"
    if isinstance(e, sympy.Mod):
        a, m = e.args
        return _mod(r(a), r(m), _nonneg(a) and _pos(m), py, _pos(m))
    if isinstance(e, sympy.Abs):
        return f"abs({r(e.args[0])})" if py else f"tl.abs({r(e.args[0])})"
    if isinstance(e, (sympy.Min, sympy.Max)):
        vals = [r(a) for a in e.args]
        if py:
            return f"{'min' if isinstance(e, sympy.Min) else 'max'}({', '.join(vals)})"
        f = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
        out = vals[0]
        for v in vals[1:]:
            out = f"{f}({out}, {v})"
        return out
    if isinstance(e, sympy.Piecewise):
        out = r(e.args[-1][0])
        for val, cond in reversed(e.args[:-1]):
            out = f"({r(val)} if {r(cond)} else {out})" if py else f"tl.where({r(cond)}, {r(val)}, {out})"
        return out
    if isinstance(e, sympy.ITE):
        c, a, b = (r(x) for x in e.args)
        return f"({a} if {c} else {b})" if py else f"tl.where({c}, {a}, {b})"
    if isinstance(e, sympy.core.relational.Relational):
        op = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
              sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!="}[type(e)]
        return f"({r(e.lhs)} {op} {r(e.rhs)})"
    if isinstance(e, (sympy.And, sympy.Or)):
        sym = (" and " if isinstance(e, sympy.And) else " or ") if py else (
            " & " if isinstance(e, sympy.And) else " | ")
        return "(" + sym.join(r(a) for a in sorted(e.args, key=sympy.default_sort_key)) + ")"
    if isinstance(e, sympy.Not):
        return f"(not {r(e.args[0])})" if py else f"({r(e.args[0])} == 0)"
    if isinstance(e, sympy.Xor):
        a, b = (r(x) for x in e.args)
        return f"({a} != {b})"
    raise ValueError(f"cannot render index expression {e} ({type(e).__name__}) to Triton")


def _floordiv(a: str, m: str, simple: bool, py: bool, m_pos: bool = True) -> str:
    if simple or py:
        return f"({a} // {m})"
    # Triton's // truncates toward zero (on the GPU and in the interpreter); correct it to floor division
    if m_pos:
        return f"tl.where((({a}) % ({m}) != 0) & (({a}) < 0), ({a}) // ({m}) - 1, ({a}) // ({m}))"
    return f"tl.where((({a}) % ({m}) != 0) & ((({a}) < 0) != (({m}) < 0)), ({a}) // ({m}) - 1, ({a}) // ({m}))"


def _mod(a: str, m: str, simple: bool, py: bool, m_pos: bool = True) -> str:
    if simple or py:
        return f"({a} % {m})"
    # Triton's % takes the dividend's sign; Python's takes the divisor's
    if m_pos:
        return f"tl.where(({a}) % ({m}) < 0, ({a}) % ({m}) + ({m}), ({a}) % ({m}))"
    return (f"tl.where((({a}) % ({m}) != 0) & ((({a}) % ({m}) < 0) != (({m}) < 0)), ({a}) % ({m}) + ({m}), "
            f"({a}) % ({m}))")


# ------------------------------------------------------------------------------------------------- naming

RESERVED = frozenset({"tl", "triton", "torch", "float", "int", "range", "min", "max", "abs", "len", "i",
                      "pid", "lane", "lane_ok", "chunk", "pos", "row_ok", "causal", "k0", "grid", "IDX", "BLOCK",
                      "BT", "BV", "BKA", "NK", "DOT_PRECISION", "STATE_TILE", "num_warps", "num_stages",
                      "dG", "tensors", "launch", "chunk", "lane_zero"})


class Namer:
    """Fresh, readable Python identifiers that never collide with each other or with reserved names."""

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        self.used: set[str] = set(RESERVED) | set(reserved)

    def fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "v"
        if base[0].isdigit():
            base = "v" + base
        name, k = base, 0
        while name in self.used or keyword.iskeyword(name) or name.startswith("__"):
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def reserve(self, name: str) -> str:
        if name in self.used:
            raise ValueError(f"name {name!r} is already used")
        self.used.add(name)
        return name


# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class AxisVar:
    """An axis inside a section: the variable holding its index values and its validity mask (None: all valid)."""

    code: str
    mask: str | None = None
    block: bool = True       # a block of values (False: one scalar per program, e.g. the step of a serial loop)


@dataclass(frozen=True)
class TensorArg:
    """How kernel code reaches a tensor: its pointer argument, the stride and size expression of each dim."""

    ptr: str
    strides: tuple[str, ...]
    sizes: tuple[str, ...]
    dtype: DType


@dataclass
class Section:
    """A block of straight-line code with its own axis environment and memo of computed nodes.

    ``hoist`` is the enclosing section that receives nodes not depending on ``varying`` (symbols or tensor
    names); while ``frozen`` a section accepts no new lines (its text is already closed above the current
    position) but its memo is still reused.
    """

    env: Mapping[sympy.Symbol, AxisVar]
    hoist: "Section | None" = None
    varying: frozenset = frozenset()
    registers: Mapping[str, str] = field(default_factory=dict)
    lines: list = field(default_factory=list)
    memo: dict = field(default_factory=dict)
    frozen: bool = False

    def emit(self, line: str) -> None:
        assert not self.frozen, "internal error: emitting into a frozen section"
        self.lines.append(line)

    def text(self, indent: int) -> list[str]:
        out = []
        for item in self.lines:
            if isinstance(item, str):
                out.append(" " * indent + item if item else "")
            else:  # a nested block: (header line, Section)
                header, sec = item
                out.append(" " * indent + header)
                body = sec.text(indent + 4)
                out.extend(body or [" " * (indent + 4) + "pass"])
        return out


def _fmt_float(v: float) -> str:
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(float(v))


class ValueRenderer:
    """Renders value expressions of one op into sections of a kernel.

    ``tensors`` maps each readable tensor name to its :class:`TensorArg`; ``dims`` maps each dim symbol to the
    variable holding its size; ``masked`` holds the accesses that need bounds checks (zero padding or a guarding
    predicate, per :func:`opgen.ir.access_report`).
    """

    def __init__(self, namer: Namer, tensors: Mapping[str, TensorArg], dims: Mapping[sympy.Symbol, str],
                 masked: Iterable[Access] = ()) -> None:
        self.namer = namer
        self.tensors = dict(tensors)
        self.dims = dict(dims)
        self.masked = set(masked)
        self.helpers: set[str] = set()
        self._deps: dict[Expr, frozenset] = {}

    # dependencies ---------------------------------------------------------------------------------------
    def deps(self, e: Expr) -> frozenset:
        """Symbols and tensor names ``e`` depends on."""
        hit = self._deps.get(e)
        if hit is not None:
            return hit
        out: set = set()
        if e.op is ExprOp.INDEX:
            out |= e.arg.free_symbols
        elif e.op is ExprOp.LOAD:
            out.add(e.arg.tensor)
            for i in e.arg.index:
                out |= i.free_symbols
            if e.arg.pad is not None:
                for lo, hi in e.arg.pad:
                    out |= sympy.sympify(lo).free_symbols | sympy.sympify(hi).free_symbols
        for s in e.src:
            out |= self.deps(s)
        res = frozenset(out)
        self._deps[e] = res
        return res

    def _home(self, e: Expr, sec: Section) -> tuple[Section, list[Section]]:
        """The outermost section ``e`` may live in, and the chain from ``sec`` to it."""
        chain = [sec]
        s = sec
        d = self.deps(e)
        while s.hoist is not None and not (d & s.varying):
            s = s.hoist
            chain.append(s)
        return s, chain

    # index expressions ----------------------------------------------------------------------------------
    def names_in(self, sec: Section) -> Callable[[sympy.Symbol], str]:
        def name(s: sympy.Symbol) -> str:
            if s in sec.env:
                return sec.env[s].code
            if s in self.dims:
                return self.dims[s]
            if isinstance(s, Axis):
                raise ValueError(f"axis {s} is not available in this part of the kernel")
            raise ValueError(f"symbol {s} has no kernel variable")
        return name

    def index(self, e: sympy.Basic, sec: Section) -> str:
        return render_index(sympy.sympify(e), self.names_in(sec))

    def mask_of(self, symbols: Iterable[sympy.Symbol], sec: Section) -> list[str]:
        """The validity masks of the axes among ``symbols`` in ``sec`` (deduplicated, stable order)."""
        out: list[str] = []
        for s in sorted(symbols, key=str):
            if s in sec.env and sec.env[s].mask is not None and sec.env[s].mask not in out:
                out.append(sec.env[s].mask)
        return out

    def is_block(self, symbols: Iterable[sympy.Symbol], sec: Section) -> bool:
        """Whether a value over ``symbols`` is a block (else one scalar per program)."""
        return any(s in sec.env and sec.env[s].block for s in symbols)

    @staticmethod
    def combine_masks(vector: list[str], scalar: list[str]) -> str:
        """One mask from block terms and scalar terms. A scalar condition is applied with ``tl.where``: the
        interpreter turns ``block_bool & scalar_bool`` into int8, which ``tl.load``/``tl.store`` reject."""
        v = " & ".join(vector)
        sc = " & ".join(scalar)
        if vector and scalar:
            return f"tl.where({sc}, {v}, False)"
        return v or sc

    def offset(self, tensor: str, idx: tuple, sec: Section, codes: list[str] | None = None) -> str:
        t = self.tensors[tensor]
        terms = []
        for k, ie in enumerate(idx):
            ie = sympy.sympify(ie)
            if ie == 0:
                continue
            code = codes[k] if codes is not None else self.index(ie, sec)
            terms.append(f"{code} * {t.strides[k]}")
        return " + ".join(terms) if terms else "0"

    # values ---------------------------------------------------------------------------------------------
    def value(self, e: Expr, sec: Section, hint: str | None = None) -> str:
        """The code of ``e`` in ``sec`` (emitting the assignments it needs); a newly computed root is named
        after ``hint``."""
        code = ""
        self._hint = (e, hint) if hint else None
        try:
            for n in e.walk():
                code = self._get(n, sec)
        finally:
            self._hint = None
        return code

    def _get(self, n: Expr, sec: Section) -> str:
        home, chain = self._home(n, sec)
        for s in chain:
            if n in s.memo:
                return s.memo[n]
        # emit in the outermost open section of the chain
        target = sec
        for s in chain:
            if not s.frozen:
                target = s
        self._current = n
        code = self._node(n, target)
        target.memo[n] = code
        return code

    def _assign(self, hint: str, code: str, sec: Section) -> str:
        h = getattr(self, "_hint", None)
        if h is not None and h[0] is getattr(self, "_current", None):
            hint = h[1]
        name = self.namer.fresh(hint)
        sec.emit(f"{name} = {code}")
        return name

    def _node(self, n: Expr, sec: Section) -> str:
        op = n.op
        if op is ExprOp.CONST:
            if n.dtype == DType.bool:
                return "True" if n.arg else "False"
            if n.dtype.is_float:
                return _fmt_float(n.arg)
            return str(int(n.arg)) if int(n.arg) >= 0 else f"({int(n.arg)})"
        if op is ExprOp.INDEX:
            code = self.index(n.arg, sec)
            if code.isidentifier() or code.lstrip("-").isdigit() or code in ("True", "False"):
                return code
            return self._assign("ix", code, sec)
        if op is ExprOp.ARG:
            raise ValueError("monoid combine arguments cannot appear in a scan kernel")
        if op is ExprOp.LOAD:
            return self._load(n, sec)
        s = [self._get(x, sec) for x in n.src]
        cd = compute_dtype(n.dtype)
        if op is ExprOp.CAST:
            return self._assign("cv", self._cast(s[0], n.operand.dtype, n.dtype), sec)
        if op is ExprOp.NEG:
            return self._assign("e", f"-{s[0]}", sec)
        if op is ExprOp.NOT:
            if s[0] in ("True", "False"):
                return "False" if s[0] == "True" else "True"
            return self._assign("e", f"{s[0]} == 0", sec)
        if op is ExprOp.EXP:
            return self._assign("e", f"tl.exp({s[0]})", sec)
        if op is ExprOp.LOG:
            return self._assign("e", f"tl.log({s[0]})", sec)
        if op is ExprOp.SQRT:
            return self._assign("e", f"tl.sqrt({s[0]})", sec)
        if op is ExprOp.ABS:
            return self._assign("e", f"tl.abs({s[0]})", sec)
        if op is ExprOp.SIGMOID:
            return self._assign("e", f"tl.sigmoid({s[0]})", sec)
        if op in (ExprOp.SOFTPLUS, ExprOp.SILU, ExprOp.TANH):
            helper = {ExprOp.SOFTPLUS: "_softplus", ExprOp.SILU: "_silu", ExprOp.TANH: "_tanh"}[op]
            self.helpers.add(helper)
            return self._assign("e", f"{helper}({s[0]})", sec)
        if op in (ExprOp.ADD, ExprOp.SUB, ExprOp.MUL, ExprOp.DIV):
            return self._assign("e", f"{s[0]} {op.value} {s[1]}", sec)
        if op in (ExprOp.MAX, ExprOp.MIN):
            f = "tl.maximum" if op is ExprOp.MAX else "tl.minimum"
            nan = ", propagate_nan=tl.PropagateNan.ALL" if cd.is_float else ""
            return self._assign("e", f"{f}({s[0]}, {s[1]}{nan})", sec)
        if op is ExprOp.POW:
            return self._assign("e", self._pow(n, s), sec)
        if op in (ExprOp.LT, ExprOp.LE, ExprOp.GT, ExprOp.GE, ExprOp.EQ, ExprOp.NE):
            return self._assign("c", f"{s[0]} {op.value} {s[1]}", sec)
        if op in (ExprOp.AND, ExprOp.OR):
            return self._assign("c", f"{s[0]} {op.value} {s[1]}", sec)
        if op is ExprOp.WHERE:
            return self._assign("e", f"tl.where({s[0]}, {s[1]}, {s[2]})", sec)
        raise ValueError(f"cannot render {op} to Triton")

    def _pow(self, n: Expr, s: list[str]) -> str:
        y = n.rhs
        if y.op is ExprOp.CONST:
            v = float(y.arg)
            if v == 0.5:
                return f"tl.sqrt({s[0]})"
            if v.is_integer() and 0 <= v <= 4:
                return "1.0" if v == 0 else " * ".join([s[0]] * int(v))
            if v.is_integer() and -4 <= v < 0:
                return "1.0 / (" + " * ".join([s[0]] * int(-v)) + ")"
        self.helpers.add("_pow")
        return f"_pow({s[0]}, {s[1]})"

    def _cast(self, x: str, src: DType, dst: DType) -> str:
        if dst == DType.bool:
            return f"{x} != 0"
        if dst.is_float:
            if not src.is_float:
                return f"tl.cast({x}, {TL_DTYPE[compute_dtype(dst)]})"
            if dst.bits < compute_dtype(src).bits or dst in (DType.f16, DType.bf16):
                # round to the narrow type, keep computing in its accumulation type (as the reference does)
                out = f"{x}.to({TL_DTYPE[dst]})"
                return f"{out}.to({TL_DTYPE[compute_dtype(dst)]})" if compute_dtype(dst) != dst else out
            return f"{x}.to({TL_DTYPE[dst]})"
        return f"tl.cast({x}, {TL_DTYPE[dst]})"

    def _load(self, n: Expr, sec: Section) -> str:
        acc: Access = n.arg
        if acc.tensor in sec.registers:
            return sec.registers[acc.tensor]
        if acc.tensor not in self.tensors:
            raise ValueError(f"tensor {acc.tensor} is not readable in this kernel")
        t = self.tensors[acc.tensor]
        syms: set = set()
        for ie in acc.index:
            syms |= sympy.sympify(ie).free_symbols
        vector = self.mask_of(syms, sec)
        scalar: list[str] = []
        codes = [self.index(ie, sec) for ie in acc.index]
        if acc in self.masked:
            padded = acc.pad is not None and any(lo != 0 or hi != 0 for lo, hi in acc.pad)
            for k, ie in enumerate(acc.index):
                lo, hi = acc.padding(k)
                if padded and lo == 0 and hi == 0:
                    continue   # a zero-padded access is in bounds in its unpadded dims
                ic = codes[k]
                if not (ic.isidentifier() or ic.lstrip("-").isdigit()):
                    ic = codes[k] = self._assign("ix", ic, sec)
                terms = [f"({ic} >= 0)", f"({ic} < {t.sizes[k]})"]
                if self.is_block(sympy.sympify(ie).free_symbols, sec):
                    vector += terms
                else:
                    scalar += terms
        off = self.offset(acc.tensor, acc.index, sec, codes)
        masks = [self.combine_masks(vector, scalar)] if (vector or scalar) else []
        name = self.namer.fresh(acc.tensor)
        if masks:
            m = masks[0]
            other = "0.0" if t.dtype.is_float else ("False" if t.dtype == DType.bool else "0")
            code = f"tl.load({t.ptr} + {off}, mask={m}, other={other})"
        else:
            code = f"tl.load({t.ptr} + {off})"
        cd = compute_dtype(t.dtype)
        if cd != t.dtype:
            code += f".to({TL_DTYPE[cd]})"
        from opgen.ir import index_str

        sec.emit(f"{name} = {code}  # {acc.tensor}[{', '.join(index_str(i) for i in acc.index)}]")
        if n.dtype != t.dtype and compute_dtype(n.dtype) != cd:
            return self._assign(name + "_c", self._cast(name, t.dtype, n.dtype), sec)
        return name
