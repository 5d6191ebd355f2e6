"""torch.ops.opgen.attention / attention_backward: opcheck, fp64 gradcheck, torch.compile with a dynamic length
(one frame), fully masked rows, agreement with a dense torch reference and with FlexAttention, bad input.

Reference: a dense formulation in plain torch (scores, the same mods applied to index tensors, an explicit
boolean mask, softmax with fully masked rows set to 0, logsumexp). Tolerances: fp64 atol/rtol 1e-10, fp32
atol/rtol 2e-5 (forward and gradients), bf16 atol/rtol 2e-2 against the fp32 reference.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import opgen.masks as masks
import opgen.scores as scores
from opgen.ops.attention_op import eager_fallback, parse_spec, prepare_mods
from opgen.ir import ArgumentError, TraceError
from opgen.ir.errors import FallbackWarning

#: fresh data every run (pytest -l shows RUN_SEED in a failing test's locals to reproduce it)
RUN_SEED = random.randrange(2**31)

D64 = torch.float64


def attention(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False, return_lse=False):
    """What ``opgen.ops.attention`` does after its argument checks: trace the mods into a spec string, then one
    call of the custom op."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    spec, captures, unsupported = prepare_mods("opgen.ops.attention", score_mod, mask_mod, q.dtype, k.dtype)
    if unsupported:                                       # an untraceable mod: dense eager, with a warning
        return eager_fallback(unsupported, q, k, v, score_mod, mask_mod, float(scale), bool(enable_gqa))
    captures = [c if c.device == q.device else c.to(q.device) for c in captures]
    out, lse = torch.ops.opgen.attention(q, k, v, captures, spec, float(scale), bool(enable_gqa))
    return (out, lse) if return_lse else out


def reference(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False):
    """Dense attention in plain torch (FlexAttention semantics): returns (out, lse)."""
    b_, hq, L, E = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if enable_gqa:
        k = k.repeat_interleave(hq // k.shape[1], dim=1)
        v = v.repeat_interleave(hq // v.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    b = torch.arange(b_)[:, None, None, None]
    h = torch.arange(hq)[None, :, None, None]
    i = torch.arange(L)[None, None, :, None]
    j = torch.arange(S)[None, None, None, :]
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    allowed = torch.ones_like(s, dtype=torch.bool) if mask_mod is None else mask_mod(b, h, i, j).expand(s.shape)
    empty = ~allowed.any(-1, keepdim=True)                # fully masked rows: out 0, lse -inf, finite grads
    s = s.masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse) * allowed
    return (p @ v).to(q.dtype), lse.masked_fill(empty, -math.inf).squeeze(-1)


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def qkv(b=1, hq=2, hkv=None, L=5, S=7, E=3, EV=4, dtype=D64, grad=True):
    hkv = hq if hkv is None else hkv
    return rand(b, hq, L, E, dtype=dtype, grad=grad), rand(b, hkv, S, E, dtype=dtype, grad=grad), \
        rand(b, hkv, S, EV, dtype=dtype, grad=grad)


def tol(dtype):
    return {D64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}[dtype]


def alibi(heads, dtype=D64):
    return scores.alibi(scores.alibi_slopes(heads).to(dtype))


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 2) | (kv_idx <= q_idx)


# -------------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype,mods", [(torch.float32, "none"), (D64, "causal"), (torch.float32, "alibi+window"),
                                        (D64, "alibi+window")])
def test_opcheck(dtype, mods):
    torch.manual_seed(RUN_SEED + 0)
    score_mod, mask_mod = {"none": (None, None), "causal": (None, masks.causal),
                           "alibi+window": (alibi(3, dtype), masks.sliding_window(3))}[mods]
    q, k, v = qkv(b=2, hq=3, L=5, S=7, E=3, EV=4, dtype=dtype)
    spec, caps, _ = prepare_mods("test", score_mod, mask_mod, q.dtype, k.dtype)
    args = (q, k, v, list(caps), spec, 0.7, False)
    torch.library.opcheck(torch.ops.opgen.attention, args)
    out, lse = torch.ops.opgen.attention(*args)
    assert not lse.requires_grad and out.requires_grad
    # the backward op has no double backward: opcheck it on inputs that need no grad
    d = [x.detach() for x in (q, k, v)]
    bargs = (*d, list(caps), out.detach(), lse, torch.randn_like(out), spec, 0.7, False)
    torch.library.opcheck(torch.ops.opgen.attention_backward, bargs)


# ------------------------------------------------------------------------------------------- gradcheck

GRAD_CASES = {
    "no mask": dict(),
    "causal": dict(mask_mod=masks.causal),
    "sliding window": dict(mask_mod=masks.sliding_window(3)),
    "alibi": dict(score_mod=alibi(2)),
    "softcap": dict(score_mod=scores.softcap(0.8), mask_mod=prefix_lm),
    "gqa": dict(enable_gqa=True, mask_mod=masks.causal),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradcheck_fp64(case):
    torch.manual_seed(RUN_SEED + 1)
    kw = GRAD_CASES[case]
    q, k, v = qkv(b=1, hq=2, hkv=1 if kw.get("enable_gqa") else 2, L=5, S=7, E=3, EV=3)
    fn = lambda *x: attention(*x, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ------------------------------------------------------------------------------ forward/backward vs torch

REF_CASES = {
    "plain": dict(),
    "causal": dict(mask_mod=masks.causal),
    "window non-causal": dict(mask_mod=masks.sliding_window(2, causal=False)),
    "alibi+causal": dict(score_mod=alibi(3, torch.float32), mask_mod=masks.causal),
    "softcap+prefix": dict(score_mod=scores.softcap(2.0), mask_mod=prefix_lm),
    "gqa+window": dict(enable_gqa=True, mask_mod=masks.sliding_window(4)),
    "scale": dict(scale=0.37, mask_mod=masks.causal),
}


REF_SHAPES = [(2, 3, 9, 11, 5, 6), (1, 1, 1, 1, 1, 1), (1, 3, 13, 6, 7, 3)]


# every case at one shape, the shapes taken in turn (each compiled kernel costs ~1 s on a cold cache)
@pytest.mark.parametrize("case,shape", [(c, REF_SHAPES[n % len(REF_SHAPES)]) for n, c in enumerate(REF_CASES)]
                         + [("alibi+causal", REF_SHAPES[1]), ("gqa+window", REF_SHAPES[2])])
def test_matches_dense_reference(case, shape):
    torch.manual_seed(RUN_SEED + 2)
    kw = dict(REF_CASES[case])
    b, h, L, S, E, EV = shape
    hkv = 1 if kw.get("enable_gqa") else h
    q, k, v = qkv(b=b, hq=h, hkv=hkv, L=L, S=S, E=E, EV=EV, dtype=torch.float32)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    torch.testing.assert_close(lse, ref_lse, **tol(torch.float32))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32))


def test_non_contiguous_inputs_and_bf16():
    torch.manual_seed(RUN_SEED + 3)
    x = rand(2, 7, 3, 4)                                   # [B, L, H, E] -> transposed views [B, H, L, E]
    q, k, v = (x.transpose(1, 2), rand(2, 9, 3, 4).transpose(1, 2), rand(2, 9, 3, 5).transpose(1, 2))
    torch.testing.assert_close(attention(q, k, v, mask_mod=masks.causal),
                               reference(q, k, v, mask_mod=masks.causal)[0], **tol(torch.float32))
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out, lse = attention(qb, kb, vb, mask_mod=masks.causal, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference(q, k, v, mask_mod=masks.causal)[0], atol=2e-2, rtol=2e-2)


def test_fully_masked_rows_give_zeros_and_finite_grads():
    torch.manual_seed(RUN_SEED + 4)
    q, k, v = qkv(b=1, hq=2, L=6, S=5, E=3, EV=2)

    def late(b, h, q_idx, kv_idx):                        # rows 0 and 1 see no key; head 1 sees nothing at all
        return (q_idx >= 2) & (kv_idx <= q_idx) & (h == 0)

    out, lse = attention(q, k, v, mask_mod=late, return_lse=True)
    assert torch.all(out[0, 1] == 0) and torch.all(out[0, 0, :2] == 0)
    assert torch.all(lse[0, 1] == -math.inf) and torch.all(lse[0, 0, :2] == -math.inf)
    torch.testing.assert_close(out, reference(q, k, v, mask_mod=late)[0], **tol(D64))
    out.square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[0, 1] == 0) and torch.all(q.grad[0, 0, :2] == 0)
    assert torch.autograd.gradcheck(lambda *x: attention(*x, mask_mod=late), (q, k, v))


# --------------------------------------------------------------------------------------- torch.compile

def test_compile_dynamic_one_frame_matches_eager():
    torch.manual_seed(RUN_SEED + 5)
    slopes_mod, window = alibi(4, torch.float32), masks.sliding_window(3)

    def block(q, k, v):
        return attention(torch.tanh(q), k, v, score_mod=slopes_mod, mask_mod=window, enable_gqa=True) * 2.0

    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=cnt, fullgraph=True, dynamic=True)
    for L in (6, 11):
        q, k, v = qkv(b=2, hq=4, hkv=2, L=L, S=L, E=5, EV=3, dtype=torch.float32)
        out = compiled(q, k, v)
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref = block(q, k, v)
        want = torch.autograd.grad(ref.square().sum(), (q, k, v))
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    assert cnt.frame_count == 1, f"{cnt.frame_count} frames for two lengths"


def sin_bias(s, b, h, q_idx, kv_idx):
    return s + torch.sin(q_idx * 0.1)                     # torch.sin has no IR: the call falls back


def test_untraceable_mod_falls_back_with_a_warning_also_under_compile():
    torch.manual_seed(RUN_SEED + 7)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.warns(FallbackWarning, match="torch function sin"):
        out = attention(q, k, v, score_mod=sin_bias, mask_mod=masks.causal)
    ref = reference(q, k, v, score_mod=sin_bias, mask_mod=masks.causal)[0]
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    cnt = CompileCounterWithBackend("eager")
    compiled = torch.compile(lambda *x: attention(*x, score_mod=sin_bias, mask_mod=masks.causal), backend=cnt,
                             fullgraph=True)
    with pytest.warns(FallbackWarning, match="compiled into the graph"):
        torch.testing.assert_close(compiled(q, k, v), ref, **tol(torch.float32))
    assert cnt.frame_count == 1


def test_mod_built_inside_the_compiled_function_falls_back_and_says_why():
    q, k, v = qkv(dtype=torch.float32)
    compiled = torch.compile(lambda *x: attention(*x, mask_mod=masks.sliding_window(3)), backend="eager",
                             fullgraph=True)
    with pytest.warns(FallbackWarning, match="created inside a torch.compile'd function"):
        out = compiled(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, mask_mod=masks.sliding_window(3))[0], **tol(torch.float32))


def test_mod_that_fails_on_index_tensors_too_is_a_trace_error():
    def python_if(b, h, q_idx, kv_idx):
        return True if q_idx >= kv_idx else False          # Python control flow: neither traced nor eager

    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(TraceError, match="mask_mod.*Python control flow"):
        attention(q, k, v, mask_mod=python_if)


# ------------------------------------------------------------------------------------- FlexAttention

@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_mods_agree_with_flex():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(RUN_SEED + 6)
    cases = [
        (None, masks.neighborhood_2d(height=5, width=7, kernel=3, dilation=(1, 2)), 1),
        (scores.softcap(1.5), masks.swin_window(height=5, width=7, window=1), 1),
        (alibi(4, torch.float32), masks.sliding_window(6), 2),
        (lambda s, b, h, qi, kv: s * (1.0 + 0.1 * h) - 0.05 * torch.abs(qi - kv), masks.causal, 4),
    ]
    for score_mod, mask_mod, hkv in cases:
        q, k, v = qkv(b=1, hq=4, hkv=hkv, L=35, S=35, E=8, EV=8, dtype=torch.float32, grad=False)
        block_mask = flex.create_block_mask(mask_mod, 1, 4, 35, 35, device="cpu")
        want = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=hkv != 4)
        got = attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, enable_gqa=hkv != 4)
        torch.testing.assert_close(got, want, **tol(torch.float32))


# ----------------------------------------------------------------------------------------- bad input

def test_captured_tensor_requiring_grad_gets_a_gradient_but_a_stale_spec_is_an_error():
    """A captured tensor that requires grad gets its gradient (tests/ops/test_attention_capture_grads.py); a spec
    traced while it did not (its "grad" flag unset) is refused rather than giving a silent zero gradient."""
    q, k, v = qkv()
    slopes = scores.alibi_slopes(2).double()
    mod = scores.alibi(slopes)
    spec, caps, _ = prepare_mods("test", mod, None, q.dtype, k.dtype)
    slopes.requires_grad_()
    with pytest.raises(ArgumentError, match=r"'captures\[0\]'.*requires grad.*traced while it did not"):
        torch.ops.opgen.attention(q, k, v, list(caps), spec, 0.5, False)
    with torch.no_grad():                                 # no gradient wanted: fine
        torch.ops.opgen.attention(q, k, v, list(caps), spec, 0.5, False)
    out = attention(q, k, v, score_mod=mod)               # traced again: the flag follows requires_grad
    (g,) = torch.autograd.grad(out.sum(), slopes)
    assert g.shape == slopes.shape and torch.isfinite(g).all()


def test_bad_dtype_device_and_spec():
    q, k, v = qkv(dtype=torch.float32, grad=False)
    spec, caps, _ = prepare_mods("test", alibi(2, torch.float32), None, q.dtype, k.dtype)
    op = torch.ops.opgen.attention
    with pytest.raises(ArgumentError, match="argument 'q' expected a floating-point"):
        op(q.long(), k, v, list(caps), spec, 1.0, False)
    with pytest.raises(ArgumentError, match=r"'captures\[0\]' is a 1-D torch.float64 tensor"):
        op(q, k, v, [caps[0].double()], spec, 1.0, False)
    with pytest.raises(ArgumentError, match=r"'captures\[0\]' is on meta"):
        op(q, k, v, [caps[0].to("meta")], spec, 1.0, False)
    with pytest.raises(ArgumentError, match="argument 'captures' has 0 tensors"):
        op(q, k, v, [], spec, 1.0, False)
    with pytest.raises(ArgumentError, match="traced for f32 scores but .* give f64"):
        op(q.double(), k.double(), v.double(), list(caps), spec, 1.0, False)
    with pytest.raises(ArgumentError, match="argument 'spec'"):
        op(q, k, v, [], '{"format": "something else"}', 1.0, False)
    with pytest.raises(ArgumentError, match="argument .k. has 3 heads but q has 2"):
        op(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3], list(caps), spec, 1.0, False)


def test_double_backward_is_a_clear_error():
    q, k, v = qkv()
    out = attention(q, k, v, mask_mod=masks.causal)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()


# ------------------------------------------------------------------------------- spec and the trace memo

def test_one_spec_per_mod_and_deterministic():
    s1, _, _ = prepare_mods("t", None, masks.sliding_window(3), torch.float32, torch.float32)
    s2, _, _ = prepare_mods("t", None, masks.sliding_window(3), torch.float32, torch.float32)
    s3, _, _ = prepare_mods("t", None, masks.sliding_window(4), torch.float32, torch.float32)
    s4, _, _ = prepare_mods("t", None, masks.sliding_window(3), torch.bfloat16, torch.bfloat16)
    assert s1 == s2 and s1 != s3
    assert parse_spec(s4).score_dtype == parse_spec(s1).score_dtype   # bf16 scores accumulate in f32
    assert parse_spec(s1).mask == parse_spec(s2).mask


DOCS = torch.tensor([0, 0, 1, 1, 1])


def doc_mask(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx]


def test_memo_sees_rebound_captured_tensors():
    """The eager memo of traced mods is keyed on what the mod reads: a rebound global / attribute / closure
    tensor is picked up (no stale captures), an unchanged mod is not traced again."""
    global DOCS
    q, k, v = qkv(L=5, S=5, grad=False)
    first = attention(q, k, v, mask_mod=doc_mask)
    torch.testing.assert_close(first, reference(q, k, v, mask_mod=doc_mask)[0], **tol(D64))
    _, caps, _ = prepare_mods("t", None, doc_mask, D64, D64)
    assert caps[0] is DOCS
    DOCS = torch.tensor([0, 1, 1, 2, 2])
    _, caps2, _ = prepare_mods("t", None, doc_mask, D64, D64)
    assert caps2[0] is DOCS
    torch.testing.assert_close(attention(q, k, v, mask_mod=doc_mask), reference(q, k, v, mask_mod=doc_mask)[0],
                               **tol(D64))

    mod = alibi(2)
    _, c1, _ = prepare_mods("t", mod, None, D64, D64)
    object.__setattr__(mod, "slopes", mod.slopes * 2)
    _, c2, _ = prepare_mods("t", mod, None, D64, D64)
    assert c1[0] is not c2[0] and c2[0] is mod.slopes

    table = torch.randn(9)

    def make(t):
        def rel_bias(s, b, h, q_idx, kv_idx):
            return s + t[q_idx - kv_idx + 4]
        return rel_bias

    f = make(table)
    _, c3, _ = prepare_mods("t", f, None, D64, D64)
    assert c3[0] is table
    s_a, _, _ = prepare_mods("t", f, None, D64, D64)
    s_b, _, _ = prepare_mods("t", make(torch.randn(9)), None, D64, D64)
    assert s_a == s_b                                      # same traced structure, new captured tensor
