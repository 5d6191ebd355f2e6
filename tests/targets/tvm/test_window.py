"""The TVM window kernels (``opgen.targets.tvm.window``) against ``F.conv2d`` / ``F.conv1d``.

Every case builds an op with ``opgen.ops.conv.declare_*`` (or by hand), runs ``run_window`` on fresh random data
(the seed is in every failure message) and compares with torch's convolution computed in float64 on the same
data. Sizes are odd (H=13, W=17) and include size-1 axes; both kernel variants (direct, gemm) run.

Tolerances: float32 is checked per element against the float64 reference with the bound of a recursive sum of
R = (C/groups) * KH * KW products, ``|got - ref| <= 2 * R * 2**-23 * (|x| (*) |w| + |bias|) + 1e-6`` (``(*)`` the
same convolution of the absolute values), which also covers the fast-exp silu epilogue; float64 is checked to
``1e-10`` absolute (data are N(0, 1)). Kernels are cached by source text in one module-wide KernelCache; batch and
image sizes are symbolic, so one kernel serves every size of a case.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

from opgen.ir import DType, OpBuilder, bind, dims, sigmoid, silu  # noqa: E402
from opgen.ir.passes.window import fuse_window  # noqa: E402
from opgen.ir.symbols import make_axes  # noqa: E402
from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_long_conv  # noqa: E402
from opgen.targets.tvm.compile import KernelCache  # noqa: E402
from opgen.targets.tvm.window import (WindowConfig, as_window_config, check_window_config,  # noqa: E402
                                      default_window_config, legalize_window_config, render_window, run_window,
                                      window_source, window_space, window_supported)

F32, F64 = torch.float32, torch.float64
IR = {F32: DType.f32, F64: DType.f64}
EPS32 = 2.0 ** -23


class Rand:
    def __init__(self) -> None:
        self.seed = random.randrange(2**31)
        self.g = torch.Generator().manual_seed(self.seed)

    def randn(self, *shape, dtype=F32):
        return torch.randn(*shape, generator=self.g, dtype=F64).to(dtype)


@pytest.fixture
def rnd() -> Rand:
    return Rand()


@pytest.fixture(scope="module")
def cache() -> KernelCache:
    return KernelCache(None)


def check(got, ref64, bound64, R: int, dtype, what: str, seed: int) -> None:
    """``got`` vs the float64 reference: the summation bound for float32, 1e-10 for float64."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)} (seed {seed})"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    err = (got.to(F64) - ref64).abs()
    tol = 2 * R * EPS32 * bound64 + 1e-6 if dtype == F32 else torch.full_like(ref64, 1e-10)
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, max |error| {err.max().item():.3g} "
                           f"(tolerance there {tol[bad].max().item():.3g}) (seed {seed})")


def run(op, inputs, cache, config=None):
    g = fuse_window(op)
    assert g is not None, f"{op.name} is not recognized as a window reduction"
    b = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    if callable(config):
        config = config(default_window_config(g, b))
    out = run_window(g, inputs, b, config, cache)[g.out]
    return out, window_source(g, b, config).config


GEMM = lambda c: replace(c, variant="gemm", co_tile=4, rows_tile=2, width_vectors=1, block_rows=2,  # noqa: E731
                         kh_block=0)
DIRECT = lambda c: replace(c, variant="direct", co_tile=2, rows_tile=4, width_vectors=1,  # noqa: E731
                           block_rows=8, block_width=2 * c.vector, kh_block=0)
SLIDING = lambda c: replace(c, variant="direct", co_tile=1, rows_tile=7, width_vectors=1,  # noqa: E731
                            block_rows=14, block_width=c.vector, kh_block=0, kw_outer=True, unroll_kh=True)

CONV_CASES = [
    # id, (N, C, H, W), F, (KH, KW), stride, padding (t, b, l, r), dilation, groups, bias, dtype, config
    ("dense-bias", (2, 3, 13, 17), 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, F32, None),
    ("dense-gemm", (2, 3, 13, 17), 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True, F32, GEMM),
    ("size1-stride2-asym", (1, 1, 13, 17), 1, (3, 2), (2, 2), (0, 1, 2, 0), (1, 1), 1, False, F32, None),
    ("size1-stride2-gemm", (1, 1, 13, 17), 1, (3, 2), (2, 2), (0, 1, 2, 0), (1, 1), 1, False, F32, GEMM),
    ("dil2-groups2", (2, 4, 13, 17), 6, (3, 3), (1, 1), (2, 1, 0, 3), (2, 2), 2, True, F32, None),
    ("dil2-groups2-gemm", (2, 4, 13, 17), 6, (3, 3), (1, 2), (2, 1, 0, 3), (2, 2), 2, True, F32, GEMM),
    # strided columns: the gemm workspace holds each row as its column phases (a tap kw*2 at stride 3: phases 0, 2, 1)
    ("stride3-dil2-gemm", (2, 3, 13, 17), 4, (3, 5), (2, 3), (1, 1, 2, 2), (1, 2), 1, True, F32, GEMM),
    ("stride2-width1-gemm", (1, 4, 13, 1), 3, (3, 1), (2, 2), (1, 1, 0, 0), (1, 1), 1, False, F32, GEMM),
    ("dense16-co-tail", (1, 16, 13, 17), 14, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, False, F32, None),
    ("dense16-direct", (1, 16, 13, 17), 14, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, False, F32, DIRECT),
    ("dense-f64", (2, 16, 13, 17), 14, (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), 1, True, F64, None),
    ("dw7", (2, 6, 13, 17), 6, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), 6, False, F32, None),
    ("dw7-f64", (1, 6, 13, 17), 6, (7, 7), (1, 1), (3, 3, 3, 3), (1, 1), 6, True, F64, None),
    ("dw31", (1, 4, 20, 23), 4, (31, 31), (1, 1), (15, 15, 15, 15), (1, 1), 4, True, F32, None),
    ("dw5-s2-d2-sliding", (1, 5, 19, 23), 5, (5, 3), (2, 1), (4, 3, 2, 1), (2, 2), 5, True, F32, SLIDING),
    ("dw5-multiplier2", (1, 3, 13, 17), 6, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 3, True, F32, None),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_matches_torch(case, rnd, cache):
    name, (N, C, H, W), Fo, (KH, KW), stride, pad, dil, groups, bias, dtype, config = case
    x = rnd.randn(N, C, H, W, dtype=dtype)
    w = rnd.randn(Fo, C // groups, KH, KW, dtype=dtype)
    b = rnd.randn(Fo, dtype=dtype) if bias else None
    op = declare_conv2d(IR[dtype], IR[dtype], IR[dtype] if bias else None, stride, pad, dil, groups)
    inputs = {"x": x, "weight": w} | ({"bias": b} if bias else {})
    got, used = run(op, inputs, cache, config)
    xp = F.pad(x.to(F64), (pad[2], pad[3], pad[0], pad[1]))
    ref = F.conv2d(xp, w.to(F64), None if b is None else b.to(F64), stride, 0, dil, groups)
    bound = F.conv2d(xp.abs(), w.to(F64).abs(), None if b is None else b.to(F64).abs(), stride, 0, dil, groups)
    check(got, ref, bound, (C // groups) * KH * KW, dtype, f"conv2d {name} with {used}", rnd.seed)


@pytest.mark.parametrize("width", range(2, 9))
def test_causal_conv1d_matches_torch(width, rnd, cache):
    bias, act = width % 2 == 0, ("silu" if width % 3 else None)
    B, D, L = 2, 5, 37
    x, w = rnd.randn(B, D, L), rnd.randn(D, width)
    b = rnd.randn(D) if bias else None
    op = declare_causal_conv1d(DType.f32, DType.f32, DType.f32 if bias else None, act)
    got, used = run(op, {"x": x, "weight": w} | ({"bias": b} if bias else {}), cache)
    x64, w64 = x.to(F64), w.to(F64).unsqueeze(1)
    b64 = None if b is None else b.to(F64)
    ref = F.conv1d(x64, w64, b64, padding=width - 1, groups=D)[..., :L]
    bound = F.conv1d(x64.abs(), w64.abs(), None if b is None else b64.abs(), padding=width - 1, groups=D)[..., :L]
    if act:
        ref = F.silu(ref)
    check(got, ref, bound, width, F32, f"causal_conv1d W={width} bias={bias} act={act} with {used}", rnd.seed)


def test_causal_conv1d_f64_silu_and_both_variants(rnd, cache):
    B, D, L, K = 1, 3, 101, 4
    x, w, b = rnd.randn(B, D, L, dtype=F64), rnd.randn(D, K, dtype=F64), rnd.randn(D, dtype=F64)
    op = declare_causal_conv1d(DType.f64, DType.f64, DType.f64, "silu")
    ref = F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=K - 1, groups=D)[..., :L])
    for config in (None, lambda c: replace(c, variant="gemm")):
        got, used = run(op, {"x": x, "weight": w, "bias": b}, cache, config)
        check(got, ref, None, K, F64, f"causal_conv1d f64 with {used}", rnd.seed)


def test_long_conv_flipped_window(rnd, cache):
    u, k = rnd.randn(2, 3, 50), rnd.randn(3, 11)
    got, _ = run(declare_long_conv(), {"u": u, "k": k}, cache)
    u64, k64 = u.to(F64), k.to(F64)
    ref = F.conv1d(F.pad(u64, (10, 0)), k64.flip(-1).unsqueeze(1), groups=3)
    bound = F.conv1d(F.pad(u64.abs(), (10, 0)), k64.abs().flip(-1).unsqueeze(1), groups=3)
    check(got, ref, bound, 11, F32, "long_conv", rnd.seed)


@pytest.mark.parametrize("kh_block", [0, 4, 5, 7])
def test_flipped_2d_window_in_kernel_row_blocks(kh_block, rnd, cache):
    """The data gradient of a depthwise conv2d reads its window flipped (dilation -1); the weight-stationary
    kernel-row blocks after the first must index the flipped weight (a regression: 13x13 was wrong with 7)."""
    from opgen.bridge import backward_op as _backward
    from opgen.ops.conv import declare_depthwise_conv2d

    k, p = 13, 6
    op = _backward(declare_depthwise_conv2d(padding=(p, p, p, p)), ("x",))
    g, w = rnd.randn(2, 3, 12, 15), rnd.randn(3, k, k)
    ins = {"x": rnd.randn(2, 3, 12, 15), "weight": w, "grad_out": g}
    group = fuse_window(op)
    bd = bind(op, {"weight": w.shape, "grad_out": g.shape, "x": (2, 3, 12, 15)})
    cfg = replace(default_window_config(group, bd), kh_block=kh_block, rows_tile=4, block_rows=8)
    got = run_window(group, ins, bd, cfg, cache)["grad_x"]
    g64, w64 = g.to(F64), w.to(F64)
    ref = F.conv_transpose2d(g64, w64[:, None], padding=p, groups=3)
    bound = F.conv_transpose2d(g64.abs(), w64.abs()[:, None], padding=p, groups=3)
    check(got, ref, bound, k * k, F32, f"flipped 13x13, kh_block {kh_block}", rnd.seed)


def _conv1d_strided():
    """A dense 1-D convolution with stride 2, dilation 3 and padding 1 (F.conv1d semantics)."""
    B, C, L, Fd, K = dims("B C L F K")
    with OpBuilder("conv1d") as bld:
        x = bld.input("x", (B, C, L), DType.f32)
        w = bld.input("w", (Fd, C, K), DType.f32)
        b, co, ci, j = make_axes("b co ci j")
        t = bld.axis("t", (L + 2 - 3 * (K - 1) - 1) // 2 + 1)
        y = bld.reduce((ci, j), x.pad(0, 0, (1, 1))[b, ci, t * 2 + j * 3 - 1] * w[co, ci, j], axes=(b, co, t),
                       name="y")
        return bld.build({"y": y})


def test_dense_conv1d_stride_dilation(rnd, cache):
    x, w = rnd.randn(2, 10, 57), rnd.randn(7, 10, 3)
    got, used = run(_conv1d_strided(), {"x": x, "w": w}, cache)
    assert used.variant == "gemm"
    ref = F.conv1d(x.to(F64), w.to(F64), stride=2, padding=1, dilation=3)
    bound = F.conv1d(x.to(F64).abs(), w.to(F64).abs(), stride=2, padding=1, dilation=3)
    check(got, ref, bound, 30, F32, f"conv1d with {used}", rnd.seed)


def _nhwc_gated():
    N, H, W, C, Fd, KH, KW = dims("N H W C F KH KW")
    with OpBuilder("nhwc_gated") as bld:
        x = bld.input("x", (N, H, W, C), DType.f32)
        w = bld.input("w", (KH, KW, C, Fd), DType.f32)
        b = bld.input("b", (Fd,), DType.f32)
        gate = bld.input("gate", (N, H, W, Fd), DType.f32)
        n, oh, ow, co, ci, kh, kw = make_axes("n oh ow co ci kh kw")
        xv = x.pad(0, ((KH - 1) // 2, KH // 2), ((KW - 1) // 2, KW // 2), 0)[
            n, oh + kh - (KH - 1) // 2, ow + kw - (KW - 1) // 2, ci]
        acc = bld.reduce((ci, kh, kw), xv * w[kh, kw, ci, co], axes=(n, oh, ow, co), name="acc")
        y = bld.map(silu(acc[n, oh, ow, co] + b[co]), (n, oh, ow, co), name="y")
        return bld.build({"out": bld.map(y[n, oh, ow, co] * sigmoid(gate[n, oh, ow, co]), (n, oh, ow, co),
                                         name="out")})


def _nchw_gated():
    N, H, W, C, Fd = dims("N H W C F")
    with OpBuilder("nchw_gated") as bld:
        x = bld.input("x", (N, C, H, W), DType.f32)
        w = bld.input("w", (Fd, C, 3, 3), DType.f32)
        gate = bld.input("gate", (N, Fd, H, W), DType.f32)
        n, co, oh, ow, ci, kh, kw = make_axes("n co oh ow ci kh kw")
        acc = bld.reduce((ci, kh, kw), x.pad(0, 0, 1, 1)[n, ci, oh + kh - 1, ow + kw - 1] * w[co, ci, kh, kw],
                         axes=(n, co, oh, ow), name="acc")
        return bld.build({"out": bld.map(silu(acc[n, co, oh, ow]) * gate[n, co, oh, ow], (n, co, oh, ow),
                                         name="out")})


def test_gated_epilogue_nchw(rnd, cache):
    x, w, gate = rnd.randn(2, 3, 13, 17), rnd.randn(4, 3, 3, 3), rnd.randn(2, 4, 13, 17)
    got, used = run(_nchw_gated(), {"x": x, "w": w, "gate": gate}, cache)
    conv = F.conv2d(x.to(F64), w.to(F64), padding=1)
    ref = F.silu(conv) * gate.to(F64)
    bound = F.conv2d(x.to(F64).abs(), w.to(F64).abs(), padding=1) * gate.to(F64).abs()
    check(got, ref, bound, 27, F32, f"gated conv with {used}", rnd.seed)


def test_nhwc_layout_with_gated_epilogue(rnd, cache):
    x, w = rnd.randn(1, 13, 17, 3), rnd.randn(3, 3, 3, 4)
    b, gate = rnd.randn(4), rnd.randn(1, 13, 17, 4)
    got, used = run(_nhwc_gated(), {"x": x, "w": w, "b": b, "gate": gate}, cache)
    xn, wn = x.to(F64).permute(0, 3, 1, 2), w.to(F64).permute(3, 2, 0, 1)
    conv = F.conv2d(xn, wn, b.to(F64), padding=1).permute(0, 2, 3, 1)
    ref = F.silu(conv) * torch.sigmoid(gate.to(F64))
    bound = F.conv2d(xn.abs(), wn.abs(), b.to(F64).abs(), padding=1).permute(0, 2, 3, 1)
    check(got, ref, bound, 27, F32, f"nhwc gated conv with {used}", rnd.seed)


# ------------------------------------------------------------------------------------ configs and sources


def _group_binding(op, **shapes):
    g = fuse_window(op)
    return g, bind(op, shapes)


def test_one_kernel_serves_every_image_size_of_a_block_bucket(rnd):
    """Batch and image sizes stay symbolic: images that fill the default blocks share one kernel; smaller images get
    blocks fitted to a power of two of tiles (here rows 14 and columns 32 for both 13 x 17 and 9 x 30, then 7 x 8)."""
    cache = KernelCache(None)
    op = declare_conv2d(padding=(3, 3, 3, 3), groups=6)
    w = rnd.randn(6, 1, 7, 7)
    compiled = []
    for N, H, W in ((1, 60, 70), (2, 57, 65), (1, 13, 17), (2, 9, 30), (1, 1, 1)):
        x = rnd.randn(N, 6, H, W)
        got, _ = run(op, {"x": x, "weight": w}, cache)
        ref = F.conv2d(x.to(F64), w.to(F64), padding=3, groups=6)
        bound = F.conv2d(x.to(F64).abs(), w.to(F64).abs(), padding=3, groups=6)
        check(got, ref, bound, 49, F32, f"dw7 at {(N, H, W)}", rnd.seed)
        compiled.append(cache.stats.compiled)
    assert compiled == [1, 1, 2, 2, 3]


def test_direct_blocks_fit_a_small_image():
    dw, b = _group_binding(declare_conv2d(padding=(3,) * 4, groups=768), x=(1, 768, 7, 7), weight=(768, 1, 7, 7))
    small = default_window_config(dw, b)
    dw2, b2 = _group_binding(declare_conv2d(padding=(3,) * 4, groups=768), x=(1, 768, 200, 300),
                             weight=(768, 1, 7, 7))
    big = default_window_config(dw2, b2)
    assert big.block_rows > small.block_rows >= 7 and big.block_width > small.block_width >= 7
    assert small.block_rows % small.rows_tile == 0 and small.block_width % small.tile_width == 0
    assert small.block_rows <= 2 * small.rows_tile and small.block_width == small.tile_width


def test_default_configs_follow_the_channel_structure():
    dw, b = _group_binding(declare_conv2d(padding=(15,) * 4, groups=256), x=(1, 256, 56, 56),
                           weight=(256, 1, 31, 31))
    c = default_window_config(dw, b)
    assert c.variant == "direct" and not c.unroll_kw and check_window_config(c, dw, b)[0]
    assert c.kw_outer and c.kh_block == 0 if c.vector * 32 < 512 else c.kh_block > 0      # AVX2: sliding taps
    dense, b2 = _group_binding(declare_conv2d(padding=(1,) * 4), x=(1, 64, 56, 56), weight=(64, 64, 3, 3))
    c2 = default_window_config(dense, b2)
    assert c2.variant == "gemm" and c2.co_tile > 1 and check_window_config(c2, dense, b2)[0]
    cc, b3 = _group_binding(declare_causal_conv1d(), x=(2, 1024, 2048), weight=(1024, 4))
    c3 = default_window_config(cc, b3)
    assert c3.variant == "direct" and c3.rows_tile == 1 and c3.unroll_kw


def test_config_json_round_trip_and_space():
    c = WindowConfig(variant="gemm", co_tile=6, rows_tile=2, block_rows=2)
    assert WindowConfig.from_json(c.to_json()) == c
    assert WindowConfig.from_json(c.dumps()) == c
    assert as_window_config(c.to_json()) == c and as_window_config(None) is None
    with pytest.raises(ValueError, match="unknown window config knobs"):
        WindowConfig.from_json({"variant": "direct", "tile": 3})
    g, b = _group_binding(declare_conv2d(), x=(1, 3, 8, 8), weight=(4, 3, 3, 3))
    sp = window_space(g, b)
    names = [k.name for k in sp.knobs]
    variants = set(dict((k.name, k.values) for k in sp.knobs)["variant"])
    assert "variant" in names and variants == {"direct", "gemm", "dot", "cvec"}
    assert sp.to_json()["knobs"]["co_tile"]["values"]


def test_invalid_configs_are_reported_and_legalized():
    g, b = _group_binding(declare_conv2d(padding=(15,) * 4, groups=4), x=(1, 4, 64, 64), weight=(4, 1, 31, 31))
    bad = WindowConfig(variant="direct", rows_tile=8, block_rows=64, block_width=512, kh_block=7, unroll_kw=False)
    ok, why = check_window_config(bad, g, b)
    assert not ok and "patch" in why
    assert not check_window_config(replace(bad, variant="winograd"), g, b)[0]
    assert not check_window_config(replace(bad, block_rows=60), g, b)[0]          # not a multiple of rows_tile
    assert check_window_config(legalize_window_config(bad, g, b), g, b)[0]
    with pytest.raises(ValueError, match="invalid window config"):
        render_window(g, bad, binding=b)
    c1, b1 = _group_binding(declare_causal_conv1d(), x=(1, 2, 16), weight=(2, 3))
    assert not check_window_config(WindowConfig(rows_tile=2, block_rows=2), c1, b1)[0]


def test_supported_and_source_shape():
    g, b = _group_binding(declare_causal_conv1d(DType.f32, DType.f32, DType.f32, "silu"), x=(2, 8, 64),
                          weight=(8, 4), bias=(8,))
    assert window_supported(g) == (True, "")
    assert window_supported(None)[0] is False
    src = window_source(g, b)
    assert src.tensors == ("x", "weight", "bias", "out")
    text = src.text
    assert "T.parallel" in text and "T.vectorized" in text and "n_L = T.int32()" in text
    assert "T.exp" not in text                               # the silu uses the polynomial exp


def test_random_valid_configs_match_torch(rnd, cache):
    """Two configs drawn from the space (rejecting invalid ones) on a strided, dilated, grouped conv with bias."""
    op = declare_conv2d(DType.f32, DType.f32, DType.f32, (2, 1), (1, 2, 2, 0), (1, 2), 2)
    x, w, b = rnd.randn(1, 6, 13, 17), rnd.randn(4, 3, 3, 2), rnd.randn(4)
    g, bd = _group_binding(op, x=x.shape, weight=w.shape, bias=b.shape)
    knobs = {k.name: k.values for k in window_space(g, bd).knobs}
    pick = random.Random(rnd.seed)
    xp = F.pad(x.to(F64), (2, 0, 1, 2))
    ref = F.conv2d(xp, w.to(F64), b.to(F64), (2, 1), 0, (1, 2), 2)
    bound = F.conv2d(xp.abs(), w.to(F64).abs(), b.to(F64).abs(), (2, 1), 0, (1, 2), 2)
    done = 0
    while done < 2:
        cfg = WindowConfig(**{k: pick.choice(v) for k, v in knobs.items()})
        cfg = replace(cfg, block_width=cfg.block_width // 8 * cfg.tile_width or cfg.tile_width,
                      block_rows=cfg.rows_tile * pick.choice((1, 2)))
        if not check_window_config(cfg, g, bd)[0]:
            continue
        got = run_window(g, {"x": x, "weight": w, "bias": b}, bd, cfg, cache)["out"]
        check(got, ref, bound, 6, F32, f"random config {cfg}", rnd.seed)
        done += 1
