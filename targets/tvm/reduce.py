"""One Reduce node as a TVM CPU kernel: the reductions of generated backward ops, run node by node.

The grad transform writes the backward of a scan as two scans plus pointwise-valued reductions over the batch,
time or state axes (``selective_scan``: ``dA[d, n] = sum_{b, t} adj_h * h[t-1] * softplus(delta) * exp(...)``,
``dB[b, n, t] = sum_d ...``). The session runs the scans of such an op as scan kernels and, with this module, each
builtin reduction as a kernel too, instead of the interpreter materializing the 4-D products::

    for lane in T.parallel(prod(output extents)):       # one output element per iteration
        acc = identity
        for r in reduction axes (serial):                # values hoisted to the loop level they depend on
            if predicate: acc = acc (+|max|min|*) value
        out[lane] = acc

Every dim is symbolic (one kernel serves every size); padded reads load 0 outside their tensor; float32 values
use the polynomial exp/log of :mod:`.expr` (``fast_math``), float64 the exact ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from opgen.ir import DType, ExprOp
from opgen.ir.nodes import MAX, MIN, PROD, SUM, Reduce
from opgen.ir.op import Op
from opgen.ir.symbols import Dim

from .expr import (Code, ExprEmitter, IndexRenderer, Scope, compute_dtype, const_text, scratch_buffer, tvm_dtype,
                   write_func_head)

SUPPORTED_DTYPES = frozenset({DType.f32, DType.f64})
_MONOIDS = {SUM: ("0", "{a} + {v}"), PROD: ("1", "{a} * {v}"), MAX: ("-inf", "T.max({a}, {v})"),
            MIN: ("inf", "T.min({a}, {v})")}


@dataclass(frozen=True)
class ReduceSource:
    """A rendered reduction kernel: TVMScript text and the calling convention."""

    text: str
    tensors: tuple[str, ...]          # inputs, then the output
    scalars: tuple[Dim, ...]          # then these dims, as int arguments


def reduce_supported(op: Op) -> tuple[bool, str]:
    """Whether ``op`` is one builtin Reduce node the reduction kernel renders ((False, why) when not)."""
    if len(op.nodes) != 1 or not isinstance(op.nodes[0], Reduce):
        return False, f"op {op.name} is not a single reduction"
    node = op.nodes[0]
    if node.monoid not in _MONOIDS:
        return False, f"op {op.name}: the monoid {node.monoid} is not builtin"
    for t in op.inputs + op.outputs:
        if t.dtype not in SUPPORTED_DTYPES:
            return False, f"op {op.name}: tensor {t.name} is {t.dtype}; the reduction kernel takes f32 and f64"
    for n in node.value.walk():
        if n.op is ExprOp.ARG:
            return False, f"op {op.name}: the value uses monoid arguments"
    return True, ""


def render_reduce(op: Op, index_bits: int = 32, fast_math: bool = True, vector: int = 1) -> ReduceSource:
    """The TVMScript source of the single-Reduce op ``op`` (see the module doc). ``vector`` > 1 computes that many
    consecutive elements of the last output axis at once (its extent must be a multiple: the kernel asserts)."""
    ok, why = reduce_supported(op)
    if not ok:
        raise ValueError(why)
    node: Reduce = op.nodes[0]
    idt = f"int{index_bits}"
    params = list(op.inputs) + list(op.outputs)
    derived = {d for d, _ in op.derived}
    plain: dict[Dim, str] = {}
    for t in params:
        for s in t.shape:
            if isinstance(s, Dim) and s not in derived:
                plain.setdefault(s, t.name)
    every = list(op.dims)
    for e in [e for _, e in op.derived] + [e for _, e in op.extents]:
        every += [s for s in sympy.sympify(e).free_symbols if isinstance(s, Dim) and s not in every]
    scalars = tuple(d for d in every if d not in derived and d not in plain)
    sym: dict[sympy.Symbol, str] = {d: f"n_{d.name}" for d in every}
    ir_dims = IndexRenderer(sym, idt)
    ext = {a: ir_dims(e) for a, e in op.extents}
    for a in tuple(node.axes) + tuple(node.raxes):
        sym[a] = f"i_{a.name}"
    V = vector if node.axes else 1
    vax = node.axes[-1] if V > 1 else None
    if vax is not None:
        sym[vax] = "(vb + v)"
    ir = IndexRenderer(sym, idt)
    allocs: list[str] = []

    def alloc(dt: str, shape: tuple) -> str:
        name = f"vt{len(allocs)}"
        allocs.append(scratch_buffer(name, f"({', '.join(shape)},)", dt))
        return name

    masked = {n.arg for e in node.exprs() for n in e.walk()
              if n.op is ExprOp.LOAD and n.arg.pad is not None
              and any(sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0 for lo, hi in n.arg.pad)}
    em = ExprEmitter(buffers={t.name: f"b_{t.name}" for t in op.tensors},
                     shapes={t.name: t.shape for t in op.tensors}, dtypes={t.name: t.dtype for t in op.tensors},
                     index=ir, masked=masked, fast_math=fast_math, alloc=alloc, vector_axis=vax, vector_len=V)
    root = Scope("lane", None, tuple(node.axes))
    chain, cur = [], root
    for k, a in enumerate(node.raxes):
        cur = cur.child(f"r_{a}", (a,), leaf=(k == len(node.raxes) - 1))
        chain.append(cur)
    if not chain:
        cur = root.child("leaf", (), leaf=True)
        chain.append(cur)
    leaf = chain[-1]
    adt = compute_dtype(node.value.dtype)
    atxt = tvm_dtype(adt)
    value = em.emit(node.value, leaf)
    vtxt = value.text if tvm_dtype(compute_dtype(node.value.dtype)) == atxt else f"T.Cast(\"{atxt}\", {value.text})"
    ident, step = _MONOIDS[node.monoid]
    ai = "acc[v]" if V > 1 else "acc[0]"
    update = f"{ai} = " + step.format(a=ai, v=vtxt)
    lines = leaf.vlines if V > 1 else leaf.lets
    if node.predicate is not None:
        pred = em.emit(node.predicate, leaf)
        lines += [f"if {pred.text}:", "    " + update]
    else:
        lines.append(update)
    out = op.outputs[0]
    odt = tvm_dtype(out.dtype)
    store = ai if odt == atxt else f"T.Cast(\"{odt}\", {ai})"

    def level(c: Code, depth: int, sc: Scope) -> None:
        c.block(depth, sc.lets)
        if sc.vlines:
            c.w(depth, f"for v in T.vectorized({V}):")
            c.block(depth + 1, sc.vlines)

    c = Code()
    write_func_head(c, "opgen.targets.tvm.reduce", "main", params, scalars, plain, idt, ir_dims, op.derived, ())
    lanes = list(node.axes)
    lane_ext = [f"T.floordiv({ext[a]}, {V})" if a == vax else ext[a] for a in lanes]
    if vax is not None:
        c.w(1, f"assert T.floormod({ext[vax]}, {V}) == 0, \"opgen: the last output extent must be a multiple of {V}\"")
    c.w(1, f"for lane in T.parallel({' * '.join(lane_ext) or '1'}):")
    for k, a in enumerate(lanes):
        inner = " * ".join(lane_ext[k + 1:])
        q = f"T.floordiv(lane, {inner})" if inner else "lane"
        val = f"T.floormod({q}, {lane_ext[k]})" if k > 0 else q
        c.w(2, f"vb: T.let = {val} * {V}" if a == vax else f"i_{a.name}: T.let = {val}")
    c.w(2, scratch_buffer("acc", f"({V},)", atxt))
    c.block(2, allocs)
    if V > 1:
        c.w(2, f"for v in T.vectorized({V}):")
        c.w(3, f"acc[v] = {const_text(float(ident), atxt)}")
    else:
        c.w(2, f"acc[0] = {const_text(float(ident), atxt)}")
    level(c, 2, root)
    d = 2
    for sc in chain:
        if sc.axes:
            (a,) = sc.axes
            c.w(d, f"for i_{a.name} in range({ext[a]}):")
            d += 1
        level(c, d, sc)
    index = ", ".join(sym[a] for a in lanes) or "0"
    if V > 1:
        c.w(2, f"for v in T.vectorized({V}):")
        c.w(3, f"b_{out.name}[{index}] = {store}")
    else:
        c.w(2, f"b_{out.name}[{index}] = {store}")
    return ReduceSource("\n".join(c.lines) + "\n", tuple(t.name for t in params), scalars)


def run_reduce(op: Op, inputs, binding, cache) -> dict:
    """Run the reduction kernel of ``op``: ``{output name: fresh tensor}`` (CPU tensors, declared dtypes)."""
    import math

    import torch

    from opgen.ir.dtypes import to_torch
    from opgen.targets.memory import empty

    biggest = max((math.prod(s) for s in binding.shapes.values()), default=1)
    node = op.nodes[0]
    lanes = 8 if op.tensor(node.out).dtype == DType.f32 else 4
    vector = lanes if node.axes and binding.extents[node.axes[-1]] % lanes == 0 else 1
    src = _source(op, 64 if biggest > 2**31 - 1 else 32, vector)
    fn = cache.get(src.text)
    args, outs = [], {}
    for name in src.tensors:
        t = op.tensor(name)
        dtype = to_torch(t.dtype)
        if t.kind == "output":
            x = empty(binding.shapes[name], dtype=dtype)
            outs[name] = x
        else:
            x = inputs[name]
            if x.device.type != "cpu":
                raise ValueError(f"op {op.name}: the tvm target runs on CPU tensors; input {name!r} is on {x.device}")
            x = x.to(dtype).contiguous()
        args.append(x)
    args += [binding.dims[d] for d in src.scalars]
    with torch.no_grad():
        fn(*args)
    return outs


_SOURCES: dict = {}


def _source(op: Op, bits: int, vector: int) -> ReduceSource:
    key = (op, bits, vector)
    hit = _SOURCES.get(key)
    if hit is None:
        if len(_SOURCES) > 1024:
            _SOURCES.clear()
        hit = _SOURCES[key] = render_reduce(op, bits, vector=vector)
    return hit
