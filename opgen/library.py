"""The catalog of library ops: what ``opgen list``, ``opgen show`` and ``opgen demo`` iterate over.

Each entry knows how to declare an example IR, make example inputs at a demo size, call the op, and call the
torch formulation a user would otherwise write (the demo's baseline, written independently of the IR).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class LibraryOp:
    """One library op: name, family, one-line summary, example IR, example inputs, op and baseline."""

    name: str
    family: str
    summary: str
    declare: Callable[[], Any]
    example: Callable[[str], tuple[tuple, dict, str]]
    baseline_name: str
    baseline: Callable[..., Any]
    tune_dims: Callable[[str], dict] | None = None   # dims of opgen tune at the example's size, if tunable
    tune_op: str | None = None                       # the name `opgen tune` knows it by (default: name)

    def op_function(self) -> Callable[..., Any]:
        import opgen.ops

        return getattr(opgen.ops, self.name)


# examples (torch imported lazily) ---------------------------------------------------------------------


def _ex_linear_scan(size: str):
    import torch

    c, length = (1024, 2048) if size == "full" else (256, 512)
    a = torch.rand(c, length) * 0.1 + 0.9
    return (a, torch.randn(c, length)), {}, f"C={c}, L={length}"


def _ex_selective_scan(size: str):
    import torch

    b, d, n, length = (2, 256, 16, 512) if size == "full" else (1, 64, 16, 256)
    u, delta = torch.randn(b, d, length), torch.rand(b, d, length) * 0.5
    A = -torch.rand(d, n)
    B, C, D, z = torch.randn(b, n, length), torch.randn(b, n, length), torch.randn(d), torch.randn(b, d, length)
    kw = {"D": D, "z": z, "delta_bias": torch.randn(d) * 0.1, "delta_softplus": True}
    return (u, delta, A, B, C), kw, f"B={b}, D={d}, N={n}, L={length}"


def _ex_chunk_gla(size: str):
    import torch

    b, t, h, k, v = (1, 512, 4, 64, 64) if size == "full" else (1, 128, 2, 32, 32)
    q, kk, vv = torch.randn(b, t, h, k), torch.randn(b, t, h, k), torch.randn(b, t, h, v)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, k)) / 16
    return (q, kk, vv, g), {}, f"B={b}, T={t}, H={h}, K={k}, V={v}"


def _ex_causal_conv1d(size: str):
    import torch

    b, d, length, w = (2, 1024, 2048, 4) if size == "full" else (1, 256, 512, 4)
    return (torch.randn(b, d, length), torch.randn(d, w), torch.randn(d)), {"activation": "silu"}, \
        f"B={b}, D={d}, L={length}, W={w}"


def _ex_conv2d(size: str):
    import torch

    n, c, hw, k = (1, 64, 56, 7) if size == "full" else (1, 32, 28, 7)
    x, w = torch.randn(n, c, hw, hw), torch.randn(c, 1, k, k)
    return (x, w, torch.randn(c)), {"padding": k // 2, "groups": c}, f"depthwise C={c}, {hw}x{hw}, {k}x{k}"


def _ex_long_conv(size: str):
    import torch

    b, h, length = (1, 64, 2048) if size == "full" else (1, 16, 512)
    return (torch.randn(b, h, length), torch.randn(h, length) / length), {}, f"B={b}, H={h}, L=Lk={length}"


def _ex_attention(size: str):
    import torch

    from opgen import masks

    b, h, length, e = (1, 4, 1024, 64) if size == "full" else (1, 2, 256, 32)
    q, k, v = (torch.randn(b, h, length, e) for _ in range(3))
    return (q, k, v), {"mask_mod": masks.sliding_window(128)}, f"B={b}, H={h}, L={length}, D={e}, window 128"


# baselines: what a user writes in torch today ---------------------------------------------------------


def _bl_linear_scan(a, b):
    import torch

    h, outs = torch.zeros_like(b[:, 0]), []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        outs.append(h)
    return torch.stack(outs, 1)


def _bl_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    import torch
    import torch.nn.functional as F

    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    x, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    for i in range(u.shape[2]):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, 2) + u * D[:, None]
    return y * F.silu(z)


def _bl_chunk_gla(q, k, v, g):
    import torch

    b, t, h, kd = q.shape
    s, outs = q.new_zeros(b, h, kd, v.shape[-1]), []
    for i in range(t):
        s = s * g[:, i].exp()[..., None] + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * kd ** -0.5, s))
    return torch.stack(outs, 1), None


def _bl_causal_conv1d(x, weight, bias, activation=None):
    import torch.nn.functional as F

    y = F.conv1d(x, weight[:, None, :], bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., : x.shape[2]]
    return F.silu(y) if activation else y


def _bl_conv2d(x, w, b, padding=0, groups=1):
    import torch.nn.functional as F

    return F.conv2d(x, w, b, padding=padding, groups=groups)


def _bl_long_conv(u, k):
    import torch

    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., : u.shape[-1]]


def _bl_attention(q, k, v, mask_mod=None):
    import torch
    import torch.nn.functional as F

    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_mod(0, 0, i, j))


# declarations for `opgen show` ----------------------------------------------------------------------------


def _decl(module: str, fn: str, **kw):
    def declare():
        import importlib

        return getattr(importlib.import_module(f"opgen.ops.{module}"), fn)(**kw)
    return declare


def _decl_attention():
    from opgen import masks, scores
    from opgen.ops.attention import declare_attention, trace

    import torch

    traced = trace("opgen show", scores.alibi(torch.ones(4)), masks.sliding_window(256))
    from opgen.ir import DType

    caps = tuple((DType.f32, d) for d in traced.capture_dims)
    return declare_attention(scale=0.125, score=traced.score, mask=traced.mask, captures=caps)


def _decl_selective_scan():
    from opgen.ir import DType
    from opgen.ops.scan import declare_selective_scan

    return declare_selective_scan(D=DType.f32, z=DType.f32, delta_bias=DType.f32, delta_softplus=True,
                                  last_state=True)


def _decl_conv2d():
    from opgen.ir import DType
    from opgen.ops.conv import declare_conv2d

    return declare_conv2d(bias=DType.f32, stride=(2, 2), padding=(1, 1, 1, 1), groups=1)


LIBRARY: tuple[LibraryOp, ...] = (
    LibraryOp("linear_scan", "scan", "first-order linear recurrence h[t] = a[t]*h[t-1] + b[t] along any dim",
              _decl("scan", "declare_linear_scan"), _ex_linear_scan, "python loop", _bl_linear_scan,
              lambda size: {"C": 1024, "L": 2048} if size == "full" else {"C": 256, "L": 512}),
    LibraryOp("selective_scan", "scan", "Mamba selective scan (mamba_ssm selective_scan_fn semantics)",
              _decl_selective_scan, _ex_selective_scan, "mamba reference loop", _bl_selective_scan,
              lambda size: dict(zip("BDNL", (2, 256, 16, 512) if size == "full" else (1, 64, 16, 256)))),
    LibraryOp("chunk_gla", "scan", "gated linear attention, matrix-state scan (fla chunk_gla semantics)",
              _decl("scan", "declare_chunk_gla", scale=0.125), _ex_chunk_gla, "recurrent loop", _bl_chunk_gla,
              lambda size: dict(zip("BTHKV", (1, 512, 4, 64, 64) if size == "full" else (1, 128, 2, 32, 32)))),
    LibraryOp("causal_conv1d", "conv", "causal depthwise conv1d (causal_conv1d_fn semantics)",
              _decl("conv", "declare_causal_conv1d"), _ex_causal_conv1d, "F.conv1d + slice", _bl_causal_conv1d,
              lambda size: dict(zip("BDLW", (2, 1024, 2048, 4) if size == "full" else (1, 256, 512, 4)))),
    LibraryOp("conv2d", "conv", "2-D convolution, F.conv2d semantics (dense, grouped, depthwise)",
              _decl_conv2d, _ex_conv2d, "F.conv2d", _bl_conv2d,
              lambda size: dict(zip("NCHWK", (1, 64, 56, 56, 7) if size == "full" else (1, 32, 28, 28, 7))),
              tune_op="depthwise_conv2d"),
    LibraryOp("long_conv", "conv", "causal long convolution (H3 / Hyena / FlashFFTConv)",
              _decl("conv", "declare_long_conv"), _ex_long_conv, "torch.fft convolution", _bl_long_conv,
              lambda size: {"B": 1, "H": 64, "L": 2048, "Lk": 2048} if size == "full" else
              {"B": 1, "H": 16, "L": 512, "Lk": 512}),
    LibraryOp("attention", "attention", "attention with FlexAttention score_mod / mask_mod semantics",
              _decl_attention, _ex_attention, "SDPA + bool mask", _bl_attention),
)


def get(name: str) -> LibraryOp:
    """The library entry called ``name``."""
    for e in LIBRARY:
        if e.name == name:
            return e
    raise KeyError(f"no library op {name!r}; available: {', '.join(e.name for e in LIBRARY)}")
