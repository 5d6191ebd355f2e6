"""Ops that no compiled target runs whole (backward ops: two scans and reductions) run their scans as scan kernels,
their builtin reductions as reduction kernels and the rest in the interpreter; results equal the pure
interpreter."""
from __future__ import annotations

import pytest
import torch

from opgen.config import Config
from opgen.ir import DType, bind
from opgen.ir.passes.grad import grad_op
from opgen.ir.passes.scan_adjoint import fuse_scan_adjoint
from opgen.ir.passes.split import node_op
from opgen.ops.scan import declare_linear_scan, declare_selective_scan
from opgen.runtime import make_session
from opgen.targets.reference import evaluate

pytest.importorskip("tvm")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_backward_scans_run_compiled(tmp_path, dtype, tol):
    F = DType.f32 if dtype == torch.float32 else DType.f64
    op = declare_selective_scan(F, F, F, F, F, "variable", "variable", F, F, F, True, True)
    back = grad_op(op, ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])
    b, d, n, length = 2, 5, 3, 11
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    ins = dict(u=r(b, d, length), delta=r(b, d, length), A=-torch.rand(d, n, dtype=dtype), B=r(b, n, length),
               C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d), grad_out=r(b, d, length),
               grad_last_state=r(b, d, n))
    session = make_session(Config(cache_dir=tmp_path, min_node_kernel_work=0))   # small: compile them anyway
    binding = bind(back, {k: tuple(v.shape) for k, v in ins.items()})
    runner = session._node_runner(back, binding, "cpu", ins)
    assert runner is not None
    reductions = {n.out for n in back.nodes if type(n).__name__ == "Reduce"}
    # the scan's fused backward group (ir/passes/scan_adjoint.py) computes its members in one kernel; the rest
    # of the reductions run as node kernels
    members = set(fuse_scan_adjoint(back).members)
    assert {"h", "adj_h"} <= members
    assert reductions and runner.compiled == {**{m: "tvm" for m in members}, **{r: "tvm" for r in reductions}}
    got = session.run(back, ins)
    want = evaluate(back, ins, binding)
    # below the work threshold the reductions outside the group are left to the interpreter
    fresh = make_session(Config(cache_dir=tmp_path, min_node_kernel_work=10**12))
    assert fresh._node_runner(back, binding, "cpu", ins).compiled == {m: "tvm" for m in members}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol * max(1.0, want[k].abs().max().item()))


def test_node_op_reads_become_inputs():
    back = grad_op(declare_linear_scan(DType.f64, DType.f64), ["a", "b"])
    k = [n.out for n in back.nodes].index("adj_h")
    sub = node_op(back, k)
    assert [t.name for t in sub.outputs] == ["adj_h"]
    assert {t.name for t in sub.inputs} == {"a", "grad_h"}
    assert len(sub.nodes) == 1
