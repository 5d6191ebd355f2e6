"""Binding concrete sizes, the op's graph view, fingerprints and the @op front end."""
from __future__ import annotations

import subprocess
import sys

import networkx as nx
import pytest

import opgen
from opgen import F32, Float
from opgen.ir import DType, OpBuilder, ShapeError, bind, dims
from opgen.ir.symbols import make_axes


@opgen.op
def ssm(u: F32["B D L"], delta: F32["B D L"], A: F32["D N"], Bm: F32["B N L"], C: F32["B N L"]):
    b, d, n, t = opgen.axes("b d n t")
    h = opgen.scan(t, a=opgen.exp(delta[b, d, t] * A[d, n]), b=delta[b, d, t] * Bm[b, n, t] * u[b, d, t], state=n)
    return opgen.sum(n, h[b, d, n, t] * C[b, n, t])


@opgen.op
def ssm_renamed(u: F32["B D L"], delta: F32["B D L"], A: F32["D N"], Bm: F32["B N L"], C: F32["B N L"]):
    x, y, z, w = opgen.axes("x y z w")
    h = opgen.scan(w, a=opgen.exp(delta[x, y, w] * A[y, z]), b=delta[x, y, w] * Bm[x, z, w] * u[x, y, w], state=z)
    return opgen.sum(z, h[x, y, z, w] * C[x, z, w])


@opgen.op
def ssm_reversed(u: F32["B D L"], delta: F32["B D L"], A: F32["D N"], Bm: F32["B N L"], C: F32["B N L"]):
    b, d, n, t = opgen.axes("b d n t")
    h = opgen.scan(t, a=opgen.exp(delta[b, d, t] * A[d, n]), b=delta[b, d, t] * Bm[b, n, t] * u[b, d, t], state=n,
                   reverse=True)
    return opgen.sum(n, h[b, d, n, t] * C[b, n, t])


SHAPES = {"u": (2, 3, 7), "delta": (2, 3, 7), "A": (3, 4), "Bm": (2, 4, 7), "C": (2, 4, 7)}


def test_bind_infers_every_dim_and_extent():
    op = ssm.build()
    b = bind(op, SHAPES)
    assert {str(k): v for k, v in b.dims.items()} == {"B": 2, "D": 3, "L": 7, "N": 4}
    assert b.shapes["out"] == (2, 3, 7)


def test_bind_mismatch_names_argument_dim_and_source():
    op = ssm.build()
    with pytest.raises(ShapeError) as ei:
        bind(op, {**SHAPES, "C": (2, 4, 6)}, who="ssm")
    msg = str(ei.value)
    assert "argument 'C'" in msg and "(2, 4, 6)" in msg and "L = 7" in msg and "argument 'u'" in msg


def test_bind_rank_error():
    op = ssm.build()
    with pytest.raises(ShapeError, match=r"argument 'A' expected a 2-D tensor of shape \[D, N\], got 3-D"):
        bind(op, {**SHAPES, "A": (1, 3, 4)})


def test_constraint_and_extent_errors():
    from opgen.ops.conv import declare_conv2d, declare_long_conv

    with pytest.raises(ShapeError, match="must not exceed"):
        bind(declare_long_conv(), {"u": (1, 2, 5), "k": (2, 6)})
    with pytest.raises(ShapeError, match="would have extent 0"):
        bind(declare_conv2d(), {"x": (1, 1, 3, 3), "weight": (1, 1, 4, 4)})


def test_graph_view_is_a_frozen_dag():
    op = ssm.build()
    g = op.graph
    assert nx.is_directed_acyclic_graph(g) and nx.is_frozen(g)
    assert ("tensor", "u") in g and g.nodes[("node", 0)]["kind"] == "scan"
    order = [n for n in nx.topological_sort(g) if n[0] == "node"]
    assert order == [("node", 0), ("node", 1)]
    with pytest.raises(nx.NetworkXError):
        g.add_node("x")


def test_fingerprint_is_structural_and_stable():
    a, b = ssm.build(), ssm.build()
    assert a.fingerprint == b.fingerprint
    assert ssm_renamed.build().fingerprint == a.fingerprint
    assert ssm_reversed.build().fingerprint != a.fingerprint
    assert ssm.build(dtype=DType.bf16).fingerprint == a.fingerprint  # F32 annotations fix the dtype
    code = ("import opgen; from opgen.ops.scan import declare_selective_scan as d; "
            "print(d().fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    from opgen.ops.scan import declare_selective_scan

    assert out == declare_selective_scan().fingerprint       # another process (another hash seed), same print


def test_generic_float_annotation_takes_the_build_dtype():
    @opgen.op
    def scale(x: Float["N"]):
        (i,) = (opgen.axes("i"),)
        return opgen.compute(x[i] * 2.0, (i,))

    assert scale.build(dtype="bf16").inputs[0].dtype == DType.bf16
    assert scale.build().inputs[0].dtype == DType.f32
    with pytest.raises(opgen.ArgumentError, match=r"op scale: argument 'x' expected a tensor, got int 1"):
        scale(1)            # a declaration is callable on tensors (its torch op); anything else is a clear error


def test_outputs_and_temps_dtypes():
    L = dims("L")
    with OpBuilder("mix") as bld:
        x = bld.input("x", (L,), DType.bf16)
        t = make_axes("t")
        h = bld.scan(t, a=0.5, b=x[t], axes=(t,))
        y = bld.map(h[t] * 2.0, (t,))
        op = bld.build({"y": y, "state": h})
    assert op.tensor("state").dtype == DType.bf16 and op.tensor("state").kind == "output"
    assert op.tensor("y").dtype == DType.f32  # reads of an intermediate see the accumulation dtype
