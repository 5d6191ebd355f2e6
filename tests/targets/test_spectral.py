"""The FFT algorithm for 1-D window reductions and lag correlations (``opgen.targets.spectral``).

Every case runs on fresh random data (the seed is in each failure message) and is compared with the reference
interpreter's direct evaluation of the same op (``opgen.targets.reference.evaluate``), an independent path: it
gathers the padded windows and sums. Tolerances: float64 ``1e-9 * (1 + K)`` absolute (FFT round-off grows like
``log n``; data N(0, 1)); float32 ``2e-6 * sqrt(K) * max|ref|`` relative to the largest output, since the
transforms spread round-off evenly over a row rather than per element. Sizes are odd, with size-1 axes.
"""
from __future__ import annotations

import random

import pytest
import torch

from opgen.bridge import backward_op as _backward
from opgen.ir import DType, bind
from opgen.ir.passes.correlation import fuse_correlation
from opgen.ir.passes.window import fuse_window
from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_long_conv
from opgen.targets.reference import evaluate
from opgen.targets.spectral import (next_fast_len, prefer_fft, run_correlation_fft, run_window_fft,
                                    window_fft_supported)

IR = {torch.float32: DType.f32, torch.float64: DType.f64}


def _smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_next_fast_len_is_the_smallest_5_smooth_size():
    for m in range(1, 3000):
        n = next_fast_len(m)
        assert n >= m and _smooth(n), m
        assert not any(_smooth(k) for k in range(m, n)), m


def _check(got: torch.Tensor, ref: torch.Tensor, dtype, k: int, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    if dtype == torch.float64:
        bound = 1e-9 * (1 + k)
    else:
        bound = 2e-6 * k ** 0.5 * max(ref.abs().max().item(), 1.0)
    assert err <= bound, f"{what}: max err {err:.3g} > {bound:.3g}"


def _inputs(op, sizes: dict, dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(*sizes[t.name], generator=g, dtype=dtype) for t in op.inputs}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,h,n,k,chunk", [(2, 3, 37, 20, None), (1, 1, 1, 1, None), (3, 2, 53, 53, None),
                                           (1, 5, 100, 7, 1), (2, 7, 64, 1, 3000)])
def test_long_conv_forward_and_both_gradients(dtype, b, h, n, k, chunk, monkeypatch):
    """``chunk``: bytes of spectrum per chunk (1: one channel at a time; 3000: a few channels per chunk)."""
    if chunk is not None:
        import opgen.targets.spectral as spectral

        monkeypatch.setattr(spectral, "CHUNK_BYTES", chunk)
    seed = random.randrange(2**31)
    op = declare_long_conv(IR[dtype], IR[dtype])
    ins = _inputs(op, {"u": (b, h, n), "k": (h, k)}, dtype, seed)
    bd = bind(op, {x: v.shape for x, v in ins.items()})
    _check(run_window_fft(fuse_window(op), ins, bd)["y"], evaluate(op, ins, bd)["y"], dtype, k, f"y seed {seed}")
    ins["grad_y"] = torch.randn(b, h, n, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    du, dk = _backward(op, ("u",)), _backward(op, ("k",))
    assert fuse_window(du) is not None and fuse_correlation(dk) is not None and fuse_window(dk) is None
    for bop, run, group, name in ((du, run_window_fft, fuse_window(du), "grad_u"),
                                  (dk, run_correlation_fft, fuse_correlation(dk), "grad_k")):
        present = {t.name: ins[t.name] for t in bop.inputs}
        bb = bind(bop, {x: v.shape for x, v in present.items()})
        _check(run(group, present, bb)[name], evaluate(bop, present, bb)[name], dtype, n, f"{name} seed {seed}")


@pytest.mark.parametrize("silu,bias", [(True, True), (False, False)])
def test_causal_conv1d_with_its_epilogue(silu, bias):
    seed = random.randrange(2**31)
    op = declare_causal_conv1d(DType.f32, DType.f32, DType.f32 if bias else None, "silu" if silu else None)
    sizes = {"x": (2, 5, 41), "weight": (5, 4), "bias": (5,)}
    ins = _inputs(op, sizes, torch.float32, seed)
    bd = bind(op, {x: v.shape for x, v in ins.items()})
    _check(run_window_fft(fuse_window(op), ins, bd)["out"], evaluate(op, ins, bd)["out"], torch.float32, 4,
           f"seed {seed}")
    # the weight gradient of causal_conv1d without an epilogue is a lag correlation too
    if not silu and not bias:
        dw = _backward(op, ("weight",))
        ins["grad_out"] = torch.randn(2, 5, 41, generator=torch.Generator().manual_seed(seed + 1))
        present = {t.name: ins[t.name] for t in dw.inputs}
        bb = bind(dw, {x: v.shape for x, v in present.items()})
        _check(run_correlation_fft(fuse_correlation(dw), present, bb)["grad_weight"],
               evaluate(dw, present, bb)["grad_weight"], torch.float32, 41, f"grad_weight seed {seed}")


def test_a_filter_shared_by_every_channel_and_a_correlation_window():
    """No channel axis in the weight (every data row a batch row), dilation +1, an offset that needs zero fill."""
    from opgen.ir import OpBuilder, dims
    from opgen.ir.symbols import make_axes

    B, C, L, K = dims("B C L K")
    with OpBuilder("shared_filter") as bld:
        x = bld.input("x", (B, C, L), DType.f64)
        w = bld.input("w", (K,), DType.f64)
        b, c, t, j = make_axes("b c t j")
        y = bld.reduce(j, x.pad(0, 0, (3, K + 2))[b, c, t + j - 3] * w[j], axes=(b, c, t), name="y")
        op = bld.build({"y": y})
    g = fuse_window(op)
    assert g is not None and g.channels.kind == "none" and g.spatial[0].dilation == 1
    seed = random.randrange(2**31)
    ins = _inputs(op, {"x": (2, 3, 29), "w": (6,)}, torch.float64, seed)
    bd = bind(op, {n: v.shape for n, v in ins.items()})
    _check(run_window_fft(g, ins, bd)["y"], evaluate(op, ins, bd)["y"], torch.float64, 6, f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c,h,w,kh,kw,pad", [(2, 3, 13, 17, 7, 5, (3, 3, 2, 2)), (1, 1, 9, 1, 3, 1, (1, 1, 0, 0)),
                                               (1, 4, 20, 23, 11, 11, (0, 4, 5, 1))])
def test_depthwise_conv2d_weight_gradient_is_a_2d_lag_correlation(dtype, n, c, h, w, kh, kw, pad):
    from opgen.ops.conv import declare_depthwise_conv2d

    seed = random.randrange(2**31)
    op = declare_depthwise_conv2d(IR[dtype], IR[dtype], None, (1, 1), pad)
    oh, ow = h + pad[0] + pad[1] - kh + 1, w + pad[2] + pad[3] - kw + 1
    dw = _backward(op, ("weight",))
    g = fuse_correlation(dw)
    assert g is not None and len(g.lags) == 2 and g.dilations == (1, 1)
    ins = _inputs(dw, {"x": (n, c, h, w), "weight": (c, kh, kw), "grad_out": (n, c, oh, ow)}, dtype, seed)
    bd = bind(dw, {x: v.shape for x, v in ins.items()})
    _check(run_correlation_fft(g, ins, bd)["grad_weight"], evaluate(dw, ins, bd)["grad_weight"], dtype,
           n * oh * ow, f"seed {seed}")


@pytest.mark.parametrize("off,dil", [(5, 1), (-9, 1), (12, -1), (0, -1), (-20, -1)])
def test_lag_correlation_at_lags_away_from_zero(off, dil):
    """Lag ranges that exclude 0 on either side: the transform size must avoid both aliasing and truncation."""
    from opgen.ir import OpBuilder, dims
    from opgen.ir.symbols import make_axes

    B, C, L = dims("B C L")
    with OpBuilder("lagged") as bld:
        a = bld.input("a", (B, C, L), DType.f64)
        b = bld.input("b", (B, C, L), DType.f64)
        n, c, t = make_axes("n c t")
        j = bld.axis("j", 7)
        y = bld.reduce((n, t), a[n, c, t] * b.pad(0, 0, (30, 30))[n, c, t + dil * j + off], axes=(c, j), name="y")
        op = bld.build({"y": y})
    g = fuse_correlation(op)
    assert g is not None and g.dilations == (dil,)
    seed = random.randrange(2**31)
    ins = _inputs(op, {"a": (2, 3, 19), "b": (2, 3, 19)}, torch.float64, seed)
    bd = bind(op, {x: v.shape for x, v in ins.items()})
    _check(run_correlation_fft(g, ins, bd)["y"], evaluate(op, ins, bd)["y"], torch.float64, 38, f"seed {seed}")


def test_what_the_fft_variant_takes_and_the_default_choice():
    op = declare_long_conv()
    g = fuse_window(op)
    assert window_fft_supported(g) == (True, "")
    short = bind(op, {"u": (2, 64, 1024), "k": (64, 16)})
    long_ = bind(op, {"u": (2, 64, 8192), "k": (64, 8192)})
    assert not prefer_fft(g, short) and prefer_fft(g, long_)
    ok, why = window_fft_supported(fuse_window(declare_conv2d()))
    assert not ok and "1-D" in why
    strided = fuse_window(declare_conv2d(stride=(2, 2)))
    assert not window_fft_supported(strided)[0]


def test_the_tvm_target_runs_the_fft_variant_and_the_correlation(tmp_path):
    pytest.importorskip("tvm")
    from opgen.targets.tvm import TVMTarget
    from opgen.targets.tvm.window import check_window_config, default_window_config, window_space

    t = TVMTarget()
    op = declare_long_conv()
    g = fuse_window(op)
    assert "fft" in dict((k.name, k.values) for k in window_space(g).knobs)["variant"]
    assert "fft" not in dict((k.name, k.values) for k in window_space(fuse_window(declare_conv2d())).knobs)["variant"]
    ins = _inputs(op, {"u": (2, 3, 300), "k": (3, 300)}, torch.float32, random.randrange(2**31))
    bd = bind(op, {x: v.shape for x, v in ins.items()})
    ref = evaluate(op, ins, bd)["y"]
    cfg = default_window_config(g, bd, t.caps())
    for variant in ("fft", "direct"):
        out = t.run(op, ins, bd, {**cfg.to_json(), "variant": variant})["y"]
        _check(out, ref, torch.float32, 300, variant)
    ok, why = check_window_config(cfg.__class__(variant="fft"), fuse_window(declare_conv2d()),
                                  bind(declare_conv2d(), {"x": (1, 2, 5, 5), "weight": (2, 2, 3, 3)}))
    assert not ok and "1-D" in why
    dk = _backward(op, ("k",))
    assert t.supports(dk, "cpu")
    ins["grad_y"] = torch.randn(2, 3, 300)
    present = {x.name: ins[x.name] for x in dk.inputs}
    bb = bind(dk, {x: v.shape for x, v in present.items()})
    _check(t.run(dk, present, bb)["grad_k"], evaluate(dk, present, bb)["grad_k"], torch.float32, 300, "grad_k")
