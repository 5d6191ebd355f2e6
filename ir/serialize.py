"""Lossless JSON for value expressions (:class:`~opgen.ir.expr.Expr`) and the sympy index expressions in them.

``expr_to_json(e)`` writes the expression DAG as a node list (shared sub-expressions once, children first);
``expr_from_json(s)`` rebuilds an :class:`Expr` that is ``==`` to ``e`` (same ops, dtypes, constants, loads with
their padding, and sympy ``INDEX`` leaves in which axes come back as :class:`~opgen.ir.symbols.Axis` and sizes as
:class:`~opgen.ir.symbols.Dim`).

Sympy expressions are stored as ``sympy.srepr`` text and read back by :func:`sympy_from_str`, which never calls
``eval``: it parses the text with :mod:`ast` and builds only the sympy classes listed in ``_SYMPY_CALLS`` from
literal arguments, so untrusted text cannot run code. Floats are stored as ``float.hex`` strings (exact, and
``inf`` / ``nan`` stay valid JSON).

Format (version 1)::

    {"format": "opgen.expr", "version": 1, "root": 3,
     "nodes": [{"op": "load", "dtype": "f32", "arg": {"tensor": "score", "index": ["Axis('b', ...)", ...]}},
               {"op": "const", "dtype": "f32", "arg": {"f": "0x1.0000000000000p+1"}}, ...]}
"""
from __future__ import annotations

import ast
import json
from typing import Any, Callable

import sympy

from .dtypes import DType
from .errors import IRError
from .expr import Access, Expr, ExprOp
from .symbols import Axis, Dim

FORMAT = "opgen.expr"
VERSION = 1

# ------------------------------------------------------------------------------------------------- sympy


def sympy_to_str(x: sympy.Basic) -> str:
    """The ``srepr`` text of a sympy expression (read back with :func:`sympy_from_str`)."""
    if not isinstance(x, sympy.Basic):
        raise IRError(f"opgen.ir.serialize: expected a sympy expression, got {type(x).__name__} {x!r}")
    return sympy.srepr(x)


def _symbol_class(cls: type) -> Callable[..., sympy.Symbol]:
    """A constructor for Axis / Dim that accepts srepr's assumption keywords only when they are the class's own."""
    own = dict(cls("_probe")._assumptions_orig)

    def make(name: str, **assumptions: bool) -> sympy.Symbol:
        if assumptions != own:
            raise IRError(f"opgen.ir.serialize: {cls.__name__}({name!r}) with assumptions {assumptions}; a "
                          f"{cls.__name__} always has {own}")
        return cls(name)
    return make


def _symbol(name: str, **assumptions: bool) -> sympy.Symbol:
    return sympy.Symbol(name, **assumptions)


# The only callables the reader builds; each takes sympy objects or literals.
_SYMPY_CALLS: dict[str, Callable[..., Any]] = {
    "Axis": _symbol_class(Axis), "Dim": _symbol_class(Dim), "Symbol": _symbol,
    "Integer": sympy.Integer, "Rational": sympy.Rational, "Float": sympy.Float,
    "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow, "Mod": sympy.Mod,
    "floor": sympy.floor, "ceiling": sympy.ceiling, "Abs": sympy.Abs, "sign": sympy.sign,
    "Max": sympy.Max, "Min": sympy.Min,
    "Piecewise": sympy.Piecewise, "ExprCondPair": sympy.functions.elementary.piecewise.ExprCondPair,
    "ITE": sympy.ITE, "And": sympy.And, "Or": sympy.Or, "Not": sympy.Not, "Xor": sympy.Xor,
    "Implies": sympy.Implies, "Equivalent": sympy.Equivalent,
    "Equality": sympy.Eq, "Unequality": sympy.Ne, "StrictLessThan": sympy.Lt, "LessThan": sympy.Le,
    "StrictGreaterThan": sympy.Gt, "GreaterThan": sympy.Ge,
    "Tuple": sympy.Tuple,
}
_SYMPY_NAMES: dict[str, sympy.Basic] = {"true": sympy.true, "false": sympy.false, "oo": sympy.oo,
                                        "zoo": sympy.zoo, "nan": sympy.nan}
_SYMBOL_CALLS = frozenset({"Axis", "Dim", "Symbol"})


def sympy_from_str(text: str) -> sympy.Basic:
    """Parse ``sympy.srepr`` text without ``eval``: only the sympy classes of ``_SYMPY_CALLS`` and literal
    arguments are accepted; anything else raises :class:`~opgen.ir.IRError`."""
    if not isinstance(text, str):
        raise IRError(f"opgen.ir.serialize: a sympy expression must be srepr text, got {type(text).__name__}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise IRError(f"opgen.ir.serialize: cannot parse sympy text {text[:80]!r}: {exc.msg}") from None
    out = _build(tree.body, text)
    if not isinstance(out, sympy.Basic):
        raise IRError(f"opgen.ir.serialize: sympy text {text[:80]!r} is a {type(out).__name__}, not a sympy "
                      f"expression")
    return out


def _build(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _build(node.operand, text)
        if isinstance(v, (bool, str)) or not isinstance(v, (int, float, sympy.Expr)):
            raise _bad(node, text)
        return -v
    if isinstance(node, ast.Name) and node.id in _SYMPY_NAMES:
        return _SYMPY_NAMES[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS:
        name = node.func.id
        args = [_build(a, text) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None or not isinstance(kw.value, ast.Constant) \
                    or not isinstance(kw.value.value, (bool, int)):
                raise _bad(node, text)
            kwargs[kw.arg] = kw.value.value
        if kwargs and name not in _SYMBOL_CALLS and name != "Float":
            raise _bad(node, text)
        if name in _SYMBOL_CALLS and not (len(args) == 1 and isinstance(args[0], str)):
            raise _bad(node, text)
        if name not in _SYMBOL_CALLS and name != "Float" and any(isinstance(a, str) for a in args):
            raise _bad(node, text)
        try:
            return _SYMPY_CALLS[name](*args, **kwargs)
        except IRError:
            raise
        except Exception as exc:  # sympy rejected the arguments
            raise IRError(f"opgen.ir.serialize: cannot build {ast.unparse(node)[:80]} from {text[:80]!r}: "
                          f"{type(exc).__name__}: {exc}") from None
    raise _bad(node, text)


def _bad(node: ast.AST, text: str) -> IRError:
    return IRError(f"opgen.ir.serialize: unsupported construct {ast.unparse(node)[:80]!r} in sympy text "
                   f"{text[:80]!r} (only sympy index classes with literal arguments are read)")

# ------------------------------------------------------------------------------------------------- Expr


def expr_to_obj(e: Expr) -> dict:
    """The JSON-ready dict of ``e`` (see the module doc for the format)."""
    if not isinstance(e, Expr):
        raise IRError(f"opgen.ir.serialize: expected an Expr, got {type(e).__name__}")
    ids: dict[Expr, int] = {}
    nodes: list[dict] = []
    for n in e.walk():
        rec: dict[str, Any] = {"op": n.op.value, "dtype": n.dtype.value}
        if n.src:
            rec["src"] = [ids[s] for s in n.src]
        if n.arg is not None:
            rec["arg"] = _arg_to_obj(n)
        ids[n] = len(nodes)
        nodes.append(rec)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "root": ids[e]}


def expr_to_json(e: Expr) -> str:
    """Lossless JSON text of ``e`` (deterministic: equal expressions give equal text)."""
    return json.dumps(expr_to_obj(e), separators=(",", ":"), allow_nan=False)


def expr_from_obj(obj: Any) -> Expr:
    """Rebuild an :class:`Expr` from :func:`expr_to_obj`'s dict."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise IRError(f"opgen.ir.serialize: not an opgen expression (expected a dict with format {FORMAT!r}, got "
                      f"{_short(obj)})")
    if obj.get("version") != VERSION:
        raise IRError(f"opgen.ir.serialize: expression format version {obj.get('version')!r} is not supported "
                      f"(this opgen reads version {VERSION})")
    nodes, root = obj.get("nodes"), obj.get("root")
    if not isinstance(nodes, list) or not nodes or not isinstance(root, int) or not 0 <= root < len(nodes):
        raise IRError(f"opgen.ir.serialize: malformed expression: 'nodes' must be a non-empty list and 'root' an "
                      f"index into it, got root {root!r}")
    built: list[Expr] = []
    for k, rec in enumerate(nodes):
        built.append(_node_from_obj(rec, k, built))
    return built[root]


def expr_from_json(s: str | bytes) -> Expr:
    """Rebuild an :class:`Expr` from :func:`expr_to_json`'s text; ``==`` to the original."""
    try:
        obj = json.loads(s)
    except (TypeError, ValueError) as exc:
        raise IRError(f"opgen.ir.serialize: not valid JSON ({exc})") from None
    return expr_from_obj(obj)


def _arg_to_obj(n: Expr) -> Any:
    a = n.arg
    if n.op is ExprOp.CONST:
        if isinstance(a, bool) or isinstance(a, int):
            return a
        if isinstance(a, float):
            return {"f": a.hex()}
    elif n.op is ExprOp.INDEX and isinstance(a, sympy.Basic):
        return sympy_to_str(a)
    elif n.op is ExprOp.LOAD and isinstance(a, Access):
        rec: dict[str, Any] = {"tensor": a.tensor, "index": [sympy_to_str(i) for i in a.index]}
        if a.pad is not None:
            rec["pad"] = [[sympy_to_str(lo), sympy_to_str(hi)] for lo, hi in a.pad]
        return rec
    elif n.op is ExprOp.ARG and isinstance(a, int) and not isinstance(a, bool):
        return a
    raise IRError(f"opgen.ir.serialize: cannot serialize the argument {a!r} ({type(a).__name__}) of a "
                  f"'{n.op.value}' node")


def _node_from_obj(rec: Any, k: int, built: list[Expr]) -> Expr:
    if not isinstance(rec, dict):
        raise IRError(f"opgen.ir.serialize: node {k} is {_short(rec)}, expected a dict")
    try:
        op, dt = ExprOp(rec.get("op")), DType(rec.get("dtype"))
    except ValueError:
        raise IRError(f"opgen.ir.serialize: node {k} has unknown op {rec.get('op')!r} or dtype "
                      f"{rec.get('dtype')!r}") from None
    src_ids = rec.get("src", [])
    if not isinstance(src_ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k
                                            for i in src_ids):
        raise IRError(f"opgen.ir.serialize: node {k} has operands {src_ids!r}; operands must be indices of "
                      f"earlier nodes")
    src = tuple(built[i] for i in src_ids)
    return Expr(op, dt, src, _arg_from_obj(op, rec.get("arg"), k))


def _arg_from_obj(op: ExprOp, a: Any, k: int) -> Any:
    if a is None:
        if op in (ExprOp.CONST, ExprOp.INDEX, ExprOp.LOAD, ExprOp.ARG):
            raise IRError(f"opgen.ir.serialize: node {k} ('{op.value}') has no 'arg'")
        return None
    if op is ExprOp.CONST:
        if isinstance(a, (bool, int)):
            return a
        if isinstance(a, dict) and isinstance(a.get("f"), str):
            try:
                return float.fromhex(a["f"])
            except ValueError:
                pass
    elif op is ExprOp.INDEX:
        return sympy_from_str(a)
    elif op is ExprOp.LOAD and isinstance(a, dict) and isinstance(a.get("tensor"), str):
        idx = tuple(sympy_from_str(i) for i in _list(a.get("index"), k))
        pad = a.get("pad")
        if pad is not None:
            pad = tuple(_pad_pair(p, k) for p in _list(pad, k))
        return Access(a["tensor"], idx, pad)
    elif op is ExprOp.ARG and isinstance(a, int) and not isinstance(a, bool):
        return a
    raise IRError(f"opgen.ir.serialize: node {k} ('{op.value}') has a malformed 'arg': {_short(a)}")


def _list(x: Any, k: int) -> list:
    if not isinstance(x, list):
        raise IRError(f"opgen.ir.serialize: node {k}: expected a list, got {_short(x)}")
    return x


def _pad_pair(p: Any, k: int) -> tuple[sympy.Basic, sympy.Basic]:
    if not isinstance(p, list) or len(p) != 2:
        raise IRError(f"opgen.ir.serialize: node {k}: a padding entry must be [lo, hi], got {_short(p)}")
    return sympy_from_str(p[0]), sympy_from_str(p[1])


def _short(x: Any) -> str:
    r = repr(x)
    return f"{type(x).__name__} {r[:60] + '...' if len(r) > 60 else r}"
