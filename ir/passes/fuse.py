"""Fusion of a scan with its prologue and epilogue into one kernel group (:class:`ScanGroup`).

Coefficient producers (pointwise Maps feeding ``a``/``b``/``init``) are inlined into the recurrence; the
projection of the state (a sum over some state axes, as Mamba's ``sum_n h * C``), pointwise epilogues on the
projection (D skip, silu gate) and final-state reads are folded into the same kernel, so per-step hidden states
never reach memory unless the state itself is an output.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..expr import Access, Expr, ExprOp, loads, substitute
from ..nodes import SUM, Affine, Map, Reduce, Scan
from ..op import Op
from ..symbols import Axis
from ..traversal import STEP


@dataclass(frozen=True)
class ScanGroup:
    """One fused affine-scan kernel over ``lanes`` (parallel) x ``state`` (registers) x ``step`` (serial)."""

    op: Op
    scan: Scan
    lanes: tuple[Axis, ...]
    state: tuple[Axis, ...]
    step: Axis
    reverse: bool
    projection: Reduce | None
    epilogue: tuple[Map, ...]
    tails: tuple[Map, ...]
    store_state: bool

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.op.outputs)

    def describe(self) -> str:
        """A one-paragraph printout of the group (the ``fused`` stage)."""
        p = self.projection
        lines = [f"scan group {self.scan.out}: lanes ({', '.join(map(str, self.lanes))}) parallel, "
                 f"state ({', '.join(map(str, self.state))}) in registers, step {self.step} serial"
                 f"{' reversed' if self.reverse else ''}",
                 f"  a = {self.scan.combine.a}", f"  b = {self.scan.combine.b}"]
        if self.scan.init is not None:
            lines.append(f"  init = {self.scan.init}")
        if p is not None:
            lines.append(f"  project {p.out}[{', '.join(map(str, p.axes))}] = sum over "
                         f"({', '.join(map(str, p.raxes))}) of {p.value}")
        lines += [f"  epilogue {m.out}[{', '.join(map(str, m.axes))}] = {m.value}" for m in self.epilogue]
        lines += [f"  final {m.out}[{', '.join(map(str, m.axes))}] = {m.value}" for m in self.tails]
        if self.store_state:
            lines.append(f"  store state {self.scan.out} every step")
        return "\n".join(lines)


def inline_maps(e: Expr, maps: dict[str, Map]) -> Expr:
    """Replace loads of the given Map results by their value expressions (axes substituted by the load's index)."""
    memo: dict[Expr, Expr] = {}
    for n in e.walk():
        if n.op is ExprOp.LOAD and n.arg.tensor in maps:
            m = maps[n.arg.tensor]
            memo[n] = inline_maps(substitute(m.value, dict(zip(m.axes, n.arg.index))), maps)
        elif n.src:
            memo[n] = Expr(n.op, n.dtype, tuple(memo[s] for s in n.src), n.arg)
        else:
            memo[n] = n
    return memo[e]


def _identity_read(acc: Access, axes: tuple[Axis, ...]) -> bool:
    return len(acc.index) == len(axes) and all(i == a for i, a in zip(acc.index, axes)) and acc.pad is None


def _reads(e: Expr, name: str) -> list[Access]:
    return [a for a in loads(e) if a.tensor == name]


def fuse_scan(op: Op) -> ScanGroup | None:
    """The fused group of an op built around one affine 1-D scan, or None when the op does not have that form."""
    scans = [n for n in op.nodes if isinstance(n, Scan)]
    if len(scans) != 1 or not isinstance(scans[0].combine, Affine) or len(scans[0].scan_axes) != 1:
        return None
    scan = scans[0]
    tr = scan.traversal
    if tr.chains != 1 or tr.valid is not sympy.true:
        return None
    steps = op.extent(scan.scan_axes[0])
    if tr.coords[0] == STEP:
        reverse = False
    elif sympy.simplify(tr.coords[0] - (steps - 1 - STEP)) == 0:
        reverse = True
    else:
        return None
    idx = op.nodes.index(scan)
    temps = {t.name for t in op.temps}
    pre = {n.out: n for n in op.nodes[:idx]}
    if any(not isinstance(n, Map) or n.out not in temps for n in pre.values()):
        return None
    comb = scan.combine
    a, b = inline_maps(comb.a, pre), inline_maps(comb.b, pre)
    init = inline_maps(scan.init, pre) if scan.init is not None else None
    fused_scan = Scan(scan.out, scan.axes, scan.scan_axes, scan.traversal, Affine(a, b), init, scan.state_axes)
    step = scan.scan_axes[0]
    state = tuple(scan.state_axes)
    lanes = tuple(x for x in scan.axes if x not in state and x != step)
    last = sympy.Integer(0) if reverse else steps - 1
    projection, epilogue, tails = None, [], []
    for n in op.nodes[idx + 1:]:
        h_reads = [x for e in n.exprs() for x in _reads(e, scan.out)]
        if isinstance(n, Reduce) and projection is None and h_reads and not epilogue:
            if (n.monoid != SUM or n.predicate is not None or not set(n.raxes) <= set(state)
                    or not all(_identity_read(x, scan.axes) for x in h_reads)):
                return None
            if any(x.tensor in pre or x.tensor == n.out for x in loads(n.value)):
                return None
            projection = Reduce(n.out, n.axes, n.raxes, inline_maps(n.value, pre), n.monoid)
        elif isinstance(n, Map) and not h_reads and projection is not None:
            srcs = {x.tensor for x in loads(n.value)} - {t.name for t in op.inputs}
            allowed = {projection.out} | {m.out for m in epilogue}
            if not srcs <= allowed or set(n.axes) != set(projection.axes):
                return None
            for x in loads(n.value):
                if x.tensor in allowed and not _identity_read(x, n.axes if x.tensor != projection.out
                                                              else projection.axes):
                    if not _same_point(x, n.axes, projection.axes if x.tensor == projection.out else None):
                        return None
            epilogue.append(Map(n.out, n.axes, inline_maps(n.value, pre)))
        elif isinstance(n, Map) and h_reads:
            want = tuple(last if x == step else x for x in scan.axes)
            if any(tuple(r.index) != want for r in h_reads) or set(n.axes) != set(lanes) | set(state):
                return None
            tails.append(n)
        else:
            return None
    outputs = {t.name for t in op.outputs}
    store_state = scan.out in outputs
    covered = {scan.out} | set(pre) | {m.out for m in epilogue} | {m.out for m in tails}
    if projection is not None:
        covered.add(projection.out)
        if projection.out in outputs and epilogue:
            return None
    if {n.out for n in op.nodes} - covered:
        return None
    return ScanGroup(op, fused_scan, lanes, state, step, reverse, projection, tuple(epilogue), tuple(tails),
                     store_state)


def _same_point(acc: Access, axes: tuple[Axis, ...], proj_axes: tuple[Axis, ...] | None) -> bool:
    """A read of the projection (or an earlier epilogue result) at the current point, whatever the axis order."""
    order = proj_axes if proj_axes is not None else axes
    return len(acc.index) == len(order) and all(i == a for i, a in zip(acc.index, order))
