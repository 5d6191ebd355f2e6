"""The declaration front end: build an :class:`~opgen.ir.op.Op` the way the math reads.

Two equivalent styles::

    @opgen.op
    def selective_scan(u: F32["B D L"], delta: F32["B D L"], A: F32["D N"], Bm: F32["B N L"], C: F32["B N L"]):
        b, d, n, t = opgen.axes("b d n t")
        h = opgen.scan(t, a=opgen.exp(delta[b, d, t] * A[d, n]), b=delta[b, d, t] * Bm[b, n, t] * u[b, d, t])
        return opgen.sum(n, h[b, d, n, t] * C[b, n, t])

    with OpBuilder("my_op") as bld:      # explicit builder, used by the op library
        x = bld.input("x", (B, L), DType.f32)
        ...
        op = bld.build(outputs={"y": y})

Inside a ``with`` block (or an ``@op`` body) the module-level functions (:func:`scan`, :func:`sum`, ...) add
nodes to the active builder. Results are :class:`TensorRef` handles: index them to read.
"""
from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import sympy

from .dtypes import DType, accum_dtype, as_dtype, promote
from .errors import IRError
from .names import check_qualname
from .expr import Access, Expr, ExprLike, ExprOp, as_expr, load
from .nodes import MAX, MIN, PROD, SUM, Affine, Associative, Map, Monoid, Reduce, Scan, TensorParam
from .op import Op
from .symbols import Axis, Dim, make_axes
from .traversal import Traversal, row_major
from .verify import infer_extents, verify_structure

_ACTIVE: contextvars.ContextVar["OpBuilder | None"] = contextvars.ContextVar("opgen_builder", default=None)


@dataclass(frozen=True)
class TensorRef:
    """A handle to a tensor of the op under construction; ``ref[i, j]`` is a load, ``ref.pad(...)`` pads."""

    name: str
    rank: int
    dtype: DType
    pad_widths: tuple[tuple[Any, Any], ...] | None = None

    def __getitem__(self, idx) -> Expr:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) != self.rank:
            raise IRError(f"{self.name} has rank {self.rank} but is indexed with {len(idx)} indices {idx}")
        return load(self.name, [_index_of(i, self.name) for i in idx], self.dtype, self.pad_widths)

    def pad(self, *widths) -> "TensorRef":
        """Zero padding: one ``(lo, hi)`` pair (or a single int for both) per dim; reads in the halo give 0."""
        if len(widths) != self.rank:
            raise IRError(f"{self.name}.pad() needs {self.rank} (lo, hi) pairs, got {len(widths)}")
        pairs = tuple((w, w) if not isinstance(w, (tuple, list)) else tuple(w) for w in widths)
        return TensorRef(self.name, self.rank, self.dtype, pairs)


def _index_of(i, tensor: str) -> sympy.Expr:
    if isinstance(i, Expr):
        if i.op is ExprOp.INDEX and i.dtype.is_int:
            return i.arg
        raise IRError(f"index of {tensor} must be an integer index expression over axes and dims, got value {i}")
    if isinstance(i, (int, sympy.Basic)):
        return sympy.sympify(i)
    raise IRError(f"index of {tensor} must be an axis expression or an int, got {type(i).__name__} {i!r}")


def _first_axes(exprs: Sequence[Expr | None]) -> list[Axis]:
    """Axes in order of first appearance (depth-first, left to right)."""
    out: list[Axis] = []

    def add(e: sympy.Basic) -> None:
        for s in sorted((s for s in e.free_symbols if isinstance(s, Axis)), key=str):
            if s not in out:
                out.append(s)

    def visit(e: Expr) -> None:
        if e.op is ExprOp.LOAD:
            for i in e.arg.index:
                add(i)
        elif e.op is ExprOp.INDEX:
            add(e.arg)
        for s in e.src:
            visit(s)

    for e in exprs:
        if e is not None:
            visit(e)
    return out


def _axes_tuple(x) -> tuple[Axis, ...]:
    t = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    for a in t:
        if not isinstance(a, Axis):
            raise IRError(f"expected an axis (from opgen.axes), got {type(a).__name__} {a!r}")
    return t


class OpBuilder:
    """Collects tensors and nodes of one op; :meth:`build` infers extents, verifies and returns the :class:`Op`."""

    def __init__(self, name: str, attrs: Mapping[str, Any] | None = None) -> None:
        self.name = check_qualname("op", name)
        self.attrs = tuple(sorted((attrs or {}).items()))
        self._inputs: list[TensorParam] = []
        self._nodes: list = []
        self._dtypes: dict[str, DType] = {}
        self._out_dtypes: dict[str, DType] = {}
        self._declared: dict[Axis, sympy.Expr] = {}
        self._derived: list[tuple[Dim, sympy.Expr]] = []
        self._constraints: list[tuple[sympy.Basic, str]] = []
        self._names: set[str] = set()
        self._token: contextvars.Token | None = None

    # context --------------------------------------------------------------------------------------------
    def __enter__(self) -> "OpBuilder":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    # declarations ---------------------------------------------------------------------------------------
    def _fresh(self, name: str | None, prefix: str) -> str:
        if name is None:
            i = 0
            while f"{prefix}{i}" in self._names:
                i += 1
            name = f"{prefix}{i}"
        if not name.isidentifier():
            raise IRError(f"op {self.name}: tensor name {name!r} is not an identifier")
        if name in self._names:
            raise IRError(f"op {self.name}: tensor name {name!r} is used twice")
        self._names.add(name)
        return name

    def input(self, name: str, shape: Sequence[Any], dtype: DType | str, lookup: bool = False) -> TensorRef:
        """Declare an input tensor of symbolic ``shape`` (dims, ints or expressions of dims).

        ``lookup=True`` marks a table read at computed positions (a bias table, ALiBi slopes): its sizes do not
        define axis extents, and its accesses are checked against its bounds when sizes are bound.
        """
        name = self._fresh(name, "in")
        shp = tuple(sympy.sympify(s) for s in shape)
        for s in shp:
            if any(isinstance(x, Axis) for x in s.free_symbols):
                raise IRError(f"op {self.name}: shape of {name} uses an axis ({s}); shapes use dims")
        dt = as_dtype(dtype)
        self._inputs.append(TensorParam(name, shp, dt, "input", lookup))
        self._dtypes[name] = dt
        return TensorRef(name, len(shp), dt)

    def axis(self, name: str, extent: Any = None) -> Axis:
        """An axis, optionally with an explicit extent (otherwise inferred)."""
        a = make_axes(name)
        if extent is not None:
            self._declared[a] = sympy.sympify(extent)
        return a

    def derive(self, dim: Dim, expr: Any) -> Dim:
        """Define ``dim`` from other dims (e.g. ``Dg = D / G``); binding checks it is a positive integer."""
        self._derived.append((dim, sympy.sympify(expr)))
        return dim

    def require(self, rel: sympy.Basic, message: str) -> None:
        """A constraint on dims checked when sizes are bound (e.g. ``Lk <= L``)."""
        self._constraints.append((sympy.sympify(rel), message))

    # compute nodes --------------------------------------------------------------------------------------
    def _add(self, node, value_dtype: DType, dtype: DType | str | None) -> TensorRef:
        """Record ``node``. Reads of its result see the accumulation dtype (intermediates stay f32 for bf16
        inputs); as an output it is stored as ``dtype`` or, by default, the value's dtype."""
        self._nodes.append(node)
        self._dtypes[node.out] = as_dtype(dtype) if dtype is not None else value_dtype
        if dtype is not None:
            self._out_dtypes[node.out] = as_dtype(dtype)
        read = as_dtype(dtype) if dtype is not None else accum_dtype(value_dtype)
        return TensorRef(node.out, len(node.axes), read)

    def map(self, value: ExprLike, axes: Sequence[Axis] | None = None, *, name: str | None = None,
            dtype: DType | str | None = None) -> TensorRef:
        """``out[axes] = value`` (axes default to the value's axes in order of appearance)."""
        v = as_expr(value)
        ax = _axes_tuple(axes) if axes is not None else tuple(_first_axes([v]))
        return self._add(Map(self._fresh(name, "t"), ax, v), v.dtype, dtype)

    def reduce(self, over, value: ExprLike, *, monoid: Monoid = SUM, where: ExprLike | None = None,
               axes: Sequence[Axis] | None = None, name: str | None = None,
               dtype: DType | str | None = None) -> TensorRef:
        """Reduce ``value`` over the axes ``over`` with ``monoid`` where the predicate ``where`` holds."""
        v = as_expr(value)
        pred = as_expr(where) if where is not None else None
        raxes = _axes_tuple(over)
        ax = _axes_tuple(axes) if axes is not None else tuple(a for a in _first_axes([v, pred]) if a not in raxes)
        node = Reduce(self._fresh(name, "t"), ax, raxes, v, monoid, pred)
        return self._add(node, v.dtype, dtype)

    def scan(self, over, *, a: ExprLike | None = None, b: ExprLike | None = None, combine: Monoid | None = None,
             value: ExprLike | None = None, init: ExprLike | None = None, reverse: bool = False,
             traversal: Traversal | None = None, state: Sequence[Axis] = (), axes: Sequence[Axis] | None = None,
             name: str | None = None, dtype: DType | str | None = None) -> TensorRef:
        """A recurrence over ``over`` (one axis, or the grid axes a ``traversal`` visits).

        Affine form: ``h = a * h[prev] + b`` (``a`` defaults to 1). General form: ``combine`` (a monoid) with
        ``value``: ``h = combine(h[prev], value)``. ``reverse`` runs backwards; ``traversal`` gives any other order.
        """
        scan_axes = _axes_tuple(over)
        if combine is None:
            if b is None:
                raise IRError(f"op {self.name}: scan needs b= (affine form) or combine= and value=")
            eb = as_expr(b)
            ea = as_expr(a if a is not None else 1.0, eb.dtype)
            comb = Affine(ea, eb)
            exprs = [eb, ea]
            vdt = promote(ea.dtype, eb.dtype)
        else:
            if value is None or a is not None or b is not None:
                raise IRError(f"op {self.name}: a general scan takes combine= and value= (not a=/b=)")
            ev = as_expr(value)
            comb = Associative(combine, ev)
            exprs = [ev]
            vdt = ev.dtype
        ei = as_expr(init, vdt) if init is not None else None
        if axes is None:
            lanes = [x for x in _first_axes(exprs + [ei]) if x not in scan_axes]
            axes_t = tuple(lanes) + scan_axes
        else:
            axes_t = _axes_tuple(axes)
        out = self._fresh(name, "h")
        node = Scan(out, axes_t, scan_axes, traversal if traversal is not None else _pending_traversal(reverse),
                    comb, ei, _axes_tuple(state) if state else ())
        return self._add(node, vdt, dtype)

    # build ----------------------------------------------------------------------------------------------
    def build(self, outputs: TensorRef | Sequence[TensorRef] | Mapping[str, TensorRef]) -> Op:
        """Finish the op: mark ``outputs`` (renamed to their keys for a mapping), infer extents, verify."""
        if isinstance(outputs, TensorRef):
            named = {"out": outputs}
        elif isinstance(outputs, Mapping):
            named = dict(outputs)
        else:
            named = {f"out{i}": r for i, r in enumerate(outputs)}
        produced = {n.out for n in self._nodes}
        rename: dict[str, str] = {}
        for key, ref in named.items():
            if not isinstance(ref, TensorRef) or ref.name not in produced:
                raise IRError(f"op {self.name}: output {key!r} must be a result of a compute node, got {ref!r}")
            if key != ref.name:
                rename[ref.name] = key
        returned = [r.name for r in named.values()]
        if len(returned) != len(set(returned)):
            raise IRError(f"op {self.name}: one result is returned under two names {sorted(named)}")
        for key in rename.values():  # a key may reuse the name of a tensor that is itself renamed away
            if key in self._names and key not in rename:
                raise IRError(f"op {self.name}: output name {key!r} is already a tensor of the op")
        nodes = tuple(_rename(n, rename) for n in self._nodes)
        dtypes = {rename.get(k, k): v for k, v in self._dtypes.items()}
        out_names = set(named)
        shapes: dict[str, tuple | None] = {t.name: t.shape for t in self._inputs}
        shapes.update({n.out: None for n in nodes})
        verify_structure({t.name: t for t in self._inputs}, nodes, self.name)
        lookups = {t.name for t in self._inputs if t.lookup}
        ext = infer_extents({k: v for k, v in shapes.items() if k not in lookups}, nodes, self._declared, self.name)
        nodes = tuple(_resolve_traversal(n, ext, self.name) for n in nodes)
        tensors = list(self._inputs)
        for n in nodes:
            shape = tuple(ext[a] for a in n.axes)
            if n.out in out_names:
                tensors.append(TensorParam(n.out, shape, dtypes[n.out], "output"))
            else:
                dt = self._out_dtypes.get(rename.get(n.out, n.out)) or accum_dtype(dtypes[n.out])
                tensors.append(TensorParam(n.out, shape, dt, "temp"))
        order = {name: i for i, name in enumerate(named)}
        tensors.sort(key=lambda t: (("input", "temp", "output").index(t.kind), order.get(t.name, 0)))
        ordered_ext = []
        for n in nodes:
            for a in tuple(n.axes) + tuple(getattr(n, "raxes", ())):
                if a not in dict(ordered_ext):
                    ordered_ext.append((a, sympy.simplify(ext[a])))
        return Op(self.name, tuple(tensors), nodes, tuple(ordered_ext), tuple(self._derived),
                  tuple(self._constraints), self.attrs)


@dataclass(frozen=True)
class _PendingTraversal:
    reverse: bool


def _pending_traversal(reverse: bool):
    return _PendingTraversal(bool(reverse))


def _resolve_traversal(n, ext, op_name: str):
    """Give default-order scans their traversal; check an explicit traversal's grid against the scan axes."""
    if not isinstance(n, Scan):
        return n
    grid = tuple(ext[a] for a in n.scan_axes)
    if isinstance(n.traversal, _PendingTraversal):
        return Scan(n.out, n.axes, n.scan_axes, row_major(grid, reverse=n.traversal.reverse), n.combine, n.init,
                    n.state_axes)
    tg = n.traversal.grid
    if len(tg) != len(grid) or any(sympy.simplify(x - y) != 0 for x, y in zip(tg, grid)):
        axes_s = ", ".join(f"{a} < {e}" for a, e in zip(n.scan_axes, grid))
        raise IRError(f"op {op_name}, node {n.out}: traversal {n.traversal.name} covers a grid "
                      f"{tuple(tg)} but the scan axes are ({axes_s})")
    return n


def _rename(node, mapping: dict[str, str]):
    if not mapping:
        return node
    from dataclasses import replace

    def r(e: Expr | None) -> Expr | None:
        if e is None:
            return None
        memo: dict[Expr, Expr] = {}
        for x in e.walk():
            if x.op is ExprOp.LOAD and x.arg.tensor in mapping:
                a = x.arg
                memo[x] = Expr(ExprOp.LOAD, x.dtype, (), Access(mapping[a.tensor], a.index, a.pad))
            elif x.src:
                memo[x] = Expr(x.op, x.dtype, tuple(memo[s] for s in x.src), x.arg)
            else:
                memo[x] = x
        return memo[e]

    out = mapping.get(node.out, node.out)
    if isinstance(node, Map):
        return replace(node, out=out, value=r(node.value))
    if isinstance(node, Reduce):
        return replace(node, out=out, value=r(node.value), predicate=r(node.predicate))
    comb = node.combine
    comb = Affine(r(comb.a), r(comb.b)) if isinstance(comb, Affine) else Associative(comb.monoid, r(comb.value))
    return replace(node, out=out, combine=comb, init=r(node.init))


# module-level DSL (acts on the active builder) ---------------------------------------------------------

def active() -> OpBuilder:
    """The builder of the enclosing ``with OpBuilder(...)`` block or ``@op`` body."""
    b = _ACTIVE.get()
    if b is None:
        raise IRError("no op is being declared: use these functions inside an @opgen.op function or a "
                      "`with OpBuilder(name):` block")
    return b


def axes(spec: str) -> tuple[Axis, ...] | Axis:
    """Axes with inferred extents: ``b, t = opgen.axes("b t")``."""
    return make_axes(spec)


def axis(name: str, extent: Any = None) -> Axis:
    """One axis with an explicit extent (``opgen.axis("t", L)``)."""
    return active().axis(name, extent)


def compute(value: ExprLike, axes: Sequence[Axis] | None = None, **kw) -> TensorRef:
    """A Map node on the active builder (see :meth:`OpBuilder.map`)."""
    return active().map(value, axes, **kw)


def reduce(over, value: ExprLike, monoid: Monoid = SUM, **kw) -> TensorRef:
    """A Reduce node with any monoid on the active builder."""
    return active().reduce(over, value, monoid=monoid, **kw)


def sum(over, value: ExprLike, **kw) -> TensorRef:  # noqa: A001 (DSL name)
    """Sum over ``over``."""
    return active().reduce(over, value, monoid=SUM, **kw)


def prod(over, value: ExprLike, **kw) -> TensorRef:
    """Product over ``over``."""
    return active().reduce(over, value, monoid=PROD, **kw)


def max(over, value: ExprLike, **kw) -> TensorRef:  # noqa: A001
    """Maximum over ``over``."""
    return active().reduce(over, value, monoid=MAX, **kw)


def min(over, value: ExprLike, **kw) -> TensorRef:  # noqa: A001
    """Minimum over ``over``."""
    return active().reduce(over, value, monoid=MIN, **kw)


def scan(over, **kw) -> TensorRef:
    """A Scan node on the active builder (see :meth:`OpBuilder.scan`)."""
    return active().scan(over, **kw)


# @op decorator -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorType:
    """An annotation ``F32["B D L"]``: dtype (None = bound at build time) and dim names."""

    dtype: DType | None
    dims: tuple[str, ...]


class _TypeFactory:
    def __init__(self, dtype: DType | None) -> None:
        self.dtype = dtype

    def __getitem__(self, spec: str) -> TensorType:
        return TensorType(self.dtype, tuple(spec.replace(",", " ").split()))


F16, BF16, F32, F64 = (_TypeFactory(d) for d in (DType.f16, DType.bf16, DType.f32, DType.f64))
Float = _TypeFactory(None)


@dataclass(frozen=True)
class OpDef:
    """A declared op: ``fn``'s tensor parameters come from annotations; keyword-only params are static."""

    fn: Callable[..., Any]
    name: str

    def build(self, dtype: DType | str = DType.f32, **static: Any) -> Op:
        """Build the IR for ``dtype`` (for ``Float[...]`` params) and static options."""
        sig = inspect.signature(self.fn)
        bld = OpBuilder(self.name, attrs={k: v for k, v in static.items()})
        dims_by_name: dict[str, Dim] = {}
        args = []
        with bld:
            for p in sig.parameters.values():
                if p.kind is inspect.Parameter.KEYWORD_ONLY:
                    continue
                ann = p.annotation
                if isinstance(ann, str):
                    ann = eval(ann, self.fn.__globals__)  # noqa: S307 (annotations are the author's code)
                if not isinstance(ann, TensorType):
                    raise IRError(f"op {self.name}: parameter {p.name} needs a tensor annotation like F32['B L']")
                shape = [dims_by_name.setdefault(n, Dim(n)) if not n.isdigit() else int(n) for n in ann.dims]
                args.append(bld.input(p.name, shape, ann.dtype or as_dtype(dtype)))
            result = self.fn(*args, **static)
        return bld.build(result)

    def __call__(self, *a, **k):
        raise TypeError(f"{self.name} is an op declaration; call .build() for its IR or register it to run it")


def op(fn: Callable[..., Any] | None = None, *, name: str | None = None):
    """Decorator declaring an op from a function whose parameters are annotated ``F32["B L"]``, ``Float[...]``."""
    if fn is None:
        return lambda f: OpDef(f, name or f.__name__)
    return OpDef(fn, name or fn.__name__)
