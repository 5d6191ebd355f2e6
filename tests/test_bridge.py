"""A declared op is a torch op (opgen/bridge.py, opgen/declared.py): forward and gradients against an independent
torch formulation, fp64 gradcheck, opcheck, torch.compile with dynamic sizes in one frame, only the needed
gradients, clear errors, a model-scale call and a small model trained with the op swapped in."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.testing

import opgen
from opgen import F32, Float
from opgen.bridge import torch_op

pytestmark = pytest.mark.xdist_group("bridge")   # one process compiles each kernel once


@opgen.op
def gated_rnn(x: Float["B C L"], f: Float["B C L"], g: Float["B C L"], r: Float["C N"], w: Float["C N"]):
    b, c, n, t = opgen.axes("b c n t")
    keep = opgen.sigmoid(f[b, c, t] + r[c, n])
    h = opgen.scan(t, a=keep, b=(1.0 - keep) * x[b, c, t], state=n, axes=(b, c, n, t))
    y = opgen.sum(n, h[b, c, n, t] * w[c, n], axes=(b, c, t))
    return opgen.compute(y[b, c, t] * opgen.silu(g[b, c, t]), (b, c, t))


def gated_rnn_loop(x, f, g, r, w):
    """The same recurrence as a plain torch loop (the independent reference)."""
    h, out = x.new_zeros(x.shape[0], x.shape[1], r.shape[1]), []
    # per-step views by unbind: its backward is one stack (indexing x[..., t] would add a zero-filled full-size
    # gradient per step: 33 s of autograd at L = 1024)
    for x_t, f_t in zip(x.unbind(-1), f.unbind(-1)):
        k = torch.sigmoid(f_t[..., None] + r)
        h = k * h + (1 - k) * x_t[..., None]
        out.append((h * w).sum(-1))
    return torch.stack(out, -1) * torch.nn.functional.silu(g)


def rnn_args(B, C, L, N, dtype=torch.float32, grad=True):
    xs = [torch.randn(B, C, L, dtype=dtype) for _ in range(3)] + [torch.randn(C, N, dtype=dtype) / 2 for _ in range(2)]
    return [x.requires_grad_(grad) for x in xs]


def grads(y, args, gy):
    return torch.autograd.grad(y, [a for a in args if a.requires_grad], gy)


@pytest.mark.parametrize("B,C,L,N", [(2, 5, 37, 3), (1, 1, 1, 1), (3, 7, 1, 2)])
def test_forward_and_gradients_match_a_torch_loop(B, C, L, N):
    args = rnn_args(B, C, L, N)
    y, ref = gated_rnn(*args), gated_rnn_loop(*args)
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(y)
    for a, b in zip(grads(y, args, gy), grads(ref, args, gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_accumulate_and_return_in_fp32():
    args = rnn_args(2, 4, 29, 3, dtype=torch.bfloat16, grad=False)
    with pytest.warns(opgen.ir.errors.FallbackWarning, match="no compiled target runs op gated_rnn whole"):
        y = gated_rnn(*args)
    ref = gated_rnn_loop(*[a.double() for a in args])
    assert y.dtype == torch.float32                      # the IR's output dtype: the accumulation dtype of bf16
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)   # bf16 inputs, fp32 arithmetic


def test_mixed_float_dtypes_promote_like_torch():
    args = rnn_args(1, 3, 11, 2, grad=False)
    args[3] = args[3].double()
    y = gated_rnn(*args)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, gated_rnn_loop(*[a.double() for a in args]))


def test_fp64_gradcheck():
    args = [a.detach().requires_grad_() for a in rnn_args(1, 2, 6, 2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: gated_rnn(*a), args)


def test_opcheck():
    top = gated_rnn.torch()
    result = torch.library.opcheck(top.forward_op, rnn_args(2, 3, 9, 2))
    assert set(result.values()) == {"SUCCESS"}, result


def test_compile_fullgraph_dynamic_one_frame_with_backward():
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda *a: gated_rnn(*a).square().mean(), backend=counter, fullgraph=True, dynamic=True)
    for L in (33, 50):
        args = rnn_args(2, 3, L, 2)
        loss = step(*args)
        loss.backward()
        ref = [a.detach().requires_grad_() for a in args]
        ref_loss = gated_rnn_loop(*ref).square().mean()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
        for a, b in zip(args, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5)
    assert counter.frame_count == 1


def test_only_the_needed_gradients_are_generated(monkeypatch):
    import opgen.bridge

    asked = []
    real = opgen.bridge.backward_op
    monkeypatch.setattr(opgen.bridge, "backward_op", lambda op, wrt: asked.append(wrt) or real(op, wrt))
    args = rnn_args(2, 3, 8, 2, grad=False)
    args[1].requires_grad_(True)
    y = gated_rnn(*args)
    (gf,) = torch.autograd.grad(y.sum(), [args[1]])
    assert asked and set(asked) == {("f",)}
    ref = args[1].detach().requires_grad_()
    (gr,) = torch.autograd.grad(gated_rnn_loop(args[0], ref, *args[2:]).sum(), [ref])
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)


def test_two_ops_of_one_name_do_not_clash():
    def declare(scale):
        @opgen.op(name="twice")
        def twice(x: F32["N"]):
            i = opgen.axes("i")
            return opgen.compute(x[i] * scale, (i,))
        return twice

    a, b = declare(2.0), declare(3.0)
    x = torch.randn(5)
    torch.testing.assert_close(a(x), 2 * x)
    torch.testing.assert_close(b(x), 3 * x)


def test_multiple_outputs_and_static_arguments():
    @opgen.op
    def ema_pair(x: Float["B L"], *, decay: float = 0.5):
        b, t = opgen.axes("b t")
        h = opgen.scan(t, a=decay, b=(1 - decay) * x[b, t])
        return {"h": h, "sq": opgen.compute(h[b, t] * h[b, t], (b, t))}

    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    h, sq = ema_pair(x, decay=0.75)
    ref, state = [], torch.zeros(3, dtype=torch.float64)
    for t in range(17):
        state = 0.75 * state + 0.25 * x[:, t]
        ref.append(state)
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(h, ref)
    torch.testing.assert_close(sq, ref * ref)
    gh, gs = torch.randn_like(h), torch.randn_like(sq)
    (g1,) = torch.autograd.grad((h * gh).sum() + (sq * gs).sum(), [x], retain_graph=True)
    (g2,) = torch.autograd.grad((ref * gh).sum() + (ref * ref * gs).sum(), [x], retain_graph=True)
    torch.testing.assert_close(g1, g2)
    (g3,) = torch.autograd.grad(sq.sum(), [x])                      # one output unused: its gradient is zero
    torch.testing.assert_close(g3, torch.autograd.grad((ref * ref).sum(), [x])[0])


def test_bad_input_names_op_argument_expected_and_got():
    args = rnn_args(2, 3, 8, 2, grad=False)
    with pytest.raises(opgen.ArgumentError, match=r"gated_rnn.*argument 'r'.*\(4, 2\).*C = 3"):
        gated_rnn(*args[:3], torch.randn(4, 2), args[4])
    with pytest.raises(opgen.ArgumentError, match=r"gated_rnn: argument 'x' expected a tensor, got NoneType"):
        gated_rnn(None, *args[1:])
    with pytest.raises(TypeError, match=r"gated_rnn\(\) takes 5 tensor arguments"):
        gated_rnn(*args[:4])

    @opgen.op
    def fixed(x: F32["N"]):
        i = opgen.axes("i")
        return opgen.compute(x[i] + 1.0, (i,))
    with pytest.raises(opgen.ArgumentError, match=r"op fixed: argument 'x' expected a float32 tensor, got float64"):
        fixed(torch.randn(3, dtype=torch.float64))
    with pytest.raises(opgen.ArgumentError, match=r"op fixed: argument 'x' expected a 1-D tensor"):
        fixed(torch.randn(3, 2))


def test_a_backward_that_cannot_be_generated_fails_at_backward_naming_the_node():
    @opgen.op
    def running_max(x: F32["B L"]):
        b, t = opgen.axes("b t")
        return opgen.max(t, x[b, t], axes=(b,))

    x = torch.randn(2, 9, requires_grad=True)
    y = running_max(x)                                       # forward-only use works
    torch.testing.assert_close(y, x.detach().amax(1))
    with pytest.raises(opgen.IRError, match=r"grad of running_max: node out \(Reduce\) is not differentiated: a max reduction"):
        y.sum().backward()


def test_opgen_run_with_grad_uses_the_torch_op_not_the_whole_op_interpreter(monkeypatch):
    op = gated_rnn.build()
    args = rnn_args(2, 3, 12, 2)
    names = ["x", "f", "g", "r", "w"]
    from opgen.targets.reference import ReferenceTarget
    whole = []
    real = ReferenceTarget.run
    monkeypatch.setattr(ReferenceTarget, "run", lambda self, o, *a, **k: whole.append(o.name) or real(self, o, *a, **k))
    y = opgen.run(op, **dict(zip(names, args)))["out"]
    y.sum().backward()
    assert "gated_rnn" not in whole                      # the forward ran a compiled kernel
    ref = [a.detach().requires_grad_() for a in args]
    gated_rnn_loop(*ref).sum().backward()
    for a, b in zip(args, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert torch_op(op) is torch_op(op)


def test_model_scale_mamba_block_length_1024_forward_and_backward():
    B, C, L, N = 2, 128, 1024, 4
    args = rnn_args(B, C, L, N)
    y = gated_rnn(*args)
    gy = torch.randn_like(y)
    ref = gated_rnn_loop(*[a.detach().double().requires_grad_() for a in args])
    torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-4)
    g_ours = grads(y, args, gy)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    g_ref = torch.autograd.grad(gated_rnn_loop(*ref_args), ref_args, gy.double())
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


class TinyRNNModel(torch.nn.Module):
    """Embedding -> gated RNN layer (the declared op) -> linear head: a small language model."""

    def __init__(self, vocab=11, C=8, N=3, layer=gated_rnn):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 3 * C)
        self.r = torch.nn.Parameter(torch.randn(C, N) / 2)
        self.w = torch.nn.Parameter(torch.randn(C, N) / 2)
        self.head = torch.nn.Linear(C, vocab)
        self.layer = layer

    def forward(self, tokens):
        x, f, g = self.emb(tokens).transpose(1, 2).chunk(3, dim=1)
        y = self.layer(x.contiguous(), f.contiguous(), g.contiguous(), self.r, self.w)
        return self.head(y.transpose(1, 2))


def test_small_model_trains_the_same_with_the_op_swapped_in():
    torch.manual_seed(0)
    ours, ref = TinyRNNModel(), TinyRNNModel(layer=gated_rnn_loop)
    ref.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 11, (4, 21))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, ref)]
    losses = []
    for _ in range(5):
        for m, opt in zip((ours, ref), opts):
            opt.zero_grad()
            logits = m(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    ours_l, ref_l = losses[0::2], losses[1::2]
    assert ours_l[-1] < ours_l[0]
    assert max(abs(a - b) for a, b in zip(ours_l, ref_l)) < 1e-4


def test_reference_fallback_warns_once_per_op_and_device():
    @opgen.op
    def cumsum_like(x: F32["B L"]):
        b, t = opgen.axes("b t")
        return opgen.scan(t, a=1.0, b=x[b, t], reverse=True)

    x = torch.randn(2, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = cumsum_like(x), cumsum_like(x)
    torch.testing.assert_close(y1, x.flip(1).cumsum(1).flip(1))
    fallbacks = [w for w in caught if issubclass(w.category, opgen.ir.errors.FallbackWarning)]
    assert len(fallbacks) <= 1                            # TVM takes this scan whole: no warning at all


_DECLARING_MODULE = '''
import torch
import opgen
from opgen import Float

@opgen.op
def ema_{tag}(x: Float["B L"], *, decay: float = 0.5):
    b, t = opgen.axes("b t")
    return opgen.scan(t, a=decay, b=(1 - decay) * x[b, t])

class M(torch.nn.Module):
    def forward(self, x):
        return ema_{tag}(x, decay=0.75) * 2
'''


def test_exported_program_with_a_declared_op_loads_after_importing_the_declaring_module(tmp_path, monkeypatch):
    """torch.export sees the declared op as torch.ops.opgen.<name>_<fingerprint> with its static argument; a fresh
    process that imports the declaring module loads and runs the .pt2 (the op is registered at declaration)."""
    import importlib
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"decl_{tag}.py").write_text(_DECLARING_MODULE.format(tag=tag))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(f"decl_{tag}")
    x = torch.randn(3, 11)
    ep = torch.export.export(mod.M(), (x,))
    assert f"torch.ops.opgen.ema_{tag}_" in ep.graph_module.code
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save(x, tmp_path / "x.pt")
    ref = x.new_zeros(3)
    expected = []
    for t in range(11):
        ref = 0.75 * ref + 0.25 * x[:, t]
        expected.append(ref * 2)
    torch.save(torch.stack(expected, 1), tmp_path / "ref.pt")
    code = (f"import torch, decl_{tag}\nx = torch.load('x.pt')\ngot = torch.export.load('m.pt2').module()(x)\n"
            f"torch.testing.assert_close(got, torch.load('ref.pt'), rtol=1e-5, atol=1e-6)\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
