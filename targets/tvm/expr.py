"""Rendering opgen expressions to TVMScript source text (no tvm import: this module only writes strings).

Two pieces:

* :class:`IndexRenderer` prints a sympy index expression or predicate as a TVMScript integer / boolean
  expression: ``floor(a/b)`` -> ``T.floordiv``, ``Mod`` -> ``T.floormod``, ``Piecewise``/``ITE`` ->
  ``T.if_then_else``, ``Min``/``Max`` -> ``T.min``/``T.max``, relations, ``T.And``/``T.Or``/``T.Not``.
* :class:`ExprEmitter` lowers an :class:`~opgen.ir.Expr` DAG to statements placed in a tree of :class:`Scope`
  objects (one per loop level of the kernel). Every node is emitted once per scope chain, in the outermost scope
  whose loops define all the axes it depends on, so state-invariant work (``softplus(delta)`` in Mamba) is
  hoisted out of the state loops and loop-invariant work out of the step loop; product chains are reordered so
  that outer-level factors are multiplied first. :func:`render_value` is the one-scope shortcut.

Values are computed in the accumulation dtype (f32 for f16/bf16/f32, f64 for f64) with dtype-exact constants.
For float32, exp/sigmoid/softplus/silu/tanh use a polynomial exp (Cephes range reduction) and softplus a
polynomial log, instead of ``T.exp``/``T.log``, which LLVM turns into one libm call per vector lane (10x slower
in vector code). float64 uses the exact ``T.exp``/``T.log1p`` and libm ``tanh``. softplus follows torch
(``x`` above 20). Loads of padded accesses read 0 outside their tensor (``T.if_then_else`` on clamped indices).

TVM 0.27 traps that shape the emitted code (verified):

* ``x = expr`` in TVMScript is a mutable 1-element *local buffer*; inside ``T.vectorized`` the vectorizer
  miscompiles it (every lane gets the last lane's value). ``x: T.let = expr`` is an immutable binding that
  vectorizes correctly, but the simplifier substitutes pure let values into their uses, and nested polynomial
  exps then grow exponentially (one selective-scan kernel took 250 s to compile). So values are stored in
  memory: scalar ones as ``x = expr`` outside vectorized loops, vector ones in ``V``-element ``local`` buffers
  (``vt[v] = expr``); LLVM's mem2reg/SROA turns both into registers.
* a ``bool`` local buffer does not survive vectorization (a ``Not`` check fails): vector booleans are ``int8``.
* ``x != x`` is simplified to false and ``T.isnan`` is not vectorized: NaN tests compare the bits. ``T.tanh`` is lowered through exp (relative
  error ~1e-9 in float64): the exact path calls libm.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

import sympy

from opgen.ir import Access, DType, Expr, ExprOp, accum_dtype
from opgen.ir.symbols import Axis

_SIMPLE = re.compile(r"[A-Za-z_]\w*(\[(v|tt|tt, v)\])?")

TVM_DTYPE = {DType.bool: "bool", DType.i32: "int32", DType.i64: "int64", DType.f16: "float16",
             DType.bf16: "bfloat16", DType.f32: "float32", DType.f64: "float64"}


def tvm_dtype(d: DType) -> str:
    """The TVM dtype name of an IR dtype."""
    return TVM_DTYPE[d]


def compute_dtype(d: DType) -> DType:
    """The dtype an IR value of dtype ``d`` is computed in (floats widen to their accumulation dtype)."""
    return accum_dtype(d) if d.is_float else d


def const_text(value, dtype: str) -> str:
    """A dtype-exact TVMScript constant."""
    if dtype == "bool":
        return f"T.bool({bool(value)})"
    if dtype.startswith("float") or dtype == "bfloat16":
        v = float(value)
        if math.isnan(v):
            return f'T.{dtype}("nan")'
        if math.isinf(v):
            return f'T.{dtype}("{"inf" if v > 0 else "-inf"}")'
        return f"T.{dtype}({v!r})"
    return f"T.{dtype}({int(value)})"


# ------------------------------------------------------------------------------------------- index expressions


class IndexRenderer:
    """Print sympy integer expressions and predicates as TVMScript.

    ``symbols`` maps every sympy symbol that may occur (axes, dims) to the text that stands for it.
    ``index_dtype`` is ``"int32"`` or ``"int64"``: integer literals are written in that dtype.
    """

    def __init__(self, symbols: Mapping[sympy.Symbol, str], index_dtype: str = "int32") -> None:
        self.symbols = dict(symbols)
        self.index_dtype = index_dtype

    def with_symbols(self, extra: Mapping[sympy.Symbol, str]) -> "IndexRenderer":
        return IndexRenderer({**self.symbols, **extra}, self.index_dtype)

    def int_literal(self, v: int) -> str:
        return str(int(v)) if self.index_dtype == "int32" and -2**31 <= v < 2**31 else f"T.{self.index_dtype}({int(v)})"

    def __call__(self, e: sympy.Basic) -> str:
        return self.render(sympy.sympify(e))

    def render(self, e: sympy.Basic) -> str:
        r = self.render
        if e is sympy.true or e is True:
            return "T.bool(True)"
        if e is sympy.false or e is False:
            return "T.bool(False)"
        if isinstance(e, sympy.Integer) or (e.is_Number and e.is_integer):
            return self.int_literal(int(e))
        if e.is_Symbol:
            try:
                return self.symbols[e]
            except KeyError:
                raise KeyError(f"index symbol {e} has no TVMScript name") from None
        if e.is_Rational:
            raise ValueError(f"index expression {e} is not an integer")
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den == 1:
                return r(num)
            return f"T.floordiv({r(num)}, {r(den)})"
        if isinstance(e, sympy.ceiling):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den == 1:
                return r(num)
            return f"(0 - T.floordiv({r(-num)}, {r(den)}))"
        if e.is_Add:
            terms = [r(t) for t in e.as_ordered_terms()]
            return "(" + " + ".join(terms) + ")"
        if e.is_Mul:
            num, den = sympy.fraction(e)
            if den != 1:
                # an exact quotient of sizes (a derived dim such as D / G): integer by construction
                return f"T.floordiv({r(num)}, {r(den)})"
            return "(" + " * ".join(r(t) for t in e.args) + ")"
        if e.is_Pow:
            base, ex = e.args
            if not ex.is_Integer or ex < 0:
                raise ValueError(f"unsupported power in index expression {e}")
            if int(ex) == 0:
                return self.int_literal(1)
            return "(" + " * ".join([r(base)] * int(ex)) + ")"
        if isinstance(e, sympy.Mod):
            a, m = e.args
            return f"T.floormod({r(a)}, {r(m)})"
        if isinstance(e, sympy.Abs):
            return f"T.abs({r(e.args[0])})"
        if isinstance(e, (sympy.Min, sympy.Max)):
            f = "T.min" if isinstance(e, sympy.Min) else "T.max"
            args = [r(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = f"{f}({out}, {a})"
            return out
        if isinstance(e, sympy.Piecewise):
            out = None
            for val, cond in reversed(e.args):
                if out is None:
                    out = r(val)
                    continue
                out = f"T.if_then_else({r(cond)}, {r(val)}, {out})"
            return out
        if isinstance(e, sympy.ITE):
            c, a, b = e.args
            return f"T.if_then_else({r(c)}, {r(a)}, {r(b)})"
        if isinstance(e, sympy.core.relational.Relational):
            op = _REL[type(e)]
            return f"({r(e.lhs)} {op} {r(e.rhs)})"
        if isinstance(e, (sympy.And, sympy.Or)):
            f = "T.And" if isinstance(e, sympy.And) else "T.Or"
            args = [r(a) for a in sorted(e.args, key=str)]
            out = args[0]
            for a in args[1:]:
                out = f"{f}({out}, {a})"
            return out
        if isinstance(e, sympy.Not):
            return f"T.Not({r(e.args[0])})"
        if isinstance(e, sympy.Xor):
            a, b = (r(x) for x in e.args)
            return f"({a} != {b})"
        raise ValueError(f"unsupported index expression {e} ({type(e).__name__})")


_REL = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
        sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!="}


# ----------------------------------------------------------------------------------------------------- scopes


@dataclass(eq=False)
class Scope:
    """One loop level of a kernel: the axes its loops define, and the statements emitted into it.

    ``lets`` are scalar statements placed at the top of the level; ``vlines`` (vector mode) go into one
    ``for v in T.vectorized(V)`` loop at the top of the level (for a leaf, the same loop also holds the
    level's own statements).
    """

    name: str
    parent: "Scope | None" = None
    axes: tuple[Axis, ...] = ()
    leaf: bool = False
    tile: int = 0                      # > 0: values bound here are stored per step of a time tile ([tt] / [tt, v])
    lets: list[str] = field(default_factory=list)
    vlines: list[str] = field(default_factory=list)
    memo: dict = field(default_factory=dict)

    def child(self, name: str, axes: tuple[Axis, ...] = (), leaf: bool = False) -> "Scope":
        return Scope(name, self, tuple(axes), leaf)

    def chain(self) -> list["Scope"]:
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out[::-1]


@dataclass(frozen=True)
class Ref:
    """How emitted code refers to a value: its text and whether it is a vector (per-lane) value."""

    text: str
    vector: bool = False


@dataclass(frozen=True)
class LoadOverride:
    """A load served by the kernel itself (state register, accumulator, staged tile) instead of memory.

    ``pinned`` loads belong to the scope where they are consumed (their value changes inside it, as the state
    during the update); others are placed like any node, by ``axes``.
    """

    text: str
    vector: bool
    pinned: bool
    axes: frozenset = frozenset()


LoadHook = Callable[[Access], "LoadOverride | None"]


# ------------------------------------------------------------------------------------------------ the emitter


class ExprEmitter:
    """Lower :class:`Expr` DAGs into let statements placed in :class:`Scope` trees.

    buffers: tensor name -> TVMScript buffer name; shapes: tensor name -> sympy shape (for masked loads);
    index: the :class:`IndexRenderer` (axes and dims -> text; in vector mode the vector axis renders as
    ``(base + v)``); masked: accesses that may fall outside their tensor and read 0 there; vector_axis /
    vector_len: the lane axis computed ``vector_len`` at a time (None / 1: scalar code); alloc(dtype, shape):
    callback that declares a ``local`` buffer and returns its name; load_hook: overrides for loads the kernel
    serves itself. dtypes: tensor name -> storage DType.

    A scope with ``tile = TT`` (the per-step scope of a vector kernel) stores each value in a ``[TT, V]``
    (``[TT]`` for scalars) buffer indexed by the step-in-tile ``tt``: the kernel computes the whole tile's
    step-level values in a loop before the recurrence (``softplus(delta)`` for 16 steps at once, independent
    work that pipelines), and the recurrence reads them.
    """

    def __init__(self, *, buffers: Mapping[str, str], shapes: Mapping[str, tuple], dtypes: Mapping[str, DType],
                 index: IndexRenderer, masked: Collection[Access] = (), fast_math: bool = True,
                 vector_axis: Axis | None = None, vector_len: int = 1,
                 alloc: Callable[[str, tuple], str] | None = None, load_hook: LoadHook | None = None) -> None:
        self.buffers = dict(buffers)
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes)
        self.index = index
        self.masked = set(masked)
        self.fast_math = fast_math
        self.vector_axis = vector_axis
        self.vector_len = vector_len
        self.alloc = alloc
        self.load_hook = load_hook or (lambda acc: None)
        self._n = 0

    # names ------------------------------------------------------------------------------------------------
    def fresh(self, prefix: str = "x") -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    # loads ------------------------------------------------------------------------------------------------
    def load_text(self, acc: Access, index: IndexRenderer | None = None) -> str:
        """``buf[i, j]`` in the tensor's storage dtype; masked accesses read 0 outside the tensor."""
        ir = index or self.index
        buf = self.buffers[acc.tensor]
        idx = [ir(i) for i in acc.index]
        if acc not in self.masked:
            return f"{buf}[{', '.join(idx)}]"
        shape = [ir(s) for s in self.shapes[acc.tensor]]
        conds, clamped = [], []
        for i, s in zip(idx, shape):
            conds += [f"({i} >= 0)", f"({i} < {s})"]
            clamped.append(f"T.max(T.min({i}, {s} - 1), 0)")
        cond = conds[0]
        for c in conds[1:]:
            cond = f"T.And({cond}, {c})"
        zero = const_text(0, tvm_dtype(self.dtypes[acc.tensor]))
        return f"T.if_then_else({cond}, {buf}[{', '.join(clamped)}], {zero})"

    def access_axes(self, acc: Access) -> frozenset:
        out = set()
        for i in acc.index:
            out |= {s for s in sympy.sympify(i).free_symbols if isinstance(s, Axis)}
        if acc in self.masked:
            for s in self.shapes[acc.tensor]:
                out |= {x for x in sympy.sympify(s).free_symbols if isinstance(x, Axis)}
        return frozenset(out)

    # emission ---------------------------------------------------------------------------------------------
    def emit(self, e: Expr, leaf: Scope) -> Ref:
        """Emit ``e`` for use in ``leaf`` (its value is valid there; in vector mode, inside the leaf's vector loop)."""
        chain = leaf.chain()
        cum: list[frozenset] = []
        acc_axes: set = set()
        for s in chain:
            acc_axes |= set(s.axes)
            cum.append(frozenset(acc_axes))
        e = self._reassociate(e, cum)
        info: dict[Expr, tuple[int, Ref]] = {}
        for n in e.walk():
            info[n] = self._node(n, chain, cum, info)
        return info[e][1]

    def _static_level(self, n: Expr, cum: list[frozenset], memo: dict) -> int:
        """The loop level a node will be placed at (as :meth:`_node` decides), without emitting it."""
        if n in memo:
            return memo[n]
        if n.op is ExprOp.CONST:
            lvl = 0
        elif n.op is ExprOp.LOAD:
            ov = self.load_hook(n.arg)
            if ov is not None and ov.pinned:
                lvl = len(cum) - 1
            else:
                lvl = self._level_for_axes(frozenset(ov.axes) if ov is not None else self.access_axes(n.arg), cum)
        elif n.op is ExprOp.INDEX:
            lvl = self._level_for_axes(frozenset(s for s in n.arg.free_symbols if isinstance(s, Axis)), cum)
        else:
            lvl = max((self._static_level(c, cum, memo) for c in n.src), default=0)
        memo[n] = lvl
        return lvl

    def _reassociate(self, e: Expr, cum: list[frozenset]) -> Expr:
        """Reorder float product chains so that factors of outer loop levels are multiplied first: in
        ``dt * B[n] * u`` the product ``dt * u`` is then computed once per step, not once per state element
        (a rounding-level change)."""
        levels: dict = {}
        memo: dict[Expr, Expr] = {}
        for n in e.walk():
            if n.src:
                src = tuple(memo[c] for c in n.src)
                n2 = n if src == n.src else Expr(n.op, n.dtype, src, n.arg)
            else:
                n2 = n
            if n2.op is ExprOp.MUL and n2.dtype.is_float:
                factors: list[Expr] = []
                stack = [n2]
                while stack:
                    x = stack.pop()
                    if x.op is ExprOp.MUL and x.dtype == n2.dtype:
                        stack.extend(reversed(x.src))
                    else:
                        factors.append(x)
                if len(factors) > 2:
                    lv = [self._static_level(f, cum, levels) for f in factors]
                    order = sorted(range(len(factors)), key=lambda i: lv[i])
                    if order != sorted(order) or lv != sorted(lv):
                        prod = factors[order[0]]
                        for i in order[1:]:
                            prod = Expr(ExprOp.MUL, n2.dtype, (prod, factors[i]))
                        n2 = prod
            memo[n] = n2
        return memo[e]

    def _level_for_axes(self, axes: frozenset, cum: list[frozenset]) -> int:
        for k, c in enumerate(cum):
            if axes <= c:
                return k
        raise ValueError(f"axes {sorted(map(str, axes))} are not defined by the loop levels "
                         f"{[sorted(map(str, c)) for c in cum]}")

    def _node(self, n: Expr, chain: list[Scope], cum: list[frozenset], info) -> tuple[int, Ref]:
        for k, s in enumerate(chain):
            if n in s.memo:
                return k, s.memo[n]
        op = n.op
        if op is ExprOp.CONST:
            return 0, Ref(const_text(n.arg, tvm_dtype(compute_dtype(n.dtype))))
        leaf_level = len(chain) - 1
        if op is ExprOp.LOAD:
            ov = self.load_hook(n.arg)
            if ov is not None:
                text = self._convert(ov.text, self.dtypes.get(n.arg.tensor, n.dtype), n.dtype)
                if ov.pinned:
                    ref = Ref(text, ov.vector)
                    chain[leaf_level].memo[n] = ref
                    return leaf_level, ref
                level = self._level_for_axes(frozenset(ov.axes), cum)
                return self._bind(n, level, chain, ov.vector, lambda bind: text)
            axes = self.access_axes(n.arg)
            level = self._level_for_axes(axes, cum)
            vec = self.vector_axis is not None and self.vector_axis in axes
            text = self._convert(self.load_text(n.arg), self.dtypes[n.arg.tensor], n.dtype)
            return self._bind(n, level, chain, vec, lambda bind: text)
        if op is ExprOp.INDEX:
            sym = n.arg
            axes = frozenset(s for s in sym.free_symbols if isinstance(s, Axis))
            level = self._level_for_axes(axes, cum)
            vec = self.vector_axis is not None and self.vector_axis in axes
            text = self.index(sym)
            if n.dtype != DType.bool and self.index.index_dtype != tvm_dtype(n.dtype):
                text = f"T.Cast(\"{tvm_dtype(n.dtype)}\", {text})"
            return self._bind(n, level, chain, vec, lambda bind: text)
        if op is ExprOp.ARG:
            raise ValueError("monoid operand slots (ARG) cannot appear in a scan kernel expression")
        kids = [info[s] for s in n.src]
        level = max((k for k, _ in kids), default=0)
        vec = any(r.vector for _, r in kids)
        args = [r.text for _, r in kids]
        return self._bind(n, level, chain, vec, lambda bind: self._apply(n, args, bind))

    def _bind(self, n: Expr, level: int, chain: list[Scope], vec: bool, make) -> tuple[int, Ref]:
        """Emit the node's definition (and the temporaries of its expansion) into ``chain[level]``.

        Scalar values become TVMScript local scalars (``x = expr``); vector values (vector mode) become
        ``V``-element local buffers written in the scope's vector loop. Both are memory to TVM, so its simplifier
        never substitutes them into their uses (it does substitute pure ``T.let`` bindings, which made the
        expression trees of nested polynomial exps grow exponentially: 250 s to compile one kernel); LLVM's
        mem2reg/SROA turns them back into registers.
        """
        s = chain[level]
        vector = vec and self.vector_len > 1
        V = str(self.vector_len)
        temps: set[str] = set()

        def buffer(dtype: str, shape: tuple) -> str:
            if self.alloc is None:
                raise ValueError("vector and tiled scopes need an alloc callback")
            return self.alloc(dtype, shape)

        def bind(text: str, dtype: str, final: bool = False) -> str:
            if _SIMPLE.fullmatch(text) and not (final and s.tile and text in temps):
                return text                 # already a name or a buffer element: no copy
            store = "int8" if dtype == "bool" else dtype
            val = f"T.Cast(\"int8\", {text})" if dtype == "bool" else text
            if final and s.tile:
                if vector:
                    buf = buffer(store, (str(s.tile), V))
                    s.vlines.append(f"{buf}[tt, v] = {val}")
                    ref = f"{buf}[tt, v]"
                else:
                    buf = buffer(store, (str(s.tile),))
                    s.lets.append(f"{buf}[tt] = {val}")
                    ref = f"{buf}[tt]"
                return f"({ref} != T.int8(0))" if dtype == "bool" else ref
            if not vector:
                name = self.fresh()
                s.lets.append(f"{name} = {text}")
                temps.add(name)
                return name
            buf = buffer(store, (V,))
            s.vlines.append(f"{buf}[v] = {val}")
            temps.add(f"{buf}[v]")
            return f"({buf}[v] != T.int8(0))" if dtype == "bool" else f"{buf}[v]"

        text = make(bind)
        ref = Ref(bind(text, tvm_dtype(compute_dtype(n.dtype)), final=True), vector)
        s.memo[n] = ref
        return level, ref

    @staticmethod
    def _convert(text: str, stored: DType, want: DType) -> str:
        """A loaded value in storage dtype ``stored`` converted to the compute dtype of ``want``."""
        src, dst = tvm_dtype(stored), tvm_dtype(compute_dtype(want))
        return text if src == dst else f"T.Cast(\"{dst}\", {text})"

    # operators --------------------------------------------------------------------------------------------
    def _apply(self, n: Expr, a: list[str], bind) -> str:
        op = n.op
        dt = tvm_dtype(compute_dtype(n.dtype))
        c = lambda v: const_text(v, dt)  # noqa: E731
        fast = self.fast_math and dt == "float32"
        if op is ExprOp.NEG:
            return f"({c(0)} - {a[0]})" if dt.startswith("float") else f"(0 - {a[0]})"
        if op is ExprOp.ABS:
            return f"T.abs({a[0]})"
        if op is ExprOp.SQRT:
            return f"T.sqrt({a[0]})"
        if op is ExprOp.LOG:
            return f"T.log({a[0]})"
        if op is ExprOp.EXP:
            return self._exp(a[0], dt, fast, bind)
        if op is ExprOp.SIGMOID:
            e = self._exp(f"({c(0)} - {a[0]})", dt, fast, bind)
            return f"({c(1.0)} / ({c(1.0)} + {e}))"
        if op is ExprOp.SILU:
            e = self._exp(f"({c(0)} - {a[0]})", dt, fast, bind)
            return f"({a[0]} / ({c(1.0)} + {e}))"
        if op is ExprOp.SOFTPLUS:
            return self._softplus(a[0], dt, fast, bind)
        if op is ExprOp.TANH:
            return self._tanh(a[0], dt, fast, bind)
        if op is ExprOp.NOT:
            return f"T.Not({a[0]})"
        if op is ExprOp.CAST:
            return self._cast(n.src[0].dtype, n.dtype, a[0])
        binop = {ExprOp.ADD: "+", ExprOp.SUB: "-", ExprOp.MUL: "*", ExprOp.LT: "<", ExprOp.LE: "<=",
                 ExprOp.GT: ">", ExprOp.GE: ">=", ExprOp.EQ: "==", ExprOp.NE: "!="}
        if op in binop:
            return f"({a[0]} {binop[op]} {a[1]})"
        if op is ExprOp.DIV:
            if dt.startswith("float"):
                return f"({a[0]} / {a[1]})"
            return f"T.floordiv({a[0]}, {a[1]})"
        if op is ExprOp.MAX:
            return f"T.max({a[0]}, {a[1]})"
        if op is ExprOp.MIN:
            return f"T.min({a[0]}, {a[1]})"
        if op is ExprOp.POW:
            rhs = n.src[1]
            if rhs.op is ExprOp.CONST and float(rhs.arg) == 2.0:
                return f"({a[0]} * {a[0]})"
            if rhs.op is ExprOp.CONST and float(rhs.arg) == 1.0:
                return a[0]
            return f"T.pow({a[0]}, {a[1]})"
        if op is ExprOp.AND:
            return f"T.And({a[0]}, {a[1]})"
        if op is ExprOp.OR:
            return f"T.Or({a[0]}, {a[1]})"
        if op is ExprOp.WHERE:
            return f"T.Select({a[0]}, {a[1]}, {a[2]})"
        raise ValueError(f"cannot render expression op {op}")

    def _cast(self, src: DType, dst: DType, text: str) -> str:
        sc, dc = tvm_dtype(compute_dtype(src)), tvm_dtype(compute_dtype(dst))
        if dst == DType.bool:
            return f"({text} != {const_text(0, sc)})" if sc != "bool" else text
        if src == DType.bool:
            return f"T.Select({text}, {const_text(1, dc)}, {const_text(0, dc)})"
        if tvm_dtype(dst) != dc:   # rounding to a narrow storage type (bf16/f16), then widened again
            return f"T.Cast(\"{dc}\", T.Cast(\"{tvm_dtype(dst)}\", {text}))"
        return text if sc == dc else f"T.Cast(\"{dc}\", {text})"

    # transcendental functions ------------------------------------------------------------------------------
    def _exp(self, x: str, dt: str, fast: bool, bind) -> str:
        if not fast:
            return f"T.exp({x})"
        return fast_exp_f32(x, bind)

    def _softplus(self, x: str, dt: str, fast: bool, bind) -> str:
        """torch's softplus: ``x`` above the threshold 20, else ``log1p(exp(x))``."""
        c = lambda v: const_text(v, dt)  # noqa: E731
        if not fast:
            return f"T.Select(T.Or({x} > {c(20.0)}, {isnan_text(x, dt)}), {x}, T.log1p(T.exp(T.min({x}, {c(20.0)}))))"
        xv = bind(x, dt)
        ev = bind(fast_exp_f32(f"T.min({xv}, {c(20.0)})", bind), dt)
        u = bind(f"{c(1.0)} + {ev}", dt)
        lg = fast_log_f32(u, bind)
        # log1p(e) = log(u) * e / (u - 1) corrects the rounding of u = 1 + e (and is e itself when u == 1)
        l1p = f"T.Select({u} == {c(1.0)}, {ev}, {lg} * ({ev} / ({u} - {c(1.0)})))"
        return f"T.Select(T.Or({xv} > {c(20.0)}, {isnan_text(xv, dt)}), {xv}, {l1p})"

    def _tanh(self, x: str, dt: str, fast: bool, bind) -> str:
        if not fast:   # TVM lowers T.tanh through exp (relative error ~1e-9, worse near 0): call libm instead
            return f"T.call_pure_extern(\"{dt}\", \"{'tanhf' if dt == 'float32' else 'tanh'}\", {x})"
        c = lambda v: const_text(v, dt)  # noqa: E731
        xv = bind(x, dt)
        z = bind(f"{xv} * {xv}", dt)
        poly = c(-5.70498872745e-3)
        for k in (2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1):
            poly = f"({poly} * {z} + {c(k)})"
        small = f"({poly} * {z} * {xv} + {xv})"
        e = fast_exp_f32(f"({c(2.0)} * {xv})", bind)
        big = f"({c(1.0)} - {c(2.0)} / ({e} + {c(1.0)}))"
        return f"T.Select(T.abs({xv}) < {c(0.625)}, {small}, {big})"


# Cephes expf / logf (single precision), written as TVMScript lets so that LLVM vectorizes them.
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
EXP_HI = 88.73                 # e**88.73 > FLT_MAX: everything above overflows to inf in the last multiply
EXP_LO = -87.5                 # k = -126 here: 2**(k-1) has a zero exponent field, the result flushes to 0


def isnan_text(x: str, dtype: str) -> str:
    """A NaN test that TVM vectorizes (``T.isnan`` is scalarized inside ``T.vectorized`` loops, and ``x != x``
    is simplified to false): the magnitude bits above those of infinity."""
    if dtype == "float64":
        return (f"(T.bitwise_and(T.reinterpret(\"int64\", {x}), T.int64(9223372036854775807)) > "
                f"T.int64(9218868437227405312))")
    return f"(T.bitwise_and(T.reinterpret(\"int32\", {x}), 2147483647) > 2139095040)"


def fast_exp_f32(x: str, bind: Callable[[str, str], str]) -> str:
    """float32 ``exp(x)`` (Cephes range reduction): clamp to [-87.5, 88.73], ``k = floor(x*log2(e) + 1/2)``,
    degree-5 polynomial on ``r = x - k*ln2`` (two-constant ln2) with coefficients doubled, times ``2**(k-1)``
    built in the exponent bits. Relative error < 2e-7 in the normal range; results below ~1e-38 flush to 0, above
    3.4e38 overflow to inf (as torch). The clamp is written as selects that keep NaN (min/max would not), and NaN
    then flows through the arithmetic: no separate NaN test (it cost 9% of Mamba's scan).
    ``bind(text, dtype)`` emits a temporary and returns its reference."""
    c = lambda v: const_text(v, "float32")  # noqa: E731
    f = "float32"
    xv = bind(x, f)
    xc = bind(f"T.Select({xv} > {c(EXP_HI)}, {c(EXP_HI)}, T.Select({xv} < {c(EXP_LO)}, {c(EXP_LO)}, {xv}))", f)
    k = bind(f"T.floor({xc} * {c(1.4426950408889634)} + {c(0.5)})", f)   # T.nearbyint is not vectorized
    r = bind(f"{xc} - {k} * {c(0.693359375)} - {k} * {c(-2.12194440e-4)}", f)
    poly = c(2 * _EXP_P[0])
    for coef in _EXP_P[1:]:
        poly = f"({poly} * {r} + {c(2 * coef)})"
    return (f"(({poly} * ({r} * {r}) + ({r} + {r}) + {c(2.0)}) * "
            f"T.reinterpret(\"float32\", T.shift_left(T.Cast(\"int32\", {k}) + 126, 23)))")


def fast_log_f32(x: str, bind: Callable[[str, str], str]) -> str:
    """float32 ``log(x)`` for finite normal ``x > 0`` (Cephes logf: exponent from the bits, degree-8 polynomial)."""
    c = lambda v: const_text(v, "float32")  # noqa: E731
    f = "float32"
    bits = bind(f"T.reinterpret(\"int32\", {x})", "int32")
    e0 = bind(f"T.Cast(\"float32\", T.shift_right({bits}, 23) - 126)", f)
    m0 = bind(f"T.reinterpret(\"float32\", T.bitwise_or(T.bitwise_and({bits}, 8388607), 1056964608))", f)
    small = bind(f"{m0} < {c(0.7071067811865476)}", "bool")
    e = bind(f"T.Select({small}, {e0} - {c(1.0)}, {e0})", f)
    m = bind(f"T.Select({small}, {m0} + {m0} - {c(1.0)}, {m0} - {c(1.0)})", f)
    z = bind(f"{m} * {m}", f)
    poly = c(_LOG_P[0])
    for coef in _LOG_P[1:]:
        poly = f"({poly} * {m} + {c(coef)})"
    y = f"({poly} * {m} * {z} + {e} * {c(-2.12194440e-4)} - {c(0.5)} * {z})"
    return f"({m} + {y} + {e} * {c(0.693359375)})"


def render_value(e: Expr, buffers: Mapping[str, str], symbols: Mapping[sympy.Symbol, str], *,
                 dtypes: Mapping[str, DType], shapes: Mapping[str, tuple] | None = None,
                 masked: Collection[Access] = (), fast_math: bool = True,
                 index_dtype: str = "int32") -> tuple[list[str], str]:
    """``e`` as TVMScript: (statements defining its temporaries, the expression text of its value).

    ``buffers`` maps tensor names to buffer names, ``symbols`` axes and dims to loop-variable / size names,
    ``dtypes`` tensor names to storage dtypes; ``masked`` accesses (with ``shapes``) read 0 outside the tensor.
    The statements are scalar TVMScript (``x = ...``) to place before the use, in the same loop body.
    """
    em = ExprEmitter(buffers=buffers, shapes=shapes or {}, dtypes=dtypes, index=IndexRenderer(symbols, index_dtype),
                     masked=masked, fast_math=fast_math)
    axes = tuple(s for s in symbols if isinstance(s, Axis))
    leaf = Scope("value", None, axes, leaf=True)
    ref = em.emit(e, leaf)
    return leaf.lets, ref.text


def write_signature(c: "Code", origin: str, func_name: str, args: list[str]) -> None:
    """The first lines of every generated kernel: a ``# generated by <origin>`` comment, the TVMScript import, the
    ``@T.prim_func`` signature with ``args`` (texts such as ``h_x: T.handle``) and the no-alias attribute."""
    c.w(0, f"# generated by {origin}")
    c.w(0, "from tvm.script import tirx as T")
    c.w(0, "")
    c.w(0, "")
    c.w(0, "@T.prim_func")
    c.w(0, f"def {func_name}({', '.join(args)}):")
    c.w(1, "T.func_attr({\"tirx.noalias\": True})")


def write_func_head(c: "Code", module: str, func_name: str, params, scalars, plain, index_dtype: str,
                    render_dim: Callable, derived, static) -> None:
    """The TVMScript prelude of a kernel: imports, the ``@T.prim_func`` signature (tensor handles, then int
    scalars), symbolic dims bound by ``T.match_buffer`` (``plain``), the buffers (aligned to their element size)
    and the derived dims not in ``static`` (``render_dim`` turns a dim expression into text)."""
    args = [f"h_{t.name}: T.handle" for t in params] + [f"n_{d.name}: T.{index_dtype}" for d in scalars]
    write_signature(c, f"{module} (TVMScript, TVM 0.27)", func_name, args)
    for d in sorted(plain, key=lambda d: d.name):
        c.w(1, f"n_{d.name} = T.{index_dtype}()")
    for t in params:
        shape = ", ".join(render_dim(s) for s in t.shape)
        align = max(1, t.dtype.bits // 8)
        c.w(1, f"b_{t.name} = T.match_buffer(h_{t.name}, ({shape}{',' if len(t.shape) == 1 else ''}), "
               f"\"{tvm_dtype(t.dtype)}\", align={align})")
    for d, e in derived:
        if d not in static:
            c.w(1, f"n_{d.name}: T.let = {render_dim(e)}")


#: the storage scope of a kernel's scratch buffers. LowerTVMBuiltin keeps constant-size "global" allocations
#: under 1 KiB on the stack (an alloca in the parallel body's own frame, so per thread), while "local" ones call
#: TVMBackendAllocWorkspace / FreeWorkspace on every entry: per lane of a parallel scan loop that cost ~40% of
#: linear_scan in cache (64 x 512 fp32: 0.71 -> 0.55 ns per element).
SCRATCH_SCOPE = "global"


def tree_sum(terms: list[str]) -> str:
    """The TVMScript sum of ``terms`` as a balanced tree (independent adds, not a dependent chain)."""
    while len(terms) > 1:
        terms = [f"({terms[i]} + {terms[i + 1]})" if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def scratch_buffer(name: str, shape: str, dtype: str) -> str:
    """The TVMScript line declaring a per-iteration scratch buffer ``name`` of ``shape`` (text such as
    ``(4, 16)``) and TVM dtype ``dtype`` (see :data:`SCRATCH_SCOPE`)."""
    return f"{name} = T.alloc_buffer({shape}, \"{dtype}\", scope=\"{SCRATCH_SCOPE}\")"


@dataclass
class Code:
    """Lines of generated TVMScript, indented four spaces per depth (shared by every kernel renderer)."""

    lines: list[str] = field(default_factory=list)

    def w(self, depth: int, text: str) -> None:
        """Append ``text`` at ``depth``."""
        self.lines.append("    " * depth + text)

    def block(self, depth: int, lines: list[str]) -> None:
        """Append each of ``lines`` at ``depth``."""
        for ln in lines:
            self.w(depth, ln)
