"""Correctness cases: every Triton kernel variant of opgen against the reference interpreter (or an independent
float64 torch formulation) at small odd shapes, in fp32 and bf16.

Each :class:`Case` forces one config per variant through the target's config dict, the way the interpreter tests
under ``tests/targets/triton`` drive the kernels: scans (``sequential``, ``chunked-matmul``), attention (flash
forward, split-key decode, flash backward), windows (``direct``, ``gemm``, ``im2win``, ``fft``) and the backward
kernels (the reverse scan that is a linear scan's adjoint, attention's backward, the window kernels of the
generated backward convolutions).

Error measure: ``max |got - ref| / max(1, max |ref|)`` over the finite entries (the pattern of infinities, e.g.
``lse = -inf`` of fully masked rows, must match). Tolerances: fp32 ``TOL_F32`` (``TOL_TF32`` where a default GPU
config may use tf32 dots), bf16 ``TOL_BF16``.

Under ``TRITON_INTERPRET=1`` two gaps of the interpreter are documented (notes/triton.md section 1): bf16 ``tl.dot``
multiplies the uint16 bit patterns (triton#11584) and fp32->bf16 casts truncate instead of rounding to nearest
even. A bf16 case whose kernel uses ``tl.dot`` and misses its tolerance there is recorded as ``skipped`` with that
reason and the measured error; on a GPU the same miss is ``wrong``.
"""
from __future__ import annotations

import math
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .report import CaseResult

TOL_F32 = 2e-4
TOL_TF32 = 5e-3
TOL_BF16 = 3e-2

BF16_DOT_GAP = ("known Triton interpreter limitation: bf16 tl.dot multiplies the uint16 bit patterns "
                "(triton#11584) and fp32->bf16 casts truncate (notes/triton.md section 1); runs on a GPU")


@dataclass(frozen=True)
class Ctx:
    """Where and how big: ``device`` of the tensors, ``tiny`` (interpreter) sizes, the kernel cache."""

    device: str
    tiny: bool
    interpret: bool
    cache_dir: Path


@dataclass(frozen=True)
class Comparison:
    label: str
    got: Any
    ref: Any
    tol: float


@dataclass(frozen=True)
class Case:
    """One kernel variant at one dtype. ``run(ctx)`` returns the comparisons (got vs reference)."""

    name: str
    family: str              # scan | attention | window | backward
    dtype: str               # fp32 | bf16
    uses_dot: bool           # the kernel uses tl.dot (bf16: an interpreter gap)
    run: Callable[[Ctx], list[Comparison]]
    est_gpu_s: float = 2.0   # estimated seconds on an H100, mostly the Triton compile


# ----------------------------------------------------------------------------------------------- helpers


def _torch():
    import torch

    return torch


def _gen(name: str):
    return _torch().Generator().manual_seed(zlib.crc32(name.encode()))


def _dt(dtype: str):
    torch = _torch()
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def _ir(dtype: str):
    from opgen.ir import DType

    return {"fp32": DType.f32, "bf16": DType.bf16}[dtype]


def _tol(dtype: str, f32: float = TOL_F32) -> float:
    return TOL_BF16 if dtype == "bf16" else f32


def rel_error(got, ref) -> float:
    """``max |got - ref| / max(1, max |ref|)`` over finite reference entries; raises on a shape or
    infinity-pattern mismatch."""
    torch = _torch()
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    x, r = got.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(x).any():
        raise AssertionError("NaN in the result (an unmasked read?)")
    fin = torch.isfinite(r)
    if not torch.equal(fin, torch.isfinite(x)):
        raise AssertionError("the pattern of infinities differs from the reference")
    if not fin.any():
        return 0.0
    return ((x[fin] - r[fin]).abs().max() / max(1.0, float(r[fin].abs().max()))).item()


def _reference(op, inputs: dict, binding) -> dict:
    """The reference interpreter on float64 copies of the (floating) inputs."""
    from opgen.targets.reference import evaluate

    wide = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    return evaluate(op, wide, binding)


def _target(ctx: Ctx):
    from opgen.targets.triton import TritonTarget

    return TritonTarget(cache_dir=ctx.cache_dir)


def _run_op(ctx: Ctx, op, inputs: dict, config, tol: float, label: str) -> list[Comparison]:
    from opgen.ir import bind

    binding = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    ref = _reference(op, inputs, binding)
    got = _target(ctx).run(op, inputs, binding, config)
    out = []
    for name, r in ref.items():
        out.append(Comparison(f"{label} {name}", got[name], r, tol))
    return out


# ------------------------------------------------------------------------------------------------- scans

SEQ = {"variant": "sequential", "BLOCK": 4, "STATE_TILE": 0, "num_warps": 1, "num_stages": 1}
SEQ_TILED = {"variant": "sequential", "BLOCK": 1, "STATE_TILE": 4, "num_warps": 1, "num_stages": 1}
CHUNKED = {"variant": "chunked-matmul", "BT": 16, "BV": 16, "num_warps": 4, "num_stages": 2, "dot_precision": "ieee"}


def _linear_scan(dtype: str, reverse: bool, config) -> Callable[[Ctx], list[Comparison]]:
    def run(ctx: Ctx) -> list[Comparison]:
        from opgen.ir import DType
        from opgen.ops.scan import declare_linear_scan

        torch, g = _torch(), _gen(f"ls{dtype}{reverse}")
        P, L, Q = (2, 11, 3) if ctx.tiny else (5, 333, 37)
        dt = _dt(dtype)
        ir = _ir(dtype)
        op = declare_linear_scan(ir, ir, reverse=reverse, initial=DType.f32 if reverse else None)
        ins = {"a": (0.5 + 0.5 * torch.rand(P, L, Q, generator=g)).to(dt), "b": torch.randn(P, L, Q, generator=g).to(dt)}
        if reverse:
            ins["initial"] = torch.randn(P, Q, generator=g)
        ins = {k: v.to(ctx.device) for k, v in ins.items()}
        return _run_op(ctx, op, ins, config, _tol(dtype), config["variant"] if config else "default")
    return run


def _selective_scan(dtype: str, config) -> Callable[[Ctx], list[Comparison]]:
    def run(ctx: Ctx) -> list[Comparison]:
        from opgen.ir import DType
        from opgen.ops.scan import declare_selective_scan

        torch, g = _torch(), _gen(f"ss{dtype}")
        Bt, D, L, N = (2, 3, 10, 5) if ctx.tiny else (2, 37, 301, 16)
        f = DType.f32
        if dtype == "bf16":
            bf = DType.bf16
            op = declare_selective_scan(bf, bf, f, bf, bf, D=f, z=bf, delta_bias=f, delta_softplus=True,
                                        last_state=True)
        else:
            op = declare_selective_scan(D=f, z=f, delta_bias=f, delta_softplus=True, last_state=True)
        dt = _dt(dtype)
        r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g))  # noqa: E731
        ins = {"u": r(Bt, D, L).to(dt), "delta": r(Bt, D, L, scale=0.5).to(dt),
               "A": -(0.1 + 1.9 * torch.rand(D, N, generator=g)), "B": r(Bt, N, L).to(dt), "C": r(Bt, N, L).to(dt),
               "D": r(D), "z": r(Bt, D, L).to(dt), "delta_bias": r(D)}
        ins = {k: v.to(ctx.device) for k, v in ins.items()}
        return _run_op(ctx, op, ins, config, _tol(dtype), config["variant"] if config else "default")
    return run


def _chunk_gla(dtype: str, config, tol: float | None = None) -> Callable[[Ctx], list[Comparison]]:
    def run(ctx: Ctx) -> list[Comparison]:
        from opgen.ir import DType
        from opgen.ops.scan import declare_chunk_gla

        torch, g = _torch(), _gen(f"gla{dtype}")
        Bt, T, H, K, V = (1, 37, 1, 20, 18) if ctx.tiny else (2, 301, 3, 64, 48)
        ir = _ir(dtype)
        op = declare_chunk_gla(ir, ir, ir, ir, scale=K ** -0.5, initial_state=DType.f32, final_state=True)
        dt = _dt(dtype)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        ins = {"q": r(Bt, T, H, K).to(dt), "k": r(Bt, T, H, K).to(dt), "v": r(Bt, T, H, V).to(dt),
               "g": (-0.5 * torch.rand(Bt, T, H, K, generator=g)).to(dt), "initial_state": r(Bt, H, K, V)}
        ins = {k: v.to(ctx.device) for k, v in ins.items()}
        return _run_op(ctx, op, ins, config, tol or _tol(dtype), config["variant"] if config else "default")
    return run


def scan_cases() -> list[Case]:
    out = []
    for dt in ("fp32", "bf16"):
        out += [Case(f"linear_scan {dt} sequential", "scan", dt, False, _linear_scan(dt, False, SEQ)),
                Case(f"selective_scan {dt} sequential", "scan", dt, False, _selective_scan(dt, SEQ)),
                Case(f"chunk_gla {dt} chunked-matmul", "scan", dt, True, _chunk_gla(dt, CHUNKED), 4.0),
                Case(f"chunk_gla {dt} sequential (state tiles)", "scan", dt, False, _chunk_gla(dt, SEQ_TILED))]
    out += [Case("linear_scan fp32 default config", "scan", "fp32", False, _linear_scan("fp32", False, None)),
            Case("chunk_gla fp32 default config", "scan", "fp32", True, _chunk_gla("fp32", None, TOL_TF32), 4.0)]
    return out


# --------------------------------------------------------------------------------------------- attention


def _attention_op(dtype: str, score_mod, mask_mod, gqa: bool, scale: float):
    from opgen.ir import accum_dtype
    from opgen.ops.attention import declare_attention, trace

    ir = _ir(dtype)
    t = trace("opgen gpucheck", score_mod, mask_mod, accum_dtype(ir))
    caps = tuple((accum_dtype(ir), d) for d in t.capture_dims)
    return declare_attention(ir, ir, ir, scale, gqa, t.score, t.mask, caps), list(t.captures)


def dense_attention(q, k, v, scale, score_mod=None, mask_mod=None):
    """Float64 ``softmax(mod(q k^T * scale) masked) @ v`` and its log-sum-exp (zeros / -inf for fully masked rows);
    differentiable."""
    torch = _torch()
    B, H, L, _ = q.shape
    S = k.shape[2]
    G = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    dev = q.device
    grids = (torch.arange(B, device=dev).view(B, 1, 1, 1), torch.arange(H, device=dev).view(1, H, 1, 1),
             torch.arange(L, device=dev).view(1, 1, L, 1), torch.arange(S, device=dev).view(1, 1, 1, S))
    s = q.double() @ kk.transpose(-1, -2) * scale
    if score_mod is not None:
        s = score_mod(s, *grids)
    vis = torch.ones_like(s, dtype=torch.bool) if mask_mod is None else \
        torch.as_tensor(mask_mod(*grids)).expand(B, H, L, S)
    m = torch.where(vis, s, -math.inf).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.where(vis, torch.exp(s - m), torch.zeros_like(s))
    den = e.sum(-1, keepdim=True)
    out = e @ vv / torch.where(den > 0, den, torch.ones_like(den))
    lse = torch.where(den[..., 0] > 0, m[..., 0] + torch.log(den[..., 0].clamp_min(1e-300)), -math.inf)
    return out, lse


def _attention(dtype: str, kind: str, mods: str, config: dict | None, backward: bool = False):
    def run(ctx: Ctx) -> list[Comparison]:
        from opgen import masks, scores
        from opgen.ir import bind

        torch, g = _torch(), _gen(f"att{dtype}{kind}{mods}")
        if kind == "decode":
            B, H, HKV, L, S, E = (2, 2, 1, 1, 200, 16) if ctx.tiny else (3, 8, 2, 3, 1999, 64)
        else:
            B, H, HKV, L, S, E = (1, 2, 2, 37, 37, 16) if ctx.tiny else (2, 4, 2, 301, 301, 64)
        if mods == "alibi+window":
            slopes = scores.alibi_slopes(H)
            score_mod, mask_mod = scores.alibi(slopes), masks.sliding_window(11 if ctx.tiny else 97)
        elif mods == "causal":
            score_mod, mask_mod = None, masks.causal
        else:
            score_mod, mask_mod = None, None
        scale = E ** -0.5
        op, caps = _attention_op(dtype, score_mod, mask_mod, HKV != H, scale)
        dt = _dt(dtype)
        q = torch.randn(B, H, L, E, generator=g).to(dt)
        k = torch.randn(B, HKV, S, E, generator=g).to(dt)
        v = torch.randn(B, HKV, S, E, generator=g).to(dt)
        ins = {"q": q, "k": k, "v": v, **{f"capture{n}": c for n, c in enumerate(caps)}}
        ins = {n: x.to(ctx.device) for n, x in ins.items()}
        binding = bind(op, {n: tuple(x.shape) for n, x in ins.items()})
        target = _target(ctx)
        got = target.run(op, ins, binding, config)
        out_name, lse_name = (t.name for t in op.outputs)
        ref_mods = (score_mod, mask_mod)
        leaves = {n: ins[n].detach().double().requires_grad_(backward) for n in ("q", "k", "v")}
        if score_mod is not None:   # the mods read captured tensors: use them on the device of the inputs
            slopes_dev = ins["capture0"].double()
            ref_mods = (scores.alibi(slopes_dev), mask_mod)
        ref_out, ref_lse = dense_attention(leaves["q"], leaves["k"], leaves["v"], scale, *ref_mods)
        tol = _tol(dtype)
        label = kind if config is None else f"{kind} {config}"
        res = [Comparison(f"{label} out", got[out_name], ref_out.detach(), tol),
               Comparison(f"{label} lse", got[lse_name], ref_lse.detach(), tol)]
        if backward:
            dout = torch.randn(ref_out.shape, generator=g).to(dt).to(ctx.device)
            grads = torch.autograd.grad(ref_out, [leaves[n] for n in ("q", "k", "v")], dout.double())
            back = target.attention_backward(op, ins, binding, got[out_name], got[lse_name], dout)
            for n, r in zip(("q", "k", "v"), grads):
                res.append(Comparison(f"backward d{n}", back[n], r, 1e-3 if dtype == "fp32" else TOL_BF16))
        return res
    return run


def attention_cases() -> list[Case]:
    t16 = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    out = []
    for dt in ("fp32", "bf16"):
        out += [Case(f"attention {dt} forward causal (16x16 tiles)", "attention", dt, True,
                     _attention(dt, "forward", "causal", t16), 3.0),
                Case(f"attention {dt} forward alibi+sliding window, GQA (default config)", "attention", dt, True,
                     _attention(dt, "forward", "alibi+window", None), 3.0),
                Case(f"attention {dt} decode split-key (splits 4)", "attention", dt, True,
                     _attention(dt, "decode", "none", {**t16, "splits": 4}), 3.0),
                Case(f"attention {dt} backward causal (default configs)", "backward", dt, True,
                     _attention(dt, "forward", "causal", None, backward=True), 8.0)]
    return out


# ----------------------------------------------------------------------------------------------- windows

GEMM16 = {"variant": "gemm", "block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 4, "num_stages": 1}
IM2WIN16 = {**GEMM16, "variant": "im2win"}
DIRECT = {"variant": "direct", "block_h": 4, "block_w": 16, "num_warps": 1, "num_stages": 1}
DIRECT1 = {"variant": "direct", "block_h": 1, "block_w": 16, "num_warps": 1, "num_stages": 1}
FFT = {"variant": "fft"}


def _conv2d(dtype: str, depthwise: bool, config) -> Callable[[Ctx], list[Comparison]]:
    def run(ctx: Ctx) -> list[Comparison]:
        import torch.nn.functional as F

        from opgen.ops.conv import declare_conv2d, declare_depthwise_conv2d

        torch, g = _torch(), _gen(f"c2{dtype}{depthwise}")
        ir, dt = _ir(dtype), _dt(dtype)
        if depthwise:
            N, C, H, W, K = (2, 3, 9, 11, 7) if ctx.tiny else (2, 37, 45, 51, 7)
            Fo, G = C, C
        else:
            N, C, Fo, H, W, K = (2, 4, 6, 9, 11, 3) if ctx.tiny else (2, 35, 67, 45, 51, 3)
            G = 1
        p = K // 2
        x = torch.randn(N, C, H, W, generator=g).to(dt)
        w = (torch.randn(Fo, C // G, K, K, generator=g) / K).to(dt)
        b = torch.randn(Fo, generator=g).to(dt)
        if depthwise:
            op = declare_depthwise_conv2d(ir, ir, ir, (1, 1), (p, p, p, p), (1, 1))
            ins = {"x": x, "weight": w.reshape(Fo, K, K), "bias": b}
        else:
            op = declare_conv2d(ir, ir, ir, (2, 2), (p, p, p, p), (1, 1), G)
            ins = {"x": x, "weight": w, "bias": b}
        ref = F.conv2d(x.double(), w.double(), b.double(), 1 if depthwise else 2, p, 1, G)
        return _run_window(ctx, op, ins, ref, config, _tol(dtype))
    return run


def _run_window(ctx: Ctx, op, ins: dict, ref, config, tol: float) -> list[Comparison]:
    from opgen.ir import bind

    ins = {k: v.to(ctx.device) for k, v in ins.items()}
    binding = bind(op, {k: tuple(v.shape) for k, v in ins.items()})
    got = _target(ctx).run(op, ins, binding, config)[op.outputs[0].name]
    return [Comparison(config["variant"] if config else "default", got, ref, tol)]


def _conv1d(dtype: str, kind: str, config) -> Callable[[Ctx], list[Comparison]]:
    def run(ctx: Ctx) -> list[Comparison]:
        import torch.nn.functional as F

        from opgen.ops.conv import declare_causal_conv1d, declare_long_conv

        torch, g = _torch(), _gen(f"c1{dtype}{kind}")
        ir, dt = _ir(dtype), _dt(dtype)
        if kind == "causal":
            B, D, L, Wd = (2, 5, 13, 4) if ctx.tiny else (2, 67, 1001, 4)
            x, w, b = (torch.randn(B, D, L, generator=g).to(dt), torch.randn(D, Wd, generator=g).to(dt),
                       torch.randn(D, generator=g).to(dt))
            ref = F.silu(F.conv1d(x.double(), w.double().unsqueeze(1), b.double(), padding=Wd - 1, groups=D)[..., :L])
            return _run_window(ctx, declare_causal_conv1d(ir, ir, ir, "silu"), {"x": x, "weight": w, "bias": b},
                               ref, config, _tol(dtype))
        B, H, L, Lk = (1, 2, 10, 4) if ctx.tiny else (2, 9, 777, 777)
        u, k = torch.randn(B, H, L, generator=g).to(dt), (torch.randn(H, Lk, generator=g) / Lk ** 0.5).to(dt)
        ref = F.conv1d(u.double(), k.double().flip(-1).unsqueeze(1), padding=Lk - 1, groups=H)[..., :L]
        return _run_window(ctx, declare_long_conv(ir, ir), {"u": u, "k": k}, ref, config, _tol(dtype))
    return run


def window_cases() -> list[Case]:
    out = []
    for dt in ("fp32", "bf16"):
        out += [Case(f"conv2d dense 3x3 stride 2 {dt} direct", "window", dt, False, _conv2d(dt, False, DIRECT)),
                Case(f"conv2d dense 3x3 stride 2 {dt} gemm", "window", dt, True, _conv2d(dt, False, GEMM16)),
                Case(f"conv2d dense 3x3 stride 2 {dt} im2win", "window", dt, True, _conv2d(dt, False, IM2WIN16)),
                Case(f"depthwise 7x7 {dt} direct", "window", dt, False, _conv2d(dt, True, DIRECT)),
                Case(f"causal_conv1d silu {dt} direct", "window", dt, False, _conv1d(dt, "causal", DIRECT1)),
                Case(f"causal_conv1d silu {dt} fft", "window", dt, False, _conv1d(dt, "causal", FFT), 1.0),
                Case(f"long_conv {dt} gemm", "window", dt, True, _conv1d(dt, "long", GEMM16))]
    out += [Case("conv2d dense 3x3 stride 2 fp32 default config", "window", "fp32", False,
                 _conv2d("fp32", False, None)),
            Case("long_conv fp32 fft", "window", "fp32", False, _conv1d("fp32", "long", FFT), 1.0)]
    return out


# ---------------------------------------------------------------------------------- generated backwards


def _conv_backward(dtype: str) -> Callable[[Ctx], list[Comparison]]:
    """Every window node of the generated backward of a strided dense conv2d, on the window kernels, against the
    reference interpreter's value of that node (the approach of tests/targets/triton/test_window_backward_triton)."""
    def run(ctx: Ctx) -> list[Comparison]:
        from opgen.ir import Binding, Reduce, bind
        from opgen.ir.passes.grad import grad_op
        from opgen.ir.passes.restage import restage_windows
        from opgen.ir.passes.split import node_op
        from opgen.ops.conv import declare_conv2d
        from opgen.targets.reference import evaluate

        torch, g = _torch(), _gen(f"cb{dtype}")
        ir, dt = _ir(dtype), _dt(dtype)
        N, C, Fo, H, W = (2, 4, 6, 9, 11) if ctx.tiny else (2, 19, 35, 37, 41)
        op = declare_conv2d(ir, ir, None, (2, 2), (1, 1, 1, 1), (1, 1), 1)
        ins = {"x": torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(ctx.device),
               "weight": torch.randn(Fo, C, 3, 3, generator=g, dtype=torch.float64).to(ctx.device)}
        y = evaluate(op, ins, bind(op, {k: tuple(v.shape) for k, v in ins.items()}))
        env = {**ins, **{f"grad_{t.name}": torch.randn(y[t.name].shape, generator=g, dtype=torch.float64)
                         .to(ctx.device) for t in op.outputs}}
        back = restage_windows(grad_op(op, tuple(ins)))
        b = bind(back, {t.name: tuple(env[t.name].shape) for t in back.inputs})
        target = _target(ctx)
        res = []
        for k, node in enumerate(back.nodes):
            sub = node_op(back, k)
            sb = Binding(b.dims, {a: b.extents[a] for a, _ in sub.extents},
                         {x.name: b.shapes[x.name] for x in sub.tensors})
            sub_in = {t.name: env[t.name] for t in sub.inputs}
            want = evaluate(sub, sub_in, sb)[node.out]
            if isinstance(node, Reduce) and target.supports(sub, ctx.device.split(":")[0]):
                # the kernel sees the data in the case's dtype; the reference node sees the same rounded data
                cast = {n: v.to(dt) for n, v in sub_in.items()}
                want = evaluate(sub, {n: v.double() for n, v in cast.items()}, sb)[node.out]
                got = target.run(sub, cast, sb)[node.out]
                res.append(Comparison(f"node {node.out}", got, want, _tol(dtype, 1e-3)))
            env[node.out] = want
        if not res:
            raise AssertionError("no node of the generated backward ran on the window kernels")
        return res
    return run


def _scan_adjoint(dtype: str) -> Callable[[Ctx], list[Comparison]]:
    """The fused scan backward kernel (``targets/triton/scan_adjoint.py``) of selective_scan (D, z, delta_bias,
    softplus, last state), chunk_gla and linear_scan (initial state) against the reference interpreter evaluating
    the same backward op in float64: every output of the group (gradients and the partial sums before the caller
    adds them up). Several chunks (checkpoints) and a lane block with a masked tail; selective_scan also through
    ``TritonTarget.prepare_group`` with the default config."""
    def run(ctx: Ctx) -> list[Comparison]:
        from opgen.bridge import backward_op
        from opgen.ir import DType, bind
        from opgen.ir.nodes import TensorParam
        from opgen.ir.op import Op
        from opgen.ir.passes.scan_adjoint import fuse_scan_adjoint
        from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan
        from opgen.targets.triton.scan_adjoint_call import adjoint_call, default_config

        torch, g = _torch(), _gen(f"sa{dtype}")
        dt, ir, f = _dt(dtype), _ir(dtype), DType.f32
        r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g))  # noqa: E731
        Bt, D, N, L = (2, 3, 4, 7) if ctx.tiny else (2, 37, 16, 301)
        ss = declare_selective_scan(ir, ir, f, ir, ir, D=f, z=ir, delta_bias=f, delta_softplus=True, last_state=True)
        ss_in = {"u": r(Bt, D, L).to(dt), "delta": r(Bt, D, L, scale=0.5).to(dt),
                 "A": -(0.1 + 1.9 * torch.rand(D, N, generator=g)), "B": r(Bt, N, L).to(dt), "C": r(Bt, N, L).to(dt),
                 "D": r(D), "z": r(Bt, D, L).to(dt), "delta_bias": r(D), "grad_out": r(Bt, D, L).to(dt),
                 "grad_last_state": r(Bt, D, N)}
        Bt2, T, H, K, V = (1, 11, 2, 3, 5) if ctx.tiny else (2, 131, 3, 16, 12)
        gla = declare_chunk_gla(ir, ir, ir, ir, scale=K ** -0.5, final_state=True)
        gla_in = {"q": r(Bt2, T, H, K).to(dt), "k": r(Bt2, T, H, K).to(dt), "v": r(Bt2, T, H, V).to(dt),
                  "g": (-0.5 * torch.rand(Bt2, T, H, K, generator=g)).to(dt), "grad_o": r(Bt2, T, H, V).to(dt),
                  "grad_final_state": r(Bt2, H, K, V)}
        P, Lp, Q = (3, 10, 2) if ctx.tiny else (5, 333, 37)
        ls = declare_linear_scan(ir, ir, initial=f)
        ls_in = {"a": (0.5 + 0.5 * torch.rand(P, Lp, Q, generator=g)).to(dt), "b": r(P, Lp, Q).to(dt),
                 "initial": r(P, Q), "grad_h": r(P, Lp, Q).to(dt)}
        small = {"CH": 3, "BLOCK": 2} if ctx.tiny else {"CH": 16}
        runs = [("selective_scan", ss, ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), ss_in, small),
                ("selective_scan default config", ss, ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), ss_in,
                 None),
                ("chunk_gla", gla, ("q", "k", "v", "g"), gla_in, {"CH": 4} if ctx.tiny else {"CH": 32}),
                ("linear_scan", ls, ("a", "b", "initial"), ls_in, small)]
        out = []
        for label, op, wrt, ins, over in runs:
            bw = backward_op(op, wrt)
            grp = fuse_scan_adjoint(bw)
            if grp is None:
                raise AssertionError(f"{label}: the backward op has no fused scan group")
            ins = {k: v.to(ctx.device) for k, v in ins.items()}
            shapes = {k: tuple(v.shape) for k, v in ins.items()}
            b = bind(bw, shapes)
            if over is None:
                hit = _target(ctx).prepare_group(bw, b, ctx.device.split(":")[0])
                if hit is None:
                    raise AssertionError(f"{label}: TritonTarget.prepare_group returned None")
                call = hit[1]
            else:
                call = adjoint_call(grp, b, ctx.cache_dir, {**default_config(grp, b), **over})
            got = call({k: ins[k] for k in grp.reads})
            tensors = tuple(TensorParam(t.name, t.shape, t.dtype, "output" if t.name in grp.outputs else t.kind)
                            for t in bw.tensors)
            ref_op = Op(bw.name, tensors, bw.nodes, bw.extents, bw.derived, bw.constraints, bw.attrs)
            ref = _reference(ref_op, ins, bind(ref_op, shapes))
            for name in grp.outputs:
                out.append(Comparison(f"{label} {name}", got[name], ref[name], _tol(dtype)))
        return out
    return run


def backward_cases() -> list[Case]:
    return [Case("scan fused backward fp32 (selective_scan, chunk_gla, linear_scan)", "backward", "fp32", False,
                 _scan_adjoint("fp32"), 3.0),
            Case("linear_scan fp32 reverse + initial (the adjoint scan)", "backward", "fp32", False,
                 _linear_scan("fp32", True, SEQ)),
            Case("linear_scan bf16 reverse + initial (the adjoint scan)", "backward", "bf16", False,
                 _linear_scan("bf16", True, SEQ)),
            Case("conv2d stride 2 fp32 generated backward (window nodes)", "backward", "fp32", True,
                 _conv_backward("fp32"), 8.0),
            Case("conv2d stride 2 bf16 generated backward (window nodes)", "backward", "bf16", True,
                 _conv_backward("bf16"), 8.0)]


def all_cases(quick: bool) -> list[Case]:
    """Every correctness case (``quick``: the fp32 ones plus one bf16 case per family)."""
    cases = scan_cases() + attention_cases() + window_cases() + backward_cases()
    if quick:
        seen: set[str] = set()
        keep = []
        for c in cases:
            if c.dtype == "fp32" or c.family not in seen:
                keep.append(c)
                if c.dtype == "bf16":
                    seen.add(c.family)
        cases = keep
    return cases


# ------------------------------------------------------------------------------------------------ running


def check(case: Case, ctx: Ctx) -> CaseResult:
    """Run one case and classify it; never raises."""
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"family": case.family, "dtype": case.dtype, "est_gpu_s": case.est_gpu_s}
    try:
        comps = case.run(ctx)
        worst, failing = 0.0, []
        for c in comps:
            e = rel_error(c.got, c.ref)
            worst = max(worst, e)
            if not e <= c.tol:
                failing.append(f"{c.label}: error {e:.2e} > {c.tol:g}")
        metrics.update(max_error=worst, tolerance=max(c.tol for c in comps), checks=len(comps))
        if failing:
            status, msg = "wrong", "; ".join(failing)
        else:
            status, msg = "ok", ""
    except Exception as e:  # noqa: BLE001 (a case records its failure, the run goes on)
        status = "crashed"
        msg = f"{type(e).__name__}: {e}"
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            msg += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
        if isinstance(e, AssertionError):   # a shape / NaN / infinity mismatch found while comparing
            status = "wrong"
    if status == "wrong" and ctx.interpret and case.dtype == "bf16" and case.uses_dot:
        status, msg = "skipped", f"{BF16_DOT_GAP}; measured: {msg}"
    return CaseResult("correctness", case.name, status, msg, time.perf_counter() - t0, metrics)
