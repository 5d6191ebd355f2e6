"""``fuse_window``: recognition of window reductions (convolutions) from affine indices, and rejection of the rest.

Ops come from the library (``opgen.ops.conv``) and from hand-written declarations in this file (other layouts,
epilogues, near misses). Only structure is checked here; the TVM kernels built on the groups are tested against
torch in ``tests/targets/tvm/test_window.py``.
"""
from __future__ import annotations

import sympy

from opgen.ir import MAX, DType, OpBuilder, dims, sigmoid, silu
from opgen.ir.passes.window import Channels, WindowGroup, fuse_window
from opgen.ir.symbols import make_axes
from opgen.library import LIBRARY
from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_long_conv
from opgen.ops.scan import declare_linear_scan, declare_selective_scan

F32 = DType.f32


def spatial(g: WindowGroup) -> list[tuple]:
    return [(str(s.out_axis), str(s.win_axis), s.data_dim, s.stride, s.dilation, s.offset, s.pad) for s in g.spatial]


def test_dense_conv2d():
    g = fuse_window(declare_conv2d())
    assert g is not None and g.out == "out" and g.epilogue is None
    assert (g.data.tensor, g.weight.tensor) == ("x", "weight")
    assert [(str(a), k) for a, k in g.batch] == [("n", 0)]
    ch = g.channels
    assert (ch.kind, str(ch.out_axis), str(ch.in_axis), ch.data_dim) == ("dense", "co", "ci", 1)
    assert spatial(g) == [("oh", "kh", 2, 1, 1, 0, (0, 0)), ("ow", "kw", 3, 1, 1, 0, (0, 0))]
    assert "channels: dense" in g.describe()


def test_strided_dilated_grouped_conv2d_with_bias():
    op = declare_conv2d(F32, F32, F32, stride=(2, 1), padding=(1, 2, 0, 3), dilation=(2, 1), groups=4)
    g = fuse_window(op)
    assert g is not None
    C, Fd = dims("C F")
    ch = g.channels
    assert ch.kind == "grouped" and ch.groups == 4
    assert sympy.simplify(ch.in_per_group - C) == 0 and sympy.simplify(ch.out_per_group - Fd) == 0
    assert spatial(g) == [("oh", "kh", 2, 2, 2, -1, (1, 2)), ("ow", "kw", 3, 1, 1, 0, (0, 3))]
    assert str(g.epilogue) == "acc[n, co, oh, ow] + bias[co]"
    assert g.extra_inputs == ("bias",)
    # the structural kind resolves with sizes: one channel per group is depthwise, one group dense
    assert ch.kind_at({C: 1, Fd: 1}) == "depthwise"
    assert ch.kind_at({C: 3, Fd: 2}) == "grouped"
    text = g.describe()
    assert "stride 2, dilation 2, offset -1, pad (1, 2)" in text and "epilogue out[n, co, oh, ow]" in text


def test_depthwise_groups_equal_channels():
    g = fuse_window(declare_conv2d(padding=(3, 3, 3, 3), groups=256))
    assert g.channels.kind == "grouped" and g.channels.groups == 256
    C, Fd = dims("C F")
    assert g.channels.kind_at({C: 1, Fd: 1}) == "depthwise"


def test_causal_conv1d_bias_silu():
    g = fuse_window(declare_causal_conv1d(F32, F32, F32, "silu"))
    W = dims("W")
    assert g is not None and g.channels.kind == "depthwise" and str(g.channels.out_axis) == "d"
    assert g.channels.in_axis is None
    (s,) = g.spatial
    assert (str(s.out_axis), str(s.win_axis), s.stride, s.dilation) == ("t", "j", 1, 1)
    assert sympy.simplify(s.offset - (1 - W)) == 0 and s.pad == (W - 1, 0)
    assert str(g.epilogue) == "silu(acc[b, d, t] + bias[d])"


def test_long_conv_is_a_flipped_window():
    g = fuse_window(declare_long_conv())
    (s,) = g.spatial
    assert s.dilation == -1 and s.offset == 0 and g.channels.kind == "depthwise"


def test_library_ops_other_than_convolutions_are_not_windows():
    found = {e.name: fuse_window(e.declare()) is not None for e in LIBRARY}
    assert found["conv2d"] and found["causal_conv1d"] and found["long_conv"]
    for name in ("linear_scan", "selective_scan", "chunk_gla", "attention"):
        if name in found:
            assert not found[name], name
    assert fuse_window(declare_linear_scan()) is None
    assert fuse_window(declare_selective_scan()) is None


def _nhwc_gated():
    """NHWC data, HWIO weight, and an epilogue with bias, silu and an elementwise gate."""
    N, H, W, C, Fd, KH, KW = dims("N H W C F KH KW")
    with OpBuilder("nhwc_gated") as bld:
        x = bld.input("x", (N, H, W, C), F32)
        w = bld.input("w", (KH, KW, C, Fd), F32)
        b = bld.input("b", (Fd,), F32)
        gate = bld.input("gate", (N, H, W, Fd), F32)
        n, oh, ow, co, ci, kh, kw = make_axes("n oh ow co ci kh kw")
        xv = x.pad(0, ((KH - 1) // 2, KH // 2), ((KW - 1) // 2, KW // 2), 0)[
            n, oh + kh - (KH - 1) // 2, ow + kw - (KW - 1) // 2, ci]
        acc = bld.reduce((ci, kh, kw), xv * w[kh, kw, ci, co], axes=(n, oh, ow, co), name="acc")
        y = bld.map(silu(acc[n, oh, ow, co] + b[co]), (n, oh, ow, co), name="y")
        out = bld.map(y[n, oh, ow, co] * sigmoid(gate[n, oh, ow, co]), (n, oh, ow, co), name="out")
        return bld.build({"out": out})


def test_nhwc_layout_and_gated_epilogue():
    g = fuse_window(_nhwc_gated())
    assert g is not None and g.out == "out"
    assert g.channels.kind == "dense" and g.channels.data_dim == 3
    assert [s.data_dim for s in g.spatial] == [1, 2]
    assert str(g.epilogue) == "silu(acc[n, oh, ow, co] + b[co]) * sigmoid(gate[n, oh, ow, co])"
    assert len(g.epilogue_maps) == 2 and set(g.extra_inputs) == {"b", "gate"}


def _window_op(value_fn, monoid=None, where=None, prologue=False, weight_index=None):
    L, K, D = dims("L K D")
    with OpBuilder("probe") as bld:
        x = bld.input("x", (D, L), F32)
        w = bld.input("w", (D, K), F32)
        d, j = make_axes("d j")
        t = bld.axis("t", L - K + 1 if prologue else L)
        src = x
        if prologue:
            src = bld.map(x[d, t] * 2.0, (d, t), name="x2")
        kw = {} if monoid is None else {"monoid": monoid}
        if where is not None:
            kw["where"] = where(t, j)
        r = bld.reduce(j, value_fn(src.pad(0, (K - 1, 0)) if not prologue else src, w, d, t, j, K),
                       axes=(d, t), name="y", **kw)
        return bld.build({"y": r})


def test_the_plain_causal_window_is_recognized():
    g = fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j - (K - 1)] * w[d, j]))
    assert g is not None and g.channels.kind == "depthwise"


def test_near_misses_are_rejected_without_errors():
    # max pooling style reduction (not a sum)
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j - (K - 1)] * w[d, j], monoid=MAX)) is None
    # a predicate on the reduction
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j - (K - 1)] * w[d, j],
                                  where=lambda t, j: j <= t)) is None
    # three factors, a sum of products, a weight with a computed index
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j - (K - 1)] * w[d, j] * w[d, j])) is None
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j - (K - 1)] + w[d, j])) is None
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j - (K - 1)] * w[d, K - 1 - j])) is None
    # a non-affine window index
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, (t + j) // 2] * w[d, j])) is None
    # a pointwise prologue (not fused here)
    assert fuse_window(_window_op(lambda x, w, d, t, j, K: x[d, t + j] * w[d, j], prologue=True)) is None


def test_matmul_is_not_a_window():
    M, K, Nn = dims("M K N")
    with OpBuilder("mm") as bld:
        a = bld.input("a", (M, K), F32)
        b = bld.input("b", (K, Nn), F32)
        i, j, k = make_axes("i j k")
        bld_out = bld.reduce(k, a[i, k] * b[k, j], axes=(i, j), name="c")
        op = bld.build({"c": bld_out})
    assert fuse_window(op) is None


def test_group_is_hashable_and_printable():
    g1 = fuse_window(declare_conv2d(groups=2))
    g2 = fuse_window(declare_conv2d(groups=2))
    assert g1 == g2 and hash(g1) == hash(g2)
    assert isinstance(g1.channels, Channels)
    assert g1.describe().startswith("window group out:")
