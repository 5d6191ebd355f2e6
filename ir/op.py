"""The op: an immutable container of tensors and compute nodes, viewed as a networkx graph.

An :class:`Op` is produced by the builder (:mod:`opgen.ir.builder`) after range inference and verification,
so every axis has an extent and every tensor a shape. Its :attr:`Op.fingerprint` is a sha256 of the canonical
printed form: stable across processes, independent of axis names and of the op's display name.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import networkx as nx
import sympy

from .expr import loads
from .names import check_qualname
from .nodes import Node, TensorParam
from .printer import op_str
from .symbols import Axis, Dim


@dataclass(frozen=True)
class Op:
    """A verified operator: ``tensors`` (inputs, temps, outputs), ``nodes`` in dependency order, axis extents."""

    name: str
    tensors: tuple[TensorParam, ...]
    nodes: tuple[Node, ...]
    extents: tuple[tuple[Axis, sympy.Expr], ...]
    derived: tuple[tuple[Dim, sympy.Expr], ...] = ()
    constraints: tuple[tuple[sympy.Basic, str], ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        check_qualname("op", self.name)

    def __hash__(self) -> int:
        """Computed once per op (an op is hashed on every call: binding, config and kernel caches are keyed by
        it, and hashing its sympy extents each time cost ~0.1 ms a call)."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.name, self.tensors, self.nodes, self.extents, self.derived, self.constraints,
                      self.attrs))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}     # hashes differ between processes

    # lookups ---------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple[TensorParam, ...]:
        return tuple(t for t in self.tensors if t.kind == "input")

    @property
    def outputs(self) -> tuple[TensorParam, ...]:
        return tuple(t for t in self.tensors if t.kind == "output")

    @property
    def temps(self) -> tuple[TensorParam, ...]:
        return tuple(t for t in self.tensors if t.kind == "temp")

    def tensor(self, name: str) -> TensorParam:
        """The tensor called ``name``."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"op {self.name} has no tensor {name!r}; it has {[t.name for t in self.tensors]}")

    def extent(self, axis: Axis) -> sympy.Expr:
        """The extent of ``axis``."""
        return dict(self.extents)[axis]

    def producer(self, name: str) -> Node | None:
        """The node that writes tensor ``name`` (None for inputs)."""
        for n in self.nodes:
            if n.out == name:
                return n
        return None

    @property
    def dims(self) -> tuple[Dim, ...]:
        """Every dim the op's shapes mention (derived dims included), sorted by name."""
        found: set[Dim] = set()
        for t in self.tensors:
            for s in t.shape:
                found |= {x for x in s.free_symbols if isinstance(x, Dim)}
        for _, e in self.extents:
            found |= {x for x in e.free_symbols if isinstance(x, Dim)}
        found |= {d for d, _ in self.derived}
        return tuple(sorted(found, key=lambda d: d.name))

    def axes_in_order(self) -> list[Axis]:
        """Axes in order of first appearance over the nodes (output axes, then reduction/scan axes)."""
        seen: list[Axis] = []
        for n in self.nodes:
            for a in tuple(n.axes) + tuple(getattr(n, "raxes", ())):
                if a not in seen:
                    seen.append(a)
        for a, _ in self.extents:
            if a not in seen:
                seen.append(a)
        return seen

    # views -----------------------------------------------------------------------------------------------
    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """A frozen DiGraph: tensor nodes ``("tensor", name)`` and compute nodes ``("node", i)``; edges follow data."""
        g = nx.DiGraph(name=self.name)
        for t in self.tensors:
            g.add_node(("tensor", t.name), kind=t.kind, param=t)
        for i, n in enumerate(self.nodes):
            g.add_node(("node", i), kind=type(n).__name__.lower(), node=n)
            for e in n.exprs():
                for acc in loads(e):
                    g.add_edge(("tensor", acc.tensor), ("node", i))
            g.add_edge(("node", i), ("tensor", n.out))
        return nx.freeze(g)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A stable structural hash (hex sha256 of the canonical printed form)."""
        return hashlib.sha256(op_str(self, canonical=True).encode()).hexdigest()

    def pretty(self, verified: bool = False) -> str:
        """The printed IR; ``verified`` adds extents and per-access bound status."""
        return op_str(self, verified=verified)

    def __str__(self) -> str:
        return self.pretty()
