"""Gradients of captured tensors in attention score mods (issue 22 item 4): learnable ALiBi slopes, relative-position
bias tables indexed by formula or by a relative-position index tensor (Swin), a capture read twice, a capture that
multiplies the score, under masks, GQA and torch.compile.

Oracle: torch autograd of an independent dense formulation ``softmax(q k^T * scale + bias) v`` written with plain
torch indexing (the bias built from the captured tensor by the same rule as the mod, not by calling the mod).
fp64: atol/rtol 1e-10 and ``gradcheck`` at small sizes; fp32 at Swin sizes: max abs error / max abs value < 1e-4.
Fresh random data every run (RUN_SEED), sizes that are not powers of two, size-1 axes. The kernels are the TVM
CPU kernels where TVM is installed (a test asserts the capture gradients come from them, not the reference).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn

import opgen
import opgen.ops.attention_op as attention_op
from opgen import masks, scores

RUN_SEED = random.randrange(2**31)
D64 = torch.float64


def dense(q, k, v, bias=None, allowed=None, scale=None, gqa=False):
    """softmax(q k^T * scale + bias) v with plain torch (bias [.., L, S] broadcast; masked keys removed)."""
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, dim=-1) @ v


def rel_index(m):
    """Swin's relative_position_index for an m x m window (written as in the Swin code)."""
    coords = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (m - 1)
    return rel[..., 0] * (2 * m - 1) + rel[..., 1]


def rand(*shape, dtype=D64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def assert_grads(got, want, dtype, what):
    for n, (a, b) in enumerate(zip(got, want)):
        if dtype == D64:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{what} grad {n}: {m} "
                                                                              f"(seed {RUN_SEED})")
        else:
            rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            assert rel < 1e-4, f"{what} grad {n}: max relative error {rel:.2e} (seed {RUN_SEED})"


# ------------------------------------------------------------------------------------------------ fp64 cases

def _cases(g):
    """name -> (make inputs, opgen score_mod/mask_mod builder, dense bias/allowed builder)."""
    def alibi(B=1, H=3, L=5, S=7):
        slopes = rand(H)
        i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
        return ((B, H, H, L, S), [slopes], lambda c: (scores.alibi(c[0]), masks.causal),
                lambda c: (c[0][:, None, None] * (j - i), j <= i))

    def rel_bias_1d(B=2, H=1, L=6, S=6):
        table = rand(H, L + S - 1)
        i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
        return ((B, H, H, L, S), [table], lambda c: (lambda s, b, h, qi, kv: s + c[0][h, qi - kv + S - 1], None),
                lambda c: (c[0][:, i - j + S - 1], None))

    def swin_gather(B=3, H=2, m=3):
        table, idx = rand((2 * m - 1) ** 2, H), rel_index(m)
        return ((B, H, H, m * m, m * m), [table],
                lambda c: (lambda s, b, h, qi, kv: s + c[0][idx[qi, kv], h], None),
                lambda c: (c[0][idx.reshape(-1)].reshape(m * m, m * m, H).permute(2, 0, 1), None))

    def swin_formula(B=2, H=3, m=3):
        table = rand((2 * m - 1) ** 2, H)
        idx = rel_index(m)

        def mod(c):
            return lambda s, b, h, qi, kv: s + c[0][(qi // m - kv // m + m - 1) * (2 * m - 1) + qi % m - kv % m
                                                    + m - 1, h]
        return ((B, H, H, m * m, m * m), [table], lambda c: (mod(c), None),
                lambda c: (c[0][idx].permute(2, 0, 1), None))

    def twice_and_scaling(B=1, H=4, L=7, S=5):
        t, w = rand(H), rand(H)
        hh = torch.arange(H)[:, None, None]
        return ((B, H, 2, L, S), [t, w],
                lambda c: (lambda s, b, h, qi, kv: s * c[1][h] + c[0][h] * c[0][(h + 1) % H] * (qi - kv), None),
                lambda c: (None, None, lambda s: s * c[1][hh] + (c[0] * c[0].roll(-1))[hh]
                           * (torch.arange(L)[:, None] - torch.arange(S)[None, :])))

    def doc_mask_bias(B=2, H=2, L=9, S=9):
        docs = torch.sort(torch.randint(0, 3, (B, L), generator=g), dim=1).values
        bias = rand(B, L)
        allowed = docs[:, None, :, None] == docs[:, None, None, :]
        return ((B, H, H, L, S), [bias],
                lambda c: (lambda s, b, h, qi, kv: s + c[0][b, kv], lambda b, h, qi, kv: docs[b, qi] == docs[b, kv]),
                lambda c: (c[0][:, None, None, :], allowed))

    return {"alibi_causal": alibi, "alibi_size1": lambda: alibi(1, 1, 1, 1), "rel_bias_1d": rel_bias_1d,
            "swin_gather": swin_gather, "swin_formula": swin_formula, "twice_and_scaling_gqa": twice_and_scaling,
            "doc_mask_bias": doc_mask_bias}


def _run_case(name, dtype=D64):
    g = torch.Generator().manual_seed(RUN_SEED)
    torch.manual_seed(RUN_SEED)
    (B, H, HKV, L, S), caps, mods, ref = _cases(g)[name]()
    caps = [c.detach().to(dtype).requires_grad_() for c in caps]
    E, EV = 5, 3
    q, k, v = rand(B, H, L, E, dtype=dtype), rand(B, HKV, S, E, dtype=dtype), rand(B, HKV, S, EV, dtype=dtype)
    score_mod, mask_mod = mods(caps)
    gqa = H != HKV
    out = opgen.ops.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=gqa)
    r = ref(caps)
    if len(r) == 3:   # a bias that is a function of the raw score
        kk, vv = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        s = r[2](q @ kk.transpose(-1, -2) / math.sqrt(E))
        want = torch.softmax(s, -1) @ vv
    else:
        want = dense(q, k, v, r[0], r[1], gqa=gqa)
    dout = torch.randn_like(out)
    got_g = grads(out, (q, k, v, *caps), dout)
    want_g = grads(want, (q, k, v, *caps), dout)
    assert_grads([out], [want], dtype, f"{name} output")
    assert_grads(got_g, want_g, dtype, name)
    return q, k, v, caps, score_mod, mask_mod, gqa


@pytest.mark.parametrize("name", ["alibi_causal", "alibi_size1", "rel_bias_1d", "swin_gather", "swin_formula",
                                  "twice_and_scaling_gqa", "doc_mask_bias"])
def test_capture_grads_match_dense_autograd_fp64(name):
    _run_case(name)


@pytest.mark.parametrize("name", ["alibi_causal", "swin_gather", "twice_and_scaling_gqa"])
def test_gradcheck_fp64(name):
    q, k, v, caps, score_mod, mask_mod, gqa = _run_case(name)
    inputs = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(),
              *[c.detach().clone().requires_grad_() for c in caps])
    ok = torch.autograd.gradcheck(lambda *x: opgen.ops.attention(
        x[0], x[1], x[2], score_mod=_rebind(score_mod, caps, x[3:]), mask_mod=mask_mod, enable_gqa=gqa), inputs)
    assert ok


def _rebind(score_mod, caps, new):
    """``score_mod`` with its captured tensors replaced by ``new`` (closures: rebuild from the cell contents)."""
    import types

    if isinstance(score_mod, scores.alibi):
        return scores.alibi(new[0])
    cells = score_mod.__closure__ or ()
    swap = {id(c): n for c, n in zip(caps, new)}

    def fix(x):
        if isinstance(x, list):
            return [swap.get(id(y), y) for y in x]
        return swap.get(id(x), x)
    return types.FunctionType(score_mod.__code__, score_mod.__globals__, score_mod.__name__, score_mod.__defaults__,
                              tuple(types.CellType(fix(c.cell_contents)) for c in cells))


def test_capture_grads_come_from_the_kernels_not_the_reference(monkeypatch):
    pytest.importorskip("tvm")
    calls = []
    real = attention_op._reference_capture_grads
    monkeypatch.setattr(attention_op, "_reference_capture_grads", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _run_case("swin_gather", torch.float32)
    _run_case("alibi_causal", torch.float32)
    assert not calls


@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("mode", ["fused", "separate"])
def test_kernel_slots_and_modes(monkeypatch, slots, mode):
    """Partial gradients per slot (1 slot, or 3 slots on fewer threads), fused and separate dq modes: same sums."""
    pytest.importorskip("tvm")
    import opgen.targets.tvm.attention_backward as tb
    import opgen.targets.tvm.attention_call as tc

    monkeypatch.setattr(tb, "tvm_threads", lambda: slots)
    real = tc.run_backward
    monkeypatch.setattr(tc, "run_backward", lambda *a, **kw: real(*a[:7], config=tb.AttentionBackwardConfig(
        block_m=16, block_n=16, vector=0, dq_mode=mode)))
    import opgen.targets.tvm.target as tt
    monkeypatch.setattr(tt, "run_backward", tc.run_backward)
    _run_case("swin_formula")
    _run_case("alibi_causal")


# ------------------------------------------------------------------------------------- Swin sizes, fp32, blocks

class WindowAttention(nn.Module):
    """Swin's window attention (no shift) with a learnable relative-position bias table, on [B, H, W, C] images:
    ``fused`` runs opgen attention with ``score_mod = s + table[index[q, kv], h]``; otherwise the classic
    formulation (bias gathered to [heads, N, N] and added to the scores, softmax, matmul)."""

    def __init__(self, dim, heads, window, fused):
        super().__init__()
        self.heads, self.m, self.fused = heads, window, fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer("index", rel_index(window))
        table, index = self.table, self.index
        self.score_mod = lambda s, b, h, q_idx, kv_idx: s + table[index[q_idx, kv_idx], h]

    def forward(self, x):
        B, Hh, W, C = x.shape
        m, nh = self.m, self.heads
        win = x.view(B, Hh // m, m, W // m, m, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, C)
        q, k, v = self.qkv(win).view(win.shape[0], m * m, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        if self.fused:
            o = opgen.ops.attention(q, k, v, score_mod=self.score_mod)
        else:
            bias = self.table[self.index.reshape(-1)].view(m * m, m * m, nh).permute(2, 0, 1)
            o = dense(q, k, v, bias)
        o = self.proj(o.transpose(1, 2).reshape(win.shape[0], m * m, C))
        return o.view(B, Hh // m, W // m, m, m, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hh, W, C)


@pytest.mark.parametrize("B,side,C,heads", [(2, 28, 96, 3), (1, 14, 60, 5)])
def test_swin_window_block_training_gradients_fp32(B, side, C, heads):
    torch.manual_seed(RUN_SEED)
    ours = WindowAttention(C, heads, 7, fused=True)
    ref = WindowAttention(C, heads, 7, fused=False)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(B, side, side, C)
    target = torch.randn(B, side, side, C)
    losses = []
    for block in (ours, ref):
        loss = (block(x) - target).square().mean()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_grads([a.grad], [b.grad], torch.float32, f"swin block {n}")
    assert ours.table.grad.abs().sum() > 0
    # one SGD step moves the tables the same way
    with torch.no_grad():
        for block in (ours, ref):
            block.table -= 10.0 * block.table.grad
    torch.testing.assert_close(ours.table, ref.table, atol=1e-6, rtol=1e-5)


def test_swin_sizes_fp32_against_fp64():
    """fp32 kernels at a Swin stage size against fp64 dense autograd (relative error < 1e-4)."""
    torch.manual_seed(RUN_SEED)
    B, H, m, d = 2 * 16, 6, 7, 32                        # 2 images of 28x28 -> 32 windows of 49 tokens
    idx = rel_index(m)
    table = (torch.randn((2 * m - 1) ** 2, H) * 0.5).requires_grad_()
    q, k, v = (torch.randn(B, H, m * m, d, requires_grad=True) for _ in range(3))
    out = opgen.ops.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + table[idx[qi, kv], h])
    dout = torch.randn_like(out)
    got = grads(out, (q, k, v, table), dout)
    q64, k64, v64, t64 = (x.detach().double().requires_grad_() for x in (q, k, v, table))
    want = dense(q64, k64, v64, t64[idx].permute(2, 0, 1))
    ref = grads(want, (q64, k64, v64, t64), dout.double())
    assert_grads(got, [r.float() for r in ref], torch.float32, "swin fp32")


def test_compile_fullgraph_learnable_table_one_frame():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(RUN_SEED)
    block = WindowAttention(24, 3, 3, fused=True)
    ref = WindowAttention(24, 3, 3, fused=False)
    ref.load_state_dict(block.state_dict())
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=cnt, fullgraph=True)
    for side in (6, 9):
        x = torch.randn(2, side, side, 24)
        got = grads(compiled(x).square().sum(), (block.table, block.qkv.weight), None)
        want = grads(ref(x).square().sum(), (ref.table, ref.qkv.weight), None)
        assert_grads(got, want, torch.float32, "compiled")
    assert cnt.frame_count <= 2


def test_capture_without_grad_and_integer_captures_get_no_gradient():
    torch.manual_seed(RUN_SEED)
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    table = torch.randn(25, 2)                            # a buffer: no gradient wanted, none computed
    idx = rel_index(3)
    out = opgen.ops.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + table[idx[qi, kv], h])
    out.sum().backward()
    assert table.grad is None and q.grad is not None


def test_opcheck_with_captures_requiring_grad():
    """The backward op's Tensor[] of capture gradients: fake shapes, autograd registration, schema."""
    from opgen.ops.attention_op import prepare_mods

    torch.manual_seed(RUN_SEED)
    q, k, v = (torch.randn(2, 3, 9, 4, dtype=D64, requires_grad=True) for _ in range(3))
    table, idx = torch.randn(25, 3, dtype=D64, requires_grad=True), rel_index(3)
    spec, caps, _ = prepare_mods("test", lambda s, b, h, qi, kv: s + table[idx[qi, kv], h], None, q.dtype, k.dtype)
    assert [c is table or c is idx for c in caps] == [True, True]
    torch.library.opcheck(torch.ops.opgen.attention, (q, k, v, list(caps), spec, 0.5, False))


def test_target_without_capture_gradients_falls_back_to_the_reference_for_them(monkeypatch):
    """A flash backward that returns only dq, dk, dv (the Triton kernels): the capture gradients come from torch
    autograd through the reference interpreter, the rest from the kernel."""
    import opgen.targets.tvm.target as tt

    real = tt.run_backward
    monkeypatch.setattr(tt, "run_backward", lambda *a, **kw: {n: g for n, g in real(*a, **kw).items()
                                                              if n in ("q", "k", "v")})
    calls = []
    ref = attention_op._reference_capture_grads
    monkeypatch.setattr(attention_op, "_reference_capture_grads", lambda *a, **kw: calls.append(a[3]) or ref(*a, **kw))
    _run_case("swin_gather")
    _run_case("twice_and_scaling_gqa")
    assert calls == [["gather0"], ["capture0", "capture1"]]


def test_malformed_gathers_in_a_spec_are_argument_errors():
    import json

    from opgen.ir import ArgumentError
    from opgen.ops.attention_op import parse_spec, prepare_mods

    table, idx = torch.randn(25, 3), rel_index(3)
    spec, _, _ = prepare_mods("test", lambda s, b, h, qi, kv: s + table[idx[qi, kv], h], None, torch.float32,
                              torch.float32)
    obj = json.loads(spec)
    assert [g["src"] for g in obj["gathers"]] == ["capture1"] and obj["gathers"][0]["index"] == "capture0"
    parse_spec(spec)
    for bad in ({"src": "capture0"}, {"index": "capture1"}, {"dim": 2}, {"dim": True}, {"dims": ["gather0_0"]},
                {"src": "gather0"}, {"dtype": "f64"}, {"extra": 1}):
        broken = json.loads(spec)
        broken["gathers"][0].update(bad)
        with pytest.raises(ArgumentError, match="gathers"):
            parse_spec(json.dumps(broken))
    broken = json.loads(spec)
    broken["captures"][1]["grad"] = "yes"
    with pytest.raises(ArgumentError, match="grad"):
        parse_spec(json.dumps(broken))


def test_reference_backend_and_bf16_inputs(reference_backend):
    """On the reference backend (and for bf16 q/k/v, which the CPU kernels do not take) capture gradients come
    from autograd through the interpreter: same results."""
    _run_case("swin_gather")
    torch.manual_seed(RUN_SEED)
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2, requires_grad=True)
    out = opgen.ops.attention(q, k, v, score_mod=scores.alibi(slopes), mask_mod=masks.causal)
    (got,) = torch.autograd.grad(out.float().sum(), slopes)
    s64 = slopes.detach().double().requires_grad_()
    i = torch.arange(9)
    want = dense(q.double(), k.double(), v.double(), s64[:, None, None] * (i[None, :] - i[:, None]),
                 i[None, :] <= i[:, None])
    (ref,) = torch.autograd.grad(want.sum(), s64)
    torch.testing.assert_close(got.double(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mode", ["fused", "separate"])
def test_dense_bias_per_batch_and_head_writes_one_buffer(monkeypatch, mode):
    """A dense bias [B, H, L, S] (every position read by one (b, h, i, j)) gets its gradient without per-slot
    copies (partition-disjoint writes), in both dq modes; = the dense formulation's gradient (dS itself)."""
    pytest.importorskip("tvm")
    import opgen.targets.tvm.attention_backward as tb
    import opgen.targets.tvm.attention_call as tc
    import opgen.targets.tvm.target as tt

    monkeypatch.setattr(tb, "tvm_threads", lambda: 2)
    real = tc.run_backward
    monkeypatch.setattr(tt, "run_backward", lambda *a, **kw: real(*a[:7], config=tb.AttentionBackwardConfig(
        block_m=16, block_n=16, vector=0, dq_mode=mode)))
    torch.manual_seed(RUN_SEED)
    B, H, L, S = 2, 3, 19, 23
    bias = torch.randn(B, H, L, S, dtype=D64, requires_grad=True)
    q, k, v = rand(B, H, L, 4), rand(B, H, S, 4), rand(B, H, S, 5)
    out = opgen.ops.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[b, h, qi, kv],
                              mask_mod=lambda b, h, qi, kv: kv <= qi + 3)
    allowed = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + 3
    want = dense(q, k, v, bias, allowed)
    dout = torch.randn_like(out)
    assert_grads(grads(out, (q, k, v, bias), dout), grads(want, (q, k, v, bias), dout), D64, f"dense bias {mode}")
    spec = attention_op.prepare_mods("t", lambda s, b, h, qi, kv: s + bias[b, h, qi, kv], None, q.dtype, k.dtype)[0]
    group = tc.attention_group(attention_op._declare(q, k, v, [bias], spec, 0.5, False, ("capture0",)))
    assert tb.partition_disjoint(group, "capture0", mode)
    table, idx = torch.randn(25, 3, requires_grad=True), rel_index(3)
    spec, caps, _ = attention_op.prepare_mods("t", lambda s, b, h, qi, kv: s + table[idx[qi, kv], h], None,
                                              torch.float32, torch.float32)
    q3, k3, v3 = (torch.randn(2, 3, 9, 4) for _ in range(3))
    group = tc.attention_group(attention_op._declare(q3, k3, v3, list(caps), spec, 0.5, False, ("gather0",)))
    assert not tb.partition_disjoint(group, "gather0", mode)     # every window adds into the same table entries


def test_swin_image_order_shifted_windows_clamped_formula():
    """Tokens in image order with the shifted-window mask (opgen.masks.swin_window) and a clamped relative-offset
    formula into the learnable table (examples/swin_block.py's SwinBias): the table's gradient scatters through
    clamp / floor-div / mod index arithmetic, with masked pairs still indexing inside the table."""
    torch.manual_seed(RUN_SEED)
    hh, ww, m, shift, H = 6, 9, 3, 1, 2
    table = rand((2 * m - 1) ** 2, H)

    def score_mod(s, b, h, qi, kv):
        dy = torch.clamp(qi // ww - kv // ww, -(m - 1), m - 1)
        dx = torch.clamp(qi % ww - kv % ww, -(m - 1), m - 1)
        return s + table[(dy + m - 1) * (2 * m - 1) + dx + m - 1, h]

    mask_mod = masks.swin_window(hh, ww, m, shift)
    n = hh * ww
    q, k, v = rand(2, H, n, 4), rand(2, H, n, 4), rand(2, H, n, 3)
    out = opgen.ops.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    y, x = torch.arange(n) // ww, torch.arange(n) % ww
    dy = (y[:, None] - y[None, :]).clamp(-(m - 1), m - 1)
    dx = (x[:, None] - x[None, :]).clamp(-(m - 1), m - 1)
    bias = table[(dy + m - 1) * (2 * m - 1) + dx + m - 1].permute(2, 0, 1)
    allowed = mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(n)[None, :])
    want = dense(q, k, v, bias, allowed)
    dout = torch.randn_like(out)
    assert_grads(grads(out, (q, k, v, table), dout), grads(want, (q, k, v, table), dout), D64, "swin image order")


_TRITON_SCRIPT = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from opgen.ir.passes.attention import fuse_attention
from opgen.ops.attention_op import _declare, _inputs, parse_spec, prepare_mods
from opgen.runtime import default_session
from opgen.targets.tiles import tile_plan
from opgen.targets.triton import attention as A

torch.manual_seed(int(sys.argv[2]))
m, H, HKV = 3, 4, 2
coords = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")).flatten(1)
rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (m - 1)
idx = rel[..., 0] * (2 * m - 1) + rel[..., 1]
table = torch.randn((2 * m - 1) ** 2, H, requires_grad=True)
slopes = torch.rand(H, requires_grad=True)
mod = lambda s, b, h, qi, kv: s * (1 + 0.1 * slopes[h]) + table[idx[qi, kv], h] + slopes[h] * (kv - qi)
q = torch.randn(2, H, m * m, 16)
k, v = (torch.randn(2, HKV, m * m, 16) for _ in range(2))
spec, caps, _ = prepare_mods("t", mod, None, q.dtype, k.dtype)
op = _declare(q, k, v, list(caps), spec, 0.25, True, ("capture0", "gather0"))
group = fuse_attention(op)
named = _inputs(q, k, v, list(caps), spec)
cfg = A.TritonAttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
plan = tile_plan(group, named, default_session().binding(op, {n: tuple(x.shape) for n, x in named.items()}, {},
                                                          "t").dims, 16, 16)
fw = A.run_forward(group, named, plan.rows, cfg, cache_dir=sys.argv[1])
dout = torch.randn_like(fw["out"])
got = A.run_backward(group, named, fw["out"], fw["lse"], dout, plan.rows, plan.cols, cfg, cache_dir=sys.argv[1])
leaves = {n: named[n].detach().double().requires_grad_() for n in ("q", "k", "v", "capture0", "gather0")}
Q, K, V, SL, G = leaves.values()
K, V = K.repeat_interleave(2, 1), V.repeat_interleave(2, 1)
i = torch.arange(m * m)
s = (Q @ K.transpose(-1, -2) * 0.25) * (1 + 0.1 * SL[:, None, None]) + G.permute(2, 0, 1) \
    + SL[:, None, None] * (i[None, :] - i[:, None])
ref = torch.autograd.grad(torch.softmax(s, -1) @ V, list(leaves.values()), dout.double())
for n, r in zip(leaves, ref):
    err = ((got[n].double() - r).abs().max() / r.abs().max()).item()
    print(n, f"{err:.2e}")
    assert err < 1e-4, n
print("OK")
'''


def test_triton_kernels_compute_capture_gradients_in_the_interpreter(tmp_path):
    """The Triton dk/dv kernel's atomic capture gradients (a Swin gather table, learnable slopes that scale the
    score and add an ALiBi term, GQA) in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must be set
    before triton is imported) against dense fp64 autograd."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    script = tmp_path / "tri.py"
    script.write_text(_TRITON_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(RUN_SEED)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]
