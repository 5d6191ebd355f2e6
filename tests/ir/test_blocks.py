"""Symbolic block sparsity (opgen.ir.passes.blocks) against brute force.

The reference classifies tiles from the dense ``L x S`` mask computed by calling the original ``mask_mod`` on
torch index tensors (independent of the tracer and of interval arithmetic): all true -> full, none -> empty.
Soundness (full / empty never wrong) is asserted everywhere; exactness where the brief requires it.
All comparisons are exact integer / boolean equalities (no tolerances).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import sympy
import torch

import opgen.masks as M
from opgen.ir import IRError
from opgen.ir.passes.blocks import (EMPTY, FULL, PARTIAL, TileTable, classify_tiles, classify_tiles_runtime,
                                    compile_interval, describe, interval, kv_tile_bounds)
from opgen.ir.symbols import make_axes
from opgen.targets.reference.index_eval import eval_index
from opgen.ops.attention import trace

b, h, i, j = make_axes("b h i j")


@functools.lru_cache(maxsize=None)
def traced(mask_mod):
    """The traced mask (cached: tracing the NATTEN / Swin masks takes a while)."""
    return trace("test", None, mask_mod)


def dense(mask_mod, L, S, B=1, H=1):
    """The mask at every (b, h, q, k), from the original mask_mod on int32 index tensors."""
    bb = torch.arange(B, dtype=torch.int32).view(B, 1, 1, 1)
    hh = torch.arange(H, dtype=torch.int32).view(1, H, 1, 1)
    q = torch.arange(L, dtype=torch.int32).view(1, 1, L, 1)
    k = torch.arange(S, dtype=torch.int32).view(1, 1, 1, S)
    return torch.as_tensor(mask_mod(bb, hh, q, k)).expand(B, H, L, S)


def brute_kind(m: torch.Tensor, bm: int, bn: int) -> np.ndarray:
    """Tile classes from a dense mask: all true -> full, none -> empty (ragged tiles: in-range elements only)."""
    B, H, L, S = m.shape
    nq, nk = -(-L // bm), -(-S // bn)
    if L % bm or S % bn:
        pad = torch.zeros(B, H, nq * bm, nk * bn, dtype=torch.int8)
        pad[:, :, :L, :S] = m
        ones = torch.zeros_like(pad)
        ones[:, :, :L, :S] = 1
        t = pad.view(B, H, nq, bm, nk, bn).sum((3, 5), dtype=torch.int32)
        v = ones.view(B, H, nq, bm, nk, bn).sum((3, 5), dtype=torch.int32)
        return torch.where(t == 0, EMPTY, torch.where(t == v, FULL, PARTIAL)).to(torch.int8).numpy()
    tiles = m.reshape(B, H, nq, bm, nk, bn)
    some, every = tiles.any(5).any(3), tiles.all(5).all(3)
    return torch.where(~some, EMPTY, torch.where(every, FULL, PARTIAL)).to(torch.int8).numpy()


def kind_np(tab: TileTable, shape) -> np.ndarray:
    k = tab.kind if isinstance(tab.kind, np.ndarray) else tab.kind.cpu().numpy()
    return np.broadcast_to(k, shape)


def check(tab: TileTable, ref: np.ndarray, exact: bool = False) -> dict:
    k = kind_np(tab, ref.shape)
    bad_full = int(((k == FULL) & (ref != FULL)).sum())
    bad_empty = int(((k == EMPTY) & (ref != EMPTY)).sum())
    assert bad_full == 0 and bad_empty == 0, f"unsound: {bad_full} tiles wrongly full, {bad_empty} wrongly empty"
    loose = {"empty_as_partial": int(((k == PARTIAL) & (ref == EMPTY)).sum()),
             "full_as_partial": int(((k == PARTIAL) & (ref == FULL)).sum())}
    if exact:
        assert loose == {"empty_as_partial": 0, "full_as_partial": 0}, loose
    return loose


# ------------------------------------------------------------------------------------------------------------
# interval arithmetic

def _boxes(rng, n, hi=300):
    a = rng.integers(0, hi, (2, n))
    c = rng.integers(0, hi, (2, n))
    return np.sort(a, 0), np.sort(c, 0)


def _dense_values(expr, a0, a1, c0, c1) -> torch.Tensor:
    """``expr`` at every point of the box, by the reference interpreter's index evaluator (exact integers)."""
    ii = torch.arange(int(a0), int(a1) + 1).view(-1, 1)
    jj = torch.arange(int(c0), int(c1) + 1).view(1, -1)
    return torch.as_tensor(eval_index(expr, {i: ii, j: jj})).expand(len(ii), jj.shape[1])


def _brute_range(expr, a, c):
    out = []
    for (a0, a1), (c0, c1) in zip(a.T, c.T, strict=True):
        v = _dense_values(expr, a0, a1, c0, c1)
        out.append((int(v.min()), int(v.max())))
    return np.array(out).T


def test_interval_exact_on_affine_forms():
    rng = np.random.default_rng(0)
    (a0, a1), (c0, c1) = _boxes(rng, 200)
    lo, hi = interval(i - j, {i: (a0, a1), j: (c0, c1)})
    assert np.array_equal(lo, a0 - c1) and np.array_equal(hi, a1 - c0)
    lo, hi = interval(3 * i - 2 * j + 7, {i: (a0, a1), j: (c0, c1)})
    assert np.array_equal(lo, 3 * a0 - 2 * c1 + 7) and np.array_equal(hi, 3 * a1 - 2 * c0 + 7)


@pytest.mark.parametrize("expr", [
    sympy.floor(i / 7) - sympy.floor(j / 5), sympy.Mod(i + 3, 16), sympy.Mod(i - j, 9), sympy.Abs(i - j - 20),
    sympy.Min(i, j + 4) - sympy.Max(i // 2, 3), sympy.Piecewise((i - j, i < 100), (sympy.Mod(j, 7), True)),
    sympy.ceiling(i / 3) * 2 - j, (i - 150) * (j - 100), sympy.floor((i + 2 * j) / 6),
])
def test_interval_sound_integer(expr):
    rng = np.random.default_rng(1)
    a, c = _boxes(rng, 60, hi=200)
    lo, hi = interval(expr, {i: (a[0], a[1]), j: (c[0], c[1])})
    ref_lo, ref_hi = _brute_range(expr, a, c)
    assert (lo <= ref_lo).all() and (hi >= ref_hi).all()
    pts = interval(expr, {i: (a[0], a[0]), j: (c[0], c[0])})      # exact at points
    assert np.array_equal(pts[0], pts[1])


@pytest.mark.parametrize("pred", [
    i >= j, sympy.And(i - j >= 0, i - j < 37), sympy.Abs(i - j) < 11, sympy.Or(j < 30, i >= j),
    sympy.Eq(sympy.Mod(i, 3), sympy.Mod(j, 3)), sympy.Ne(i // 16, j // 16), sympy.Not(i > j + 5),
    sympy.ITE(i < 100, j < 50, j > 150), sympy.Xor(i < j, j < 90),
    sympy.Eq(sympy.Piecewise((0, sympy.Mod(i, 40) < 20), (1, True)), sympy.Piecewise((0, j < 77), (1, True))),
])
def test_interval_three_valued_sound(pred):
    rng = np.random.default_rng(2)
    a, c = _boxes(rng, 60, hi=200)
    may_t, may_f = interval(pred, {i: (a[0], a[1]), j: (c[0], c[1])})
    for n, ((a0, a1), (c0, c1)) in enumerate(zip(a.T, c.T, strict=True)):
        v = _dense_values(pred, a0, a1, c0, c1)
        assert may_t[n] or not v.any()
        assert may_f[n] or v.all()


def test_interval_torch_backend_matches_numpy():
    pred = traced(M.swin_window(16, 24, 8, 3)).mask.sym.xreplace({})
    rng = np.random.default_rng(3)
    a, c = _boxes(rng, 50, hi=384)
    env = {i: (a[0], a[1]), j: (c[0], c[1])}
    t_env = {s: (torch.as_tensor(lo), torch.as_tensor(hi)) for s, (lo, hi) in env.items()}
    n_t, n_f = interval(pred, env)
    t_t, t_f = interval(pred, t_env)
    assert np.array_equal(n_t, t_t.numpy()) and np.array_equal(n_f, t_f.numpy())


@pytest.mark.parametrize("expr, name", [(sympy.sin(i) < 1, "sin"), (sympy.Mod(i, j) < 3, "Mod"),
                                        (sympy.floor(i / j) < 2, "division"), (i / 3 + j < 2 * i / 5 + 0, None)])
def test_interval_unsupported_raises_or_handles_rationals(expr, name):
    env = {i: (np.array([0]), np.array([10])), j: (np.array([1]), np.array([5]))}
    if name is None:                                   # a rational comparison is multiplied through: supported
        t, f = interval(expr, env)
        assert t.shape == (1,)
        return
    with pytest.raises(IRError, match=name):
        interval(expr, env)


def test_compile_once_is_cached():
    p = sympy.And(i >= j, i - j < 9)
    assert compile_interval(p) is compile_interval(p)


# ------------------------------------------------------------------------------------------------------------
# classification of traced masks vs brute force

AFFINE = [
    ("causal", M.causal),
    ("sliding_window(20)", M.sliding_window(20)),
    ("sliding_window(20, causal=False)", M.sliding_window(20, causal=False)),
    ("sliding_window(1)", M.sliding_window(1)),
    ("prefix_lm(30)", lambda b, h, q, k: (k < 30) | (q >= k)),
]


@pytest.mark.parametrize("name, mask", AFFINE)
@pytest.mark.parametrize("L, S, bm, bn", [(97, 130, 16, 32), (130, 97, 32, 16), (64, 64, 64, 64), (1, 1, 16, 16),
                                          (5, 77, 128, 8)])
@pytest.mark.parametrize("refine", [False, True])
def test_affine_masks_exact(name, mask, L, S, bm, bn, refine):
    tab = classify_tiles(traced(mask).mask.sym, L=L, S=S, block_m=bm, block_n=bn, refine=refine)
    assert tab.kind.shape == (1, 1, -(-L // bm), -(-S // bn)) and tab.kind.dtype == np.int8
    check(tab, brute_kind(dense(mask, L, S), bm, bn), exact=True)


STRUCTURED = [
    ("neighborhood_1d(7)", M.neighborhood_1d(7), M.neighborhood_1d(7, length=97), 97),
    ("neighborhood_1d(5, dilation=3)", M.neighborhood_1d(5, dilation=3), M.neighborhood_1d(5, 3, length=97), 97),
    ("neighborhood_2d(7x13, k3)", M.neighborhood_2d(7, 13, 3), None, 91),
    ("neighborhood_2d(10x13, k(3,5), d(2,1))", M.neighborhood_2d(10, 13, (3, 5), (2, 1)), None, 130),
    ("swin_window(8x16, w4)", M.swin_window(8, 16, 4), None, 128),
    ("swin_window(12x8, w4, s1)", M.swin_window(12, 8, 4, 1), None, 96),
]


@pytest.mark.parametrize("name, mask, plain, n", STRUCTURED)
@pytest.mark.parametrize("bm, bn", [(16, 32), (32, 16), (7, 9)])
def test_structured_masks_sound_and_refined_exact(name, mask, plain, n, bm, bn):
    ref = brute_kind(dense(plain or mask, n, n), bm, bn)
    pred = traced(mask).mask.sym
    check(classify_tiles(pred, L=n, S=n, block_m=bm, block_n=bn, refine=False), ref)
    check(classify_tiles(pred, L=n, S=n, block_m=bm, block_n=bn), ref, exact=True)


@pytest.mark.parametrize("mask, n, tile", [
    (M.neighborhood_2d(64, 64, 7), 64, 64), (M.swin_window(64, 64, 8, 4), 64, 64),
    (M.neighborhood_2d(32, 32, 7, 2), 32, 32), (M.swin_window(32, 32, 8), 32, 32),
    (M.neighborhood_1d(31, 3, length=2048), 2048, 64)],
                         ids=["nbhd2d_64_k7", "swin_64_w8_s4", "nbhd2d_32_k7_d2", "swin_32_w8", "nbhd1d_k31_d3"])
def test_standard_sizes_tight_without_refinement(mask, n, tile):
    """Image tokens with one image row per tile (64x64 image, 64x64 tiles): interval arithmetic alone is exact."""
    L = n * n if not isinstance(mask, M.neighborhood_1d) else n
    tab = classify_tiles(traced(mask).mask.sym, L=L, S=L, block_m=tile, block_n=tile, refine=False)
    check(tab, brute_kind(dense(mask, L, L), tile, tile), exact=True)


def test_refinement_removes_looseness_on_odd_sizes():
    mask = M.swin_window(24, 40, 8, 3)
    ref = brute_kind(dense(mask, 960, 960), 32, 16)
    pred = traced(mask).mask.sym
    loose = check(classify_tiles(pred, L=960, S=960, block_m=32, block_n=16, refine=False), ref)
    assert loose["empty_as_partial"] > 0        # interval arithmetic alone is loose when tiles straddle rows
    check(classify_tiles(pred, L=960, S=960, block_m=32, block_n=16), ref, exact=True)
    check(classify_tiles(pred, L=960, S=960, block_m=32, block_n=16, refine=1000), ref)   # tiny budget: sound


def test_per_head_and_per_batch_predicates():
    mask = lambda b, h, q, k: (q - k < 4 * (h + 1)) & (q >= k)      # noqa: E731
    tab = classify_tiles(traced(mask).mask.sym, L=45, S=45, block_m=8, block_n=4, B=2, H=3)
    assert tab.kind.shape == (1, 3, 6, 12)
    check(tab, brute_kind(dense(mask, 45, 45, 2, 3), 8, 4), exact=True)
    mask_b = lambda b, h, q, k: (b == 0) | (q >= k)                 # noqa: E731
    tab = classify_tiles(traced(mask_b).mask.sym, L=33, S=20, block_m=16, block_n=8, B=2, H=3)
    assert tab.kind.shape == (2, 1, 3, 3)
    check(tab, brute_kind(dense(mask_b, 33, 20, 2, 3), 16, 8), exact=True)
    assert tab.counts()["full"] + tab.counts()["partial"] + tab.counts()["empty"] == 2 * 3 * 3


def test_no_mask_and_constant_masks():
    for pred in (sympy.true, None):
        tab = classify_tiles(pred, L=50, S=70, block_m=16, block_n=32)
        assert tab.counts() == {"empty": 0, "partial": 0, "full": 4 * 3} and tab.density == 1.0
        count, index, masked = tab.rows()
        assert count.tolist() == [[[3] * 4]] and index[0, 0, 0].tolist() == [0, 1, 2] and masked.sum() == 0
    tab = classify_tiles(sympy.false, L=50, S=70, block_m=16, block_n=32)
    assert tab.counts()["empty"] == 12 and tab.density == 0.0
    assert tab.rows()[1].shape == (1, 1, 4, 1)


def test_dims_binding_and_errors():
    W = sympy.Symbol("W", integer=True, positive=True)
    tab = classify_tiles(sympy.And(i >= j, i - j < W), L=40, S=40, block_m=8, block_n=8, dims={"W": 10})
    check(tab, brute_kind(dense(M.sliding_window(10), 40, 40), 8, 8), exact=True)
    with pytest.raises(IRError, match="W"):
        classify_tiles(i - j < W, L=40, S=40, block_m=8, block_n=8)
    with pytest.raises(IRError, match="block_m"):
        classify_tiles(i >= j, L=40, S=40, block_m=0, block_n=8)
    with pytest.raises(IRError, match="predicate"):
        classify_tiles(i - j, L=40, S=40, block_m=8, block_n=8)


# ------------------------------------------------------------------------------------------------------------
# kernel lists

def _from_lists(count, index, masked, nk):
    out = np.zeros(tuple(count.shape) + (nk,), np.int8)
    for idx in np.ndindex(*count.shape):
        for n in range(int(count[idx])):
            out[idx + (int(index[idx + (n,)]),)] = PARTIAL if masked[idx + (n,)] else FULL
    return out


def test_rows_and_cols_round_trip():
    mask = lambda b, h, q, k: (q - k < 4 * (h + 1)) & (q >= k)      # noqa: E731
    tab = classify_tiles(traced(mask).mask.sym, L=45, S=50, block_m=8, block_n=4, H=3)
    count, index, masked = tab.rows()
    assert count.dtype == index.dtype == masked.dtype == torch.int32
    assert index.shape[-1] == int(count.max())
    assert np.array_equal(_from_lists(count, index, masked, tab.kv_tiles), tab.kind)
    for n in range(index.shape[-1]):                                # ascending key tiles
        if n:
            ok = count > n
            assert (index[..., n][ok] > index[..., n - 1][ok]).all()
    c2, i2, m2 = tab.cols()
    assert c2.shape == (1, 3, tab.kv_tiles)
    assert np.array_equal(_from_lists(c2, i2, m2, tab.q_tiles), np.swapaxes(tab.kind, -1, -2))
    c3, i3, _ = tab.rows(width=tab.kv_tiles + 2)
    assert i3.shape[-1] == tab.kv_tiles + 2 and torch.equal(c3, count)


# ------------------------------------------------------------------------------------------------------------
# data-dependent masks

def _runtime(mask_mod, L, S, bm, bn, B=1, H=1):
    tr = traced(mask_mod)
    tensors = {f"capture{n}": t for n, t in enumerate(tr.captures)}
    return classify_tiles_runtime(tr.mask, tensors, L=L, S=S, block_m=bm, block_n=bn, B=B, H=H)


def test_runtime_document_mask():
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 6, (211,), generator=g).sort().values
    for mask, exact in ((lambda b, h, q, k: doc[q] == doc[k], True),
                        (lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k), False)):
        tab = _runtime(mask, 211, 211, 16, 32)
        assert isinstance(tab.kind, torch.Tensor) and tab.kind.dtype == torch.int8
        check(tab, brute_kind(dense(mask, 211, 211), 16, 32), exact=exact)
    shuffled = doc[torch.randperm(211, generator=g)]
    mask = lambda b, h, q, k: shuffled[q] != shuffled[k]            # noqa: E731
    check(_runtime(mask, 211, 211, 16, 32), brute_kind(dense(mask, 211, 211), 16, 32))


def test_runtime_routing_mask():
    g = torch.Generator().manual_seed(1)
    route = torch.rand(2, 3, 4, 3, generator=g) > 0.5
    for bm, bn in ((64, 64), (16, 32), (48, 80)):
        mask = lambda b, h, q, k: route[b, h, q // 64, k // 64] & (q >= k)      # noqa: E731
        tab = _runtime(mask, 200, 150, bm, bn, B=2, H=3)
        assert tuple(tab.kind.shape) == (2, 3, -(-200 // bm), -(-150 // bn))
        check(tab, brute_kind(dense(mask, 200, 150, 2, 3), bm, bn), exact=(bm, bn) == (64, 64))


def test_runtime_float_and_length_masks():
    g = torch.Generator().manual_seed(2)
    slope = torch.randn(3, generator=g)
    mask = lambda b, h, q, k: slope[h] * (q - k) > 1.5               # noqa: E731
    check(_runtime(mask, 77, 90, 16, 16, H=3), brute_kind(dense(mask, 77, 90, 1, 3), 16, 16))
    vals = torch.randn(90, generator=g)
    vals[[3, 40, 41, 77]] = float("nan")
    for mask in (lambda b, h, q, k: vals[k] > 0.3, lambda b, h, q, k: vals[q] != vals[k] + 1.0):
        check(_runtime(mask, 90, 90, 16, 8), brute_kind(dense(mask, 90, 90), 16, 8))
    lens = torch.tensor([60, 13, 90])
    mask = lambda b, h, q, k: (k < lens[b]) & (q < lens[b])          # noqa: E731
    check(_runtime(mask, 90, 90, 16, 8, B=3), brute_kind(dense(mask, 90, 90, 3), 16, 8), exact=True)


def test_runtime_relative_position_table_and_index_masks():
    g = torch.Generator().manual_seed(3)
    rel = torch.randint(0, 4, (2 * 60 - 1,), generator=g)
    mask = lambda b, h, q, k: rel[q - k + 59] > 1                    # noqa: E731
    check(_runtime(mask, 60, 60, 8, 8), brute_kind(dense(mask, 60, 60), 8, 8))
    pred = traced(M.sliding_window(20)).mask                         # no tensors: same answer as compile time
    rt = classify_tiles_runtime(pred, {}, L=97, S=130, block_m=16, block_n=32)
    st = classify_tiles(pred, L=97, S=130, block_m=16, block_n=32, refine=False)
    assert np.array_equal(rt.kind.numpy(), st.kind)


def test_runtime_errors():
    tr = traced(lambda b, h, q, k: torch.arange(10)[q] > 3)
    with pytest.raises(IRError, match="capture0"):
        classify_tiles_runtime(tr.mask, {}, L=10, S=10, block_m=4, block_n=4)


# ------------------------------------------------------------------------------------------------------------
# loop bounds

t = sympy.Symbol("t", integer=True, nonnegative=True)


def test_kv_tile_bounds_closed_forms():
    first, stop = kv_tile_bounds(i >= j, i, j, 64, 32)
    assert first == 0 and sympy.simplify(stop - (sympy.floor((64 * t + 63) / 32) + 1)) == 0
    first, stop = kv_tile_bounds(traced(M.sliding_window(100)).mask.sym, i, j, 64, 64)
    assert sympy.simplify(first - sympy.Max(0, sympy.floor((64 * t - 99) / 64))) == 0 and stop == t + 1
    assert kv_tile_bounds(traced(M.swin_window(8, 8, 4)).mask.sym, i, j, 16, 16) is None
    assert kv_tile_bounds(sympy.Or(i >= j, j < 4), i, j, 16, 16) is None


@pytest.mark.parametrize("name, mask", AFFINE[:4] + [("per-head", lambda b, h, q, k: (q - k < 4 * (h + 1)) & (q >= k)),
                                                      ("band", lambda b, h, q, k: (k - q <= 9) & (q - k <= 3))])
@pytest.mark.parametrize("L, S, bm, bn", [(97, 130, 16, 32), (130, 97, 32, 16), (50, 50, 8, 8)])
def test_kv_tile_bounds_match_table(name, mask, L, S, bm, bn):
    pred = traced(mask).mask.sym
    H = 3
    tab = classify_tiles(pred, L=L, S=S, block_m=bm, block_n=bn, H=H)
    first, stop = kv_tile_bounds(pred, i, j, bm, bn, q_len=L, kv_len=S)
    for hh in range(tab.kind.shape[1]):
        for tq in range(tab.q_tiles):
            f = int(first.subs({t: tq, h: hh}))
            s = int(stop.subs({t: tq, h: hh}))
            visited = np.nonzero(tab.kind[0, hh, tq])[0]
            if len(visited):
                assert (f, s) == (visited.min(), visited.max() + 1), (tq, hh, f, s, visited)


# ------------------------------------------------------------------------------------------------------------
# scale and printing

def test_scale_16k_completes():
    for mask in (M.causal, M.sliding_window(256), M.swin_window(128, 128, 8, 4)):
        tab = classify_tiles(traced(mask).mask.sym, L=16384, S=16384, block_m=64, block_n=64)
        assert tab.kind.shape == (1, 1, 256, 256)
        assert sum(tab.counts().values()) == 65536
    assert tab.counts()["partial"] > 0 and tab.counts()["full"] == 0


def test_describe():
    tab = classify_tiles(i >= j, L=97, S=130, block_m=16, block_n=32)
    text = describe(tab)
    assert "16 x 32" in text and "full 9, partial 7, empty 19" in text and "density" in text
    pic = text.splitlines()[2:]
    assert len(pic) == 7 and all(len(r.strip()) == 5 for r in pic) and pic[0].strip() == "+...."
    big = describe(classify_tiles(i >= j, L=16384, S=16384, block_m=64, block_n=64))
    assert len(big.splitlines()) == 2
    heads = describe(classify_tiles(i - j < 4 * (h + 1), L=64, S=64, block_m=16, block_n=16, H=2))
    assert "1 x 2 tables" in heads and "b=0, h=0" in heads
