"""The time-vector variant of a first-order scan: W consecutive steps of one lane as the lanes of a SIMD vector.

A first-order recurrence ``h[t] = a[t] * h[t-1] + b[t]`` over lanes that are strided in memory (each lane
contiguous in time: ``linear_scan`` on ``[P, L]``) is latency-bound as a scalar chain, and vectorizing across
lanes needs a transpose. Here each block of W steps is loaded as two contiguous vectors and scanned inside the
registers (Hillis-Steele: log2(W) levels, each combining every element with the one ``k`` steps earlier, shifted
in by ``T.Shuffle`` with the identity (1, 0) filled in)::

    c = b; p = a                                  # element i: the map of steps (i-k, i] after each level
    for k in 1, 2, 4, ..:  c = p * shift(c, k, 0) + c;  p = p * shift(p, k, 1)
    h = p * broadcast(state) + c                  # the state carried in from the previous block
    state = h[W - 1]                              # (h[0] for a reversed scan, whose shifts run the other way)

so the per-step work is a few vector FMAs and shuffles and the loads and stores are whole vectors (linear_scan
1024 x 2048 fp32 on AVX2: 1.24 ms against 1.64 ms for 4 interleaved scalar chains; an elementwise add over the
same bytes 0.84 ms). The steps after the last full block (before the first, reversed) run as a scalar loop.

Applies (:func:`time_vector_supported`) to groups with a scalar state per lane (no state axes, no projection or
epilogue) whose step-dependent accesses are unpadded and contiguous in the step (the step axis is the last index
that is not a size-1 dim).
"""
from __future__ import annotations

from typing import Callable, Mapping

from opgen.ir.passes import ScanGroup
from opgen.ir.symbols import Axis
from opgen.schedules.scan import TIME_VECTOR_WIDTHS, padded_steps, time_vector_supported  # noqa: F401 (re-exported)

from .expr import ExprEmitter, IndexRenderer, Scope, scratch_buffer

# (the time-vector variant's widths and applicability, TIME_VECTOR_WIDTHS and time_vector_supported, are schedule
# data: opgen.schedules.scan)

def _shift(vec: str, k: int, fill: str, width: int, reverse: bool) -> str:
    """``vec`` moved k steps along the scan (element i reads element i - k, or i + k reversed), ``fill`` (the
    identity) shifted in: one level of a Hillis-Steele scan. (A Sklansky scan, one permute and a blend per
    level, has fewer shuffles on paper but ran 1.4x slower in cache on AVX2: its levels are longer latency.)"""
    if reverse:      # concat([vec, fill]): indices >= width read the fill
        idx = [i + k for i in range(width)]
        return f"T.Shuffle([{vec}, T.Broadcast({fill}, {width})], [{', '.join(map(str, idx))}])"
    idx = [width - k + i for i in range(width)]        # concat([fill, vec]): element i reads vec[i - k]
    return f"T.Shuffle([T.Broadcast({fill}, {width}), {vec}], [{', '.join(map(str, idx))}])"


def time_vector_body(group: ScanGroup, width: int, *, sym: Mapping, buffers: Mapping[str, str],
                     dtypes: Mapping, shapes: Mapping, ext_step: str, state_dtype: str,
                     out_dtype: str | None, conv: Callable[[str, object], str], fast_math: bool,
                     index_dtype: str = "int32") -> tuple[list[str], list[tuple[int, str]]]:
    """(local buffer declarations, (depth, line) body) of one lane's scan: blocks of ``width`` steps scanned in
    registers, then the scalar remainder. ``sym`` renders axes and dims (the step is overridden here);
    ``conv(text, dtype)`` converts a value of IR dtype ``dtype`` to the state dtype; ``out_dtype`` is the TVM
    dtype of the stored state (None: not stored)."""
    W, rev = width, group.reverse
    step = group.step
    a_e, b_e = group.scan.combine.a, group.scan.combine.b
    sdt = state_dtype
    one, zero = f"T.{sdt}(1)", f"T.{sdt}(0)"
    allocs = [scratch_buffer("st", "(1,)", sdt),
              scratch_buffer("ta", f"({W},)", sdt),
              scratch_buffer("tc", f"({W},)", sdt),
              scratch_buffer("sv", f"({W},)", sdt),
              scratch_buffer("st0", "(1,)", sdt),
              scratch_buffer("fv", f"({W},)", sdt),
              scratch_buffer("fin", "(1,)", "int32")]
    if out_dtype is not None:
        allocs.append(scratch_buffer("th", f"({W},)", sdt))
    body: list[tuple[int, str]] = []

    def alloc(dtype: str, shape: tuple) -> str:
        name = f"vt{len(allocs)}"
        allocs.append(scratch_buffer(name, f"({', '.join(shape)},)", dtype))
        return name

    masked, lo, hi = padded_steps(group)

    def render(exprs, s, vector: bool = False) -> tuple[list[str], list[str], list[str]]:
        """(scalar statements, statements of the vector loop over the block's steps, value texts) of
        ``exprs`` in one scope (shared subexpressions emitted once). Vector temporaries are [W] local buffers:
        TVM does not vectorize a loop that assigns scalar locals. Blocks read padded tensors unmasked (they
        stay inside them); the scalar steps mask."""
        ir = IndexRenderer(s, index_dtype)
        em = ExprEmitter(buffers=buffers, shapes=shapes, dtypes=dtypes, index=ir, fast_math=fast_math,
                         masked=() if vector else masked,
                         vector_axis=step if vector else None, vector_len=W if vector else 1, alloc=alloc)
        leaf = Scope("value", None, tuple(x for x in s if isinstance(x, Axis)), leaf=True)
        texts = [em.emit(e, leaf).text for e in exprs]
        return leaf.lets, leaf.vlines, texts

    if group.scan.init is not None:
        lets, _, (it,) = render([group.scan.init], sym)
        body.extend((0, ln) for ln in lets)
        body.append((0, f"st[0] = {conv(it, group.scan.init.dtype)}"))
    else:
        body.append((0, f"st[0] = {zero}"))
    # blocks cover steps [lo, lo + nfull * W): every load they make is inside its tensor
    body.append((0, f"nfull: T.let = T.max(T.floordiv({ext_step} - {lo + hi}, {W}), 0)"))

    def values(step_text: str, vector: bool = False):
        s = dict(sym)
        s[step] = step_text
        lets, vlines, (at, bt) = render([a_e, b_e], s, vector)
        ir = IndexRenderer(s, index_dtype)
        out_buf = f"{buffers[group.scan.out]}[{', '.join(ir(i) for i in group.scan.axes)}]"

        def store(v: str) -> str:
            cast = v if out_dtype == sdt else f"T.Cast(\"{out_dtype}\", {v})"
            return f"{out_buf} = {cast}"
        return lets, vlines, conv(at, a_e.dtype), conv(bt, b_e.dtype), store

    def scalar_steps(count: str, step_of: Callable[[str], str], depth: int = 0) -> None:
        body.append((depth, f"for s in range({count}):"))
        body.append((depth + 1, f"i_step: T.let = {step_of('s')}"))
        lets, _, at, bt, store = values("i_step")
        body.extend((depth + 1, ln) for ln in lets)
        body.append((depth + 1, f"st[0] = {at} * st[0] + {bt}"))
        if out_dtype is not None:
            body.append((depth + 1, store("st[0]")))

    def blocks() -> None:
        body.append((0, f"sv[T.Ramp(0, 1, {W})] = T.Broadcast(st[0], {W})"))
        body.append((0, "for s0 in range(nfull):"))
        body.append((1, f"tb: T.let = {'(nfull - 1 - s0)' if rev else 's0'} * {W} + {lo}"))
        lets, vlines, at, bt, store = values("(tb + v)", vector=True)
        body.extend((1, ln) for ln in lets)
        body.append((1, f"for v in T.vectorized({W}):"))
        body.extend((2, ln) for ln in vlines)
        body.append((2, f"ta[v] = {at}"))
        body.append((2, f"tc[v] = {bt}"))
        body.append((1, f"p0: T.let = ta[T.Ramp(0, 1, {W})]"))
        body.append((1, f"c0: T.let = tc[T.Ramp(0, 1, {W})]"))
        k, lvl = 1, 0
        while k < W:
            body.append((1, f"c{lvl + 1}: T.let = p{lvl} * {_shift(f'c{lvl}', k, zero, W, rev)} + c{lvl}"))
            body.append((1, f"p{lvl + 1}: T.let = p{lvl} * {_shift(f'p{lvl}', k, one, W, rev)}"))
            k, lvl = 2 * k, lvl + 1
        last = 0 if rev else W - 1
        body.append((1, f"hv: T.let = p{lvl} * sv[T.Ramp(0, 1, {W})] + c{lvl}"))
        # the carry stays a vector (every lane the block's last state: one permute on the loop-carried path,
        # not an extract and a broadcast)
        body.append((1, f"sv[T.Ramp(0, 1, {W})] = T.Shuffle([hv], [{', '.join([str(last)] * W)}])"))
        # the sum of the lane's states: finite unless one of them is inf or NaN (or the sum overflows: then the lane
        # runs again for nothing); one vector add a block, off the carried path
        body.append((1, f"fv[T.Ramp(0, 1, {W})] = fv[T.Ramp(0, 1, {W})] + hv"))
        if out_dtype is not None:
            body.append((1, f"th[T.Ramp(0, 1, {W})] = hv"))
            body.append((1, f"for v in T.vectorized({W}):"))
            body.append((2, store("th[v]")))
        body.append((0, "st[0] = sv[0]"))

    body.append((0, "st0[0] = st[0]"))
    body.append((0, f"fv[T.Ramp(0, 1, {W})] = T.Broadcast({zero}, {W})"))
    end = f"({lo} + nfull * {W})"                          # the first step after the blocks
    head = f"T.min({lo}, {ext_step})"                       # steps before the blocks
    if rev:
        scalar_steps(f"{ext_step} - {end}", lambda s: f"({ext_step} - 1 - {s})")
        blocks()
        if lo:
            scalar_steps(head, lambda s: f"({head} - 1 - {s})")
    else:
        if lo:
            scalar_steps(head, lambda s: s)
        blocks()
        scalar_steps(f"{ext_step} - T.max({end}, {head})", lambda s: f"(T.max({end}, {head}) + {s})")
    # A block that met inf or NaN is not what the sequential loop computes: its products of the a's times a zero
    # state or a zero shifted in are inf * 0 = NaN where the loop, multiplying step by step, gets inf. Such a lane
    # runs again one step at a time from its initial state (its outputs overwritten).
    body.append((0, "fin[0] = 1"))
    body.append((0, f"for v in range({W}):"))
    # |x| <= the largest finite float32: false for inf and NaN (a comparison the TIR simplifier does not fold; a
    # float64 sum past it only reruns the lane; the TVMScript parser takes no float literal beyond float32)
    big = "3.4028234663852886e+38"
    body.append((1, f"fin[0] = T.Select(T.abs(fv[v]) <= T.{sdt}({big}), fin[0], 0)"))
    body.append((0, "if fin[0] == 0:"))
    body.append((1, "st[0] = st0[0]"))
    scalar_steps(ext_step, (lambda s: f"({ext_step} - 1 - {s})") if rev else (lambda s: s), depth=1)
    return allocs, body
