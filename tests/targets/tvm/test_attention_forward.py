"""The TVM CPU flash-attention forward kernel (``opgen.targets.tvm.attention``) against plain torch.

Every case builds the attention op the way ``opgen.ops.attention`` does (the mods are traced into IR), runs
:func:`attention_forward` with a tile table built here by brute force (the mask evaluated densely with torch,
tiles classified full / partial / empty), and compares ``out`` and ``lse`` with an independent float64 torch
formulation: the dense score matrix ``q @ k^T * scale``, the same ``score_mod`` / ``mask_mod`` functions applied
to broadcast index tensors (FlexAttention semantics), ``masked_fill(-inf)``, ``logsumexp`` and a softmax whose
fully masked rows are 0. Dense no-mask and causal cases are also checked against
``F.scaled_dot_product_attention``. Data is fresh random data (the seed is in every failure message).

Tolerances: float32 ``2e-5 * max(1, max|expected|)`` absolute on every element (out and finite lse; -inf lse
must match exactly); float64 ``1e-10`` likewise.

Kernels are compiled once per (mask, score mod, dtype, head dims, config) into a module-wide cache; the sizes are
symbolic, so the ragged, L != S and size-1 cases reuse the kernels of the other cases.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

from opgen import masks, scores  # noqa: E402
from opgen.ir import DType  # noqa: E402
from opgen.ir.passes.attention import fuse_attention  # noqa: E402
from opgen.ops.attention import declare_attention, trace  # noqa: E402
from opgen.targets.tvm.attention import (AttentionConfig, AttentionKernelError, as_attention_config,  # noqa: E402
                                         attention_forward, attention_space, check_attention_config,
                                         check_tile_table, default_attention_config, render_attention_forward)
from opgen.targets.tvm.compile import KernelCache  # noqa: E402

F32, F64 = torch.float32, torch.float64
IR = {F32: DType.f32, F64: DType.f64}
TOL = {F32: 2e-5, F64: 1e-10}
# small tiles and register blocks that do not divide them: every tail path of the kernel runs
CFG = AttentionConfig(block_m=16, block_n=16, vector=8, qk_rows=3, qk_vectors=2, pv_rows=3, pv_vectors=1)
CFG64 = AttentionConfig(block_m=8, block_n=8, vector=4, qk_rows=3, qk_vectors=1, pv_rows=3, pv_vectors=2)


@pytest.fixture(scope="module")
def cache() -> KernelCache:
    return KernelCache()


@pytest.fixture
def seed() -> int:
    return random.randrange(2**31)


# ------------------------------------------------------------------------------------------------ helpers


def make_group(score_mod=None, mask_mod=None, dtype=F32, gqa=False, scale=0.5):
    """(attention group, captured tensors by input name), as opgen.ops.attention declares it."""
    tr = trace("test", score_mod, mask_mod, DType.f64 if dtype == F64 else DType.f32)
    caps = tuple((IR.get(t.dtype, DType.i64 if t.dtype == torch.int64 else DType.i32) if t.dtype != torch.bool
                  else DType.bool, d) for t, d in zip(tr.captures, tr.capture_dims))
    op = declare_attention(IR[dtype], IR[dtype], IR[dtype], scale, gqa, tr.score, tr.mask, caps)
    return fuse_attention(op), {f"capture{n}": t for n, t in enumerate(tr.captures)}


def index_grids(B, H, L, S):
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(L).view(1, 1, L, 1), torch.arange(S).view(1, 1, 1, S))


def dense_mask(mask_mod, B, H, L, S) -> torch.Tensor:
    """The mask as a bool tensor broadcastable to [B, H, L, S] (all true without a mask_mod)."""
    if mask_mod is None:
        return torch.ones(1, 1, L, S, dtype=torch.bool)
    return torch.as_tensor(mask_mod(*index_grids(B, H, L, S))).to(torch.bool)


def tile_table(mask: torch.Tensor, L, S, bm, bn, all_partial=False, list_empty=False):
    """Brute-force (count, index, masked) from a dense bool mask [Bt, Ht, L, S] (Bt, Ht are 1 or full).

    all_partial marks every listed tile partial; list_empty also lists the empty tiles (as partial)."""
    Bt, Ht = mask.shape[0], mask.shape[1]
    mask = mask.expand(Bt, Ht, L, S)
    nq, nk = -(-L // bm), -(-S // bn)
    rows = {}
    for b in range(Bt):
        for h in range(Ht):
            for t in range(nq):
                ent = []
                for u in range(nk):
                    blk = mask[b, h, t * bm:(t + 1) * bm, u * bn:(u + 1) * bn]
                    if blk.any() or list_empty:
                        ent.append((u, 1 if (all_partial or not bool(blk.all())) else 0))
                rows[b, h, t] = ent
    W = max(1, max(len(e) for e in rows.values()))
    count = torch.zeros(Bt, Ht, nq, dtype=torch.int32)
    index = torch.full((Bt, Ht, nq, W), -7, dtype=torch.int32)     # padding is never read
    masked = torch.full((Bt, Ht, nq, W), 5, dtype=torch.int32)
    for (b, h, t), ent in rows.items():
        count[b, h, t] = len(ent)
        for n, (u, m) in enumerate(ent):
            index[b, h, t, n], masked[b, h, t, n] = u, m
    return count, index, masked


def reference(q, k, v, score_mod, mask_mod, scale):
    """float64 dense attention with FlexAttention semantics: (out, lse)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    B, H, L, _ = q.shape
    S = k.shape[2]
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * scale
    if score_mod is not None:
        s = score_mod(s, *index_grids(B, H, L, S)).to(F64)
    s = s.masked_fill(~dense_mask(mask_mod, B, H, L, S), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def rand(seed, *shape, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def assert_close(got, want, dtype, what, seed):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    want = want.to(F64)
    got = got.to(F64)
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), \
        f"{what}: infinities differ (seed {seed})"
    assert not torch.isnan(got).any(), f"{what}: NaN in the result (seed {seed})"
    fin = ~inf
    if not fin.any():
        return
    tol = TOL[dtype] * max(1.0, want[fin].abs().max().item())
    err = (got[fin] - want[fin]).abs().max().item()
    assert err <= tol, f"{what}: max |error| {err:.3g} > {tol:.3g} (seed {seed})"


def run_case(cache, seed, *, B=2, H=3, HKV=None, L=37, S=None, E=5, EV=7, score_mod=None, mask_mod=None,
             dtype=F32, cfg=None, scale=0.5, table_kw=None, per_head_table=False, group=None):
    """Run the kernel and compare with the dense reference; returns (out, lse)."""
    S = L if S is None else S
    HKV = H if HKV is None else HKV
    cfg = cfg or (CFG64 if dtype == F64 else CFG)
    if group is None:
        group, caps = make_group(score_mod, mask_mod, dtype, gqa=HKV != H, scale=scale)
    else:
        group, caps = group
    q = rand(seed, B, H, L, E, dtype=dtype)
    k = rand(seed + 1, B, HKV, S, E, dtype=dtype)
    v = rand(seed + 2, B, HKV, S, EV, dtype=dtype)
    mask = dense_mask(mask_mod, B, H, L, S)
    if per_head_table:
        mask = mask.expand(B, H, L, S)
    rows = tile_table(mask, L, S, cfg.block_m, cfg.block_n, **(table_kw or {}))
    res = attention_forward(group, {"q": q, "k": k, "v": v, **caps}, rows, cfg, cache, validate=True)
    want_out, want_lse = reference(q, k, v, score_mod, mask_mod, scale)
    assert_close(res["out"], want_out, dtype, "out", seed)
    assert_close(res["lse"], want_lse, dtype, "lse", seed)
    return res, (q, k, v)


# ------------------------------------------------------------------------------------------------- masks


def test_no_mask_matches_sdpa(cache, seed):
    res, (q, k, v) = run_case(cache, seed, L=37, S=29)
    want = F.scaled_dot_product_attention(q.to(F64), k.to(F64), v.to(F64), scale=0.5)
    assert_close(res["out"], want, F32, "out vs sdpa", seed)


@pytest.mark.parametrize("table_kw", [{}, {"all_partial": True}], ids=["full-tiles", "all-partial"])
def test_no_mask_table_kinds(cache, seed, table_kw):
    a, _ = run_case(cache, seed, L=40, S=33, table_kw=table_kw)
    b, _ = run_case(cache, seed, L=40, S=33, table_kw={})
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["lse"], b["lse"])


def test_causal_matches_sdpa(cache, seed):
    res, (q, k, v) = run_case(cache, seed, L=50, mask_mod=masks.causal)
    want = F.scaled_dot_product_attention(q.to(F64), k.to(F64), v.to(F64), is_causal=True, scale=0.5)
    assert_close(res["out"], want, F32, "out vs sdpa", seed)


@pytest.mark.parametrize("table_kw", [{"all_partial": True}, {"all_partial": True, "list_empty": True}],
                         ids=["all-partial", "empty-tiles-listed"])
def test_causal_partial_tables_same_result(cache, seed, table_kw):
    a, _ = run_case(cache, seed, L=45, mask_mod=masks.causal, table_kw=table_kw)
    b, _ = run_case(cache, seed, L=45, mask_mod=masks.causal)
    torch.testing.assert_close(a["out"], b["out"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a["lse"], b["lse"], rtol=1e-6, atol=1e-6)


def test_causal_per_head_table(cache, seed):
    run_case(cache, seed, B=2, H=3, L=33, mask_mod=masks.causal, per_head_table=True)


def test_sliding_window(cache, seed):
    run_case(cache, seed, L=83, mask_mod=masks.sliding_window(20))


def test_neighborhood_2d(cache, seed):
    run_case(cache, seed, B=1, H=2, L=9 * 7, mask_mod=masks.neighborhood_2d(9, 7, 3, dilation=(1, 2)))


def test_swin_shifted(cache, seed):
    run_case(cache, seed, B=1, H=2, L=8 * 12, mask_mod=masks.swin_window(8, 12, 4, shift=2))


def test_data_dependent_mask_and_fully_masked_rows(cache, seed):
    # document mask read from captured tensors; with S = 25 the rows of document 2 (31..44) see no key: query
    # tile 1 mixes visible and empty rows, tile 2 has no key tile at all (count 0)
    doc = torch.tensor([0] * 11 + [1] * 20 + [2] * 14)                  # int64 ids
    keep = torch.rand(25, generator=torch.Generator().manual_seed(seed)) > 0.3   # a bool capture
    keep[0] = keep[11] = True                                             # the first key of each document
    res, _ = run_case(cache, seed, L=45, S=25,
                      mask_mod=lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv) & keep[kv])
    assert torch.equal(res["out"][:, :, 31:], torch.zeros_like(res["out"][:, :, 31:]))
    assert torch.isneginf(res["lse"][:, :, 31:]).all() and torch.isfinite(res["lse"][:, :, :31]).all()


# ------------------------------------------------------------------------------------------- score mods


def test_alibi_causal(cache, seed):
    slopes = scores.alibi_slopes(3)
    run_case(cache, seed, L=41, score_mod=scores.alibi(slopes), mask_mod=masks.causal)


def test_relative_position_bias_table(cache, seed):
    L = 30
    bias = rand(seed + 9, 2 * L - 1)
    run_case(cache, seed, L=L, score_mod=lambda s, b, h, q, kv: s + bias[q - kv + L - 1])


def test_per_head_relative_bias(cache, seed):
    L = 26
    bias = rand(seed + 9, 3, 2 * L - 1)
    run_case(cache, seed, L=L, score_mod=lambda s, b, h, q, kv: s + bias[h, q - kv + L - 1],
             mask_mod=masks.causal)


def test_softcap(cache, seed):
    run_case(cache, seed, L=44, E=9, score_mod=scores.softcap(2.0), scale=3.0)


# ------------------------------------------------------------------------------------ shapes and layouts


def test_gqa(cache, seed):
    run_case(cache, seed, B=2, H=6, HKV=2, L=35, mask_mod=masks.causal)


@pytest.mark.parametrize("L,S", [(97, 61), (61, 97), (16, 16), (17, 1), (1, 23), (1, 1)])
def test_ragged_and_unequal_lengths(cache, seed, L, S):
    run_case(cache, seed, B=1, H=1, L=L, S=S)


@pytest.mark.parametrize("L,S", [(97, 61), (1, 9), (30, 30)])
def test_causal_ragged(cache, seed, L, S):
    run_case(cache, seed, B=1, H=2, L=L, S=S, mask_mod=masks.causal)


def test_large_values_are_stable(cache, seed):
    # scores of several hundred (q scaled up): the online max must keep exp in range
    group = make_group(mask_mod=masks.causal)
    q = rand(seed, 2, 3, 40, 5) * 40
    k, v = rand(seed + 1, 2, 3, 40, 5), rand(seed + 2, 2, 3, 40, 7)
    rows = tile_table(dense_mask(masks.causal, 2, 3, 40, 40), 40, 40, CFG.block_m, CFG.block_n)
    res = attention_forward(group[0], {"q": q, "k": k, "v": v}, rows, CFG, cache)
    want_out, want_lse = reference(q, k, v, None, masks.causal, 0.5)
    assert want_lse.abs().max() > 100
    assert_close(res["out"], want_out, F32, "out", seed)
    assert_close(res["lse"], want_lse, F32, "lse", seed)


# ----------------------------------------------------------------------------------------------- float64


def test_float64_alibi_causal(cache, seed):
    run_case(cache, seed, B=2, H=3, L=29, S=23, dtype=F64, score_mod=scores.alibi(scores.alibi_slopes(3)),
             mask_mod=masks.causal)


# ---------------------------------------------------------------------------------------- config, errors


def test_config_json_round_trip():
    cfg = AttentionConfig(block_m=32, block_n=48, pv_rows=6, fast_math=False)
    assert AttentionConfig.from_json(cfg.to_json()) == cfg
    assert as_attention_config(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown attention config knobs"):
        AttentionConfig.from_json({"block_m": 64, "tile": 3})


def test_config_checks_and_space():
    assert check_attention_config(AttentionConfig()) is None
    assert "multiple of vector" in check_attention_config(AttentionConfig(block_m=20, vector=8))
    group, _ = make_group(mask_mod=masks.causal)
    space = attention_space(group)
    names = {k.name for k in space.knobs}
    assert {"block_m", "block_n", "vector", "qk_rows", "pv_rows"} <= names
    assert all(isinstance(c, str) for c in space.constraints)
    d = default_attention_config(group, {"L": 4096, "S": 4096})
    assert check_attention_config(d) is None and d.block_m == 64
    small = default_attention_config(group, {"L": 10, "S": 12})
    assert small.block_m <= 16 and small.block_n <= 16


def test_unsupported_dtype_raises():
    group, _ = make_group(mask_mod=masks.causal)
    with pytest.raises(AttentionKernelError, match="not supported"):
        render_attention_forward(group, CFG, DType.f16, (8, 8))
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    rows = tile_table(dense_mask(None, 1, 1, 4, 4), 4, 4, 16, 16)
    with pytest.raises(AttentionKernelError, match="bfloat16"):
        attention_forward(group, {"q": q, "k": q, "v": q}, rows, CFG, KernelCache())


def test_bad_table_shape_raises(cache):
    group, _ = make_group(mask_mod=masks.causal)
    q = torch.randn(1, 1, 40, 5)
    rows = tile_table(dense_mask(masks.causal, 1, 1, 40, 40), 40, 40, 8, 8)    # tiles of 8, config says 16
    with pytest.raises(AttentionKernelError, match="query tiles of block_m=16"):
        attention_forward(group, {"q": q, "k": q, "v": q}, rows, CFG, cache)


def test_invalid_table_entries_are_reported(cache):
    group, _ = make_group(mask_mod=masks.causal)
    q = torch.randn(1, 1, 20, 5)
    count, index, masked = tile_table(dense_mask(masks.causal, 1, 1, 20, 20), 20, 20, 16, 16)
    assert check_tile_table((count, index, masked), 20, CFG) is None
    bad = index.clone()
    bad[0, 0, 1, 1] = 2                               # key tile 2 of a 20-key sequence in tiles of 16
    assert "key tiles must lie in [0, 2)" in check_tile_table((count, bad, masked), 20, CFG)
    with pytest.raises(AttentionKernelError, match="invalid tile table"):
        attention_forward(group, {"q": q, "k": q, "v": q}, (count, bad, masked), CFG, cache, validate=True)
    assert "counts" in check_tile_table((count + 5, index, masked), 20, CFG)


def test_empty_query_length(cache):
    group, _ = make_group(mask_mod=masks.causal)
    q, k = torch.randn(2, 3, 0, 5), torch.randn(2, 3, 4, 5)
    rows = (torch.zeros(1, 1, 0, dtype=torch.int32), torch.zeros(1, 1, 0, 1, dtype=torch.int32),
            torch.zeros(1, 1, 0, 1, dtype=torch.int32))
    res = attention_forward(group, {"q": q, "k": k, "v": torch.randn(2, 3, 4, 7)}, rows, CFG, cache)
    assert res["out"].shape == (2, 3, 0, 7) and res["lse"].shape == (2, 3, 0)
