"""The TVM CPU flash-attention backward (``opgen.targets.tvm.attention_backward``).

Every case builds the attention op with ``opgen.ops.attention.trace`` + ``declare_attention`` on FlexAttention-style
mods, runs ``attention_backward`` and compares dq, dk, dv with torch autograd through an independent dense
formulation written here (masked scores, ``logsumexp``, ``exp``, ``@ v``, all in float64; fully masked rows give
zero output). ``out`` and ``lse`` come from that reference too. Tile tables are built by brute force: the mask
is evaluated densely with torch and every (query tile, key tile) pair classified (all true: full, none: omitted,
else partial); some cases use tables that list every tile as partial, or as full when there is no mask.

Data is fresh random data (the seed is in every failure message); sizes are not powers of two, tiles are ragged
(L=97, S=61), and size-1 axes occur (B=1, HQ=1, L=1).
Tolerances (max abs error over all elements): float64 ``1e-9 * max(1, max|ref|)``; float32 ``5e-5 * max(1,
max|ref|)`` (the kernel computes in float32 with a polynomial exp; observed errors are ~1e-6).
One kernel cache serves the module; most cases run the fused schedule (one kernel per mod and tile config) to keep
the compile time of the file low (~1 s per kernel); the separate schedule (dq kernel + dk/dv kernel) runs for GQA.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

pytest.importorskip("tvm")

from opgen import masks, scores  # noqa: E402
from opgen.ir import DType, as_dtype  # noqa: E402
from opgen.ir.passes.attention import fuse_attention  # noqa: E402
from opgen.ops.attention import declare_attention, trace  # noqa: E402
from opgen.targets.tvm.attention_backward import (AttentionBackwardConfig, as_backward_config,  # noqa: E402
                                                  attention_backward, default_backward_config,
                                                  render_attention_backward)
from opgen.targets.tvm.compile import KernelCache  # noqa: E402

F32, F64 = torch.float32, torch.float64
TOL = {F32: 5e-5, F64: 1e-9}
CACHE = KernelCache()


# ------------------------------------------------------------------------------------------------ helpers


class Rand:
    def __init__(self) -> None:
        self.seed = random.randrange(2**31)
        self.g = torch.Generator().manual_seed(self.seed)

    def randn(self, *shape, dtype=F64, scale=1.0):
        return (scale * torch.randn(*shape, generator=self.g, dtype=F64)).to(dtype)


@pytest.fixture
def rnd() -> Rand:
    return Rand()


def make_group(dtype, score_mod=None, mask_mod=None, gqa=False, scale=0.3):
    idt = DType.f32 if dtype == F32 else DType.f64
    tr = trace("test", score_mod, mask_mod, idt)
    caps = tuple((as_dtype(t.dtype), d) for t, d in zip(tr.captures, tr.capture_dims))
    op = declare_attention(idt, idt, idt, scale, gqa, tr.score, tr.mask, caps)
    return fuse_attention(op), {f"capture{n}": t for n, t in enumerate(tr.captures)}


def dense_mask(mask_mod, B, HQ, L, S):
    """The mask on the full [B, HQ, L, S] grid (all true without a mask)."""
    if mask_mod is None:
        return torch.ones(B, HQ, L, S, dtype=torch.bool)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(HQ).view(1, HQ, 1, 1)
    i = torch.arange(L).view(1, 1, L, 1)
    j = torch.arange(S).view(1, 1, 1, S)
    return torch.as_tensor(mask_mod(b, h, i, j)).expand(B, HQ, L, S)


def reference(q, k, v, dout, score_mod, mask, scale):
    """out, lse, dq, dk, dv by autograd through a dense float64 masked softmax (zero rows where all masked)."""
    B, HQ, L, _ = q.shape
    HKV, S = k.shape[1], k.shape[2]
    q, k, v = (x.detach().to(F64).requires_grad_() for x in (q, k, v))
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if score_mod is not None:
        b = torch.arange(B).view(B, 1, 1, 1)
        h = torch.arange(HQ).view(1, HQ, 1, 1)
        i = torch.arange(L).view(1, 1, L, 1)
        j = torch.arange(S).view(1, 1, 1, S)
        s = score_mod(s, b, h, i, j)
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = p @ vv
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(F64))
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    return out.detach(), lse.detach(), dq, dk, dv


def tile_kinds(mask, BM, BN):
    """[Bt, Ht, NQ, NK] int: 0 empty, 1 partial, 2 full (in-range elements only); Bt/Ht 1 when broadcast."""
    if bool((mask == mask[:1]).all()):
        mask = mask[:1]
    if bool((mask == mask[:, :1]).all()):
        mask = mask[:, :1]
    Bt, Ht, L, S = mask.shape
    nq, nk = -(-L // BM), -(-S // BN)
    pad = (0, nk * BN - S, 0, nq * BM - L)
    anyv = torch.nn.functional.pad(mask, pad, value=False).view(Bt, Ht, nq, BM, nk, BN).any(-1).any(3)
    allv = torch.nn.functional.pad(mask, pad, value=True).view(Bt, Ht, nq, BM, nk, BN).all(-1).all(3)
    return torch.where(~anyv, 0, torch.where(allv, 2, 1))


def lists(kind):
    """(count, index, masked) int32 from [Bt, Ht, N, M] tile kinds (visit order ascending)."""
    Bt, Ht, N, M = kind.shape
    count = (kind > 0).sum(-1).to(torch.int32)
    W = max(1, int(count.max()))
    index = torch.zeros(Bt, Ht, N, W, dtype=torch.int32)
    masked = torch.zeros(Bt, Ht, N, W, dtype=torch.int32)
    for b in range(Bt):
        for h in range(Ht):
            for n in range(N):
                tiles = torch.nonzero(kind[b, h, n] > 0).flatten()
                index[b, h, n, :len(tiles)] = tiles.to(torch.int32)
                masked[b, h, n, :len(tiles)] = (kind[b, h, n, tiles] == 1).to(torch.int32)
    return count, index, masked


def tables(mask, BM, BN, every: str | None = None):
    """rows and cols tile tables of ``mask``; ``every`` "partial" / "full" lists every tile with that flag."""
    kind = tile_kinds(mask, BM, BN)
    if every is not None:
        kind = torch.full_like(kind, 1 if every == "partial" else 2)
    return lists(kind), lists(kind.transpose(-1, -2))


def check(rnd, dtype, *, score_mod=None, mask_mod=None, B=1, HQ=2, HKV=None, L=37, S=37, E=12, EV=20,
          BM=16, BN=16, mode="fused", every=None, vector=0, reg_rows=4):
    HKV = HKV or HQ
    group, caps = make_group(dtype, score_mod, mask_mod, gqa=HKV != HQ)
    q, k = rnd.randn(B, HQ, L, E, dtype=dtype), rnd.randn(B, HKV, S, E, dtype=dtype)
    v, dout = rnd.randn(B, HKV, S, EV, dtype=dtype), rnd.randn(B, HQ, L, EV, dtype=dtype)
    mask = dense_mask(mask_mod, B, HQ, L, S)
    out, lse, dq, dk, dv = reference(q, k, v, dout, score_mod, mask, group.scale)
    rows, cols = tables(mask, BM, BN, every)
    cfg = AttentionBackwardConfig(block_m=BM, block_n=BN, dq_mode=mode, vector=vector, reg_rows=reg_rows)
    got = attention_backward(group, {"q": q, "k": k, "v": v, **caps}, out.to(dtype), lse.to(dtype), dout,
                             rows, cols, cfg, CACHE)
    for name, ref in (("q", dq), ("k", dk), ("v", dv)):
        g = got[name]
        assert g.dtype == dtype and g.shape == ref.shape, (name, g.dtype, g.shape)
        assert torch.isfinite(g).all(), f"d{name} has non-finite values (seed {rnd.seed})"
        err = (g.to(F64) - ref).abs().max().item()
        tol = TOL[dtype] * max(1.0, ref.abs().max().item())
        assert err <= tol, f"d{name}: max error {err:.3e} > {tol:.1e} (seed {rnd.seed}, {mode}, {dtype})"
    return got, mask


# ------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("case", ["none", "causal", "sliding", "neighborhood_2d", "swin_shift"])
def test_masks_fp64(rnd, case):
    kw = {"none": dict(B=2, HQ=3, L=97, S=61),
          "causal": dict(L=97, S=97, BM=16, BN=24),
          "sliding": dict(mask_mod=masks.sliding_window(17), L=100, S=100, BM=12, BN=8),
          "neighborhood_2d": dict(mask_mod=masks.neighborhood_2d(9, 11, 3), L=99, S=99, BM=16, BN=16),
          "swin_shift": dict(mask_mod=masks.swin_window(8, 12, 4, 2), L=96, S=96, BM=16, BN=16)}[case]
    if case == "causal":
        kw["mask_mod"] = masks.causal
    check(rnd, F64, **kw)


def test_fully_masked_rows_and_register_tile_remainders(rnd):
    """Rows that see no key get zero gradients (no NaN); also tiles and head dims that are not multiples of the
    register tile (block_m 10 = 3 * 3 + 1 rows), of the vector width or of each other (E=5, EV=3)."""
    def mask_mod(b, h, i, j):   # rows i % 7 == 3 see no key
        return (j <= i) & (i % 7 != 3)

    group, _ = make_group(F64, None, mask_mod)
    cfg = AttentionBackwardConfig(block_m=10, block_n=8, reg_rows=3, reg_vectors=2, vector=4)
    text = render_attention_backward(group, cfg, head_dim=5, value_dim=3, dtype=DType.f64,
                                     mode="fused").kernels[0].text
    assert "acc_1_" in text and "acc_3_" in text
    got, mask = check(rnd, F64, mask_mod=mask_mod, L=45, S=45, E=5, EV=3, BM=10, BN=8, reg_rows=3, vector=4)
    dead = ~mask[0, 0].any(-1)
    assert int(dead.sum()) == 6
    assert (got["q"][:, :, dead] == 0).all()


def test_data_dependent_mask(rnd):
    doc = torch.tensor([0] * 20 + [1] * 23 + [2] * 10)

    def mask_mod(b, h, i, j):
        return (doc[i] == doc[j]) & (j <= i)

    check(rnd, F64, mask_mod=mask_mod, L=53, S=53, BM=16, BN=8)


# ---------------------------------------------------------------------------------------------- score mods


def rel_bias(length: int, heads: int, dtype):
    table = torch.randn(heads, 2 * length - 1, dtype=F64).to(dtype)

    def score_mod(score, b, h, i, j):
        return score + table[h, i - j + (length - 1)]

    return score_mod


@pytest.mark.parametrize("case", ["alibi", "softcap", "rel_bias"])
def test_score_mods_fp64(rnd, case):
    if case == "alibi":
        check(rnd, F64, score_mod=scores.alibi(scores.alibi_slopes(3).to(F64)), mask_mod=masks.causal, HQ=3,
              L=50, S=50, BM=16, BN=16)
    elif case == "softcap":
        check(rnd, F64, score_mod=scores.softcap(1.5), L=40, S=45, BM=16, BN=16)
    else:
        check(rnd, F64, score_mod=rel_bias(60, 2, F64), mask_mod=masks.causal, L=60, S=60, BM=16, BN=16)


def test_fp32_softcap_of_alibi_causal_ragged(rnd):
    """float32 (polynomial exp and tanh): soft-capped ALiBi scores under a causal mask, ragged tiles."""
    alibi, cap = scores.alibi(scores.alibi_slopes(3)), scores.softcap(2.0)

    def score_mod(score, b, h, i, j):
        return cap(alibi(score, b, h, i, j), b, h, i, j)

    check(rnd, F32, score_mod=score_mod, mask_mod=masks.causal, HQ=3, L=97, S=97, BM=16, BN=24)


# ----------------------------------------------------------------------------------------- gqa and schedules


@pytest.mark.parametrize("mode", ["fused", "separate"])
def test_gqa_head_dependent_mask(rnd, mode):
    """HQ=6 query heads over HKV=2 kv heads; the mask depends on the head, so the tables have Ht = HQ."""
    def mask_mod(b, h, i, j):
        return (j <= i) | (h % 3 == 1)

    got, mask = check(rnd, F64, mask_mod=mask_mod, B=2, HQ=6, HKV=2, L=50, S=50, BM=16, BN=16, mode=mode)
    assert tile_kinds(mask, 16, 16).shape[:2] == (1, 6)


@pytest.mark.parametrize("every", ["partial", "full"])
def test_tables_listing_every_tile(rnd, every):
    """A table that lists every tile (as partial, or as full without a mask) gives the same gradients."""
    check(rnd, F64, B=2, HQ=3, L=97, S=61, every=every)


def test_every_tile_partial_with_mask(rnd):
    check(rnd, F64, mask_mod=masks.causal, L=97, S=97, BM=16, BN=24, every="partial")


@pytest.mark.parametrize("L,S,HQ", [(1, 61, 1), (97, 61, 3), (61, 1, 2), (1, 1, 1)])
def test_sizes(rnd, L, S, HQ):
    check(rnd, F64, B=1, HQ=HQ, L=L, S=S)


# ---------------------------------------------------------------------------------------------- config, errors


def test_config_json_round_trip():
    cfg = AttentionBackwardConfig(block_m=32, block_n=48, vector=8, reg_rows=6, dq_mode="separate")
    assert AttentionBackwardConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert as_backward_config(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown knobs"):
        AttentionBackwardConfig.from_json({"block_m": 16, "tile": 3})
    with pytest.raises(ValueError, match="dq_mode"):
        AttentionBackwardConfig(dq_mode="atomic")
    with pytest.raises(ValueError, match="multiple of vector"):
        AttentionBackwardConfig(block_n=20, vector=8)


def test_default_config_and_foreign_config():
    d = default_backward_config(dtype=DType.f32)
    assert d.block_m == d.block_n == 64 and d.vector >= 1 and d.block_n % d.vector == 0

    class Forward:   # any object with block_m / block_n (a forward config)
        block_m, block_n, vector, fast_math = 32, 16, 16, False

    cfg = as_backward_config(Forward(), DType.f64)
    assert (cfg.block_m, cfg.block_n, cfg.fast_math) == (32, 16, False)
    assert cfg.block_n % cfg.vector == 0
    with pytest.raises(TypeError, match="block_m"):
        as_backward_config(object())


def test_wrong_table_size_is_an_error(rnd):
    group, _ = make_group(F64, None, None)
    q = rnd.randn(1, 1, 20, 12)
    k, v = rnd.randn(1, 1, 20, 12), rnd.randn(1, 1, 20, 20)
    out, lse, dout = rnd.randn(1, 1, 20, 20), rnd.randn(1, 1, 20), rnd.randn(1, 1, 20, 20)
    rows, cols = tables(torch.ones(1, 1, 20, 20, dtype=torch.bool), 8, 8)   # tables for 8 x 8 tiles
    cfg = AttentionBackwardConfig(block_m=16, block_n=16)
    with pytest.raises(ValueError, match="query tiles"):
        attention_backward(group, {"q": q, "k": k, "v": v}, out, lse, dout, rows, cols, cfg, CACHE)
    with pytest.raises(TypeError, match="rows"):
        attention_backward(group, {"q": q, "k": k, "v": v}, out, lse, dout, object(), cols, cfg, CACHE)


def test_sources_are_symbolic():
    """One kernel text per (group, config, dtype, head dims): sizes are T.int32 vars, not literals."""
    group, _ = make_group(F32, None, masks.causal)
    cfg = as_backward_config(AttentionBackwardConfig(block_m=16, block_n=16), DType.f32)
    src = render_attention_backward(group, cfg, head_dim=12, value_dim=20, dtype=DType.f32, mode="separate")
    assert [k.name for k in src.kernels] == ["dq", "dkdv"]
    for k in src.kernels:
        for var in ("n_B = T.int32()", "n_HQ = T.int32()", "n_L = T.int32()", "n_S = T.int32()"):
            assert var in k.text
        assert "T.exp(" not in k.text        # float32 uses the polynomial exp
