"""Restaging backward convolutions (``opgen.ir.passes.restage``): strided data gradients split into one window
reduction per phase (``opgen.ir.passes.phases``) or, where the dilation is a multiple of the stride, read a
zero-inserted output gradient; grouped ones read a re-laid-out weight, so all become window reductions; the
rewritten op computes the same gradients (float64, the reference interpreter, fresh random data, odd sizes)."""
from __future__ import annotations

import pytest
import torch

from opgen.ir import DType, Map, Reduce, bind
from opgen.ir.passes.grad import grad_op
from opgen.ir.passes.phases import split_strided_phases
from opgen.ir.passes.restage import relayout_operands, restage_windows, upsample_strided_reads
from opgen.ir.passes.split import node_op
from opgen.ir.passes.window import fuse_window
from opgen.ops.conv import declare_conv2d
from opgen.targets.reference import evaluate

F64 = DType.f64


def _backward(stride, pads, dil, groups):
    op = declare_conv2d(F64, F64, None, stride, pads, dil, groups)
    return grad_op(op, ("x", "weight"))


def _windows(op) -> list[str]:
    return [n.out for k, n in enumerate(op.nodes) if isinstance(n, Reduce) and fuse_window(node_op(op, k))]


def _run(op, x, w, gy):
    b = bind(op, {"x": x.shape, "weight": w.shape, "grad_out": gy.shape})
    return evaluate(op, {"x": x, "weight": w, "grad_out": gy}, b)


def _check_same_gradients(back, new, shape_x, shape_w):
    attrs = dict(back.attrs)
    pt, pb, pl, pr = attrs["padding"]
    x, w = torch.randn(*shape_x, dtype=torch.float64), torch.randn(*shape_w, dtype=torch.float64)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pl, pr, pt, pb)), w, stride=attrs["stride"],
                                   dilation=attrs["dilation"], groups=attrs["groups"])
    gy = torch.randn_like(y)
    want, got = _run(back, x, w, gy), _run(new, x, w, gy)
    for name in ("grad_x", "grad_weight"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_a_strided_data_gradient_reads_the_zero_inserted_gradient():
    back = _backward((2, 3), (1, 2, 2, 0), (2, 1), 1)
    assert "t0" not in _windows(back)
    new = restage_windows(back)
    k = next(i for i, n in enumerate(new.nodes) if n.out == "t0")
    up = new.nodes[k - 1]
    assert isinstance(up, Map) and new.tensor(up.out).kind == "temp"
    assert new.nodes[k].predicate is None and "t0" in _windows(new)
    # x 11 x 13, kernel 3 x 5, stride 2 x 3, dilation 2 x 1 (a multiple of the stride), padding (1, 2) x (2, 0)
    _check_same_gradients(back, new, (2, 3, 11, 13), (4, 3, 3, 5))


# stride, padding (t, b, l, r), groups, x (N, C, H, W), weight (F, C/groups, KH, KW)
PHASE_CASES = {
    "3x3-stride2-odd": ((2, 2), (1, 1, 1, 1), 1, (2, 3, 9, 10), (4, 3, 3, 3)),
    "3x5-stride2x3-asym": ((2, 3), (1, 2, 2, 0), 1, (1, 2, 11, 13), (3, 2, 3, 5)),
    "1x1-stride2-size1": ((2, 2), (0, 0, 0, 0), 1, (1, 3, 7, 1), (2, 3, 1, 1)),    # phases with no tap
    "2x3-stride3x2": ((3, 2), (1, 0, 0, 1), 1, (1, 2, 8, 9), (3, 2, 2, 3)),
    "grouped": ((2, 2), (1, 1, 1, 1), 2, (1, 4, 7, 6), (6, 2, 3, 3)),
}


@pytest.mark.parametrize("case", list(PHASE_CASES), ids=list(PHASE_CASES))
def test_a_strided_data_gradient_splits_into_one_window_per_phase(case):
    stride, pads, groups, xs, ws = PHASE_CASES[case]
    back = _backward(stride, pads, (1, 1), groups)
    assert "t0" not in _windows(back)
    new = restage_windows(back)
    phases = [n for n in new.nodes if isinstance(n, Reduce) and n.out.startswith("t0_p")]
    assert len(phases) == stride[0] * stride[1]
    assert all(n.predicate is None for n in phases) and set(_windows(new)) >= {n.out for n in phases}
    assert not any(n.out.endswith("_up") for n in new.nodes)            # nothing zero-inserted
    _check_same_gradients(back, new, xs, ws)


def test_phase_taps_partition_the_kernel():
    """A 3x5 kernel at stride 2x3: the six phases read 2x2, 2x2, 2x1, 1x2, 1x2, 1x1 taps (15 in all, as the kernel
    has), instead of 15 taps per output position through the zero-inserted gradient."""
    back = _backward((2, 3), (1, 2, 2, 0), (1, 1), 1)
    new = split_strided_phases(back, next(k for k, n in enumerate(back.nodes) if n.out == "t0"))
    b = bind(new, {"x": (1, 2, 11, 13), "weight": (3, 2, 3, 5), "grad_out": (1, 3, 6, 4)})
    taps = sorted(tuple(b.extents[a] for a in n.raxes if a.name.startswith("t0_p")) for n in new.nodes
                  if isinstance(n, Reduce) and n.out.startswith("t0_p"))
    assert sum(h * w for h, w in taps) == 3 * 5
    assert taps == sorted([(2, 2), (2, 2), (2, 1), (1, 2), (1, 2), (1, 1)])


def test_a_grouped_data_gradient_reads_a_relaid_weight():
    back = _backward((1, 1), (1, 1, 1, 1), (1, 1), 2)
    new = restage_windows(back)
    k = next(i for i, n in enumerate(new.nodes) if n.out == "t0")
    w2 = new.nodes[k - 1]
    assert isinstance(w2, Map) and w2.value.arg.tensor == "weight"
    reads = {a.tensor: a for a in (f.arg for f in new.nodes[k].value.walk() if f.arg.__class__.__name__ == "Access")}
    assert tuple(reads[w2.out].index) == w2.axes                     # the reduction reads the copy at plain axes
    b = bind(new, {"x": (1, 4, 5, 7), "weight": (6, 2, 3, 3), "grad_out": (1, 6, 5, 7)})
    assert b.shapes[w2.out] == (4, 3, 3, 3)                            # [C_in, F/groups, KH, KW]: a permutation
    assert "t0" in _windows(new) and "t0" not in _windows(back)
    _check_same_gradients(back, new, (1, 4, 5, 7), (6, 2, 3, 3))


def test_strided_and_grouped_together():
    back = _backward((2, 2), (1, 1, 0, 1), (1, 2), 3)
    new = restage_windows(back)
    # the data gradient: zero-inserted gradient + relaid weight; the weight gradient: regrouped data (regroup_data)
    assert {"t0", "t1"} <= set(_windows(new)) and len(new.nodes) == len(back.nodes) + 3
    assert "t1" not in _windows(back)
    # x 9 x 10, kernel 3 x 3, stride 2, dilation (1, 2), padding (1, 1) x (0, 1)
    _check_same_gradients(back, new, (2, 6, 9, 10), (3, 2, 3, 3))


def test_nothing_changes_where_the_gradient_already_is_a_window():
    back = _backward((1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert restage_windows(back) is back
    for k in range(len(back.nodes)):
        assert upsample_strided_reads(back, k) is None          # no stride predicate anywhere
        assert relayout_operands(back, k) is None               # every factor is plain or padded
