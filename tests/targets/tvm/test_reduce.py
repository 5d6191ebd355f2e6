"""The reduction kernel (``opgen.targets.tvm.reduce``): single Reduce nodes of generated backward ops and hand-built
reductions against the reference interpreter, on fresh random data (seed in the failure message), odd sizes and
size-1 axes, scalar and vectorized (last output extent a multiple of the SIMD width) forms. Tolerances: float32
``2e-5 * max(1, max|ref|)`` absolute, float64 ``1e-10`` likewise."""
from __future__ import annotations

import random

import pytest
import sympy
import torch

pytest.importorskip("tvm")

from opgen.ir import DType, OpBuilder, bind, dims, exp, where  # noqa: E402
from opgen.ir.nodes import MAX, Reduce  # noqa: E402
from opgen.ir.passes.split import node_op  # noqa: E402
from opgen.ir.symbols import make_axes  # noqa: E402
from opgen.ops.scan import declare_selective_scan  # noqa: E402
from opgen.targets.reference.evaluate import _Evaluator  # noqa: E402
from opgen.targets.reference import evaluate  # noqa: E402
from opgen.targets.tvm import TVMTarget  # noqa: E402
from opgen.targets.tvm.reduce import reduce_supported, render_reduce, run_reduce  # noqa: E402
from opgen.bridge import backward_op as _backward  # noqa: E402


@pytest.fixture(scope="module")
def target() -> TVMTarget:
    return TVMTarget()


def _close(got, want, dtype, what):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape and err <= tol * max(1.0, want.abs().max().item()), f"{what}: max err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [(2, 5, 3, 13), (1, 8, 16, 24), (1, 1, 1, 1)])
def test_selective_scan_backward_reductions(target, dtype, sizes):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    dt = DType.f32 if dtype == torch.float32 else DType.f64
    op = declare_selective_scan(dt, dt, dt, dt, dt, "variable", "variable", dt, dt, None, True, False)
    back = _backward(op, tuple(t.name for t in op.inputs))
    b, d, n, length = sizes
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ins = dict(u=r(b, d, length), delta=r(b, d, length), A=-torch.rand(d, n, generator=g, dtype=dtype),
               B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), grad_out=r(b, d, length))
    bd = bind(back, {k: v.shape for k, v in ins.items()})
    ev = _Evaluator(back, dict(ins), bd, torch.device("cpu"), 1 << 26)
    ev.run()
    checked = 0
    for k, node in enumerate(back.nodes):
        if not isinstance(node, Reduce):
            continue
        sub = node_op(back, k)
        assert reduce_supported(sub) == (True, "")
        sub_ins = {x.name: ev.tensors[x.name] for x in sub.inputs}
        got = run_reduce(sub, sub_ins, bind(sub, {x: v.shape for x, v in sub_ins.items()}), target.cache)[node.out]
        _close(got, ev.tensors[node.out], dtype, f"{node.out} at {sizes} (seed {seed})")
        checked += 1
    assert checked >= 6


def test_max_with_a_predicate_and_padded_reads(target):
    """A max over a window of a padded input, where a predicate drops odd offsets; vectorized when W % 8 == 0."""
    H, W, K = dims("H W K")
    with OpBuilder("masked_max") as bld:
        x = bld.input("x", (H, W), DType.f32)
        i, j = make_axes("i j")
        k = bld.axis("k", K)
        y = bld.reduce(k, exp(x.pad((0, 0), (2, 2))[i, j + k - 2]), monoid=MAX, where=sympy.Eq(k % 2, 0) | sympy.Eq(j, 0),
                       axes=(i, j), name="y")
        op = bld.build({"y": y})
    for w in (16, 13):
        ins = {"x": torch.randn(3, w)}
        bd = bind(op, {"x": (3, w)}, {"K": 5})
        got = run_reduce(op, ins, bd, target.cache)["y"]
        _close(got, evaluate(op, ins, bd)["y"], torch.float32, f"masked max W={w}")
    assert "T.vectorized(8)" in render_reduce(op, vector=8).text
    ok, why = reduce_supported(declare_selective_scan())
    assert not ok and "not a single reduction" in why
