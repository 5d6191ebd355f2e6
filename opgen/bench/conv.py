"""The convolution cases of ``opgen bench``: opgen's window-reduction kernels against ``F.conv2d`` /
``F.conv1d`` (oneDNN on CPU) in one process (see :mod:`opgen.bench.protocol`)."""
from __future__ import annotations

from .protocol import CaseResult, Impl, measure


def conv_cases(repeats: int, quick: bool) -> list[CaseResult]:
    """Depthwise 31x31 and 7x7 (forward, forward+backward), dense 3x3, strided and grouped forward+backward,
    the issue 22 goal shapes (:func:`conv_goal_cases`), causal conv1d and long_conv, fp32."""
    import torch
    import torch.nn.functional as F

    import opgen

    out = []
    c, side = (32, 28) if quick else (256, 56)
    for k in (31, 7):
        x, w = torch.randn(1, c, side, side), torch.randn(c, 1, k, k)
        impls = [Impl("opgen", lambda x=x, w=w, k=k: opgen.ops.conv2d(x, w, padding=k // 2, groups=c)),
                 Impl("F.conv2d", lambda x=x, w=w, k=k: F.conv2d(x, w, padding=k // 2, groups=c))]
        out.append(measure("conv2d", f"depthwise {k}x{k}, C={c}, {side}x{side}, N=1 fp32", impls, repeats))
        out.append(_fwd_bwd(x, w, repeats, f"fwd+bwd depthwise {k}x{k}, C={c}, {side}x{side}, N=1 fp32",
                            padding=k // 2, groups=c))
    ch = 16 if quick else 64
    x, w = torch.randn(1, ch, side, side), torch.randn(ch, ch, 3, 3)
    impls = [Impl("opgen", lambda: opgen.ops.conv2d(x, w, padding=1)),
             Impl("F.conv2d", lambda: F.conv2d(x, w, padding=1))]
    out.append(measure("conv2d", f"dense 3x3, {ch}->{ch}, {side}x{side}, N=1 fp32", impls, repeats))
    # gradients through the restaged backward: a strided downsampling conv and a grouped (ResNeXt) conv
    cin, cout, side2 = (16, 32, 28) if quick else (64, 128, 56)
    x, w = torch.randn(1, cin, side2, side2), torch.randn(cout, cin, 3, 3)
    out.append(_fwd_bwd(x, w, repeats, f"fwd+bwd dense 3x3 stride 2, {cin}->{cout}, {side2}x{side2}, N=1 fp32",
                        stride=2, padding=1))
    cg, groups, side3 = (32, 4, 14) if quick else (128, 32, 28)
    x, w = torch.randn(1, cg, side3, side3), torch.randn(cg, cg // groups, 3, 3)
    out.append(_fwd_bwd(x, w, repeats, f"fwd+bwd grouped 3x3, C={cg}, groups={groups}, {side3}x{side3}, N=1 fp32",
                        padding=1, groups=groups))
    b, d, length, width = (2, 128, 512, 4) if quick else (2, 1024, 2048, 4)
    x, w = torch.randn(b, d, length), torch.randn(d, width)
    impls = [Impl("opgen", lambda: opgen.ops.causal_conv1d(x, w)),
             Impl("F.conv1d, pad + slice", lambda: F.conv1d(x, w[:, None], padding=width - 1, groups=d)[..., :length])]
    out.append(measure("causal_conv1d", f"B={b} D={d} L={length} W={width} fp32", impls, repeats))
    out += conv_goal_cases(repeats, quick)
    out += long_conv_cases(repeats, quick)
    return out


#: issue 22's speed goals for convolutions (B=8, fp32): dense 3x3 at the ResNet stages (channels, px), padding 1, and
#: depthwise 7x7 at the ConvNeXt stages, padding 3; fwd+bwd >= 0.8x F.conv2d (dense), fwd >= 1.0x and fwd+bwd >= 1.5x
#: (depthwise), one thread
RESNET_STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))
CONVNEXT_STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))


def conv_goal_cases(repeats: int, quick: bool) -> list[CaseResult]:
    """Dense 3x3 at ResNet stage shapes (forward+backward) and depthwise 7x7 at ConvNeXt stage shapes (forward, and
    forward+backward), B=8 (quick: B=2 and a quarter of the channels at the two smallest images)."""
    import torch
    import torch.nn.functional as F

    import opgen

    b = 2 if quick else 8
    dense = RESNET_STAGES[2:] if quick else RESNET_STAGES
    dw = CONVNEXT_STAGES[2:] if quick else CONVNEXT_STAGES
    div = 4 if quick else 1
    out = []
    for c, side in dense:
        c //= div
        x, w = torch.randn(b, c, side, side), torch.randn(c, c, 3, 3) / (3 * c ** 0.5)
        out.append(_fwd_bwd(x, w, repeats, f"fwd+bwd dense 3x3, {c}->{c}, {side}x{side}, N={b} fp32", padding=1))
    for c, side in dw:
        c //= div
        x, w = torch.randn(b, c, side, side), torch.randn(c, 1, 7, 7) / 7
        impls = [Impl("opgen", lambda x=x, w=w, c=c: opgen.ops.conv2d(x, w, padding=3, groups=c)),
                 Impl("F.conv2d", lambda x=x, w=w, c=c: F.conv2d(x, w, padding=3, groups=c))]
        out.append(measure("conv2d", f"depthwise 7x7, C={c}, {side}x{side}, N={b} fp32", impls, repeats))
        out.append(_fwd_bwd(x, w, repeats, f"fwd+bwd depthwise 7x7, C={c}, {side}x{side}, N={b} fp32", padding=3,
                            groups=c))
    return out


def _fwd_bwd(x, w, repeats: int, case: str, **conv) -> CaseResult:
    """Forward and backward (data and weight gradients) of a conv2d against torch autograd."""
    import torch
    import torch.nn.functional as F

    import opgen

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(F.conv2d(x, w, **conv).shape)

    def step(fn):
        xg.grad = wg.grad = None
        with torch.enable_grad():
            fn(xg, wg, **conv).backward(g)
        return wg.grad

    impls = [Impl("opgen", lambda: step(opgen.ops.conv2d)), Impl("F.conv2d autograd", lambda: step(F.conv2d))]
    return measure("conv2d", case, impls, repeats)


def fft_conv(u, k):
    """The torch.fft causal convolution a Hyena / H3 implementation writes: rfft of size 2L, product, irfft, slice."""
    import torch

    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n) * torch.fft.rfft(k, n), n)[..., :u.shape[-1]]


def long_conv_cases(repeats: int, quick: bool) -> list[CaseResult]:
    """``long_conv`` with a full-length filter, forward and forward+backward, against the torch.fft convolution."""
    import torch

    import opgen

    b, h, length = (2, 32, 1024) if quick else (4, 256, 8192)
    u, k = torch.randn(b, h, length), torch.randn(h, length) / length ** 0.5
    impls = [Impl("opgen", lambda: opgen.ops.long_conv(u, k)), Impl("torch.fft conv", lambda: fft_conv(u, k))]
    out = [measure("long_conv", f"B={b} H={h} L={length} Lk={length} fp32", impls, repeats)]
    ug, kg = u.clone().requires_grad_(), k.clone().requires_grad_()
    g = torch.randn(b, h, length)

    def fwd_bwd(f):
        ug.grad = kg.grad = None
        with torch.enable_grad():
            f(ug, kg).backward(g)
        return kg.grad

    impls = [Impl("opgen", lambda: fwd_bwd(opgen.ops.long_conv)), Impl("torch.fft conv autograd", lambda: fwd_bwd(fft_conv))]
    out.append(measure("long_conv", f"fwd+bwd B={b} H={h} L={length} Lk={length} fp32", impls, repeats))
    return out
