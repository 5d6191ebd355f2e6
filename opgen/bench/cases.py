"""The benchmark cases of ``opgen bench``: opgen against what a user would otherwise run (same process)."""
from __future__ import annotations

import time
from typing import Callable

from .baselines import _ss_loop, _ss_scan_hop
from .protocol import CaseResult, Impl, measure
from .training import PARTS as TRAINING_PARTS


def _compiled(fn: Callable, *args) -> Impl:
    """torch.compile(fn) with its (one-off) compile time recorded."""
    import torch

    c = torch.compile(fn, fullgraph=True)
    t0 = time.perf_counter()
    c(*args)
    return Impl("", lambda: c(*args), time.perf_counter() - t0)


def linear_scan_cases(repeats: int, quick: bool) -> list[CaseResult]:
    import torch
    from torch._higher_order_ops import associative_scan

    import opgen

    c, length = (256, 512) if quick else (1024, 2048)
    a = torch.rand(c, length) * 0.1 + 0.9
    b = torch.randn(c, length)

    def cumprod_form():
        p = torch.cumprod(a, dim=1)
        return p * torch.cumsum(b / p, dim=1)

    def combine(x, y):
        return x[0] * y[0], y[0] * x[1] + y[1]

    def assoc(a_, b_):
        return associative_scan(combine, (a_, b_), dim=1, combine_mode="generic")[1]

    comp = _compiled(assoc, a, b)
    comp.name = "compiled associative_scan (generic)"
    # not a formulation of the scan: the memory floor of any op that reads a and b and returns a fresh tensor of
    # the same size (the copy floor below moves the same bytes into a buffer that is already mapped)
    fresh = Impl("memory floor with a fresh output: a + b", lambda: a + b, same_op=False)
    impls = [Impl("opgen", lambda: opgen.ops.linear_scan(a, b)), Impl("cumprod/cumsum form", cumprod_form), comp,
             fresh]
    res = measure("linear_scan", f"C={c} L={length} a~U(0.9,1) fp32", impls, repeats, floor_bytes=3 * a.numel() * 4)
    res.notes["cumprod/cumsum form"] = f"{int((~torch.isfinite(cumprod_form())).sum())} non-finite outputs"
    return [res]


def _ss_inputs(b, d, n, length):
    import torch

    u, delta = torch.randn(b, d, length), torch.rand(b, d, length) * 0.1
    A, B, C = -torch.rand(d, n), torch.randn(b, n, length), torch.randn(b, n, length)
    return u, delta, A, B, C, torch.randn(d), torch.randn(b, d, length)


def selective_scan_cases(repeats: int, quick: bool) -> list[CaseResult]:
    import opgen

    sizes = [(2, 256, 16, 512)] if quick else [(2, 256, 16, 512), (2, 1536, 16, 2048)]
    out = []
    for b, d, n, length in sizes:
        u, delta, A, B, C, D, z = _ss_inputs(b, d, n, length)
        args = (u, delta, A, B, C, D, z)
        comp = _compiled(_ss_scan_hop, *args)
        comp.name = "torch.compile(scan HOP reference)"
        impls = [Impl("opgen", lambda: opgen.ops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_softplus=True)),
                 Impl("torch reference loop", lambda: _ss_loop(*args)), comp]
        out.append(measure("selective_scan", f"B={b} D={d} N={n} L={length} fwd fp32", impls, repeats))
    b, d, n, length = sizes[0]
    leaves = [x.clone().requires_grad_() for x in _ss_inputs(b, d, n, length)]

    def fwd_bwd(fn):
        def run():
            for x in leaves:
                x.grad = None
            with torch.enable_grad():
                y = fn(*leaves)
                y.sum().backward()
            return leaves[0].grad
        return run

    import torch

    impls = [Impl("opgen", fwd_bwd(lambda u, dl, A, B, C, D, z: opgen.ops.selective_scan(
                u, dl, A, B, C, D=D, z=z, delta_softplus=True))),
             Impl("torch autograd of the reference loop", fwd_bwd(_ss_loop))]
    out.append(measure("selective_scan", f"B={b} D={d} N={n} L={length} fwd+bwd fp32", impls, max(3, repeats // 2)))
    return out


def chunk_gla_cases(repeats: int, quick: bool) -> list[CaseResult]:
    import torch

    import opgen

    b, t, h, k = (1, 256, 2, 64) if quick else (2, 1024, 4, 64)
    q, kk, v = torch.randn(b, t, h, k), torch.randn(b, t, h, k), torch.randn(b, t, h, k)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, k)) / 16

    def loop():
        s, outs = q.new_zeros(b, h, k, k), []
        for i in range(t):
            s = s * g[:, i].exp()[..., None] + kk[:, i, :, :, None] * v[:, i, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * k ** -0.5, s))
        return torch.stack(outs, 1)

    impls = [Impl("opgen", lambda: opgen.ops.chunk_gla(q, kk, v, g)[0]), Impl("recurrent torch reference", loop)]
    return [measure("chunk_gla", f"B={b} T={t} H={h} K=V={k} fp32", impls, repeats)]


def _attention_cases(repeats: int, quick: bool) -> list[CaseResult]:
    from .attention import attention_cases

    return attention_cases(repeats, quick)


def _conv_cases(repeats: int, quick: bool) -> list[CaseResult]:
    from .conv import conv_cases

    return conv_cases(repeats, quick)


def _long_conv_cases(repeats: int, quick: bool) -> list[CaseResult]:
    from .conv import long_conv_cases

    return long_conv_cases(repeats, quick)


def _declared_cases(repeats: int, quick: bool) -> list[CaseResult]:
    from .declared import declared_cases

    return declared_cases(repeats, quick)


def _training(part: str | None) -> Callable[[int, bool], list[CaseResult]]:
    def run(repeats: int, quick: bool) -> list[CaseResult]:
        from .training import training_cases

        return training_cases(repeats, quick, [part] if part else None)
    return run


SUITES: dict[str, Callable[[int, bool], list[CaseResult]]] = {
    "linear_scan": linear_scan_cases,
    "selective_scan": selective_scan_cases,
    "chunk_gla": chunk_gla_cases,
    "attention": _attention_cases,
    "conv": _conv_cases,
    "long_conv": _long_conv_cases,
    "declared": _declared_cases,
}
# model-shaped blocks and the ops of the training speed goals, forward and forward+backward (opgen.bench.training):
# slow at full size, so they run only when named (`opgen bench training`, or one part: `opgen bench training.swin`)
SUITES["training"] = _training(None)
SUITES.update({f"training.{p}": _training(p) for p in TRAINING_PARTS})
OPT_IN: frozenset[str] = frozenset(["training"] + [f"training.{p}" for p in TRAINING_PARTS])
