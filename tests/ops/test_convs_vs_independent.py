"""Convolution ops (causal_conv1d, conv2d, long_conv) against independent torch formulations.

Expected values come from torch.nn.functional convolutions / FFTs / explicit loops computed
in float64 in this file; nothing from opgen is used to build them.
Each test draws a fresh random seed and prints it in the failure message.
"""

import random

import pytest
import torch
import torch.nn.functional as F

import opgen.ops as ops


# --------------------------------------------------------------------------- helpers


def _id(v):
    """Readable test ids: dtypes by name, tuples as AxBxC."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    return None


def _fresh_seed():
    return random.randrange(2**31)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _tols(dtype, ref):
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    if dtype == torch.float64:
        return dict(atol=1e-9 * scale, rtol=1e-9)
    return dict(atol=1e-4 * scale, rtol=1e-4)


def _check(got, ref, dtype, what, seed):
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got)} (seed={seed})"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)} (seed={seed})"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype} (seed={seed})"
    torch.testing.assert_close(
        got.detach().to(torch.float64),
        ref.to(torch.float64),
        **_tols(dtype, ref),
        msg=lambda m: f"{what} mismatch (seed={seed}):\n{m}",
    )


F32, F64 = torch.float32, torch.float64


# ------------------------------------------------------------------- causal_conv1d


def ref_causal_conv1d(x, weight, bias=None, activation=None):
    x64, w64 = x.to(torch.float64), weight.to(torch.float64)
    b64 = None if bias is None else bias.to(torch.float64)
    D, W = w64.shape
    L = x64.shape[-1]
    out = F.conv1d(x64, w64[:, None, :], b64, padding=W - 1, groups=D)[..., :L]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out


def loop_causal_conv1d(x, weight, bias=None):
    """Literal definition, used in one test to pin the convention (weight[d, W-1] hits x[t])."""
    x64, w64 = x.to(torch.float64), weight.to(torch.float64)
    Bsz, D, L = x64.shape
    W = w64.shape[1]
    out = torch.zeros(Bsz, D, L, dtype=torch.float64)
    for t in range(L):
        for w in range(W):
            s = t - (W - 1) + w
            if s >= 0:
                out[:, :, t] += w64[:, w] * x64[:, :, s]
    if bias is not None:
        out += bias.to(torch.float64)[:, None]
    return out


CAUSAL_CASES = [
    # B, D, L, W, bias, activation, dtype
    (2, 5, 37, 4, True, None, F32),
    (1, 1, 1, 4, True, "silu", F64),
    (1, 3, 7, 1, False, None, F64),
    (3, 13, 5, 2, True, "swish", F32),
    (2, 7, 3, 3, False, "silu", F64),
    (1, 4, 64, 4, True, "silu", F32),
]


@pytest.mark.parametrize("B,D,L,W,use_bias,activation,dtype", CAUSAL_CASES, ids=_id)
def test_causal_conv1d(B, D, L, W, use_bias, activation, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    x = _randn(g, B, D, L, dtype=dtype)
    w = _randn(g, D, W, dtype=dtype)
    b = _randn(g, D, dtype=dtype) if use_bias else None
    ref = ref_causal_conv1d(x, w, b, activation)
    kwargs = {}
    if use_bias:
        kwargs["bias"] = b
    if activation is not None:
        kwargs["activation"] = activation
    got = ops.causal_conv1d(x, w, **kwargs)
    _check(got, ref, dtype, f"causal_conv1d B={B} D={D} L={L} W={W} bias={use_bias} act={activation}", seed)


def test_causal_conv1d_tap_convention_and_causality():
    """weight[:, W-1] multiplies the current step; future inputs never leak into the past."""
    seed = _fresh_seed()
    g = _gen(seed)
    B, D, L, W = 2, 3, 11, 4
    x = _randn(g, B, D, L)
    w = _randn(g, D, W)
    b = _randn(g, D)
    got = ops.causal_conv1d(x, w, b)
    _check(got, loop_causal_conv1d(x, w, b), torch.float64, "causal_conv1d vs loop", seed)
    # perturb the future: outputs at t < 6 must not change
    x2 = x.clone()
    x2[..., 6:] += 10.0
    got2 = ops.causal_conv1d(x2, w, b)
    assert torch.equal(got2[..., :6], got[..., :6]), f"causal_conv1d is not causal (seed={seed})"
    assert not torch.allclose(got2[..., 6:], got[..., 6:]), f"causal_conv1d ignores x (seed={seed})"


# -------------------------------------------------------------------------- conv2d


def ref_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    b64 = None if bias is None else bias.to(torch.float64)
    return F.conv2d(x.to(torch.float64), weight.to(torch.float64), b64, stride, padding, dilation, groups)


CONV2D_CASES = [
    # (B, C, H, W), (O, kh, kw), bias, stride, padding, dilation, groups, dtype
    ((2, 3, 7, 5), (4, 3, 3), True, 1, 0, 1, 1, F32),
    ((1, 1, 5, 5), (1, 3, 3), False, 1, 1, 1, 1, F64),
    ((2, 3, 13, 9), (5, 1, 1), True, 1, 0, 1, 1, F32),  # 1x1
    ((1, 6, 9, 7), (6, 3, 3), True, 1, 1, 1, 6, F64),  # depthwise
    ((1, 5, 8, 11), (10, 3, 5), False, 1, (1, 2), 1, 5, F32),  # depthwise multiplier 2, pad pair
    ((2, 6, 11, 10), (9, 3, 2), True, 1, 0, 1, 3, F64),  # grouped
    ((1, 4, 13, 13), (7, 3, 3), True, 2, 1, 1, 1, F32),  # strided
    ((2, 3, 17, 12), (5, 3, 3), False, (2, 3), (0, 1), 1, 1, F64),  # asymmetric stride/padding
    ((1, 2, 15, 11), (3, 3, 3), True, 1, 2, 2, 1, F32),  # dilated
    ((1, 4, 14, 9), (4, 2, 3), True, (3, 1), (1, 0), (2, 3), 2, F64),  # everything mixed
    ((3, 1, 1, 1), (2, 1, 1), True, 1, 0, 1, 1, F32),  # 1x1 image
    ((1, 2, 9, 7), (3, 3, 3), True, 1, "same", 1, 1, F64),
    ((1, 3, 8, 6), (2, 4, 2), False, 1, "same", (1, 2), 1, F32),  # even kernel: asymmetric "same" pad
    ((2, 2, 7, 9), (3, 3, 5), True, 1, "valid", 1, 1, F64),
    ((1, 2, 5, 37), (2, 5, 7), True, (1, 4), 3, 1, 2, F32),  # kernel larger than input, saved by padding
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("xshape,wshape,use_bias,stride,padding,dilation,groups,dtype", CONV2D_CASES, ids=_id)
def test_conv2d(xshape, wshape, use_bias, stride, padding, dilation, groups, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    Bsz, C, H, W = xshape
    O, kh, kw = wshape
    x = _randn(g, Bsz, C, H, W, dtype=dtype)
    w = _randn(g, O, C // groups, kh, kw, dtype=dtype)
    b = _randn(g, O, dtype=dtype) if use_bias else None
    ref = ref_conv2d(x, w, b, stride, padding, dilation, groups)
    got = ops.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    what = f"conv2d x={xshape} w={tuple(w.shape)} bias={use_bias} s={stride} p={padding} d={dilation} g={groups}"
    _check(got, ref, dtype, what, seed)


def test_conv2d_defaults_and_noncontiguous_input():
    seed = _fresh_seed()
    g = _gen(seed)
    x = _randn(g, 2, 9, 5, 3).permute(0, 3, 1, 2)  # [2, 3, 9, 5], non-contiguous
    w = _randn(g, 4, 3, 2, 3)
    got = ops.conv2d(x, w)
    _check(got, ref_conv2d(x, w), torch.float64, "conv2d defaults, non-contiguous x", seed)


# ------------------------------------------------------------------------ long_conv


def ref_long_conv_fft(u, k):
    u64, k64 = u.to(torch.float64), k.to(torch.float64)
    L = u64.shape[-1]
    n = 2 * L
    uf = torch.fft.rfft(u64, n=n)
    kf = torch.fft.rfft(k64, n=n)
    return torch.fft.irfft(uf * kf, n=n)[..., :L]


def ref_long_conv_loop(u, k):
    u64, k64 = u.to(torch.float64), k.to(torch.float64)
    Bsz, H, L = u64.shape
    Lk = k64.shape[-1]
    y = torch.zeros(Bsz, H, L, dtype=torch.float64)
    for t in range(L):
        for s in range(max(0, t - Lk + 1), t + 1):
            y[:, :, t] += k64[:, t - s] * u64[:, :, s]
    return y


LONG_CASES = [
    # B, H, L, Lk, dtype
    (1, 1, 1, 1, F64),
    (2, 3, 7, 7, F32),
    (2, 3, 13, 5, F64),
    (1, 5, 37, 1, F32),
    (3, 2, 100, 37, F32),
    (1, 4, 257, 257, F64),
    (1, 4, 257, 100, F32),
    (2, 1, 33, 32, F64),
]


@pytest.mark.parametrize("B,H,L,Lk,dtype", LONG_CASES, ids=_id)
def test_long_conv(B, H, L, Lk, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    u = _randn(g, B, H, L, dtype=dtype)
    k = _randn(g, H, Lk, dtype=dtype)
    ref = ref_long_conv_fft(u, k)
    if L <= 40:  # cross-check the two independent references on small cases
        torch.testing.assert_close(ref, ref_long_conv_loop(u, k), atol=1e-10, rtol=1e-10)
    got = ops.long_conv(u, k)
    # sums of up to L products: scale the tolerance by the largest partial-sum magnitude
    _check(got, ref, dtype, f"long_conv B={B} H={H} L={L} Lk={Lk}", seed)


def test_long_conv_impulse_response():
    """u = unit impulse at s0 -> y[t] = k[t - s0] for t - s0 < Lk, else 0."""
    seed = _fresh_seed()
    g = _gen(seed)
    H, L, Lk, s0 = 3, 29, 11, 5
    k = _randn(g, H, Lk)
    u = torch.zeros(1, H, L, dtype=torch.float64)
    u[..., s0] = 1.0
    exp = torch.zeros(1, H, L, dtype=torch.float64)
    exp[..., s0 : s0 + Lk] = k
    got = ops.long_conv(u, k)
    _check(got, exp, torch.float64, "long_conv impulse", seed)


# semantics against independent formulations, on the reference interpreter (kernels: tests/targets)
pytestmark = pytest.mark.usefixtures("reference_backend")
