"""The fused scan backward (``ir/passes/scan_adjoint.py`` + ``targets/tvm/scan_adjoint.py``).

Checked three ways, fresh random data each run: the group the pass finds in the grad transform's backward ops
(selective_scan, chunk_gla, linear_scan, reversed); the kernel's outputs against the reference interpreter
running the same backward op node by node, with several chunks (first pass + checkpoints) and a split of the
cross-lane reductions over parallel chunks; and the library ops' gradients through the torch bridge against
torch autograd of independent float64 loops, at sizes that are not powers of two and with size-1 axes.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import opgen
from opgen import Float
from opgen.bridge import backward_op
from opgen.ir.passes.scan_adjoint import fuse_scan_adjoint, group_scan_adjoint
from opgen.ops import chunk_gla, linear_scan, selective_scan
from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan

pytest.importorskip("tvm")

SS_ALL = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


# ------------------------------------------------------------------------------------------------ the pass

def test_selective_scan_backward_is_one_group():
    op = declare_selective_scan(D="f32", z="f32", delta_bias="f32", delta_softplus=True, last_state=True)
    g = fuse_scan_adjoint(backward_op(op, SS_ALL))
    assert g is not None and g.carry_a
    kinds = {r.node.out: r.kind for r in g.reductions}
    # y (for dz), du and two ddelta terms per step (sum over n); dA, dD-like ddelta_bias terms per lane (sum over
    # b, t); dB and dC across lanes (sum over d); dD's sum of inputs over (b, t) beside the epilogues
    assert sorted(kinds.values()) == sorted(["point"] * 4 + ["lane"] * 3 + ["cross"] * 2 + ["steplane"])
    assert {m.out for m in g.epilogues} == {"grad_u", "grad_delta", "grad_z"}
    assert [str(a) for a in g.split] == ["d"] and [str(a) for a in g.state] == ["n"]
    members = set(g.members)
    assert {"h", "adj_h"} <= members
    bw = backward_op(op, SS_ALL)
    names = [n.out for n in bw.nodes]
    first = names.index(g.first)
    assert set(names[first:first + len(members)]) == members        # contiguous after group_scan_adjoint


def test_chunk_gla_and_linear_scan_groups():
    g = fuse_scan_adjoint(backward_op(declare_chunk_gla(scale=0.5, final_state=True), ("q", "k", "v", "g")))
    assert g is not None and [str(a) for a in g.state] == ["kk", "vv"]
    assert {r.kind for r in g.reductions} == {"point"}
    g = fuse_scan_adjoint(backward_op(declare_linear_scan(initial="f32"), ("a", "b", "initial")))
    assert g is not None and len(g.tails) == 1 and len(g.stores) == 2
    g = fuse_scan_adjoint(backward_op(declare_linear_scan(reverse=True), ("a", "b")))
    assert g is not None and g.reverse


def test_a_forward_op_has_no_group():
    op = declare_selective_scan()
    assert fuse_scan_adjoint(op) is None
    assert group_scan_adjoint(op) is op


# ------------------------------------------------------------------------------------- kernel vs reference

def _kernel_vs_reference(op, wrt, inputs, chunk, threads):
    from opgen.runtime import default_session
    from opgen.targets.reference.evaluate import evaluate
    from opgen.targets.tvm.scan_adjoint import adjoint_call

    bw = backward_op(op, wrt)
    g = fuse_scan_adjoint(bw)
    sess = default_session()
    b = sess.binding(bw, {k: tuple(v.shape) for k, v in inputs.items()}, {}, "test")
    call = adjoint_call(g, b, sess.targets.get("tvm").cache, threads, chunk=chunk)
    got = call(inputs)
    # the reference computes the members too: evaluate the group's results as outputs of a copy of the op
    from opgen.ir.nodes import TensorParam
    from opgen.ir.op import Op
    tensors = tuple(TensorParam(t.name, t.shape, t.dtype, "output" if t.name in g.outputs else t.kind)
                    for t in bw.tensors)
    ref_op = Op(bw.name, tensors, bw.nodes, bw.extents, bw.derived, bw.constraints, bw.attrs)
    ref = evaluate(ref_op, inputs, sess.binding(ref_op, {k: tuple(v.shape) for k, v in inputs.items()}, {}, "t"))
    assert set(got) == set(g.outputs)
    for name in g.outputs:
        err = (got[name].double() - ref[name].double()).abs().max().item()
        scale = ref[name].double().abs().max().item() + 1e-6
        assert err <= 2e-5 * scale, (name, err, scale)


@pytest.mark.parametrize("chunk,threads", [(None, 1), (3, 2), (5, 3)], ids=["one chunk", "3-step chunks x2",
                                                                             "5-step chunks x3"])
def test_selective_scan_kernel_matches_reference(chunk, threads):
    g = _gen()
    Bt, Dd, N, L = 2, 5, 8, 13
    op = declare_selective_scan(D="f32", z="f32", delta_bias="f32", delta_softplus=True, last_state=True)
    inputs = dict(u=torch.randn(Bt, Dd, L, generator=g), delta=torch.randn(Bt, Dd, L, generator=g) * 0.5,
                  A=-torch.rand(Dd, N, generator=g) - 0.5, B=torch.randn(Bt, N, L, generator=g),
                  C=torch.randn(Bt, N, L, generator=g), D=torch.randn(Dd, generator=g),
                  z=torch.randn(Bt, Dd, L, generator=g), delta_bias=torch.randn(Dd, generator=g),
                  grad_out=torch.randn(Bt, Dd, L, generator=g), grad_last_state=torch.randn(Bt, Dd, N, generator=g))
    _kernel_vs_reference(op, SS_ALL, inputs, chunk, threads)


@pytest.mark.parametrize("chunk", [None, 4])
def test_chunk_gla_and_linear_scan_kernels_match_reference(chunk):
    g = _gen()
    Bt, T, H, K, V = 1, 11, 2, 4, 8
    op = declare_chunk_gla(scale=0.5, final_state=True)
    inputs = dict(q=torch.randn(Bt, T, H, K, generator=g), k=torch.randn(Bt, T, H, K, generator=g),
                  v=torch.randn(Bt, T, H, V, generator=g), g=-torch.rand(Bt, T, H, K, generator=g) * 0.3,
                  grad_o=torch.randn(Bt, T, H, V, generator=g), grad_final_state=torch.randn(Bt, H, K, V, generator=g))
    _kernel_vs_reference(op, ("q", "k", "v", "g"), inputs, chunk, 1)
    P, L, Q = 3, 10, 2
    inputs = dict(a=torch.rand(P, L, Q, generator=g), b=torch.randn(P, L, Q, generator=g),
                  initial=torch.randn(P, Q, generator=g), grad_h=torch.randn(P, L, Q, generator=g))
    _kernel_vs_reference(declare_linear_scan(initial="f32"), ("a", "b", "initial"), inputs, chunk, 1)


# ------------------------------------------------------------------------------- library ops through torch

def _ss_loop(u, delta, A, B, C, D, z, db):
    """Mamba's selective scan as a step loop (two autograd nodes per step), returning (out, last state)."""
    dt = F.softplus(delta + db[:, None])
    dA = torch.exp(dt.unsqueeze(-1) * A[None, :, None, :])                  # [B, D, L, N]
    dBu = (dt * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)           # [B, D, L, N]
    h, hs = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for a_t, b_t in zip(dA.unbind(2), dBu.unbind(2)):
        h = a_t * h + b_t
        hs.append(h)
    y = (torch.stack(hs, 2) * C.transpose(1, 2).unsqueeze(1)).sum(-1)
    return (y + D[:, None] * u) * F.silu(z), h


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 1, 4, 1), (3, 6, 16, 37)], ids=str)
def test_selective_scan_grads_vs_float64_loop(shape):
    g = _gen()
    Bt, Dd, N, L = shape
    args = [torch.randn(Bt, Dd, L, generator=g), torch.randn(Bt, Dd, L, generator=g) * 0.5,
            -torch.rand(Dd, N, generator=g) - 0.5, torch.randn(Bt, N, L, generator=g),
            torch.randn(Bt, N, L, generator=g), torch.randn(Dd, generator=g), torch.randn(Bt, Dd, L, generator=g),
            torch.randn(Dd, generator=g)]
    x32 = [a.clone().requires_grad_() for a in args]
    x64 = [a.double().requires_grad_() for a in args]
    gy, gs = torch.randn(Bt, Dd, L, generator=g), torch.randn(Bt, Dd, N, generator=g)
    y, last = selective_scan(*x32, delta_softplus=True, return_last_state=True)
    torch.autograd.backward([y, last], [gy, gs])
    ry, rlast = _ss_loop(*x64)
    torch.autograd.backward([ry, rlast], [gy.double(), gs.double()])
    for name, a, b in zip(SS_ALL, x32, x64):
        err = (a.grad.double() - b.grad).abs().max().item()
        assert err <= 1e-4 * (b.grad.abs().max().item() + 1e-3), (name, err)


def test_fused_backward_runs_one_kernel(monkeypatch):
    """All eight gradients come from one kernel call (not one backward op per gradient)."""
    import opgen.targets.tvm.scan_adjoint as sa

    calls = []
    real = sa.adjoint_call

    def counting(*a, **k):
        fn = real(*a, **k)

        def wrapped(tensors):
            calls.append(1)
            return fn(tensors)
        return wrapped
    monkeypatch.setattr(sa, "adjoint_call", counting)
    from opgen.runtime import default_session
    default_session().forget_tuned()
    g = _gen()
    Bt, Dd, N, L = 1, 7, 4, 9      # sizes no other test uses: a fresh node plan
    x = [torch.randn(Bt, Dd, L, generator=g).requires_grad_(), torch.randn(Bt, Dd, L, generator=g).requires_grad_(),
         (-torch.rand(Dd, N, generator=g) - 0.5).requires_grad_(), torch.randn(Bt, N, L, generator=g).requires_grad_(),
         torch.randn(Bt, N, L, generator=g).requires_grad_(), torch.randn(Dd, generator=g).requires_grad_(),
         torch.randn(Bt, Dd, L, generator=g).requires_grad_(), torch.randn(Dd, generator=g).requires_grad_()]
    selective_scan(*x, delta_softplus=True).sum().backward()
    assert len(calls) == 1
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in x)


def test_linear_scan_and_chunk_gla_grads_vs_float64():
    g = _gen()
    a = torch.rand(3, 4, 29, generator=g) * 0.9 + 0.05
    b, init = torch.randn(3, 4, 29, generator=g), torch.randn(3, 4, generator=g)
    x32 = [t.clone().requires_grad_() for t in (a, b, init)]
    x64 = [t.double().requires_grad_() for t in (a, b, init)]
    gy = torch.randn(3, 4, 29, generator=g)
    linear_scan(x32[0], x32[1], dim=-1, initial=x32[2]).backward(gy)
    h, hs = x64[2], []
    for t in range(29):
        h = x64[0][..., t] * h + x64[1][..., t]
        hs.append(h)
    torch.stack(hs, -1).backward(gy.double())
    for p, q in zip(x32, x64):
        assert (p.grad.double() - q.grad).abs().max() <= 1e-5 * (q.grad.abs().max() + 1)
    Bt, T, H, K, V = 1, 19, 2, 16, 12      # 16 x 12 state: several chunks of recomputation
    xs = [torch.randn(Bt, T, H, K, generator=g), torch.randn(Bt, T, H, K, generator=g),
          torch.randn(Bt, T, H, V, generator=g), -torch.rand(Bt, T, H, K, generator=g) * 0.3]
    x32 = [t.clone().requires_grad_() for t in xs]
    x64 = [t.double().requires_grad_() for t in xs]
    go = torch.randn(Bt, T, H, V, generator=g)
    chunk_gla(*x32, scale=0.3)[0].backward(go)
    S, os_ = x64[0].new_zeros(Bt, H, K, V), []
    for t in range(T):
        S = torch.exp(x64[3][:, t])[..., None] * S + x64[1][:, t][..., None] * x64[2][:, t][..., None, :]
        os_.append(torch.einsum("bhk,bhkv->bhv", x64[0][:, t] * 0.3, S))
    torch.stack(os_, 1).backward(go.double())
    for p, q in zip(x32, x64):
        assert (p.grad.double() - q.grad).abs().max() <= 1e-4 * (q.grad.abs().max() + 1e-3)


def test_bf16_inputs():
    g = _gen()
    Bt, Dd, N, L = 2, 6, 8, 21
    args = [torch.randn(Bt, Dd, L, generator=g), torch.randn(Bt, Dd, L, generator=g) * 0.5,
            -torch.rand(Dd, N, generator=g) - 0.5, torch.randn(Bt, N, L, generator=g),
            torch.randn(Bt, N, L, generator=g)]
    xb = [a.bfloat16().requires_grad_() for a in args]
    x64 = [a.bfloat16().double().requires_grad_() for a in args]
    gy = torch.randn(Bt, Dd, L, generator=g)
    selective_scan(*xb).backward(gy.bfloat16())
    dt = x64[1]
    dA = torch.exp(dt.unsqueeze(-1) * x64[2][None, :, None, :])
    h, ys = x64[0].new_zeros(Bt, Dd, N), []
    for t in range(L):
        h = dA[:, :, t] * h + (dt[:, :, t] * x64[0][:, :, t]).unsqueeze(-1) * x64[3][:, :, t].unsqueeze(1)
        ys.append((h * x64[4][:, :, t].unsqueeze(1)).sum(-1))
    torch.stack(ys, -1).backward(gy.bfloat16().double())
    for p, q in zip(xb, x64):
        assert p.grad.dtype == torch.bfloat16
        # bf16 storage of the gradients: 8 bits of mantissa, plus accumulation over up to N*L terms
        assert (p.grad.double() - q.grad).abs().max() <= 2e-2 * (q.grad.abs().max() + 1e-3)


def test_fp64_gradcheck_through_the_fused_kernel():
    g = _gen()
    Bt, Dd, N, L = 1, 3, 4, 5
    args = [torch.randn(Bt, Dd, L, generator=g, dtype=torch.float64),
            torch.randn(Bt, Dd, L, generator=g, dtype=torch.float64) * 0.5,
            -torch.rand(Dd, N, generator=g, dtype=torch.float64) - 0.5,
            torch.randn(Bt, N, L, generator=g, dtype=torch.float64),
            torch.randn(Bt, N, L, generator=g, dtype=torch.float64), torch.randn(Dd, generator=g, dtype=torch.float64),
            torch.randn(Bt, Dd, L, generator=g, dtype=torch.float64), torch.randn(Dd, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True, return_last_state=True),
                                    args, eps=1e-6, atol=1e-6)


def test_mamba_block_scale_no_full_size_tensor(monkeypatch):
    """A Mamba block's scan at L=1024 (D=96, N=16): gradients match the float64 loop, and no tensor of the scan's
    full size [B, D, N, L] is ever held by the backward op's interpreter (the fused kernel computes them all)."""
    import importlib

    ev = importlib.import_module("opgen.targets.reference.evaluate")

    biggest = []
    real_run = ev._Evaluator.run

    def spy(self):
        out = real_run(self)
        biggest.append(max(t.numel() for t in self.tensors.values() if isinstance(t, torch.Tensor)))
        return out
    monkeypatch.setattr(ev._Evaluator, "run", spy)
    g = _gen()
    Bt, Dd, N, L = 1, 96, 16, 1024
    args = [torch.randn(Bt, Dd, L, generator=g), torch.randn(Bt, Dd, L, generator=g) * 0.5 - 1.0,
            -torch.rand(Dd, N, generator=g) - 0.5, torch.randn(Bt, N, L, generator=g),
            torch.randn(Bt, N, L, generator=g), torch.randn(Dd, generator=g), torch.randn(Bt, Dd, L, generator=g),
            torch.randn(Dd, generator=g)]
    x32 = [a.clone().requires_grad_() for a in args]
    x64 = [a.double().requires_grad_() for a in args]
    gy = torch.randn(Bt, Dd, L, generator=g)
    selective_scan(*x32, delta_softplus=True).backward(gy)
    _ss_loop(*x64)[0].backward(gy.double())
    for name, a, b in zip(SS_ALL, x32, x64):
        rel = (a.grad.double() - b.grad).abs().max().item() / (b.grad.abs().max().item() + 1e-6)
        assert rel <= 1e-4, (name, rel)          # fp32 accumulation over N * L = 16384 terms
    assert biggest and max(biggest) < Bt * Dd * N * L // 4


def test_grouped_b_c_scatter_into_groups():
    """Grouped B / C (``[batch, G, N, L]``, a group of channels per head as in Mamba-2 / SSD): their gradients
    are cross-lane sums scattered into the channel's group (``where d // (D / G) == g``), in the fused kernel."""
    op = declare_selective_scan(B_layout="grouped", C_layout="grouped", D="f32")
    g = fuse_scan_adjoint(backward_op(op, ("u", "delta", "A", "B", "C", "D")))
    assert g is not None
    assert [r.kind for r in g.reductions if r.scatter] == ["cross", "cross"]
    gen = _gen()
    Bt, Dd, G, N, L = 2, 6, 3, 4, 11
    args = [torch.randn(Bt, Dd, L, generator=gen), torch.rand(Bt, Dd, L, generator=gen),
            -torch.rand(Dd, N, generator=gen) - 0.5, torch.randn(Bt, G, N, L, generator=gen),
            torch.randn(Bt, G, N, L, generator=gen), torch.randn(Dd, generator=gen)]
    x32 = [a.clone().requires_grad_() for a in args]
    x64 = [a.double().requires_grad_() for a in args]
    gy = torch.randn(Bt, Dd, L, generator=gen)
    selective_scan(*x32).backward(gy)
    rep = Dd // G
    u, dt, A, Bg, Cg, D = x64
    Bv, Cv = Bg.repeat_interleave(rep, 1), Cg.repeat_interleave(rep, 1)      # [B, D, N, L]
    h, ys = u.new_zeros(Bt, Dd, N), []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bv[..., t]
        ys.append((h * Cv[..., t]).sum(-1))
    (torch.stack(ys, -1) + D[:, None] * u).backward(gy.double())
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D"), x32, x64):
        assert (a.grad.double() - b.grad).abs().max() <= 1e-4 * (b.grad.abs().max() + 1e-3), name


def test_declared_ssd_grads_vs_float64_loop():
    """A declared Mamba-2 SSD scan (matrix state [N, P], heads grouped over B/C): the cross-lane sums over heads
    and head channels (the state's vector axis P) are folded per step; grads vs a float64 loop."""
    @opgen.op
    def ssd_test(x: Float["B L H P"], dt: Float["B L H"], A: Float["H"], Bm: Float["B L G N"],
                 Cm: Float["B L G N"]):
        b, t, h, n, p = opgen.axes("b t h n p")
        H, G = opgen.dims("H G")
        g = h * G // H
        st = opgen.scan(t, a=opgen.exp(dt[b, t, h] * A[h]), b=dt[b, t, h] * Bm[b, t, g, n] * x[b, t, h, p],
                        state=(n, p), axes=(b, h, n, p, t))
        return opgen.sum(n, Cm[b, t, g, n] * st[b, h, n, p, t], axes=(b, t, h, p))

    gen = _gen()
    Bt, L, H, P, G, N = 2, 13, 4, 8, 2, 5
    args = [torch.randn(Bt, L, H, P, generator=gen), torch.rand(Bt, L, H, generator=gen) * 0.5,
            -torch.rand(H, generator=gen), torch.randn(Bt, L, G, N, generator=gen),
            torch.randn(Bt, L, G, N, generator=gen)]
    x32 = [a.clone().requires_grad_() for a in args]
    x64 = [a.double().requires_grad_() for a in args]
    gy = torch.randn(Bt, L, H, P, generator=gen)
    ssd_test(*x32).backward(gy)
    x, dt, A, Bm, Cm = x64
    Bh, Ch = Bm.repeat_interleave(H // G, 2), Cm.repeat_interleave(H // G, 2)   # [B, L, H, N]
    S, ys = x.new_zeros(Bt, H, N, P), []
    for t in range(L):
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * Bh[:, t])[..., None] * x[:, t, :, None]
        ys.append(torch.einsum("bhn,bhnp->bhp", Ch[:, t], S))
    torch.stack(ys, 1).backward(gy.double())
    for name, a, b in zip(("x", "dt", "A", "Bm", "Cm"), x32, x64):
        assert (a.grad.double() - b.grad).abs().max() <= 1e-4 * (b.grad.abs().max() + 1e-3), name


@pytest.mark.parametrize("reverse", [False, True])
def test_stateless_scan_lanes_as_vectors(reverse):
    """A scan without state axes (linear_scan, minGRU) runs 16 lanes as one vector (the last lane split into
    blocks x 16): grads (stores and the initial state's tail) vs a float64 loop, through the torch op."""
    from opgen.targets.tvm.scan_adjoint import lane_vector_group
    from opgen.runtime import default_session

    op = declare_linear_scan(reverse=True) if reverse else declare_linear_scan(initial="f32")
    wrt = ("a", "b", "initial") if not reverse else ("a", "b")
    gen = _gen()
    P, L, Q = 3, 21, 32
    a = torch.rand(P, L, Q, generator=gen) * 0.9 + 0.05
    b, init = torch.randn(P, L, Q, generator=gen), torch.randn(P, Q, generator=gen)
    bw = backward_op(op, wrt)
    ins = {"a": a, "b": b, "grad_h": b}
    if not reverse:
        ins["initial"] = init
    binding = default_session().binding(bw, {k: tuple(v.shape) for k, v in ins.items()}, {}, "t")
    assert lane_vector_group(fuse_scan_adjoint(bw), binding).state          # split: a vector state axis
    x32 = [t.clone().requires_grad_() for t in ((a, b, init) if not reverse else (a, b))]
    x64 = [t.detach().double().requires_grad_() for t in x32]
    gy = torch.randn(P, L, Q, generator=gen)
    linear_scan(x32[0], x32[1], dim=1, reverse=reverse, initial=x32[2] if not reverse else None).backward(gy)
    h = x64[2] if not reverse else x64[0].new_zeros(P, Q)
    hs = []
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        h = x64[0][:, t] * h + x64[1][:, t]
        hs.append(h)
    torch.stack(hs[::-1] if reverse else hs, 1).backward(gy.double())
    for p, q in zip(x32, x64):
        assert (p.grad.double() - q.grad).abs().max() <= 1e-5 * (q.grad.abs().max() + 1)
