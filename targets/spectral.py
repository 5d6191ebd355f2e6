"""The FFT algorithm for 1-D window reductions (long convolutions) and lag correlations (their weight gradients).

A 1-D window reduction with stride 1 and dilation +-1 whose channels are depthwise (or absent) is, per row, a
linear convolution (dilation -1: ``y[t] = sum_j w[j] x[t - j + off]``) or a cross-correlation (dilation +1) of the
data row with the weight row, with the data zero outside ``[0, N)`` (its declared padding). With
``n >= N + K - 1`` both are exact through real FFTs of size ``n``: ``irfft(rfft(x, n) * rfft(w', n))`` where
``w'`` is ``w`` (convolution) or ``w`` reversed (correlation), sliced at the offset. The weight's spectrum is
computed once per channel and broadcast over the batch. Cost ``O(N log N)`` per row against ``O(N K)`` for the
direct kernel, so the FFT wins for long windows (the choice is the ``variant`` knob of the window space: the
tuner picks by measuring, the default by :func:`prefer_fft`).

A lag correlation (:mod:`opgen.ir.passes.correlation`, the weight gradient ``dk[h, j] = sum_{b,t} dy[b,h,t]
u[b,h,t-j]``) is ``irfft(sum_b conj(rfft(a_b)) * rfft(b_b))`` read at the lags: the batch sum happens in the
frequency domain, so it costs two forward transforms per row and one inverse per channel.

The transforms are torch's (``torch.fft``: MKL or pocketfft on CPU, cuFFT on CUDA), in float32 for float32 ops
and float64 for float64 ops; everything around them (operand layout, zero padding, the spectral product, slicing)
is fused into as few passes as torch allows, and a pointwise epilogue (bias, activation, gating) is evaluated
on the result by the reference interpreter (elementwise torch ops).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import torch

from opgen.ir.index import evaluate_int
from opgen.ir.passes.correlation import CorrelationGroup
from opgen.ir.passes.window import WindowGroup
from opgen.ir.symbols import Axis
from opgen.targets.memory import empty


@functools.lru_cache(maxsize=4096)
def next_fast_len(m: int) -> int:
    """The smallest ``2^a 3^b 5^c >= m`` (sizes FFT libraries transform fastest)."""
    best = 1 << max(0, (m - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = p35
            while q < m:
                q *= 2
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return best


def _int(e, binding) -> int:
    return _int_at(e, tuple(sorted(binding.dims.items(), key=lambda kv: kv[0].name)))


@functools.lru_cache(maxsize=8192)
def _int_at(e, dims: tuple) -> int:
    """``e`` evaluated at ``dims`` (memoized: sympy substitution costs ~50 us a call)."""
    return int(evaluate_int(e, dict(dims)))


def window_fft_supported(group: WindowGroup, binding=None) -> tuple[bool, str]:
    """Whether the FFT algorithm computes ``group`` ((False, why) when not); with ``binding``, also at its sizes."""
    if len(group.spatial) != 1:
        return False, f"the FFT variant takes 1-D windows; this one is {len(group.spatial)}-D"
    sp = group.spatial[0]
    if sp.stride != 1 or abs(sp.dilation) != 1:
        return False, f"the FFT variant needs stride 1 and dilation +-1 (got stride {sp.stride}, dilation {sp.dilation})"
    ch = group.channels
    if ch.kind not in ("depthwise", "none"):
        return False, f"the FFT variant takes depthwise (or channel-free) windows; this one is {ch.kind}"
    if ch.kind == "depthwise" and binding is not None:
        if ch.kind_at(binding.dims) != "depthwise" or _int(ch.out_per_group, binding) != 1:
            return False, "the FFT variant takes one output channel per input channel"
    if any(not isinstance(i, Axis) for i in group.weight.index):
        return False, "the FFT variant needs a weight indexed by plain axes"
    return True, ""


def prefer_fft(group: WindowGroup, binding) -> bool:
    """The default choice between the direct kernel and the FFT: ``T * K`` multiply-adds per row against
    ``FFT_WORK * n log2 n`` for the transforms (measured on AVX2, one thread, 2 x 64 rows: the vectorized
    direct kernel wins up to ~256 taps at L=1024 and ~512 at L=4096)."""
    if not window_fft_supported(group, binding)[0]:
        return False
    sp = group.spatial[0]
    t_out, k, n_in = (_int(e, binding) for e in (sp.out_size, sp.window, sp.in_size))
    n = next_fast_len(n_in + k - 1)
    return t_out * k > FFT_WORK * n * math.log2(max(n, 2))


#: direct multiply-adds worth one ``n log2 n`` unit of transform work (calibrated; see :func:`prefer_fft`)
FFT_WORK = 30.0


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


#: bytes of spectrum per chunk of rows: large enough for long row batches, small enough that the allocator
#: reuses heap blocks (glibc serves blocks below its 32 MiB mmap threshold from the heap once freed: no page
#: faults) and that a chunk's transforms stay near the caches. Measured at B=4, H=256, L=8192 on one AVX2 thread:
#: unchunked (torch's whole-tensor form) 434 ms; chunks of 4 heads 253 ms, 16 heads 193 ms, 64 heads 159 ms.
CHUNK_BYTES = 16 << 20


def _chunk(rows_per_unit: int, n: int, dtype: torch.dtype, units: int) -> int:
    """How many units (channels) of ``rows_per_unit`` rows to transform at once."""
    per_unit = rows_per_unit * (n // 2 + 1) * (16 if dtype == torch.float64 else 8)
    return max(1, min(units, CHUNK_BYTES // max(per_unit, 1)))


#: a data value whose magnitude exceeds this many times its row's mean |x| is an outlier: the transform takes it as
#: zero and it is added back by a direct sum to the outputs that read it (:func:`_add_spikes`), so its rounding
#: never reaches earlier outputs (1e7 at the end of a row of unit values moved every earlier output by ~0.1 when
#: transformed); a value inside the ratio moves earlier outputs by at most ~eps x ratio of the row's scale
OUTLIER_RATIO = 1024.0


def _spike_mask(x: torch.Tensor) -> torch.Tensor | None:
    """Where ``x`` ``(rows, C, N)`` holds values the transform must not see (NaN, inf, and outliers past
    :data:`OUTLIER_RATIO` times their row's mean |x| of finite values), or None when there are none. The common
    case costs two whole-tensor reductions (min/max and the l1 norm: ~23 ms at 4 x 256 x 8192 on one thread, next
    to ~150 ms of transforms); only data with a large dynamic range pay for the per-row test."""
    if x.numel() == 0:
        return None
    lo, hi = torch.aminmax(x)
    l1 = torch.linalg.vector_norm(x, 1)
    if bool(torch.isfinite(l1)) and float(torch.maximum(-lo, hi)) <= OUTLIER_RATIO * float(l1) / x.numel():
        return None                          # a finite l1 norm: every value finite; none past the ratio
    finite = torch.isfinite(x)
    a = x.abs().masked_fill_(~finite, 0.0)
    return ~finite | (a > OUTLIER_RATIO * a.mean(-1, keepdim=True))


#: most NaN / inf / outlier data values the FFT window path adds back one by one (:func:`_add_spikes`); past that the op
#: runs on the reference interpreter (direct sums)
MAX_NONFINITE = 4096


def _add_spikes(y: torch.Tensor, spikes: list, w: torch.Tensor, shift: int, corr: bool) -> None:
    """Add to ``y`` ``(rows, C, T)`` the terms of the data values ``spikes`` (``((row, channel, s), value)``, taken
    as zeros by the transform): ``x[s]`` meets ``w[j]`` at ``t = s + j - shift`` (a convolution) or
    ``t = s - shift - j`` (a correlation), as a direct sum would (``inf * 0`` is NaN, ``inf - inf`` NaN)."""
    K, T = w.shape[-1], y.shape[-1]
    for (r, c, s), v in spikes:
        wc = w[c if w.shape[0] > 1 else 0]
        if corr:                                 # t = s - shift - j, j in [0, K): t from s - shift - K + 1 up
            t0, t1 = max(0, s - shift - K + 1), min(T, s - shift + 1)
            if t1 > t0:
                y[r, c, t0:t1] += v * wc[s - shift - t1 + 1:s - shift - t0 + 1].flip(-1)
        else:
            t0, t1 = max(0, s - shift), min(T, s - shift + K)
            if t1 > t0:
                y[r, c, t0:t1] += v * wc[t0 + shift - s:t1 + shift - s]


def _window_acc(group: WindowGroup, inputs: Mapping[str, torch.Tensor], binding) -> torch.Tensor | None:
    """The reduction ``group.reduce.out`` by FFT, laid out in ``group.axes`` order (None when the data hold more
    than :data:`MAX_NONFINITE` NaN / inf / outlier values)."""
    sp = group.spatial[0]
    ch = group.channels
    data, weight = group.data, group.weight
    x = inputs[data.tensor]
    w = inputs[weight.tensor]
    depthwise = ch.kind == "depthwise"
    order = [k for _, k in group.batch] + ([ch.data_dim] if depthwise else []) + [sp.data_dim]
    const = [k for k in range(x.dim()) if k not in order]
    x = x.permute(order + const)[(slice(None),) * len(order) + (0,) * len(const)]
    w_order = ([weight.index.index(ch.out_axis)] if depthwise else []) + [weight.index.index(sp.win_axis)]
    w_const = [k for k in range(w.dim()) if k not in w_order]
    w = w.permute(w_order + w_const)[(slice(None),) * len(w_order) + (0,) * len(w_const)]
    cdt = _compute_dtype(x, w)
    lead = x.shape[:-2] if depthwise else x.shape[:-1]          # the batch dims
    if not depthwise:                          # one shared filter: every row is a batch row
        x, w = x.reshape(-1, 1, x.shape[-1]), w.reshape(1, -1)
    x = x.reshape(-1, x.shape[-2], x.shape[-1])              # (rows, C, N)
    n_in, k = x.shape[-1], w.shape[-1]
    full_len = n_in + k - 1
    n = next_fast_len(full_len)
    shift = _int(sp.offset, binding)
    t_out = _int(sp.out_size, binding)
    spikes = None
    bad = _spike_mask(x)
    if bad is not None and bool(bad.any()):
        # NaN / inf and outlying values: transformed, they would reach every output of their row (a NaN at the end
        # made every earlier output NaN; 1e7 moved them by ~0.1 of ~3). The transform takes them as zeros and
        # each is added back by a direct sum to the outputs that read it (few of them; else the direct path)
        where = bad.nonzero()
        if where.shape[0] > MAX_NONFINITE:
            return None
        spikes = list(zip(where.tolist(), x[bad].to(cdt).tolist()))
        x = x.masked_fill(bad, 0.0)
    w = w.to(cdt)
    spike_w, spike_shift = w, shift
    if sp.dilation == 1:                      # correlation = convolution with the reversed window
        w = w.flip(-1)
        shift += k - 1
    lo, hi = max(shift, 0), min(shift + t_out, full_len)
    y = empty((x.shape[0], x.shape[1], t_out), dtype=cdt, device=x.device)
    if not (lo == shift and hi == shift + t_out):
        y.zero_()
    wf = torch.fft.rfft(w, n)                                 # (C, n/2+1): once per channel
    step = _chunk(x.shape[0], n, cdt, x.shape[1])
    for c0 in range(0, x.shape[1], step):
        cs = slice(c0, c0 + step)
        spec = torch.fft.rfft(x[:, cs].to(cdt), n)
        spec.mul_(wf[cs])
        if hi > lo:
            y[:, cs, lo - shift:hi - shift] = torch.fft.irfft(spec, n)[..., lo:hi]
    if spikes is not None:
        _add_spikes(y, spikes, spike_w, spike_shift, sp.dilation == 1)
    y = y.reshape(lead + y.shape[1:]) if depthwise else y.reshape(lead + (t_out,))
    have = [a for a, _ in group.batch] + ([ch.out_axis] if depthwise else []) + [sp.out_axis]
    return y.permute([have.index(a) for a in group.axes])


def _correlation_acc(group: CorrelationGroup, inputs: Mapping[str, torch.Tensor], binding) -> torch.Tensor:
    """The reduction ``group.reduce.out`` by FFT over the lagged dims, laid out in ``group.axes`` order."""
    a, b = inputs[group.a.tensor], inputs[group.b.tensor]
    out_axes = set(group.axes)
    idx = list(group.a.index)
    chans = [k for k, ax in enumerate(idx) if ax in out_axes]
    batch = [k for k, ax in enumerate(idx) if ax not in out_axes and k not in group.dims]
    perm = batch + chans + list(group.dims)
    a, b = a.permute(perm), b.permute(perm)
    nd = len(group.dims)
    cshape = a.shape[len(batch):a.dim() - nd]
    rows = 1
    for s in a.shape[:len(batch)]:
        rows *= s
    a = a.reshape((rows, -1) + tuple(a.shape[a.dim() - nd:]))      # (batch rows, channels, lagged dims...)
    b = b.reshape((rows, -1) + tuple(b.shape[b.dim() - nd:]))
    cdt = _compute_dtype(a, b)
    tdims = tuple(range(-nd, 0))
    sizes, picks = [], []                    # per lagged dim: transform size; positions in the inverse, valid lags
    for i, (na, nb) in enumerate(zip(a.shape[2:], b.shape[2:])):
        lag = torch.arange(_int(group.op.extent(group.lags[i]), binding), device=a.device)
        m = group.dilations[i] * lag + _int(group.offsets[i], binding)
        # circular correlation of size n equals the linear one at every lag in [m_lo, m_hi] when the aliases
        # m - n and m + n fall outside its support [-(na-1), nb-1]: n >= max(nb - m_lo, na + m_hi) (and both
        # signals fit: n >= na, nb)
        m_lo, m_hi = int(m.min()), int(m.max())
        n = next_fast_len(max(nb - m_lo, na + m_hi, na, nb))
        sizes.append(n)
        picks.append((torch.remainder(m, n), (m >= -(na - 1)) & (m <= nb - 1)))
    y = torch.empty((a.shape[1],) + tuple(p.numel() for p, _ in picks), dtype=cdt, device=a.device)
    step = _chunk(rows * math.prod(sizes[:-1]), sizes[-1], cdt, a.shape[1])
    for c0 in range(0, a.shape[1], step):
        cs = slice(c0, c0 + step)
        spec = torch.fft.rfftn(a[:, cs].to(cdt), sizes, dim=tdims).conj_physical_()
        spec.mul_(torch.fft.rfftn(b[:, cs].to(cdt), sizes, dim=tdims))
        r = torch.fft.irfftn(spec.sum(dim=0), sizes, dim=tdims)  # r[m] = sum_t a[t] b[t + m]  (m mod n)
        for i, (where, _) in enumerate(picks):
            r = r.index_select(1 + i, where)
        y[cs] = r
    for i, (_, valid) in enumerate(picks):
        if not bool(valid.all()):
            shape = [1] * y.dim()
            shape[1 + i] = -1
            y = y * valid.reshape(shape).to(cdt)
    y = y.reshape(tuple(cshape) + tuple(y.shape[1:]))
    have = [idx[k] for k in chans] + list(group.lags)
    return y.permute([have.index(ax) for ax in group.axes])


def _with_epilogue(op, reduce_out: str, acc: torch.Tensor, inputs: Mapping[str, torch.Tensor], binding) -> dict:
    from opgen.ir.dtypes import to_torch
    from opgen.targets.reference import evaluate

    acc = acc.to(to_torch(op.tensor(reduce_out).dtype)).contiguous()
    if [t.name for t in op.outputs] == [reduce_out]:          # no epilogue
        return {reduce_out: acc}
    present = {t.name: inputs[t.name] for t in op.inputs}
    outs = evaluate(op, present, binding, node_runner=lambda k, tensors: acc if k == 0 else None)
    return {t.name: outs[t.name].to(to_torch(t.dtype)).contiguous() for t in op.outputs}


def _finite_sum(x: torch.Tensor) -> bool:
    """True only if every value of ``x`` is finite (their sum is; one vectorized pass, 6x cheaper than
    ``isfinite``); False may also mean a finite sum that overflowed."""
    return bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else None)))


def _all_finite(inputs: Mapping[str, torch.Tensor], names) -> bool:
    """Whether the transformed operands hold only finite values (one pass each; cheap next to the transforms)."""
    return all(_finite_sum(inputs[n]) or bool(torch.isfinite(inputs[n]).all()) for n in names
               if inputs[n].is_floating_point())


def _direct(op, inputs: Mapping[str, torch.Tensor], binding) -> dict:
    """The outputs by the reference interpreter (direct sums): for operands with NaN or inf, whose FFT would spread
    them to every output (a NaN at the end of a row made every earlier output NaN), where a direct sum keeps them
    to the outputs that read them."""
    from opgen.ir.dtypes import to_torch
    from opgen.targets.reference import evaluate

    present = {t.name: inputs[t.name] for t in op.inputs if t.name in inputs}
    outs = evaluate(op, present, binding)
    return {t.name: outs[t.name].to(to_torch(t.dtype)).contiguous() for t in op.outputs}


def run_window_fft(group: WindowGroup, inputs: Mapping[str, torch.Tensor], binding) -> dict:
    """The outputs of a window op computed with the FFT algorithm (``{name: fresh tensor}``)."""
    ok, why = window_fft_supported(group, binding)
    if not ok:
        raise ValueError(f"op {group.op.name}: {why}")
    acc = _window_acc(group, inputs, binding) if _all_finite(inputs, (group.weight.tensor,)) else None
    if acc is None:                              # NaN / inf in the window, or many in the data
        return _direct(group.op, inputs, binding)
    return _with_epilogue(group.op, group.reduce.out, acc, inputs, binding)


def run_correlation_fft(group: CorrelationGroup, inputs: Mapping[str, torch.Tensor], binding) -> dict:
    """The outputs of a lag-correlation op computed with FFTs (``{name: fresh tensor}``)."""
    if not _all_finite(inputs, (group.a.tensor, group.b.tensor)):
        return _direct(group.op, inputs, binding)
    return _with_epilogue(group.op, group.reduce.out, _correlation_acc(group, inputs, binding), inputs, binding)
