"""Tracing FlexAttention-style ``score_mod`` / ``mask_mod`` functions into IR expressions.

The mod is called once with symbolic stand-ins (:class:`Sym`) for ``score``, ``b``, ``h``, ``q_idx`` and
``kv_idx``. Python operators and the torch functions FlexAttention mods use (``torch.where``, ``torch.abs``,
``torch.minimum``, ``torch.tanh``, ...) are intercepted through ``__torch_function__``; tensors the mod captures
(ALiBi slopes, a bias table, document ids) become extra inputs of the op, indexed symbolically. A captured tensor
indexed by a captured integer tensor (``table[relative_position_index[q_idx, kv_idx], h]``) becomes a
:class:`Gather` the op computes at each call. Index
arithmetic stays sympy, so a pure index predicate comes out as one sympy boolean the compiler can reason about.
Anything else raises :class:`~opgen.ir.TraceError` naming the mod and the construct.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch

from opgen.ir import DType, Expr, ExprOp, TraceError, as_dtype, index, load
from opgen.ir.errors import UnsupportedConstruct
from opgen.ir import expr as E
from opgen.ir.symbols import Axis, Dim


@dataclass
class Tracer:
    """Collects the tensors a mod captures; one tracer per traced call of ``opgen.ops.attention``."""

    who: str
    arg: str = "score_mod"
    captures: list[torch.Tensor] = field(default_factory=list)
    capture_dims: list[tuple[Dim, ...]] = field(default_factory=list)
    gathers: list["Gather"] = field(default_factory=list)

    def fail(self, what: str) -> TraceError:
        return UnsupportedConstruct(f"{self.who}: argument '{self.arg}' uses an unsupported construct: {what}. Write mods "
                          f"with torch operators, torch.where/abs/minimum/maximum/clamp/exp/tanh/sigmoid and "
                          f"indexing of captured tensors (as for FlexAttention).")

    def capture(self, t: torch.Tensor) -> tuple[str, tuple[Dim, ...], DType]:
        for i, c in enumerate(self.captures):
            if c is t:
                return f"capture{i}", self.capture_dims[i], as_dtype(t.dtype)
        i = len(self.captures)
        self.captures.append(t)
        dims_ = tuple(Dim(f"capture{i}_{k}") for k in range(t.dim()))
        self.capture_dims.append(dims_)
        try:
            dt = as_dtype(t.dtype)
        except TypeError:
            raise self.fail(f"a captured tensor of dtype {t.dtype}") from None
        return f"capture{i}", dims_, dt

    def rank(self, name: str) -> int:
        """The rank of a captured tensor or gather by its IR name."""
        if name.startswith("gather"):
            return len(self.gathers[int(name[6:])].dims)
        return len(self.capture_dims[int(name[7:])])

    def gather(self, src: str, dim: int, idx: str, dtype: DType) -> str:
        """The name of ``src`` gathered along ``dim`` by the integer tensor ``idx`` (a :class:`Gather`, made once
        per (src, dim, idx)): its dims are ``src``'s with ``dim`` replaced by all of ``idx``'s."""
        for m, g in enumerate(self.gathers):
            if (g.src, g.dim, g.index) == (src, dim, idx):
                return f"gather{m}"
        m = len(self.gathers)
        rank = self.rank(src) - 1 + self.rank(idx)
        self.gathers.append(Gather(src, dim, idx, dtype, tuple(Dim(f"gather{m}_{k}") for k in range(rank))))
        return f"gather{m}"

    def lift(self, x: Any) -> Expr:
        """An IR expression for an operand of a traced operation."""
        if isinstance(x, Sym):
            return x.expr
        if isinstance(x, bool):
            return E.const(x)
        if isinstance(x, (int, float)):
            return E.const(x)
        if isinstance(x, sympy.Basic):
            return index(x)
        if isinstance(x, torch.Tensor):
            if x.dim() != 0:
                raise self.fail(f"a captured {x.dim()}-D tensor used without indexing (shape {tuple(x.shape)})")
            name, _, dt = self.capture(x)
            return load(name, (), dt)
        raise self.fail(f"a value of type {type(x).__name__}")


class Sym:
    """A symbolic value inside a traced mod: an index (``b``, ``h``, ``q_idx``, ``kv_idx``) or the score."""

    __slots__ = ("expr", "tracer", "extent")

    def __init__(self, expr: Expr, tracer: Tracer, extent: "Sym | None" = None) -> None:
        self.expr = expr
        self.tracer = tracer
        self.extent = extent

    def _wrap(self, e: Expr) -> "Sym":
        return Sym(e, self.tracer)

    def _bin(self, op: E.ExprOp, other: Any, reflected: bool = False) -> "Sym":
        a, b = self.expr, self.tracer.lift(other)
        return self._wrap(E.binary(op, b, a) if reflected else E.binary(op, a, b))

    def __add__(self, o): return self._bin(ExprOp.ADD, o)  # noqa: E704
    def __radd__(self, o): return self._bin(ExprOp.ADD, o, True)  # noqa: E704
    def __sub__(self, o): return self._bin(ExprOp.SUB, o)  # noqa: E704
    def __rsub__(self, o): return self._bin(ExprOp.SUB, o, True)  # noqa: E704
    def __mul__(self, o): return self._bin(ExprOp.MUL, o)  # noqa: E704
    def __rmul__(self, o): return self._bin(ExprOp.MUL, o, True)  # noqa: E704
    def __truediv__(self, o): return self._bin(ExprOp.DIV, o)  # noqa: E704
    def __rtruediv__(self, o): return self._bin(ExprOp.DIV, o, True)  # noqa: E704
    def __pow__(self, o): return self._bin(ExprOp.POW, o)  # noqa: E704
    def __lt__(self, o): return self._bin(ExprOp.LT, o)  # noqa: E704
    def __le__(self, o): return self._bin(ExprOp.LE, o)  # noqa: E704
    def __gt__(self, o): return self._bin(ExprOp.GT, o)  # noqa: E704
    def __ge__(self, o): return self._bin(ExprOp.GE, o)  # noqa: E704
    def __eq__(self, o): return self._bin(ExprOp.EQ, o)  # type: ignore[override]  # noqa: E704
    def __ne__(self, o): return self._bin(ExprOp.NE, o)  # type: ignore[override]  # noqa: E704
    def __and__(self, o): return self._bin(ExprOp.AND, o)  # noqa: E704
    def __rand__(self, o): return self._bin(ExprOp.AND, o, True)  # noqa: E704
    def __or__(self, o): return self._bin(ExprOp.OR, o)  # noqa: E704
    def __ror__(self, o): return self._bin(ExprOp.OR, o, True)  # noqa: E704
    def __neg__(self): return self._wrap(E.unary(ExprOp.NEG, self.expr))  # noqa: E704
    def __pos__(self): return self  # noqa: E704
    def __abs__(self): return self._wrap(E.absolute(self.expr))  # noqa: E704
    __hash__ = None  # type: ignore[assignment]

    def __invert__(self) -> "Sym":
        return self._wrap(E.unary(ExprOp.NOT, self.expr))

    def _intdiv(self, other: Any, mod: bool, reflected: bool = False) -> "Sym":
        a, b = self.expr, self.tracer.lift(other)
        if reflected:
            a, b = b, a
        sa, sb = _int_index(a), _int_index(b)
        if sa is not None and sb is not None:
            return self._wrap(index(sympy.Mod(sa, sb) if mod else sympy.floor(sa / sb)))
        raise self.tracer.fail(f"'{'%' if mod else '//'}' on a value that is not an index expression")

    def __floordiv__(self, o): return self._intdiv(o, False)  # noqa: E704
    def __rfloordiv__(self, o): return self._intdiv(o, False, True)  # noqa: E704
    def __mod__(self, o): return self._intdiv(o, True)  # noqa: E704
    def __rmod__(self, o): return self._intdiv(o, True, True)  # noqa: E704

    def __bool__(self) -> bool:
        raise self.tracer.fail("Python control flow (if / and / or / bool()) on a traced index or score; use "
                               "torch.where or the & | ~ operators")

    def __index__(self) -> int:
        raise self.tracer.fail("converting a traced index to a Python int")

    __int__ = __index__

    def _sympy_(self) -> sympy.Basic:
        """Lets sympy arithmetic (e.g. a symbolic sequence length minus an index) absorb integer indices."""
        si = _int_index(self.expr)
        if si is None:
            raise sympy.SympifyError(self)
        return si

    def __float__(self) -> float:
        raise self.tracer.fail("converting a traced value to a Python float")

    def __getitem__(self, item):
        raise self.tracer.fail("indexing a traced index or score")

    def __iter__(self):
        raise self.tracer.fail("iterating over a traced value")

    # tensor-like methods used in mods
    def abs(self): return self.__abs__()  # noqa: E704
    def exp(self): return self._wrap(E.exp(self.expr))  # noqa: E704
    def log(self): return self._wrap(E.log(self.expr))  # noqa: E704
    def tanh(self): return self._wrap(E.tanh(self.expr))  # noqa: E704
    def sigmoid(self): return self._wrap(E.sigmoid(self.expr))  # noqa: E704
    def sqrt(self): return self._wrap(E.sqrt(self.expr))  # noqa: E704

    def clamp(self, min=None, max=None):  # noqa: A002 (torch's names)
        return _clamp(self.tracer, self, min, max)

    def to(self, dtype=None, *a, **k):
        if isinstance(dtype, torch.dtype):
            return self._wrap(E.cast(self.expr, as_dtype(dtype)))
        return self

    def float(self): return self._wrap(E.cast(self.expr, DType.f32))  # noqa: E704

    def __repr__(self) -> str:
        return f"Sym({self.expr})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = next(a.tracer for a in _flat(args, kwargs) if isinstance(a, Sym))
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__" and isinstance(args[0], torch.Tensor):
            return _getitem(tracer, args[0], args[1])
        handler = _TORCH.get(name)
        if handler is None:
            raise tracer.fail(f"torch function {name}")
        return handler(tracer, *args, **kwargs)


def _int_index(e: Expr) -> sympy.Expr | None:
    """The sympy integer of an index leaf or integer constant, else None."""
    if e.op is ExprOp.INDEX and e.dtype.is_int:
        return e.arg
    if e.op is ExprOp.CONST and e.dtype.is_int:
        return sympy.Integer(e.arg)
    return None


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (tuple, list)):
            yield from a
        else:
            yield a


def _getitem(tracer: Tracer, t: torch.Tensor, item) -> Sym:
    """``t[item]``: a load of the captured tensor at index expressions; an index that is itself a load of a captured
    integer tensor (Swin's ``table[relative_position_index[q_idx, kv_idx], h]``) makes a :class:`Gather` of ``t``
    by that tensor, loaded at the integer tensor's own index expressions."""
    items = item if isinstance(item, tuple) else (item,)
    if len(items) != t.dim():
        raise tracer.fail(f"indexing a captured {t.dim()}-D tensor of shape {tuple(t.shape)} with {len(items)} "
                          f"indices (index every dimension)")
    lifted = [tracer.lift(i) for i in items]
    name, _, dt = tracer.capture(t)
    idx: list[sympy.Expr] = []
    for e in lifted:
        si = _int_index(e)
        if si is None and e.op is ExprOp.LOAD and e.dtype.is_int and e.arg.pad is None \
                and e.arg.tensor.startswith(("capture", "gather")):
            name = tracer.gather(name, len(idx), e.arg.tensor, dt)
            idx.extend(e.arg.index)
            continue
        if si is None:
            raise tracer.fail("indexing a captured tensor with a data-dependent value (only index arithmetic on "
                              "b, h, q_idx, kv_idx, or a captured integer tensor indexed by it, is supported)")
        idx.append(si)
    return Sym(load(name, idx, dt), tracer)


def _binop(op: ExprOp, reflected: bool = False):
    def f(tracer: Tracer, a, b, *rest, **kw):
        if rest or kw:
            raise tracer.fail(f"extra arguments to {op.value}")
        ea, eb = tracer.lift(a), tracer.lift(b)
        return Sym(E.binary(op, eb, ea) if reflected else E.binary(op, ea, eb), tracer)
    return f


def _unop(fn: Callable[[Expr], Expr]):
    def f(tracer: Tracer, a, *rest, **kw):
        if rest or kw:
            raise tracer.fail("extra arguments to a unary function")
        return Sym(fn(tracer.lift(a)), tracer)
    return f


def _where(tracer: Tracer, cond, a=None, b=None):
    if a is None or b is None:
        raise tracer.fail("torch.where with one argument (nonzero)")
    return Sym(E.where(tracer.lift(cond), tracer.lift(a), tracer.lift(b)), tracer)


def _clamp(tracer: Tracer, x, min=None, max=None):  # noqa: A002
    e = tracer.lift(x)
    if min is not None:
        e = E.maximum(e, tracer.lift(min))
    if max is not None:
        e = E.minimum(e, tracer.lift(max))
    return Sym(e, tracer)


def _full_like_scalar(tracer: Tracer, *a, **k):
    raise tracer.fail("creating tensors inside a mod (torch.full_like / zeros_like / ones_like)")


_TORCH: dict[str, Callable] = {
    "where": _where, "abs": _unop(E.absolute), "exp": _unop(E.exp), "log": _unop(E.log), "tanh": _unop(E.tanh),
    "sigmoid": _unop(E.sigmoid), "sqrt": _unop(E.sqrt), "neg": _unop(lambda e: E.unary(ExprOp.NEG, e)),
    "logical_not": _unop(lambda e: E.unary(ExprOp.NOT, e)), "bitwise_not": _unop(lambda e: E.unary(ExprOp.NOT, e)),
    "minimum": _binop(ExprOp.MIN), "maximum": _binop(ExprOp.MAX), "clamp": _clamp,
    "logical_and": _binop(ExprOp.AND), "logical_or": _binop(ExprOp.OR),
    "full_like": _full_like_scalar, "zeros_like": _full_like_scalar, "ones_like": _full_like_scalar,
}
for _names, _op in ((("add", "__add__"), ExprOp.ADD), (("sub", "__sub__"), ExprOp.SUB),
                    (("mul", "__mul__"), ExprOp.MUL), (("div", "__truediv__", "true_divide"), ExprOp.DIV),
                    (("lt", "__lt__"), ExprOp.LT), (("le", "__le__"), ExprOp.LE), (("gt", "__gt__"), ExprOp.GT),
                    (("ge", "__ge__"), ExprOp.GE), (("eq", "__eq__"), ExprOp.EQ), (("ne", "__ne__"), ExprOp.NE),
                    (("__and__", "bitwise_and"), ExprOp.AND), (("__or__", "bitwise_or"), ExprOp.OR),
                    (("pow", "__pow__"), ExprOp.POW)):
    for _n in _names:
        _TORCH[_n] = _binop(_op)
for _n, _op in (("__radd__", ExprOp.ADD), ("__rsub__", ExprOp.SUB), ("rsub", ExprOp.SUB), ("__rmul__", ExprOp.MUL),
                ("__rtruediv__", ExprOp.DIV), ("__rand__", ExprOp.AND), ("__ror__", ExprOp.OR)):
    _TORCH[_n] = _binop(_op, reflected=True)


@dataclass(frozen=True)
class Gather:
    """``gather{m}``: the tensor ``src`` (a captured tensor or an earlier gather, by IR name) indexed along ``dim``
    by the integer tensor ``index``, i.e. ``src[:, ..., index, ...]`` with ``dim`` leading slices: dims
    ``src.dims[:dim] + index.dims + src.dims[dim + 1:]``, dtype ``src``'s. Computed from the captured tensors at
    each call (so it follows in-place updates, and torch differentiates it into its source)."""

    src: str
    dim: int
    index: str
    dtype: DType
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class TracedMods:
    """The traced score expression, mask predicate (None: no mask) and captured tensors, in capture order, and
    the gathers (:class:`Gather`) the expressions read as ``gather{m}``."""

    score: Expr
    mask: Expr | None
    captures: tuple[torch.Tensor, ...]
    capture_dims: tuple[tuple[Dim, ...], ...]
    gathers: tuple[Gather, ...] = ()


def trace_mods(who: str, score_mod: Callable | None, mask_mod: Callable | None, score: Expr,
               axes: tuple[Axis, Axis, Axis, Axis], extents: tuple[sympy.Expr, ...]) -> TracedMods:
    """Trace both mods over the axes ``(b, h, q_idx, kv_idx)``; ``score`` is the expression of the raw score."""
    tracer = Tracer(who)

    def idx(k: int) -> Sym:
        return Sym(index(axes[k]), tracer, Sym(index(extents[k]), tracer))

    out_score = score
    if score_mod is not None:
        tracer.arg = "score_mod"
        if not callable(score_mod):
            raise TraceError(f"{who}: argument 'score_mod' expected a callable (score, b, h, q_idx, kv_idx), got "
                             f"{type(score_mod).__name__}")
        res = _call(tracer, score_mod, (Sym(score, tracer), idx(0), idx(1), idx(2), idx(3)))
        e = tracer.lift(res)
        if e.dtype == DType.bool:
            raise tracer.fail("a score_mod returning a boolean (did you mean mask_mod?)")
        out_score = E.cast(e, DType.f32) if not e.dtype.is_float else e
    mask = None
    if mask_mod is not None:
        tracer.arg = "mask_mod"
        if not callable(mask_mod):
            raise TraceError(f"{who}: argument 'mask_mod' expected a callable (b, h, q_idx, kv_idx), got "
                             f"{type(mask_mod).__name__}")
        res = _call(tracer, mask_mod, (idx(0), idx(1), idx(2), idx(3)))
        mask = tracer.lift(res)
        if mask.dtype != DType.bool:
            raise tracer.fail(f"a mask_mod returning {mask.dtype} instead of a boolean")
    return TracedMods(out_score, mask, tuple(tracer.captures), tuple(tracer.capture_dims), tuple(tracer.gathers))


def _call(tracer: Tracer, fn: Callable, args: tuple) -> Any:
    try:
        return fn(*args)
    except TraceError:
        raise
    except Exception as exc:  # the user's function failed on symbolic inputs: say which and why
        raise tracer.fail(f"{type(exc).__name__}: {exc}") from exc


NEG_INF = -math.inf
