"""Helpers shared by the passes that rewrite one reduction of an op into new nodes (:mod:`.restage`,
:mod:`.phases`): the two load factors of a product, load replacement, fresh names, and splicing nodes in."""
from __future__ import annotations

from typing import Iterable, Sequence

import sympy

from ..expr import Expr, ExprOp
from ..nodes import SUM, Map, Node, Reduce, TensorParam
from ..op import Op
from ..symbols import Axis
from .window import _factors, _strip_cast


def product_of_loads(node: Reduce) -> tuple[Expr, Expr] | None:
    """The two load factors of a SUM reduction's value (casts of floats stripped), or None."""
    if node.monoid != SUM:
        return None
    fs = [_strip_cast(f) for f in _factors(node.value)]
    if len(fs) != 2 or any(f.op is not ExprOp.LOAD for f in fs):
        return None
    return fs[0], fs[1]


def replace_load(e: Expr, old: Expr, new: Expr) -> Expr:
    """``e`` with the load node ``old`` replaced by ``new`` (same dtype)."""
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        if n is old or (n.op is ExprOp.LOAD and n == old):
            memo[n] = new
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


def fresh_name(op: Op, base: str, taken: Iterable[str] = ()) -> str:
    """``base`` (or ``base1``, ``base2``, ...): a name no tensor of ``op`` and nothing in ``taken`` has."""
    names = {t.name for t in op.tensors} | set(taken)
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}{i}"
    return name


def fresh_axes(op: Op, base: str, n: int, taken: Iterable[str] = ()) -> tuple[Axis, ...]:
    """``n`` axes named ``base0``, ``base1``, ... (suffixed where taken) that ``op`` does not use."""
    used = {a.name for a, _ in op.extents} | set(taken)
    out = []
    for j in range(n):
        name, i = f"{base}{j}", 0
        while name in used:
            i += 1
            name = f"{base}{j}_{i}"
        used.add(name)
        out.append(Axis(name))
    return tuple(out)


def splice(op: Op, k: int, temps: Sequence[TensorParam], nodes: Sequence[Node],
           extents: Iterable[tuple[Axis, sympy.Expr]]) -> Op:
    """``op`` with node ``k`` replaced by ``nodes``, the ``temps`` they write added (after the inputs) and
    ``extents`` given to their new axes."""
    tensors = list(op.tensors)
    first_other = next((i for i, t in enumerate(tensors) if t.kind != "input"), len(tensors))
    tensors[first_other:first_other] = list(temps)
    new_nodes = op.nodes[:k] + tuple(nodes) + op.nodes[k + 1:]
    all_extents = tuple(extents) + tuple((a, e) for a, e in op.extents)
    return Op(op.name, tuple(tensors), new_nodes, all_extents, op.derived, op.constraints, op.attrs)


def insert_before(op: Op, k: int, temp: TensorParam, map_node: Map, map_ext, node: Reduce) -> Op:
    """``op`` with ``map_node`` (writing ``temp``) inserted before node ``k``, which becomes ``node``."""
    return splice(op, k, (temp,), (map_node, node), map_ext)


def conjuncts(pred: sympy.Basic) -> list[sympy.Basic]:
    """The terms of a conjunction (the predicate itself when it is not an ``And``)."""
    return list(pred.args) if isinstance(pred, sympy.And) else [pred]
