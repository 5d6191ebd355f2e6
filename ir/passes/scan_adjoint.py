"""Fusion of a scan's backward into one kernel group (:class:`ScanAdjointGroup`).

The grad transform turns an affine scan ``h[t] = a[t] * h[t-1] + b[t]`` into a backward op that recomputes
``h`` (the forward scan), runs the adjoint ``adj[t] = a[t+1] * adj[t+1] + g[t]`` (a reverse scan) and reduces
products of ``adj``, ``h[t-1]`` and the inputs into every parameter gradient. Run node by node, each of those
is a tensor of the scan's full size (``[B, D, N, L]`` for Mamba) and each reduction a pass over it.

This pass finds that pattern in any backward op (no per-op rule: it reads the IR the grad transform wrote) and
describes it as one group that a target computes lane by lane: per lane, the forward state is recomputed chunk
by chunk (from chunk-boundary states when the whole sequence does not fit in a scratch buffer), the adjoint
runs backwards over the chunk, and every reduction is accumulated as it goes:

* ``point``: summed over state axes only (``sum_n adj * B`` -> ``du[b, d, t]``): a per-step accumulator;
* ``lane``: summed over the step (``dA[d, n]``, ``dD[d]``): a per-lane accumulator, written once per lane to
  a partial ``[lanes..., kept state...]`` that the caller sums over the reduced lane axes;
* ``steplane``: a sum over the step of a value per lane and step (``dD = sum_{b,t} g * u * silu(z)``), no state:
  accumulated beside the epilogues into a ``lane`` partial;
* ``cross``: summed over lane axes but not the step (``dB[b, n, t] = sum_d ...``): the lanes reduced are
  split into chunks run serially in one parallel iteration, each chunk accumulating into its own partial
  ``[split chunks, kept lanes..., kept state..., step]`` that the caller sums over the chunks (no atomics);

plus ``store`` maps over the scan's axes (``grad_b = adj``) and ``tail`` maps read at one step (the gradient
of the initial state, ``a[0] * adj[0]``). Map temps read only by the group are inlined into it.

:func:`group_scan_adjoint` reorders the op's nodes (a topological order) so the members are contiguous and
everything they read comes first, so a runner can compute the whole group at its first member.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from ..expr import Access, Expr, ExprOp, index, loads, substitute, where
from ..nodes import SUM, Affine, Map, Reduce, Scan
from ..op import Op
from ..symbols import Axis
from ..traversal import STEP
from .fuse import inline_maps


@dataclass(frozen=True)
class AdjointReduction:
    """One reduction of the group: its node (maps inlined), kind (``point``, ``lane``, ``cross``) and the
    state axes it keeps (in the scan's axis order)."""

    node: Reduce
    kind: str
    kept_state: tuple[Axis, ...]
    kept_lanes: tuple[Axis, ...]
    scatter: tuple[tuple[Axis, sympy.Expr], ...] = ()   # output axes given by lanes (a group of heads: h*G//H)


@dataclass(frozen=True)
class ScanAdjointGroup:
    """A forward scan, its adjoint and the nodes reading them, computed lane by lane (module docstring)."""

    op: Op
    forward: Scan                      # a, b, init with member maps inlined
    adjoint: Scan                      # b, init inlined; a as the grad transform wrote it
    lanes: tuple[Axis, ...]
    state: tuple[Axis, ...]
    step: Axis
    reverse: bool                      # the forward scan runs from the last step
    carry_a: bool                      # the adjoint's coefficient is the forward one a step later: carried
    reductions: tuple[AdjointReduction, ...]
    stores: tuple[Map, ...]            # maps over the scan's axes reading h / adj (inlined)
    epilogues: tuple[Map, ...]         # maps over lanes and step reading point reductions (and inputs)
    tails: tuple[tuple[Map, sympy.Expr], ...]   # maps over lanes + state reading h / adj at one step
    split: tuple[Axis, ...]            # lane axes the cross reductions sum over
    members: tuple[str, ...]           # every node the group computes (scans, inlined maps, readers)
    outputs: tuple[str, ...]           # member results the rest of the op (or the caller) needs
    reads: tuple[str, ...]             # tensors the group reads from outside (inputs, earlier temps)

    def exprs(self) -> list[Expr]:
        """Every value expression the group computes (what a kernel emits; what support checks walk)."""
        f, a = self.forward, self.adjoint
        out = [f.combine.a, f.combine.b, a.combine.a, a.combine.b] + [r.node.value for r in self.reductions]
        out += [m.value for m in self.stores] + [m.value for m, _ in self.tails] + [m.value for m in self.epilogues]
        return out + [x for x in (f.init, a.init) if x is not None]

    def common_blocker(self) -> str:
        """Why no kernel renders this group (a tail read at another step than the forward's first, a value using
        monoid arguments), or "" (each target adds its own checks)."""
        first = self.op.extent(self.step) - 1 if self.reverse else sympy.Integer(0)
        for m, c in self.tails:
            if sympy.simplify(c - first) != 0:
                return f"{m.out} reads the scan at step {c}, not at its first step"
        if any(n.op is ExprOp.ARG for e in self.exprs() for n in e.walk()):
            return "a value uses monoid arguments"
        return ""

    @property
    def first(self) -> str:
        """The member the group runs at (its first in the op's order)."""
        names = [n.out for n in self.op.nodes]
        return min(self.members, key=names.index)

    def describe(self) -> str:
        """A printout of the group (the ``fused`` stage of a backward op)."""
        f = self.forward
        lines = [f"scan adjoint group {f.out} / {self.adjoint.out}: lanes ({', '.join(map(str, self.lanes))}) "
                 f"parallel, state ({', '.join(map(str, self.state))}), step {self.step} forward then reversed"
                 + (f"; lanes ({', '.join(map(str, self.split))}) serial per chunk" if self.split else ""),
                 f"  a = {f.combine.a}", f"  b = {f.combine.b}", f"  adjoint b = {self.adjoint.combine.b}"
                 + (" (a carried)" if self.carry_a else f"; adjoint a = {self.adjoint.combine.a}")]
        for r in self.reductions:
            n = r.node
            lines.append(f"  {r.kind} {n.out}[{', '.join(map(str, n.axes))}] = sum over "
                         f"({', '.join(map(str, n.raxes))}) of {n.value}")
        lines += [f"  store {m.out}[{', '.join(map(str, m.axes))}] = {m.value}" for m in self.stores]
        lines += [f"  epilogue {m.out}[{', '.join(map(str, m.axes))}] = {m.value}" for m in self.epilogues]
        lines += [f"  at step {c}: {m.out}[{', '.join(map(str, m.axes))}] = {m.value}" for m, c in self.tails]
        return "\n".join(lines)


def _direction(op: Op, scan: Scan) -> bool | None:
    """True: the scan runs from the last step; False: from the first; None: another traversal."""
    if not isinstance(scan.combine, Affine) or len(scan.scan_axes) != 1:
        return None
    tr = scan.traversal
    if tr.chains != 1 or tr.valid is not sympy.true:
        return None
    if tr.coords[0] == STEP:
        return False
    steps = op.extent(scan.scan_axes[0])
    if sympy.simplify(tr.coords[0] - (steps - 1 - STEP)) == 0:
        return True
    return None


def _readers(op: Op, name: str) -> list:
    return [n for n in op.nodes if n.out != name and any(a.tensor == name for e in n.exprs() for a in loads(e))]


def _step_offset(acc: Access, axes: tuple[Axis, ...], step: Axis) -> sympy.Expr | None:
    """How a read of the scan's result indexes the step (``step + k`` -> k, a constant -> the constant as
    ``('at', c)``), None when any other axis is not read at its own position."""
    if len(acc.index) != len(axes):
        return None
    off = None
    for i, a in zip(acc.index, axes):
        i = sympy.sympify(i)
        if a != step:
            if i != a or (acc.pad is not None and any(sympy.sympify(p) != 0 for p in acc.padding(axes.index(a)))):
                return None
            continue
        off = i
    return off


def shifted_coefficient(op: Op, forward: Scan, reverse: bool) -> Expr:
    """The adjoint coefficient the grad transform writes for ``forward``: its ``a`` one step later, zero past the
    end (the same construction, so the comparison is exact)."""
    from .grad import shifted_step

    (t,) = forward.scan_axes
    steps = op.extent(t)
    nxt, ok = (t - 1, t > 0) if reverse else (t + 1, t < steps - 1)
    return where(index(ok), shifted_step(forward.combine.a, t, nxt, op, steps), 0.0)


def _temp_maps(op: Op) -> dict[str, Map]:
    temps = {t.name for t in op.temps}
    return {n.out: n for n in op.nodes if isinstance(n, Map) and n.out in temps}


@functools.lru_cache(maxsize=128)
def fuse_scan_adjoint(op: Op) -> ScanAdjointGroup | None:
    """The adjoint group of a backward op (module docstring), or None when the op does not have that form."""
    scans = [n for n in op.nodes if isinstance(n, Scan)]
    if len(scans) != 2:
        return None
    fwd, adj = scans
    rf, ra = _direction(op, fwd), _direction(op, adj)
    if rf is None or ra is None or rf == ra or fwd.scan_axes != adj.scan_axes or set(fwd.axes) != set(adj.axes):
        return None
    step = fwd.scan_axes[0]
    axes = fwd.axes
    state = tuple(fwd.state_axes)
    lanes = tuple(x for x in axes if x not in state and x != step)
    outputs = {t.name for t in op.outputs}
    if fwd.out in outputs or adj.out in outputs:
        return None
    if any(a.tensor in (fwd.out, adj.out) for e in (adj.combine.a,) for a in loads(e)):
        return None
    if any(a.tensor == adj.out for e in fwd.exprs() for a in loads(e)):
        return None
    # readers of h and adj
    readers: dict[str, object] = {}
    for name in (fwd.out, adj.out):
        for n in _readers(op, name):
            if n is not adj:
                readers[n.out] = n
    reductions, stores, tails = [], [], []
    for n in readers.values():
        grouped = None
        if isinstance(n, Reduce):
            n, grouped = _ungrouped(n, (fwd.out, adj.out), axes, lanes)
        for e in n.exprs():
            for acc in loads(e):
                if acc.tensor in (fwd.out, adj.out) and _step_offset(acc, _axes_of(op, acc.tensor), step) is None:
                    return None
        if isinstance(n, Reduce):
            scatter = grouped if grouped else _scatter(n, lanes)
            if (n.monoid != SUM or scatter is None
                    or (set(n.axes) - set(scatter)) | set(n.raxes) != set(axes)):
                return None
            if not _reads_at(n.value, fwd.out, adj.out, step, rf, at=None):
                return None
            red_lanes = set(n.raxes) & set(lanes)
            kept_state = tuple(a for a in state if a in n.axes)
            kept_lanes = tuple(a for a in lanes if a in n.axes)
            kind = "lane" if step in n.raxes else ("cross" if red_lanes else "point")
            if scatter and kind != "cross":
                return None
            reductions.append((n, kind, kept_state, kept_lanes, tuple(scatter.items())))
        elif isinstance(n, Map) and set(n.axes) == set(axes):
            if not _reads_at(n.value, fwd.out, adj.out, step, rf, at=None):
                return None
            stores.append(n)
        elif isinstance(n, Map) and set(n.axes) == set(axes) - {step}:
            ats = {sympy.sympify(a.index[_axes_of(op, a.tensor).index(step)]) for a in loads(n.value)
                   if a.tensor in (fwd.out, adj.out)}
            steps = op.extent(step)
            if len(ats) != 1:
                return None
            (c,) = ats
            if not (c == 0 or sympy.simplify(c - (steps - 1)) == 0):
                return None
            tails.append((n, c))
        else:
            return None
    cross = [set(n.raxes) & set(lanes) for n, k, *_ in reductions if k == "cross"]
    split = tuple(a for a in lanes if cross and a in cross[0])
    if any(c != set(split) for c in cross):
        return None
    # map temps read only by the group: inlined
    maps = _temp_maps(op)
    core = {fwd.out, adj.out} | set(readers)
    produced = {n.out for n in op.nodes if not isinstance(n, Map)} | {fwd.out, adj.out}
    inl = {k for k, m in maps.items() if k not in core and not any(a.tensor in produced for a in loads(m.value))}
    changed = True
    while changed:
        changed = False
        for k in sorted(inl):
            rd = _readers(op, k)
            if k in outputs or any(r.out not in core | inl for r in rd) or any(
                    a.tensor in maps and a.tensor not in inl for a in loads(maps[k].value)):
                inl.discard(k)
                changed = True
    inl = {k for k in inl if any(r.out in core for r in _readers(op, k)) or
           any(r.out in inl for r in _readers(op, k))}
    members = core | inl
    imaps = {k: maps[k] for k in inl}
    # maps per lane and step over the point reductions (the gradient sums of du = D * g + sum_n ...): epilogues
    point_outs = {n.out: n for n, kind, *_ in reductions if kind == "point"}
    lane_step = set(lanes) | {step}
    inputs = {t.name for t in op.inputs}
    pure = {k for k, m in maps.items() if all(a.tensor in inputs for a in loads(m.value))}
    steps: dict[str, Map] = {}
    for n in op.nodes:
        if not isinstance(n, Map) or n.out in members:
            continue
        n = _in_frame_of(n, {**point_outs, **steps})
        if n is None or set(n.axes) != lane_step:
            continue
        accs = loads(n.value)
        if not any(a.tensor in point_outs or a.tensor in steps for a in accs):
            continue
        ok = True
        for a in accs:
            if a.tensor in point_outs or a.tensor in steps:
                own = point_outs[a.tensor].axes if a.tensor in point_outs else steps[a.tensor].axes
                ok &= tuple(a.index) == tuple(own) and a.pad is None
            else:
                ok &= a.tensor in inputs or a.tensor in pure or a.tensor in inl
        if ok:
            steps[n.out] = n
    members |= set(steps)
    # sums over the step of values per lane and step (dD = sum_{b,t} g * u * silu(z)): accumulated per lane too
    for n in op.nodes:
        if (isinstance(n, Reduce) and n.out not in members and n.monoid == SUM and n.predicate is None
                and step in n.raxes and set(n.axes) | set(n.raxes) == lane_step
                and all(a.tensor in inputs or a.tensor in pure or a.tensor in inl or
                        ((a.tensor in point_outs or a.tensor in steps) and a.pad is None) for a in loads(n.value))):
            reductions.append((n, "steplane", (), tuple(a for a in lanes if a in n.axes), ()))
            members.add(n.out)
    for k in sorted(pure - members):             # input maps only members read now
        if k not in outputs and _readers(op, k) and all(r.out in members for r in _readers(op, k)):
            members.add(k)
            imaps[k] = maps[k]
            inl.add(k)
    for k in pure:
        if k in members:
            imaps.setdefault(k, maps[k])
    # what the group reads from outside must not depend on it
    reads = []
    for n in op.nodes:
        if n.out in members:
            for e in n.exprs():
                for acc in loads(e):
                    if acc.tensor not in members and acc.tensor not in reads:
                        reads.append(acc.tensor)
    if _depends_on(op, reads, members):
        return None
    needed = []
    for n in op.nodes:
        if n.out in members and n.out not in (fwd.out, adj.out) and n.out not in inl:
            if n.out in outputs or any(r.out not in members for r in _readers(op, n.out)):
                needed.append(n.out)
    # maps over the scan's axes that only members read are inlined into them (a map of h feeding the adjoint)
    for m in [m for m in stores if m.out not in needed]:
        imaps[m.out] = m
    stores = [m for m in stores if m.out in needed]
    tails = [(m, c) for m, c in tails if m.out in needed]
    # step epilogues: each with the pure input maps and the epilogues it reads inlined (point sums stay loads)
    epis, done = [], {}
    for k, m in steps.items():
        value = inline_maps(m.value, {**{x: maps[x] for x in pure}, **imaps, **done})
        done[k] = Map(k, m.axes, value)
        if k in needed:
            epis.append(done[k])
    f_scan = Scan(fwd.out, fwd.axes, fwd.scan_axes, fwd.traversal,
                  Affine(inline_maps(fwd.combine.a, imaps), inline_maps(fwd.combine.b, imaps)),
                  inline_maps(fwd.init, imaps) if fwd.init is not None else None, fwd.state_axes)
    carry = adj.combine.a == shifted_coefficient(op, fwd, rf)
    a_scan = Scan(adj.out, adj.axes, adj.scan_axes, adj.traversal,
                  Affine(inline_maps(adj.combine.a, imaps), inline_maps(adj.combine.b, imaps)),
                  inline_maps(adj.init, imaps) if adj.init is not None else None, adj.state_axes)
    reds = tuple(AdjointReduction(Reduce(n.out, n.axes, n.raxes, inline_maps(n.value, {**imaps, **done}),
                                         n.monoid), k, ks, kl, sc) for n, k, ks, kl, sc in reductions)
    order = [n.out for n in op.nodes]
    return ScanAdjointGroup(
        op, f_scan, a_scan, lanes, state, step, rf, carry, reds,
        tuple(Map(m.out, m.axes, inline_maps(m.value, imaps)) for m in stores), tuple(epis),
        tuple((Map(m.out, m.axes, inline_maps(m.value, imaps)), c) for m, c in tails), split,
        tuple(sorted(members, key=order.index)), tuple(needed), tuple(reads))


def _ungrouped(n: Reduce, scans: tuple[str, ...], axes: tuple[Axis, ...], lanes: tuple[Axis, ...]):
    """A reduction over the channels of a group, as the grad transform writes it (``sum_{g1} h[b, g0*Dg + g1, ..]``
    into ``grad_C[b, g0, ..]``), as a sum over the lane ``d`` scattered into ``g0 = d // Dg``: ``(node, scatter)``,
    or ``(n, None)`` when the node is not of that form."""
    if n.predicate is not None:
        return n, None
    for acc in loads(n.value):
        if acc.tensor not in scans or len(acc.index) != len(axes):
            continue
        for i, lane in zip(acc.index, axes):
            i = sympy.sympify(i)
            if lane not in lanes or i == lane:
                continue
            for g in n.axes:
                for r in n.raxes:
                    size = sympy.simplify((i - r) / g)
                    if any(isinstance(x, Axis) for x in size.free_symbols) or size == 0:
                        continue
                    value = substitute(substitute(n.value, {r: lane - g * size}), {g: sympy.floor(lane / size)})
                    raxes = tuple(lane if a == r else a for a in n.raxes)
                    return Reduce(n.out, n.axes, raxes, value, n.monoid), {g: sympy.floor(lane / size)}
    return n, None


def _scatter(n: Reduce, lanes: tuple[Axis, ...]) -> dict | None:
    """``{output axis: lane expression}`` for a reduction whose predicate ties an output axis to the lanes
    (``grad_B[b, t, g, n] = sum_{h, p} ... where h * G // H == g``); ``{}`` without a predicate; None otherwise."""
    p = n.predicate
    if p is None:
        return {}
    if p.op is not ExprOp.INDEX or not isinstance(p.arg, sympy.Eq):
        return None
    lhs, rhs = p.arg.lhs, p.arg.rhs
    for ax, ex in ((rhs, lhs), (lhs, rhs)):
        used = {s for s in ex.free_symbols if isinstance(s, Axis)}
        if isinstance(ax, Axis) and ax in n.axes and used and used <= set(lanes) and ax not in used:
            return {ax: ex}
    return None


def _in_frame_of(m: Map, frames: dict) -> Map | None:
    """``m`` with its axes renamed to those of the first of ``frames`` (nodes by name) it reads at its own
    position (the grad transform's output maps use fresh axes: ``grad_u[g1, g2, g3] = t13[g1, g2, g3]``)."""
    for a in loads(m.value):
        node = frames.get(a.tensor)
        if node is not None and tuple(a.index) == tuple(m.axes) and len(set(m.axes)) == len(m.axes):
            ren = dict(zip(m.axes, node.axes))
            return Map(m.out, tuple(node.axes), substitute(m.value, ren))
    return None


def _axes_of(op: Op, name: str) -> tuple[Axis, ...]:
    n = next(n for n in op.nodes if n.out == name)
    return tuple(n.axes)


def _reads_at(e: Expr, h: str, adj: str, step: Axis, reverse: bool, at) -> bool:
    """Reads of ``h`` at the step or the one before it (in the forward order), of ``adj`` at the step."""
    prev = step + 1 if reverse else step - 1
    for nd in e.walk():
        if nd.op is not ExprOp.LOAD or nd.arg.tensor not in (h, adj):
            continue
        acc = nd.arg
        k = [sympy.sympify(i).has(step) for i in acc.index].index(True) if any(
            sympy.sympify(i).has(step) for i in acc.index) else None
        if k is None:
            return False
        i = sympy.sympify(acc.index[k])
        if i == step:
            continue
        if acc.tensor == h and sympy.simplify(i - prev) == 0:
            continue
        return False
    return True


def _depends_on(op: Op, names, members) -> bool:
    """Whether any of ``names`` is computed (transitively) from a member."""
    by = {n.out: n for n in op.nodes}
    seen: set[str] = set()
    todo = [n for n in names if n in by]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        if k in members:
            return True
        for e in by[k].exprs():
            todo += [a.tensor for a in loads(e) if a.tensor in by]
    return False


def group_scan_adjoint(op: Op) -> Op:
    """``op`` with its nodes reordered so that the members of its adjoint group are contiguous, preceded by
    every node they read (unchanged when there is no group)."""
    g = fuse_scan_adjoint(op)
    if g is None:
        return op
    by = {n.out: n for n in op.nodes}
    before: set[str] = set()
    todo = [r for r in g.reads if r in by]
    while todo:
        k = todo.pop()
        if k in before:
            continue
        before.add(k)
        for e in by[k].exprs():
            todo += [a.tensor for a in loads(e) if a.tensor in by]
    members = set(g.members)
    first = [n for n in op.nodes if n.out in before]
    mid = [n for n in op.nodes if n.out in members]
    rest = [n for n in op.nodes if n.out not in before and n.out not in members]
    nodes = tuple(first + mid + rest)
    if nodes == op.nodes:
        return op
    return Op(op.name, op.tensors, nodes, op.extents, op.derived, op.constraints, op.attrs)


def split_lane(group: ScanAdjointGroup, width: int) -> ScanAdjointGroup | None:
    """``group`` with its last lane axis ``q`` split into ``q = qb * width + qv``, ``qv`` a state axis of static
    extent ``width``: a scan without state axes (``linear_scan``, minGRU) then runs ``width`` independent lanes
    as one vector, like the state of a diagonal scan. Valid when the caller checked that ``width`` divides
    ``q``'s extent; None for groups this does not serve (with state axes or reductions: only stores and tails)."""
    if group.state or group.reductions or group.epilogues or not group.lanes or width < 2:
        return None
    op = group.op
    q = group.lanes[-1]
    taken = {str(a) for a, _ in op.extents}
    qb, qv = Axis(unused_name(taken, f"{q}_blk")), Axis(unused_name(taken, f"{q}_vec"))
    ren = {q: qb * width + qv}
    extents = op.extents + ((qb, op.extent(q) / width), (qv, sympy.Integer(width)))
    new_op = Op(op.name, op.tensors, op.nodes, extents, op.derived, op.constraints, op.attrs)

    def scan(s: Scan) -> Scan:
        return Scan(s.out, s.axes, s.scan_axes, s.traversal,
                    Affine(substitute(s.combine.a, ren), substitute(s.combine.b, ren)),
                    substitute(s.init, ren) if s.init is not None else None, s.state_axes)

    def remap(m: Map) -> Map:
        return Map(m.out, tuple(ren.get(a, a) for a in m.axes), substitute(m.value, ren))

    return ScanAdjointGroup(new_op, scan(group.forward), scan(group.adjoint), group.lanes[:-1] + (qb,), (qv,),
                            group.step, group.reverse, group.carry_a, (), tuple(remap(m) for m in group.stores), (),
                            tuple((remap(m), c) for m, c in group.tails), (), group.members, group.outputs,
                            group.reads)


def unused_name(taken: set[str], base: str) -> str:
    """``base``, or ``base1``, ``base2``... the first not in ``taken`` (which it joins)."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def finish_partial(r: AdjointReduction, x, axes: tuple[Axis, ...]):
    """A reduction's result from its kernel partial ``x`` (a torch tensor over ``axes``): a cross partial summed
    over its leading split dim, a lane partial over the lane axes the reduction sums; permuted to the output's
    axis order."""
    if r.kind == "cross":
        x = x.sum(0)
    else:
        drop = [k for k, a in enumerate(axes) if a in r.node.raxes]
        if drop:
            x = x.sum(drop)
        axes = tuple(a for a in axes if a not in r.node.raxes)
    return x.permute([axes.index(a) for a in r.node.axes])
