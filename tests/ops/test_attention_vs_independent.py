"""opgen.ops.attention (FlexAttention semantics) against an independent float64 reference.

The reference builds the full score matrix with einsum in float64, applies score_mod by calling
it on broadcast index tensors, applies the mask with masked_fill(-inf), softmaxes, zeroes rows
where every key is masked and multiplies by v.  Masks for the opgen.masks helpers are built here
by explicit python loops from their documented definitions (NATTEN / Swin / sliding window), not
from the helpers.  Each test draws a fresh random seed and prints it in the failure message.
"""

import math
import random

import pytest
import torch

import opgen
import opgen.masks
import opgen.ops as ops
import opgen.scores


# --------------------------------------------------------------------------- helpers


def _id(v):
    """Readable test ids: dtypes by name, tuples as AxBxC."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    return None


def _fresh_seed():
    return random.randrange(2**31)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _tols(dtype):
    if dtype == torch.float64:
        return dict(atol=1e-9, rtol=1e-9)
    return dict(atol=1e-4, rtol=1e-4)


def _check(got, ref, dtype, what, seed):
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got)} (seed={seed})"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)} (seed={seed})"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype} (seed={seed})"
    assert not torch.isnan(got).any(), f"{what}: NaN in output (seed={seed})"
    torch.testing.assert_close(
        got.detach().to(torch.float64),
        ref.to(torch.float64),
        **_tols(dtype),
        msg=lambda m: f"{what} mismatch (seed={seed}):\n{m}",
    )


def _index_tensors(B, H, L, S):
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    q_idx = torch.arange(L)[None, None, :, None]
    kv_idx = torch.arange(S)[None, None, None, :]
    return b, h, q_idx, kv_idx


def ref_attention(q, k, v, score_mod=None, mask_mod=None, mask=None, scale=None, enable_gqa=False):
    """Dense float64 FlexAttention reference.

    mask_mod: flex-style callable evaluated on broadcast index tensors; mask: an explicit bool
    tensor broadcastable to [B, Hq, L, S] (True = keep). Both may be given (logical and)."""
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    B, Hq, L, E = q64.shape
    Hkv, S = k64.shape[1], k64.shape[2]
    if Hkv != Hq:
        assert enable_gqa and Hq % Hkv == 0
        rep = Hq // Hkv  # query head h uses kv head h // rep
        k64 = k64.repeat_interleave(rep, dim=1)
        v64 = v64.repeat_interleave(rep, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    s = torch.einsum("bhle,bhse->bhls", q64, k64) * scale
    b, h, qi, ki = _index_tensors(B, Hq, L, S)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki).to(torch.float64).expand(B, Hq, L, S)
    keep = torch.ones(B, Hq, L, S, dtype=torch.bool)
    if mask_mod is not None:
        keep = keep & mask_mod(b, h, qi, ki).expand(B, Hq, L, S)
    if mask is not None:
        keep = keep & mask.to(torch.bool).expand(B, Hq, L, S)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with every key masked -> 0
    return torch.einsum("bhls,bhsv->bhlv", p, v64)


def _qkv(gen, B, Hq, Hkv, L, S, E, Ev, dtype):
    q = _randn(gen, B, Hq, L, E, dtype=dtype)
    k = _randn(gen, B, Hkv, S, E, dtype=dtype)
    v = _randn(gen, B, Hkv, S, Ev, dtype=dtype)
    return q, k, v


def _pair_mask(L, S, pred):
    """[L, S] bool from a plain python predicate pred(i, j) -> bool."""
    m = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        for j in range(S):
            m[i, j] = bool(pred(i, j))
    return m


# ---- independent NATTEN / Swin reference masks (plain loops, no opgen helpers)


def natten_window(i, length, kernel, dilation):
    """Positions attended by query i (NATTEN 1-D, dilation groups, clamped window)."""
    r = i % dilation
    group = [p for p in range(length) if p % dilation == r]
    Lg = len(group)
    start = min(max(i // dilation - kernel // 2, 0), Lg - kernel)
    return [group[start + j] for j in range(kernel)]


def natten_mask_1d(length, kernel, dilation):
    m = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in natten_window(i, length, kernel, dilation):
            m[i, j] = True
    return m


def natten_mask_2d(height, width, kernel, dilation):
    L = height * width
    m = torch.zeros(L, L, dtype=torch.bool)
    for r in range(height):
        rows = natten_window(r, height, kernel, dilation)
        for c in range(width):
            cols = natten_window(c, width, kernel, dilation)
            for rr in rows:
                for cc in cols:
                    m[r * width + c, rr * width + cc] = True
    return m


def swin_mask(height, width, window, shift):
    """Swin-Transformer attention mask expressed on the ORIGINAL (unshifted) token order.

    As in the Swin code: the image is rolled by -shift, partitioned into window x window
    windows, and (if shift > 0) region ids are painted with the h/w slices of the paper's
    code; two tokens attend iff same window and same region.  Window ids and region ids are
    computed in the shifted frame and rolled back by +shift onto the original positions."""
    win_shifted = torch.zeros(height, width, dtype=torch.long)
    for i in range(height):
        for j in range(width):
            win_shifted[i, j] = (i // window) * (width // window) + (j // window)
    region_shifted = torch.zeros(height, width, dtype=torch.long)
    if shift > 0:
        h_slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        w_slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        cnt = 0
        for hs in h_slices:
            for ws in w_slices:
                region_shifted[hs, ws] = cnt
                cnt += 1
    win = torch.roll(win_shifted, shifts=(shift, shift), dims=(0, 1)).reshape(-1)
    region = torch.roll(region_shifted, shifts=(shift, shift), dims=(0, 1)).reshape(-1)
    return (win[:, None] == win[None, :]) & (region[:, None] == region[None, :])


F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]


# ------------------------------------------------------------------ plain attention


PLAIN_CASES = [
    # B, H, L, S, E, Ev, scale, dtype
    (1, 1, 1, 1, 8, 8, None, F32),
    (2, 3, 7, 7, 16, 16, None, F64),
    (1, 2, 33, 33, 5, 5, None, F32),
    (2, 1, 7, 13, 8, 5, 0.25, F64),
    (1, 3, 1, 37, 5, 16, None, F32),
    (3, 2, 13, 1, 16, 8, 1.7, F64),
]


@pytest.mark.parametrize("B,H,L,S,E,Ev,scale,dtype", PLAIN_CASES, ids=_id)
def test_attention_no_mods(B, H, L, S, E, Ev, scale, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    q, k, v = _qkv(g, B, H, H, L, S, E, Ev, dtype)
    ref = ref_attention(q, k, v, scale=scale)
    got = ops.attention(q, k, v) if scale is None else ops.attention(q, k, v, scale=scale)
    _check(got, ref, dtype, f"attention B={B} H={H} L={L} S={S} E={E} Ev={Ev} scale={scale}", seed)
    if dtype == torch.float64 and L > 1 and S > 1:
        # sanity of the reference itself: SDPA agrees (no masks)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(sdpa, ref, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------- mask helpers


@pytest.mark.parametrize("B,H,L,E,dtype", [(2, 3, 7, 8, F32), (1, 1, 33, 5, F64), (1, 2, 1, 16, F32)], ids=_id)
def test_attention_causal(B, H, L, E, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    q, k, v = _qkv(g, B, H, H, L, L, E, E, dtype)
    mask = _pair_mask(L, L, lambda i, j: j <= i)
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=opgen.masks.causal)
    _check(got, ref, dtype, f"causal B={B} H={H} L={L} E={E}", seed)


@pytest.mark.parametrize("L,w,dtype", [(33, 5, F32), (7, 1, F64), (37, 8, F64)], ids=_id)
def test_attention_sliding_window(L, w, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    q, k, v = _qkv(g, 2, 2, 2, L, L, 8, 8, dtype)
    mask = _pair_mask(L, L, lambda i, j: 0 <= i - j < w)
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=opgen.masks.sliding_window(w))
    _check(got, ref, dtype, f"sliding_window L={L} w={w}", seed)


NATTEN_1D_CASES = [
    # L, kernel, dilation, dtype
    (33, 5, 1, F32),
    (7, 7, 1, F64),
    (13, 1, 1, F32),
    (33, 7, 3, F64),
    (37, 5, 4, F32),  # unequal dilation groups (10, 9, 9, 9)
    (23, 3, 7, F64),
]


def natten_start(index, length, kernel, dilation):
    """NATTEN's own get_window_start arithmetic, used to cross-check natten_window."""
    nh = kernel // 2
    if dilation <= 1:
        return max(index - nh, 0) + (index + nh >= length) * (length - index - nh - 1)
    ni = index - nh * dilation
    if ni < 0:
        return index % dilation
    if index + nh * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nh * dilation
        return a + imodd - kernel * dilation
    return ni


@pytest.mark.parametrize("L,kernel,dilation,dtype", NATTEN_1D_CASES, ids=_id)
def test_attention_neighborhood_1d(L, kernel, dilation, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    mask = natten_mask_1d(L, kernel, dilation)
    assert (mask.sum(-1) == kernel).all()
    for i in range(L):  # two independent formulations of the reference agree
        st = natten_start(i, L, kernel, dilation)
        assert natten_window(i, L, kernel, dilation) == [st + dilation * j for j in range(kernel)]
    # the helper evaluated on index tensors must give the same mask, kernel keys per query
    _, _, qi, ki = _index_tensors(1, 1, L, L)
    helper_mask = opgen.masks.neighborhood_1d(kernel, dilation, length=L)(
        torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), qi, ki
    )
    helper_mask = helper_mask.expand(1, 1, L, L)[0, 0]
    assert (helper_mask.sum(-1) == kernel).all(), f"helper: neighbours per query {helper_mask.sum(-1).tolist()}"
    assert torch.equal(helper_mask, mask), f"neighborhood_1d({kernel}, {dilation}) helper mask != NATTEN loop mask"

    q, k, v = _qkv(g, 1, 2, 2, L, L, 8, 8, dtype)
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=opgen.masks.neighborhood_1d(kernel, dilation))
    _check(got, ref, dtype, f"neighborhood_1d L={L} kernel={kernel} dilation={dilation}", seed)


NATTEN_2D_CASES = [
    # height, width, kernel, dilation
    (5, 7, 3, 1),
    (6, 9, 3, 2),
    (3, 5, 3, 1),
    (7, 4, 1, 1),
]


@pytest.mark.parametrize("height,width,kernel,dilation", NATTEN_2D_CASES, ids=_id)
def test_attention_neighborhood_2d(height, width, kernel, dilation):
    seed = _fresh_seed()
    g = _gen(seed)
    L = height * width
    mask = natten_mask_2d(height, width, kernel, dilation)
    assert (mask.sum(-1) == kernel * kernel).all()
    _, _, qi, ki = _index_tensors(1, 1, L, L)
    helper_mask = opgen.masks.neighborhood_2d(height, width, kernel, dilation)(
        torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), qi, ki
    ).expand(1, 1, L, L)[0, 0]
    assert (helper_mask.sum(-1) == kernel * kernel).all(), "neighborhood_2d helper: wrong neighbour count"
    assert torch.equal(helper_mask, mask), f"neighborhood_2d({height},{width},{kernel},{dilation}) != loop mask"
    for dtype in DTYPES:
        q, k, v = _qkv(g, 2, 1, 1, L, L, 5, 5, dtype)
        ref = ref_attention(q, k, v, mask=mask)
        got = ops.attention(q, k, v, mask_mod=opgen.masks.neighborhood_2d(height, width, kernel, dilation))
        _check(got, ref, dtype, f"neighborhood_2d {height}x{width} kernel={kernel} dilation={dilation}", seed)


SWIN_CASES = [
    # height, width, window, shift
    (6, 9, 3, 0),
    (6, 9, 3, 1),
    (4, 8, 4, 2),
    (5, 5, 5, 3),
]


@pytest.mark.parametrize("height,width,window,shift", SWIN_CASES, ids=_id)
def test_attention_swin_window(height, width, window, shift):
    seed = _fresh_seed()
    g = _gen(seed)
    L = height * width
    mask = swin_mask(height, width, window, shift)
    for dtype in DTYPES:
        q, k, v = _qkv(g, 1, 3, 3, L, L, 8, 8, dtype)
        ref = ref_attention(q, k, v, mask=mask)
        got = ops.attention(q, k, v, mask_mod=opgen.masks.swin_window(height, width, window, shift))
        _check(got, ref, dtype, f"swin_window {height}x{width} window={window} shift={shift}", seed)


# ----------------------------------------------------------------- score helpers


@pytest.mark.parametrize("H,L,dtype", [(3, 7, F32), (1, 33, F64), (2, 1, F32)], ids=_id)
def test_attention_alibi_causal(H, L, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    q, k, v = _qkv(g, 2, H, H, L, L, 16, 8, dtype)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(H)], dtype=dtype) * 3.0
    bias = torch.zeros(H, L, L, dtype=torch.float64)
    for h in range(H):
        for i in range(L):
            for j in range(L):
                bias[h, i, j] = float(slopes[h]) * (j - i)
    ref = ref_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + bias[None], mask=_pair_mask(L, L, lambda i, j: j <= i))
    got = ops.attention(q, k, v, score_mod=opgen.scores.alibi(slopes), mask_mod=opgen.masks.causal)
    _check(got, ref, dtype, f"alibi+causal H={H} L={L}", seed)


@pytest.mark.parametrize("cap,dtype", [(0.5, F32), (5.0, F64)], ids=_id)
def test_attention_softcap(cap, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    q, k, v = _qkv(g, 2, 2, 2, 13, 13, 8, 8, dtype)
    q = q * 3  # push scores into the capped regime
    ref = ref_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: cap * torch.tanh(s / cap))
    got = ops.attention(q, k, v, score_mod=opgen.scores.softcap(cap))
    _check(got, ref, dtype, f"softcap cap={cap}", seed)
    plain = ref_attention(q, k, v)
    assert not torch.allclose(plain, ref, atol=1e-3), "softcap test is vacuous"


# --------------------------------------------------------------- user-written mods


@pytest.mark.parametrize("dtype", [F32], ids=_id)
def test_attention_prefix_lm(dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    L, prefix_len = 33, 5
    q, k, v = _qkv(g, 2, 3, 3, L, L, 8, 8, dtype)
    mask = _pair_mask(L, L, lambda i, j: j <= i or j < prefix_len)
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=lambda b, h, q, kv: (kv <= q) | (kv < prefix_len))
    _check(got, ref, dtype, "prefix-LM mask_mod", seed)


@pytest.mark.parametrize("dtype", [F64], ids=_id)
def test_attention_dilated_window_mod(dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    L = 33
    q, k, v = _qkv(g, 1, 2, 2, L, L, 5, 5, dtype)
    mask = _pair_mask(L, L, lambda i, j: abs(i - j) <= 4 and (i - j) % 2 == 0)
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=lambda b, h, q, kv: (torch.abs(q - kv) <= 4) & ((q - kv) % 2 == 0))
    _check(got, ref, dtype, "dilated window mask_mod", seed)


@pytest.mark.parametrize("H,L,dtype", [(3, 7, F64), (2, 33, F32), (1, 1, F64)], ids=_id)
def test_attention_relative_position_bias(H, L, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    q, k, v = _qkv(g, 2, H, H, L, L, 8, 8, dtype)
    bias_table = _randn(g, H, 2 * L - 1, dtype=dtype)
    bias = torch.zeros(H, L, L, dtype=torch.float64)
    for h in range(H):
        for i in range(L):
            for j in range(L):
                bias[h, i, j] = float(bias_table[h, i - j + L - 1])
    ref = ref_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + bias[None])
    got = ops.attention(q, k, v, score_mod=lambda s, b, h, q, kv: s + bias_table[h, q - kv + L - 1])
    _check(got, ref, dtype, f"relative position bias H={H} L={L}", seed)


@pytest.mark.parametrize("dtype", [F64], ids=_id)
def test_attention_document_mask(dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    B, L = 2, 33
    q, k, v = _qkv(g, B, 2, 2, L, L, 16, 16, dtype)
    doc_ids = torch.sort(torch.randint(0, 4, (B, L), generator=g), dim=-1).values
    doc_ids[1] = torch.randint(0, 3, (L,), generator=g)  # batch 1: interleaved documents
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                mask[b, 0, i, j] = bool(doc_ids[b, i] == doc_ids[b, j])
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=lambda b, h, q, kv: doc_ids[b, q] == doc_ids[b, kv])
    _check(got, ref, dtype, f"document mask doc_ids={doc_ids.tolist()}", seed)


@pytest.mark.parametrize("dtype", [F32], ids=_id)
def test_attention_where_score_mod_with_causal(dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    B, H, L = 1, 3, 13
    q, k, v = _qkv(g, B, H, H, L, L, 8, 8, dtype)
    sm = torch.zeros(H, L, L, dtype=torch.float64)
    for h in range(H):
        for i in range(L):
            for j in range(L):
                sm[h, i, j] = 0.5 if (i - j > 3) else (-0.75 * h)
    ref = ref_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + sm[None], mask=_pair_mask(L, L, lambda i, j: j <= i))
    got = ops.attention(
        q, k, v,
        score_mod=lambda s, b, h, q, kv: torch.where(q - kv > 3, s + 0.5, s - 0.75 * h),
        mask_mod=lambda b, h, q, kv: q >= kv,
    )
    _check(got, ref, dtype, "torch.where score_mod + causal", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_attention_fully_masked_rows_are_zero(dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    L = 7
    q, k, v = _qkv(g, 2, 2, 2, L, L, 8, 8, dtype)
    # strictly causal: query 0 has no key; also queries >= 5 see nothing
    mod = lambda b, h, q, kv: (kv < q) & (q < 5)  # noqa: E731
    mask = _pair_mask(L, L, lambda i, j: j < i and i < 5)
    ref = ref_attention(q, k, v, mask=mask)
    got = ops.attention(q, k, v, mask_mod=mod)
    _check(got, ref, dtype, "fully masked rows", seed)
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0])), "row with no keys must be exactly 0"
    assert torch.equal(got[:, :, 5:], torch.zeros_like(got[:, :, 5:])), "rows with no keys must be exactly 0"


# ------------------------------------------------------------------------------ GQA


@pytest.mark.parametrize("L,use_causal,dtype", [(7, False, F64), (33, True, F32), (1, True, F64)], ids=_id)
def test_attention_gqa(L, use_causal, dtype):
    seed = _fresh_seed()
    g = _gen(seed)
    Hq, Hkv = 4, 2
    q, k, v = _qkv(g, 2, Hq, Hkv, L, L, 16, 5, dtype)
    mask = _pair_mask(L, L, lambda i, j: j <= i) if use_causal else None
    ref = ref_attention(q, k, v, mask=mask, enable_gqa=True)
    kwargs = dict(mask_mod=opgen.masks.causal) if use_causal else {}
    got = ops.attention(q, k, v, enable_gqa=True, **kwargs)
    _check(got, ref, dtype, f"GQA Hq={Hq} Hkv={Hkv} L={L} causal={use_causal}", seed)
    # the head index seen by mods is the query head: per-query-head bias must be honoured
    slopes = torch.tensor([0.1, 0.7, 1.3, 2.9], dtype=dtype)
    ref2 = ref_attention(
        q, k, v, enable_gqa=True, mask=mask,
        score_mod=lambda s, b, h, qi, ki: s + slopes.to(torch.float64)[h] * (ki - qi),
    )
    got2 = ops.attention(q, k, v, enable_gqa=True, score_mod=opgen.scores.alibi(slopes), **kwargs)
    _check(got2, ref2, dtype, f"GQA + alibi L={L}", seed)


# semantics against independent formulations, on the reference interpreter (kernels: tests/targets)
pytestmark = pytest.mark.usefixtures("reference_backend")
