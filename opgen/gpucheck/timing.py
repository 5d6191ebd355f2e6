"""Timing of the goal cases of BENCHMARKS.md on a GPU: opgen's default config against the GPU baselines a user
would otherwise run, with ``triton.testing.do_bench`` (median of the timed runs, L2 flushed before each).

Per case the record gives ``opgen_ms``, each baseline's ms, ``ratio`` = best baseline ms / opgen ms (above 1:
opgen is faster), TFLOP/s and the fraction of the HBM bandwidth reached by opgen (minimum traffic: every input
read once, every output written once, over opgen's time), and ``goal``: the ratio below which the case is
``slow``. The peaks come from :func:`peaks` (a table by device name; the bandwidth from the device properties
where torch reports the memory clock and bus width).

Inputs and ops are those of the tuning problems of :mod:`opgen.tune.library` (what ``opgen tune OP`` measures).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .report import CaseResult

# name substring -> (bf16/fp16 dense TFLOP/s, tf32 TFLOP/s, fp32 non-tensor TFLOP/s, HBM TB/s); vendor datasheets
PEAK_TABLE = {
    "H200": (989.4, 494.7, 66.9, 4.8),
    "H100 PCIe": (756.0, 378.0, 51.2, 2.0),
    "H100 NVL": (835.0, 417.5, 60.0, 3.9),
    "H100": (989.4, 494.7, 66.9, 3.35),
    "A100": (312.0, 156.0, 19.5, 2.0),
}


def peaks() -> dict[str, Any]:
    """Peak numbers of the current CUDA device (empty without one)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    out: dict[str, Any] = {"device": p.name, "sms": p.multi_processor_count}
    for key, (bf16, tf32, fp32, tbs) in PEAK_TABLE.items():
        if key in p.name:
            out.update(bf16_tflops=bf16, tf32_tflops=tf32, fp32_tflops=fp32, hbm_tbs=tbs, source=f"table ({key})")
            break
    clock, width = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    if clock and width:   # kHz, bits; DDR: two transfers per clock
        out["hbm_tbs_from_properties"] = round(2 * clock * 1e3 * width / 8 / 1e12, 3)
        out.setdefault("hbm_tbs", out["hbm_tbs_from_properties"])
    return out


@dataclass(frozen=True)
class TimingCase:
    name: str
    op: str                          # a LibraryProblem op name
    dims: dict[str, int]
    dtype: str                       # torch dtype name
    goal: float                      # slow when the ratio (baseline / opgen) is below this
    flops: Callable[[dict[str, int]], float]
    est_gpu_s: float = 20.0          # compile (opgen kernel, torch.compile for flex) + do_bench of each function
    quick: bool = False              # part of --quick
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _attention_flops(d: dict[str, int]) -> float:
    from opgen.tune.library import ATTENTION_WINDOW

    n = d["L"]
    visible = sum(min(i + 1, ATTENTION_WINDOW + 1) for i in range(n))   # causal window of ATTENTION_WINDOW keys
    return 4.0 * d["B"] * d["H"] * d["D"] * visible


#: fwd+bwd over fwd of the library op (issue 22: selective_scan fwd+bwd <= 3x its own forward)
BACKWARD_GOAL = 3.0


def cases(quick: bool) -> list[TimingCase]:
    """The goal cases (BENCHMARKS.md, issues 3-5) at GPU sizes."""
    out = [
        TimingCase("attention alibi + sliding window 256, B=4 H=16 L=4096 D=64 bf16", "attention",
                   dict(B=4, H=16, L=4096, D=64), "bfloat16", 0.8, _attention_flops, 60.0, True,
                   "baselines: SDPA with a dense bias mask, compiled FlexAttention"),
        TimingCase("conv2d dense 3x3 64->64 56x56 N=32 bf16", "conv2d", dict(N=32, C=64, F=64, H=56, W=56, K=3),
                   "bfloat16", 0.9, lambda d: 2.0 * d["N"] * d["F"] * d["H"] * d["W"] * d["C"] * 9, 20.0, True),
        TimingCase("conv2d dense 3x3 64->64 56x56 N=32 fp32", "conv2d", dict(N=32, C=64, F=64, H=56, W=56, K=3),
                   "float32", 0.9, lambda d: 2.0 * d["N"] * d["F"] * d["H"] * d["W"] * d["C"] * 9, 20.0),
        TimingCase("depthwise 7x7 C=256 56x56 N=32 bf16", "depthwise_conv2d", dict(N=32, C=256, H=56, W=56, K=7),
                   "bfloat16", 1.0, lambda d: 2.0 * d["N"] * d["C"] * d["H"] * d["W"] * 49, 15.0),
        TimingCase("depthwise 31x31 C=256 56x56 N=8 fp32", "depthwise_conv2d", dict(N=8, C=256, H=56, W=56, K=31),
                   "float32", 1.0, lambda d: 2.0 * d["N"] * d["C"] * d["H"] * d["W"] * 961, 15.0),
        TimingCase("causal_conv1d B=8 D=2048 L=4096 W=4 bf16", "causal_conv1d", dict(B=8, D=2048, L=4096, W=4),
                   "bfloat16", 1.0, lambda d: 2.0 * d["B"] * d["D"] * d["L"] * d["W"], 10.0, True),
        TimingCase("long_conv B=4 H=256 L=8192 fp32", "long_conv", dict(B=4, H=256, L=8192, Lk=8192), "float32",
                   1.2, lambda d: 0.0, 10.0, note="FFT: no direct FLOP count"),
        TimingCase("linear_scan C=4096 L=4096 fp32", "linear_scan", dict(C=4096, L=4096), "float32", 1.0,
                   lambda d: 2.0 * d["C"] * d["L"], 10.0, True),
        TimingCase("selective_scan B=2 D=1536 L=2048 N=16 fp32 (fwd; fwd+bwd)", "selective_scan",
                   dict(B=2, D=1536, L=2048, N=16), "float32", 1.0, lambda d: 9.0 * d["B"] * d["D"] * d["L"] * d["N"],
                   28.0, note="baseline: mamba_ssm selective_scan_fn if importable, else the torch reference "
                   "loop", extra={"backward": BACKWARD_GOAL}),
        TimingCase("chunk_gla B=2 T=2048 H=8 K=V=128 bf16", "chunk_gla", dict(B=2, T=2048, H=8, K=128, V=128),
                   "bfloat16", 0.8, lambda d: 6.0 * d["B"] * d["T"] * d["H"] * d["K"] * d["V"], 30.0, True,
                   "baseline: fla chunk_gla if importable, else the torch recurrent loop"),
    ]
    return [c for c in out if c.quick] if quick else out


def _baselines(case: TimingCase, x: dict, dims: dict[str, int]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, fn) of the baselines of ``case`` (a missing optional one is left out)."""
    import torch
    import torch.nn.functional as F

    from opgen.tune.library import _conv_baseline

    if case.op == "attention":
        from opgen import masks, scores
        from opgen.tune.library import ATTENTION_WINDOW

        n, heads = x["q"].shape[2], x["q"].shape[1]
        dev = x["q"].device
        i, j = torch.arange(n, device=dev).view(1, 1, n, 1), torch.arange(n, device=dev).view(1, 1, 1, n)
        hh = torch.arange(heads, device=dev).view(1, heads, 1, 1)
        bias = scores.alibi(x["capture0"])(torch.zeros((), device=dev), 0, hh, i, j)
        bias = bias.masked_fill(~masks.sliding_window(ATTENTION_WINDOW)(0, 0, i, j), float("-inf")).to(x["q"].dtype)
        out = [("SDPA dense bias", lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=bias))]
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            mask_mod = masks.sliding_window(ATTENTION_WINDOW)
            block = create_block_mask(mask_mod, None, None, n, n, device=dev)
            flex = torch.compile(flex_attention, dynamic=False)
            score = scores.alibi(x["capture0"])
            out.append(("compiled FlexAttention", lambda: flex(x["q"], x["k"], x["v"], score_mod=score,
                                                              block_mask=block)))
        except Exception:  # noqa: BLE001 (FlexAttention is optional)
            pass
        return out
    if case.op in ("long_conv", "causal_conv1d", "conv2d", "depthwise_conv2d"):
        name, fn = _conv_baseline(case.op, x, dims)
        return [(name.replace(" (oneDNN)", " (cuDNN)"), fn)]
    if case.op == "linear_scan":
        return [("torch cumprod/cumsum", lambda: (lambda p: p * torch.cumsum(x["b"] / p, 1))(torch.cumprod(x["a"], 1)))]
    if case.op == "selective_scan":
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            return [("mamba_ssm selective_scan_fn", lambda: selective_scan_fn(
                x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True))]
        except Exception:  # noqa: BLE001 (optional)
            from opgen.bench.baselines import _ss_loop

            return [("torch reference loop", lambda: _ss_loop(x["u"], x["delta"] + x["delta_bias"][:, None], x["A"],
                                                             x["B"], x["C"], x["D"], x["z"]))]
    if case.op == "chunk_gla":
        try:
            from fla.ops.gla import chunk_gla

            k_dim = x["q"].shape[-1]
            return [("fla chunk_gla", lambda: chunk_gla(x["q"], x["k"], x["v"], x["g"], scale=k_dim ** -0.5,
                                                       output_final_state=True))]
        except Exception:  # noqa: BLE001 (optional)
            def loop():
                q, k, v, g = x["q"].float(), x["k"].float(), x["v"].float(), x["g"].float()
                s, outs = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3]), []
                for t in range(q.shape[1]):
                    s = s * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
                    outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * q.shape[3] ** -0.5, s))
                return torch.stack(outs, 1)
            return [("torch recurrent loop", loop)]
    raise ValueError(f"no baseline for {case.op}")


@dataclass
class _Problem:
    """A library op at the case's dims on the Triton target (the inputs of ``opgen.tune.library``'s problems,
    without building a schedule space)."""

    op: Any
    inputs: dict
    binding: Any
    target: Any

    @staticmethod
    def make(case: TimingCase, cache_dir: str) -> "_Problem":
        import torch

        from opgen.ir import bind
        from opgen.targets.triton import TritonTarget
        from opgen.tune.library import _inputs

        device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
        op, inputs = _inputs(case.op, case.dims, getattr(torch, case.dtype), torch.Generator().manual_seed(0))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        binding = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
        return _Problem(op, inputs, binding, TritonTarget(cache_dir=cache_dir))


def _bench(fn: Callable[[], Any]) -> float:
    import torch
    from triton.testing import do_bench

    with torch.no_grad():
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _bench_grad(fn: Callable[[], Any], grad_to_none=None) -> float:
    """Like :func:`_bench` with autograd enabled (``grad_to_none``: leaves whose ``.grad`` is reset per run)."""
    import torch
    from triton.testing import do_bench

    with torch.enable_grad():
        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _time_fwd_bwd(case: TimingCase, p: "_Problem", m: dict[str, Any]) -> tuple[str, bool]:
    """The library ``selective_scan`` at the case's inputs: forward, and forward + backward through autograd (the
    torch bridge runs the generated backward op, whose scan group is the fused Triton kernel of
    ``targets/triton/scan_adjoint.py`` on CUDA); their ratio against ``case.extra["backward"]``, the peak memory of
    one fwd+bwd (above the scan's full size ``B*D*N*L`` fp32 means the fused kernel did not run) and mamba_ssm's
    fwd+bwd when importable. Returns (message, within the goal)."""
    import torch

    from opgen.ops import selective_scan

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    leaves = [p.inputs[n].detach().clone().requires_grad_() for n in names]
    gy = torch.randn_like(p.inputs["u"])

    def fwd():
        return selective_scan(*[x.detach() for x in leaves], delta_softplus=True)

    def fwd_bwd():
        torch.autograd.backward(selective_scan(*leaves, delta_softplus=True), gy)

    goal = float(case.extra["backward"])
    m["library fwd ms"] = f_ms = _bench(fwd)
    m["library fwd+bwd ms"] = fb_ms = _bench_grad(fwd_bwd, leaves)
    m["fwd+bwd / fwd"] = q = fb_ms / f_ms
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.enable_grad():
        fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    d = case.dims
    full = d["B"] * d["D"] * d["N"] * d["L"] * 4
    m["fwd+bwd peak MB"], m["scan full size MB"] = peak / 2**20, full / 2**20
    msg = (f"fwd+bwd {q:.2f}x its forward (goal <= {goal:g}x; {fb_ms:.2f} ms), peak {peak / 2**20:.0f} MB "
           f"(the scan's full size: {full / 2**20:.0f} MB)")
    msg += _time_fused_kernel(p, names, m)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        ml = [x.detach().clone().requires_grad_() for x in leaves]
        mb = _bench_grad(lambda: torch.autograd.backward(selective_scan_fn(*ml, delta_softplus=True), gy), ml)
        m["mamba_ssm fwd+bwd ms"] = mb
        msg += f"; {mb / fb_ms:.2f}x of mamba_ssm fwd+bwd"
    except Exception as e:  # noqa: BLE001 (optional)
        m["mamba_ssm fwd+bwd"] = f"unavailable: {type(e).__name__}"
    return msg, q <= goal and peak < full


#: configs of the fused backward kernel timed alone (the default; two steps per iteration, which spills at the
#: default tile and so runs with 32 lanes x 8 warps): which is faster is for the GPU to say
FUSED_CONFIGS = (("default", {}), ("2 steps/iteration, 32 lanes x 8 warps", {"UNROLL": 2, "BLOCK": 32, "num_warps": 8}))


def _time_fused_kernel(p: "_Problem", names: tuple[str, ...], m: dict[str, Any]) -> str:
    """The fused backward kernel of the op's backward group alone (``adjoint_call``, partial sums included) in each
    of :data:`FUSED_CONFIGS`; a message part."""
    import sympy
    import torch

    from opgen.bridge import backward_op
    from opgen.ir import bind
    from opgen.ir.dtypes import to_torch
    from opgen.ir.passes.scan_adjoint import fuse_scan_adjoint
    from opgen.targets.triton.scan_adjoint_call import adjoint_call, default_config

    bw = backward_op(p.op, names)
    grp = fuse_scan_adjoint(bw)
    if grp is None:
        return "; the backward op has no fused scan group"
    dims = dict(p.binding.dims)
    gen = torch.Generator(device=p.inputs["u"].device).manual_seed(1)
    ins = {}
    for t in bw.inputs:
        if t.name in p.inputs:
            ins[t.name] = p.inputs[t.name]
        else:
            shape = tuple(int(sympy.sympify(x).subs(dims)) for x in t.shape)
            ins[t.name] = torch.randn(shape, generator=gen, device=p.inputs["u"].device).to(to_torch(t.dtype))
    b = bind(bw, {k: tuple(v.shape) for k, v in ins.items()})
    reads = {k: ins[k] for k in grp.reads}
    parts = []
    for label, over in FUSED_CONFIGS:
        cfg = {**default_config(grp, b), **over}
        call = adjoint_call(grp, b, p.target.cache_dir, cfg)
        ms = _bench(lambda: call(reads))
        m[f"fused backward kernel ms ({label})"] = ms
        m[f"fused backward config ({label})"] = cfg
        parts.append(f"{label} {ms:.2f} ms")
    return "; fused backward kernel alone: " + ", ".join(parts)


def run_case(case: TimingCase, peak: dict[str, Any], cache_dir: str) -> CaseResult:
    """Time one case; never raises."""
    t0 = time.perf_counter()
    m: dict[str, Any] = {"dtype": case.dtype, "goal": case.goal, "est_gpu_s": case.est_gpu_s}
    try:
        p = _Problem.make(case, cache_dir)
        cfg = p.target.config(p.op, p.binding)
        m["config"] = cfg
        m["opgen_ms"] = ms = _bench(lambda: p.target.run(p.op, p.inputs, p.binding, cfg))
        best, notes = None, [case.note] if case.note else []
        for name, fn in _baselines(case, p.inputs, case.dims):
            try:
                b = _bench(fn)
            except Exception as e:  # noqa: BLE001 (one baseline failing leaves the others)
                notes.append(f"baseline {name} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            m[f"{name} ms"] = b
            if best is None or b < best[1]:
                best = (name, b)
        flops = case.flops(case.dims)
        if flops:
            m["tflops"] = flops / (ms * 1e-3) / 1e12
        nbytes = sum(v.numel() * v.element_size() for v in p.inputs.values())
        nbytes += sum(_out_bytes(p, t) for t in p.op.outputs)
        if peak.get("hbm_tbs"):
            m["hbm_fraction"] = nbytes / (ms * 1e-3) / (peak["hbm_tbs"] * 1e12)
        if best is None:
            return CaseResult("timing", case.name, "skipped", "; ".join(notes + ["no baseline ran"]),
                              time.perf_counter() - t0, m)
        m["baseline"] = best[0]
        m["ratio"] = ratio = best[1] / ms
        status = "ok" if ratio >= case.goal else "slow"
        msg = f"{ratio:.2f}x of {best[0]} (goal {case.goal}x)"
        if case.extra.get("backward"):
            bmsg, bok = _time_fwd_bwd(case, p, m)
            msg += "; " + bmsg
            status = status if bok else "slow"
        return CaseResult("timing", case.name, status, "; ".join([msg] + notes), time.perf_counter() - t0, m)
    except Exception as e:  # noqa: BLE001 (a case records its failure, the run goes on)
        return CaseResult("timing", case.name, "crashed", f"{type(e).__name__}: {str(e)[:500]}",
                          time.perf_counter() - t0, m)


def _out_bytes(p, t) -> int:
    import math as _m

    from opgen.ir.dtypes import to_torch

    import torch

    return _m.prod(p.binding.shapes[t.name]) * torch.empty((), dtype=to_torch(t.dtype)).element_size()
