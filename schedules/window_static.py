"""The static structure of a window group at a binding, shared by the window kernels of every target.

A window group (:class:`opgen.ir.passes.window.WindowGroup`) keeps its sizes symbolic; a kernel bakes in the
channel counts, window sizes, strides, dilations and offsets of one call and leaves the batch and spatial sizes as
arguments. :func:`static_window` computes those numbers (a flipped window, negative dilation, becomes a positive
dilation with ``flip`` set and its offset moved to the first tap).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from opgen.ir.passes.window import WindowGroup
from opgen.ir.symbols import Axis, Dim

__all__ = ["StaticDim", "StaticWindow", "static_window", "dynamic_dims"]


@dataclass(frozen=True)
class StaticDim:
    """One spatial dim with its static numbers (dilation made positive: ``flip`` reverses the window axis)."""

    real: bool
    out_axis: Axis | None
    win_axis: Axis | None
    data_dim: int | None
    stride: int
    dil: int
    off: int
    flip: bool
    K: int


@dataclass(frozen=True)
class StaticWindow:
    """The group at a binding: static numbers for the kernel, the dims that stay symbolic."""

    static: tuple[tuple[Dim, int], ...]
    dynamic: frozenset
    row: StaticDim
    col: StaticDim
    Cg: int
    Fg: int
    G: int
    kind: str


def _dims_of(e) -> set:
    return {s for s in sympy.sympify(e).free_symbols if isinstance(s, Dim)}


def dynamic_dims(group: WindowGroup) -> frozenset:
    """Dims of batch and spatial input sizes (kept symbolic) that no static quantity needs."""
    op = group.op
    ext = dict(op.extents)
    dyn: set = set()
    shape = op.tensor(group.data.tensor).shape
    for _, k in group.batch:
        dyn |= _dims_of(shape[k])
    for s in group.spatial:
        dyn |= _dims_of(s.in_size)
    static: set = set()
    for d in op.tensor(group.weight.tensor).shape:
        static |= _dims_of(d)
    for s in group.spatial:
        static |= _dims_of(s.offset) | _dims_of(ext[s.win_axis])
    ch = group.channels
    static |= _dims_of(ch.in_per_group) | _dims_of(ch.out_per_group) | _dims_of(ch.groups)
    if ch.data_dim is not None:
        static |= _dims_of(shape[ch.data_dim])
    if ch.out_axis is not None:
        static |= _dims_of(ext[ch.out_axis])
    return frozenset(dyn - static)


def static_window(group: WindowGroup, binding) -> StaticWindow:
    """Static numbers of ``group`` at ``binding``; ValueError naming the op when the form is unsupported."""
    op = group.op
    dyn = dynamic_dims(group)
    static = tuple(sorted(((d, int(v)) for d, v in binding.dims.items() if d not in dyn), key=lambda x: x[0].name))
    sub = {d: sympy.Integer(v) for d, v in static}

    def num(e, what: str) -> int:
        v = sympy.sympify(e).xreplace(sub)
        if not v.is_Integer:
            raise ValueError(f"op {op.name}: the window {what} {e} must not depend on the batch or image size")
        return int(v)

    if len(group.spatial) not in (1, 2):
        raise ValueError(f"op {op.name}: the window kernels handle 1-D and 2-D windows, not "
                         f"{len(group.spatial)}-D")
    sps = []
    for s in group.spatial:
        K = int(binding.extents[s.win_axis])
        off = num(s.offset, "offset")
        flip = s.dilation < 0
        dil = abs(s.dilation)
        if flip:
            off = off + (K - 1) * s.dilation
        sps.append(StaticDim(True, s.out_axis, s.win_axis, s.data_dim, s.stride, dil, off, flip, K))
    row = sps[0] if len(sps) == 2 else StaticDim(False, None, None, None, 1, 1, 0, False, 1)
    col = sps[-1]
    ch = group.channels
    Cg, Fg, G = (num(e, "channel count") for e in (ch.in_per_group, ch.out_per_group, ch.groups))
    return StaticWindow(static, dyn, row, col, Cg, Fg, G, ch.kind_at(binding.dims))
