"""``opgen bench training``: model-shaped blocks and the ops of issue 22's speed goals, forward and forward+backward,
opgen against the torch formulation a user would otherwise run, interleaved in one process (medians).

Parts (each also a suite of its own, ``training.<part>``):

- ``ops``: ``selective_scan`` (B=2, D=1536, N=16, L=2048; D, z, delta_bias, softplus) against autograd of the
  torch loop (:func:`ss_loop_unbind`; the indexing loop's backward is quadratic in L), with fwd+bwd / its own
  forward; ``chunk_gla`` (B=2, T=1024, H=8, K=V=64) against autograd of the chunked torch GLA
  (:func:`gla_chunked`, flash-linear-attention's naive chunk form, chunk 64);
- ``mamba1`` (B=1, L=512, d_model=256, d_inner=512, N=16, against transformers' slow path: ``F.conv1d`` and the
  indexing loop, whose backward writes a full-size gradient per step), ``mamba2`` (B=2, L=1024, d_model=256, H=8,
  N=P=64, against the chunked torch SSD, chunk 64), ``convnext`` (one block per stage, B=8: 96@56, 192@28, 384@14,
  768@7), ``resnet`` (B=8: 64@56, 128@28, 256@14, 512@7), ``swin`` (Swin-T stages 1 and 2, B=8, window 7, the
  second shifted): the blocks of :mod:`opgen.bench.blocks`.

Every case is verified before it is timed: the opgen and the torch implementation (same weights, same inputs) run
forward and backward once, and the output and every gradient (input and each parameter) must agree within
``TOL`` relative to the torch value (``max |opgen - torch| / max |torch|`` per tensor). Blocks with ReLUs in the
gradient path (ResNet) have kinks: an fp32 rounding difference of 1e-7 that flips one pre-activation across 0 changes
that element's gradient by O(1), and BatchNorm and the next conv spread it (measured: one flipped element of 200704
gave max rel err 0.13 in the input gradient, relative L2 error 2e-3); for them a gradient that misses ``TOL`` passes
when its relative L2 error ``||opgen - torch|| / ||torch||`` is within ``KINK_TOL``. A case that fails the check
is reported ``wrong: ...`` and not timed (its baseline still is); a case opgen cannot run yet (an op raises) is
reported ``unsupported: <error>``. Each case gives two :class:`TrainingResult` rows (``fwd`` under no_grad,
``fwd+bwd``) with the status, the worst errors, the memory of one forward+backward step and the fwd+bwd / fwd
ratios (also as notes, so the JSON record and :func:`opgen.bench.format_results` carry them);
:func:`format_training` prints them as one table. Memory:

- ``peak RSS``: the process's peak resident memory above its resting state during one forward+backward step
  (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, after ``malloc_trim``; every allocator
  counts, TVM's workspaces included);
- ``saved``: the bytes autograd keeps from the forward for the backward (distinct storages, parameters included).

``quick`` runs tiny sizes (seconds once kernels are built): what the tests run.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .protocol import CaseResult, Impl, measure

TOL = 1e-3      # max |opgen - torch| / max |torch|, per tensor (output and each gradient), fp32
KINK_TOL = 1e-2     # ||opgen - torch|| / ||torch|| of a gradient of a block with ReLU kinks that misses TOL

PARTS = ("ops", "mamba1", "mamba2", "convnext", "resnet", "swin")


@dataclass
class Pair:
    """One training case: the opgen and the torch implementation of the same computation on their own leaves
    (equal values), and the gradient of the output that the backward gets."""

    op: str
    case: str
    baseline: str
    ours: Callable[[], Any]
    theirs: Callable[[], Any]
    ours_leaves: list[tuple[str, Any]]
    theirs_leaves: list[tuple[str, Any]]
    grad_out: Any
    kinks: bool = False          # ReLUs in the gradient path: gradients may also pass by relative L2 (KINK_TOL)


# ------------------------------------------------------------------------------------------------ measuring


def _rel_err(a, b) -> float:
    """``max |a - b| / max |b|`` in float64 (inf when the shapes differ or a is not finite)."""
    if a is None or b is None or a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    e = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
    return e if math.isfinite(e) else math.inf


def _rel_l2(a, b) -> float:
    """``||a - b|| / ||b||`` in float64 (inf when the shapes differ or a is not finite)."""
    if a is None or b is None or a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    e = (a - b).norm().item() / max(b.norm().item(), 1e-30)
    return e if math.isfinite(e) else math.inf


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    def run():
        with torch.no_grad():
            return fn()
    return run


def _step(fn: Callable[[], Any], leaves: list[tuple[str, Any]], grad_out) -> Callable[[], Any]:
    """One forward+backward: clears the leaves' gradients, runs ``fn().backward(grad_out)``, returns the first
    leaf's gradient."""
    import torch

    def run():
        for _, t in leaves:
            t.grad = None
        with torch.enable_grad():
            fn().backward(grad_out)
        return leaves[0][1].grad
    return run


def _proc_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(field_name)


def peak_rss_mib(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory (MiB) above the resting state while ``fn`` runs once: Linux ``VmHWM`` after
    resetting it; None where /proc cannot say."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_kib("VmRSS")
    except OSError:
        return None
    fn()
    try:
        return max(0, _proc_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def saved_mib(fn: Callable[[], Any]) -> float | None:
    """MiB that autograd saves for the backward during ``fn`` (distinct storages); None if hooks cannot count."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        except Exception:  # noqa: BLE001 (a tensor without storage: not counted)
            pass
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    except Exception:  # noqa: BLE001
        return None
    return sum(seen.values()) / 2 ** 20


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MiB" if x >= 10 else f"{x:.1f} MiB"


@dataclass
class TrainingResult(CaseResult):
    """A measured training case: the medians (``ms``, ``opgen`` is nan when it did not run) plus its status (``ok``,
    ``unsupported: <error>`` or ``wrong: <error>``), the check against torch and the memory of a step."""

    step: str = "fwd"                                             # "fwd" or "fwd+bwd"
    baseline: str = ""
    status: str = "ok"
    out_err: float | None = None                                  # max |opgen - torch| / max |torch|, output
    grad_err: float | None = None                                 # the same, worst gradient
    worst_grad: str = ""
    grad_l2: float | None = None                                  # kinks: worst relative L2 error of a gradient
    peak_mib: dict[str, float | None] = field(default_factory=dict)    # impl -> peak RSS above resting (fwd+bwd)
    saved_mib: dict[str, float | None] = field(default_factory=dict)   # impl -> saved for backward
    bwd_over_fwd: dict[str, float] = field(default_factory=dict)       # impl -> fwd+bwd ms / fwd ms


@dataclass
class _Check:
    fwd_status: str = "ok"
    bwd_status: str = "ok"
    out_err: float | None = None
    grad_err: float | None = None
    worst_grad: str = ""
    grad_l2: float | None = None
    first_call_s: float | None = None

    def text(self) -> str:
        parts = [] if self.out_err is None else [f"output rel err {self.out_err:.1e}"]
        if self.grad_err is not None:
            parts.append(f"grads max rel err {self.grad_err:.1e} ({self.worst_grad})")
        kinks = "" if self.grad_l2 is None else \
            f"; ReLU kinks: grads max relative L2 err {self.grad_l2:.1e} (tol {KINK_TOL:g})"
        return ", ".join(parts) + f" (tol {TOL:g})" + kinks if parts else ""


def _verify(pair: Pair) -> _Check:
    """Run both implementations forward and forward+backward once; compare the output and every gradient."""
    import torch

    chk = _Check()
    with torch.no_grad():
        ref = pair.theirs()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = pair.ours()
    except Exception as exc:  # noqa: BLE001 (reported as the case's status)
        chk.fwd_status = chk.bwd_status = f"unsupported: {_error_text(exc)}"
        return chk
    chk.first_call_s = time.perf_counter() - t0
    chk.out_err = _rel_err(out, ref)
    if not chk.out_err <= TOL:
        chk.fwd_status = chk.bwd_status = f"wrong: output rel err {chk.out_err:.1e} > tol {TOL:g}"
    _step(pair.theirs, pair.theirs_leaves, pair.grad_out)()
    try:
        _step(pair.ours, pair.ours_leaves, pair.grad_out)()
    except Exception as exc:  # noqa: BLE001
        chk.bwd_status = f"unsupported: {_error_text(exc)}"
        return chk
    errs = {name: _rel_err(a.grad, b.grad) for (name, a), (_, b) in zip(pair.ours_leaves, pair.theirs_leaves)}
    chk.worst_grad = max(errs, key=lambda k: errs[k])
    chk.grad_err = errs[chk.worst_grad]
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    if bad and pair.kinks:
        l2 = {name: _rel_l2(a.grad, b.grad) for (name, a), (_, b) in zip(pair.ours_leaves, pair.theirs_leaves)}
        chk.grad_l2 = max(l2.values())
        bad = {f"{k} (L2 {l2[k]:.1e})": v for k, v in bad.items() if not l2[k] <= KINK_TOL}
    if bad and chk.bwd_status == "ok":
        chk.bwd_status = "wrong: grad rel err " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(bad.items())) + \
            f" > tol {TOL:g}"
    return chk


def _timed(pair: Pair, step: str, status: str, opgen_fn: Callable[[], Any], name: str, fn: Callable[[], Any],
           repeats: int, chk: _Check) -> TrainingResult:
    """Both implementations interleaved (status ok), else the baseline alone with opgen's time nan."""
    case = f"{pair.case} {step}"
    if status == "ok":
        res = measure(pair.op, case, [Impl("opgen", opgen_fn), Impl(name, fn)], repeats)
    else:
        res = measure(pair.op, case, [Impl(name, fn)], repeats)
        res.ms = {"opgen": math.nan, **res.ms}
    notes = {"status": status, **({"check": chk.text()} if chk.text() else {})}
    if step == "fwd" and chk.first_call_s is not None:
        notes["first call"] = f"opgen forward {chk.first_call_s:.1f} s (kernel builds, cached per shape)"
    return TrainingResult(res.op, res.case, res.ms, res.max_err, None, notes, step=step, baseline=name, status=status,
                          out_err=chk.out_err, grad_err=chk.grad_err if step != "fwd" else None,
                          worst_grad=chk.worst_grad if step != "fwd" else "",
                          grad_l2=chk.grad_l2 if step != "fwd" else None)


def run_pair(pair: Pair, repeats: int) -> list[TrainingResult]:
    """Verify the pair, then measure its forward (no_grad) and its forward+backward, interleaved, with the memory
    of one forward+backward step of each."""
    chk = _verify(pair)
    step_t = _step(pair.theirs, pair.theirs_leaves, pair.grad_out)
    step_o = _step(pair.ours, pair.ours_leaves, pair.grad_out)
    fwd = _timed(pair, "fwd", chk.fwd_status, _no_grad(pair.ours), pair.baseline, _no_grad(pair.theirs), repeats,
                 chk)
    impls = [("torch", step_t)] + ([("opgen", step_o)] if chk.bwd_status == "ok" else [])
    peak = {k: peak_rss_mib(f) for k, f in impls}
    saved = {k: saved_mib(f) for k, f in impls}
    bwd = _timed(pair, "fwd+bwd", chk.bwd_status, step_o, f"{pair.baseline} (autograd)", step_t, max(3, repeats // 2),
                 chk)
    bwd.peak_mib, bwd.saved_mib = peak, saved
    bwd.notes["memory"] = "peak RSS above resting " + ", ".join(f"{k} +{_mib(v)}" for k, v in peak.items()) + \
        "; saved for backward " + ", ".join(f"{k} {_mib(v)}" for k, v in saved.items())
    bwd.bwd_over_fwd = {k: bwd.ms[b] / fwd.ms[f] for k, b, f in (("opgen", "opgen", "opgen"),
                                                                 ("torch", bwd.baseline, fwd.baseline))
                        if math.isfinite(bwd.ms[b] / fwd.ms[f])}
    bwd.notes["fwd+bwd / own fwd"] = ", ".join(f"{k} {v:.1f}x" for k, v in bwd.bwd_over_fwd.items())
    return [fwd, bwd]


def format_training(results: list[CaseResult]) -> str:
    """A compact table of training results: one row per (case, fwd or fwd+bwd)."""
    rows = [("block / op", "case", "pass", "opgen ms", "torch ms", "speedup", "fwd+bwd/fwd opgen|torch",
             "peak MiB opgen|torch", "check: max rel err", "status")]

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None or not math.isfinite(x) else format(x, fmt)

    for r in results:
        if not isinstance(r, TrainingResult):
            continue
        base = r.ms.get(r.baseline, math.nan)
        speed = base / r.ms["opgen"] if r.ms["opgen"] > 0 else math.nan
        ratio = f"{num(r.bwd_over_fwd.get('opgen'), '.1f')}|{num(r.bwd_over_fwd.get('torch'), '.1f')}" \
            if r.step != "fwd" else ""
        peak = "|".join("-" if r.peak_mib.get(k) is None else _mib(r.peak_mib[k]).removesuffix(" MiB")
                        for k in ("opgen", "torch")) if r.peak_mib else ""
        check = f"out {num(r.out_err, '.0e')}" + (f", grad {num(r.grad_err, '.0e')}" if r.grad_err is not None
                                                 else "") + \
            (f" (kinks: L2 {num(r.grad_l2, '.0e')})" if r.grad_l2 is not None else "")
        case = r.case[:-len(r.step)].strip() if r.case.endswith(r.step) else r.case
        rows.append((r.op, case, r.step, num(r.ms["opgen"], ".2f"), num(base, ".2f"),
                     f"{num(speed, '.2f')}x", ratio, peak, check, r.status))
    baselines = sorted({f"{r.op}: {r.baseline}" for r in results if isinstance(r, TrainingResult)
                        and r.step == "fwd"})
    widths = [max(len(str(x)) for x in col) for col in zip(*rows)]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    return table + "\n\ntorch formulations (baselines): " + "; ".join(baselines) + \
        f"\nspeedup = torch ms / opgen ms; fwd = forward under no_grad; check tolerance {TOL:g} " \
        "(max |opgen - torch| / max |torch| per tensor: output, input and every parameter gradient; blocks with ReLU " \
        f"kinks: or relative L2 {KINK_TOL:g})"


# ------------------------------------------------------------------------------------------------ the pairs


def _leaves(*named: tuple[str, Any]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Two independent sets of leaves (requiring grad) with the same values."""
    ours = [(n, t.detach().clone().requires_grad_()) for n, t in named]
    theirs = [(n, t.detach().clone().requires_grad_()) for n, t in named]
    return ours, theirs


def ss_loop_unbind(u, delta, A, B, C, D):
    """The selective scan as a torch loop over time (``y = C h + D u``, delta as given), with the per-step slices
    taken by ``unbind``: its backward stacks the step gradients once. (Indexing ``dA[:, :, i]`` in the loop, as
    transformers' slow path and :func:`opgen.bench.baselines.ss_loop_plain` do, makes autograd write a full-size
    gradient per step: quadratic in L, over 10 minutes for one backward at D=1536, L=2048.)"""
    import torch

    dA = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A)).unbind(0)
    dBu = torch.einsum("bdl,bnl,bdl->lbdn", delta, B, u).unbind(0)
    Cs = C.unbind(2)
    x, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for i in range(u.shape[2]):
        x = dA[i] * x + dBu[i]
        ys.append(torch.einsum("bdn,bn->bd", x, Cs[i]))
    return torch.stack(ys, 2) + u * D[:, None]


def selective_scan_pair(b: int, d: int, n: int, length: int) -> Pair:
    """``selective_scan`` with D, z, delta_bias and softplus against the torch loop (unbind form)."""
    import torch
    import torch.nn.functional as F

    import opgen

    torch.manual_seed(0)
    named = [("u", torch.randn(b, d, length)), ("delta", torch.randn(b, d, length) * 0.5 - 2),
             ("A", -torch.rand(d, n) - 0.1), ("B", torch.randn(b, n, length)), ("C", torch.randn(b, n, length)),
             ("D", torch.randn(d)), ("z", torch.randn(b, d, length)), ("delta_bias", torch.randn(d) * 0.1)]
    ours, theirs = _leaves(*named)
    o, t = (dict(x) for x in (ours, theirs))

    def fn_o():
        return opgen.ops.selective_scan(o["u"], o["delta"], o["A"], o["B"], o["C"], D=o["D"], z=o["z"],
                                        delta_bias=o["delta_bias"], delta_softplus=True)

    def fn_t():
        delta = F.softplus(t["delta"] + t["delta_bias"][:, None])
        return ss_loop_unbind(t["u"], delta, t["A"], t["B"], t["C"], t["D"]) * F.silu(t["z"])

    return Pair("selective_scan", f"B={b} D={d} N={n} L={length} (D, z, delta_bias, softplus) fp32",
                "torch loop (unbind)", fn_o, fn_t, ours, theirs, torch.randn(b, d, length))


def gla_chunked(q, k, v, g, scale: float, chunk: int = 64):
    """Gated linear attention in chunks, in torch (flash-linear-attention's naive chunk form): the intra-chunk part
    as masked matmuls with the decays factored into q and k, the states carried between chunks by a loop.
    q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, T a multiple of ``chunk``; returns o ``[B, T, H, V]``."""
    import torch

    b, t, h, kd = q.shape
    vd, nc = v.shape[-1], t // chunk
    q, k, v, g = (x.transpose(1, 2).reshape(b, h, nc, chunk, x.shape[-1]) for x in (q, k, v, g))
    gc = g.cumsum(-2)
    qg, kg = q * gc.exp() * scale, k * (-gc).exp()
    k_end = k * (gc[..., -1:, :] - gc).exp()
    causal = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool, device=q.device))
    o = (qg @ kg.transpose(-1, -2)).masked_fill(~causal, 0) @ v
    s, inter = q.new_zeros(b, h, kd, vd), []
    for i in range(nc):
        inter.append(qg[:, :, i] @ s)
        s = s * gc[:, :, i, -1, :, None].exp() + k_end[:, :, i].transpose(-1, -2) @ v[:, :, i]
    o = o + torch.stack(inter, 2)
    return o.reshape(b, h, t, vd).transpose(1, 2)


def chunk_gla_pair(b: int, t: int, h: int, k: int, chunk: int) -> Pair:
    """``chunk_gla`` against autograd of the chunked torch formulation."""
    import torch
    import torch.nn.functional as F

    import opgen

    torch.manual_seed(0)
    named = [("q", torch.randn(b, t, h, k)), ("k", torch.randn(b, t, h, k)), ("v", torch.randn(b, t, h, k)),
             ("g", F.logsigmoid(torch.randn(b, t, h, k)) / 16)]
    ours, theirs = _leaves(*named)
    o, th = (dict(x) for x in (ours, theirs))
    scale = k ** -0.5
    return Pair("chunk_gla", f"B={b} T={t} H={h} K=V={k} fp32", f"chunked torch GLA (chunk {chunk})",
                lambda: opgen.ops.chunk_gla(o["q"], o["k"], o["v"], o["g"], scale=scale)[0],
                lambda: gla_chunked(th["q"], th["k"], th["v"], th["g"], scale, chunk),
                ours, theirs, torch.randn(b, t, h, k))


def block_pair(op: str, case: str, baseline: str, make: Callable[[str], Any], x_shape: tuple[int, ...],
               kinks: bool = False) -> Pair:
    """A block (``make(impl)``) and its deep copy with the other ``impl``: same weights, same input."""
    import torch

    torch.manual_seed(0)
    theirs_block = make("torch")
    ours_block = copy.deepcopy(theirs_block)
    ours_block.impl = "opgen"
    x = torch.randn(x_shape)
    with torch.no_grad():
        y_shape = theirs_block(x).shape
    x_o, x_t = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = [("input", x_o)] + list(ours_block.named_parameters())
    theirs = [("input", x_t)] + list(theirs_block.named_parameters())
    return Pair(op, case, baseline, lambda: ours_block(x_o), lambda: theirs_block(x_t), ours, theirs,
                torch.randn(y_shape), kinks)


# ------------------------------------------------------------------------------------------------ sizes


def _sizes(quick: bool) -> dict[str, Any]:
    """The sizes of each part (``quick``: tiny, for tests)."""
    if quick:
        return {"selective_scan": [(1, 32, 4, 64)], "chunk_gla": [(1, 64, 2, 16, 16)],
                "mamba1": [(1, 64, 16, 4)], "mamba2": [(1, 64, 32, 16, 16, 16)],
                "convnext": [(2, 16, 14)], "resnet": [(2, 8, 14)], "swin": [(1, 16, 2, 14, 3)]}
    return {"selective_scan": [(2, 1536, 16, 2048)], "chunk_gla": [(2, 1024, 8, 64, 64)],
            # (batch, L, d_model, d_state): d_inner = 2 d_model; small because the baseline's backward is
            # quadratic in L (7 s a step here, one thread)
            "mamba1": [(1, 512, 256, 16)],
            # (batch, L, d_model, d_state, headdim, chunk): H = 2 d_model / headdim = 8
            "mamba2": [(2, 1024, 256, 64, 64, 64)],
            "convnext": [(8, 96, 56), (8, 192, 28), (8, 384, 14), (8, 768, 7)],
            "resnet": [(8, 64, 56), (8, 128, 28), (8, 256, 14), (8, 512, 7)],
            # (batch, dim, heads, resolution, shift): Swin-T stages 1 and 2, the second with shifted windows
            "swin": [(8, 96, 3, 56, 0), (8, 192, 6, 28, 3)]}


def _pairs(part: str, quick: bool) -> Iterator[Pair]:
    """The pairs of a part, made one at a time (a case's tensors are freed before the next is made)."""
    from . import blocks

    s = _sizes(quick)
    if part == "ops":
        yield from (selective_scan_pair(*x) for x in s["selective_scan"])
        yield from (chunk_gla_pair(*x) for x in s["chunk_gla"])
    elif part == "mamba1":
        for b, length, dm, n in s["mamba1"]:
            yield block_pair("mamba1 block", f"B={b} L={length} d_model={dm} d_inner={2 * dm} N={n} fp32",
                             "F.conv1d + torch loop scan (transformers slow path)",
                             lambda impl: blocks.Mamba1Block(dm, n, impl=impl), (b, length, dm))
    elif part == "mamba2":
        for b, length, dm, n, p, c in s["mamba2"]:
            yield block_pair("mamba2 block", f"B={b} L={length} d_model={dm} H={2 * dm // p} N={n} P={p} fp32",
                             f"F.conv1d + chunked torch SSD (chunk {c})",
                             lambda impl: blocks.Mamba2Block(dm, n, p, chunk=c, impl=impl), (b, length, dm))
    elif part == "convnext":
        for b, c, r in s["convnext"]:
            yield block_pair("convnext block", f"B={b} C={c} {r}x{r} fp32", "F.conv2d",
                             lambda impl: blocks.ConvNeXtBlock(c, impl=impl), (b, c, r, r))
    elif part == "resnet":
        for b, c, r in s["resnet"]:
            yield block_pair("resnet basic block", f"B={b} C={c} {r}x{r} fp32", "F.conv2d",
                             lambda impl: blocks.ResNetBasicBlock(c, impl=impl), (b, c, r, r), kinks=True)
    elif part == "swin":
        for b, c, h, r, sh in s["swin"]:
            yield block_pair("swin block", f"B={b} C={c} heads={h} {r}x{r} window 7 shift {sh} fp32",
                             "SDPA on windows, bias as float mask",
                             lambda impl: blocks.SwinBlock(c, h, r, 7, sh, impl=impl), (b, r * r, c))
    else:
        raise ValueError(f"unknown training part {part!r}; known: {PARTS}")


def training_cases(repeats: int, quick: bool, parts: list[str] | None = None) -> list[TrainingResult]:
    """The training suite (or the given parts of it): each pair verified, then forward and forward+backward."""
    import sys

    out: list[TrainingResult] = []
    for part in parts or PARTS:
        for pair in _pairs(part, quick):
            try:
                rows = run_pair(pair, repeats)
            except Exception as exc:  # noqa: BLE001 (a call that raised after the check passed: reported, not raised)
                status = f"unsupported: {_error_text(exc)} (while timing)"
                rows = [TrainingResult(pair.op, f"{pair.case} {step}", {"opgen": math.nan, name: math.nan}, {},
                                       notes={"status": status}, step=step, baseline=name, status=status)
                        for step, name in (("fwd", pair.baseline), ("fwd+bwd", f"{pair.baseline} (autograd)"))]
            for r in rows:
                out.append(r)
                print(f"training: {r.op} {r.case}: opgen {r.ms['opgen']:.2f} ms, {r.baseline} "
                      f"{r.ms[r.baseline]:.2f} ms ({r.status})", file=sys.stderr, flush=True)
    return out
