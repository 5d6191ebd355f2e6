"""Triton attention kernels (``opgen.targets.triton.attention``) without a GPU.

* Rendering, configs and argument errors run in-process (no triton import needed for most).
* Interpreter numerics: this file, run as a script with ``TRITON_INTERPRET=1`` (set before triton is imported,
  hence a subprocess), runs every case of :func:`cases` against an independent dense float64 torch formulation
  (``q k^T * scale -> score_mod -> masked_fill(-inf) -> softmax -> @ v``, a dense ``[B, H, L, S]`` mask from the
  same FlexAttention-style ``mask_mod`` evaluated on index tensors) and prints one ``OK``/``FAIL`` line per case.
  Tile tables are built by brute force from the dense mask (all true -> full, none -> omitted, else partial),
  or with every listed tile marked partial, or (no mask) every tile marked full. Padding entries of the tables
  point at tile 0 so that reading one would corrupt the result. Sizes are not multiples of the tiles.
  Tolerances (max abs error over max(1, max |ref|)): fp32 forward 2e-5, fp32 gradients 1e-4, fp16 forward 4e-3.
* AOT: the forward, backward and decode kernels of the default bf16 configs at head dims 64 and 128 compile for
  sm_90 with shared memory within the H100 limit and no register spills (skipped without the toolchain).

Usage as a script: ``TRITON_INTERPRET=1 python test_attention_triton.py CACHE_DIR [CASE ...]``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from opgen import masks, scores
from opgen.ir import DType
from opgen.ir.passes.attention import fuse_attention
from opgen.ops.attention import declare_attention, trace
from opgen.targets.triton import attention as A

HERE = Path(__file__).resolve()
H100_SMEM = 232448
F32, F64 = torch.float32, torch.float64
_IR = {torch.float16: DType.f16, torch.bfloat16: DType.bf16, torch.float32: DType.f32, torch.int64: DType.i64,
       torch.int32: DType.i32, torch.bool: DType.bool}


# ----------------------------------------------------------------------------------------------- helpers


def make_group(score_mod=None, mask_mod=None, dtype=torch.float32, gqa=False, scale=0.3):
    """(AttentionGroup, captured tensors) for FlexAttention-style mods, as ``opgen.ops.attention`` declares it."""
    t = trace("test", score_mod, mask_mod)
    caps = tuple((_IR[c.dtype], d) for c, d in zip(t.captures, t.capture_dims))
    ir = _IR[dtype]
    return fuse_attention(declare_attention(ir, ir, ir, scale, gqa, t.score, t.mask, caps)), list(t.captures)


def index_grids(B, H, L, S):
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1), torch.arange(L).view(1, 1, L, 1),
            torch.arange(S).view(1, 1, 1, S))


def dense_mask(mask_mod, B, H, L, S):
    """The mask as a dense bool tensor ``[B, H, L, S]`` (None: no mask)."""
    if mask_mod is None:
        return None
    return torch.as_tensor(mask_mod(*index_grids(B, H, L, S))).expand(B, H, L, S).clone()


def tile_tables(mask, B, H, L, S, bm, bn, mode="auto", transpose=False, reverse=False):
    """Brute-force tile tables ``(count, index, masked)`` (int32) from a dense mask.

    Rows (``transpose=False``): per query tile the key tiles; columns: per key tile the query tiles. ``mode``:
    "auto" (full/partial/empty from the mask), "partial" (every non-empty tile partial), "full" (every tile
    listed and full; only valid without a mask). Broadcast dims (b, h) are kept at size 1 when the mask does
    not depend on them. ``reverse`` lists the tiles in reverse order (the result must not depend on it).
    Mode "blocks" of :func:`cases` uses :func:`blocks_tables` (opgen's classifier) instead.
    """
    m = torch.ones(1, 1, L, S, dtype=torch.bool) if mask is None else mask
    if m.shape[0] > 1 and bool((m == m[:1]).all()):
        m = m[:1]
    if m.shape[1] > 1 and bool((m == m[:, :1]).all()):
        m = m[:, :1]
    Bt, Ht = m.shape[0], m.shape[1]
    NQ, NK = -(-L // bm), -(-S // bn)
    pad = torch.zeros(Bt, Ht, NQ * bm, NK * bn, dtype=torch.bool)
    valid = torch.zeros(1, 1, NQ * bm, NK * bn, dtype=torch.bool)
    pad[:, :, :L, :S] = m
    valid[:, :, :L, :S] = True
    t = pad.view(Bt, Ht, NQ, bm, NK, bn).sum((3, 5))
    n_valid = valid.view(1, 1, NQ, bm, NK, bn).sum((3, 5))
    listed = t > 0
    full = t == n_valid
    if mode == "full":
        assert mask is None
        listed = torch.ones_like(listed)
        full = torch.ones_like(full)
    elif mode == "partial":
        full = torch.zeros_like(full)
    if transpose:
        listed, full = listed.transpose(2, 3), full.transpose(2, 3)
    n_rows, n_cols = listed.shape[2], listed.shape[3]
    count = listed.sum(-1).to(torch.int32)
    W = max(1, int(count.max()))
    index = torch.zeros(Bt, Ht, n_rows, W, dtype=torch.int32)   # padding points at tile 0, flagged full
    flags = torch.zeros(Bt, Ht, n_rows, W, dtype=torch.int32)
    for b in range(Bt):
        for h in range(Ht):
            for r in range(n_rows):
                cols = [c for c in range(n_cols) if listed[b, h, r, c]]
                if reverse:
                    cols = cols[::-1]
                for w, c in enumerate(cols):
                    index[b, h, r, w] = c
                    flags[b, h, r, w] = 0 if full[b, h, r, c] else 1
    return count, index, flags


def blocks_tables(group, inputs, B, H, L, S, bm, bn, transpose=False):
    """Tile tables from opgen's own classifier (:mod:`opgen.ir.passes.blocks`): the interface the target uses."""
    from opgen.ir.passes.blocks import classify_tiles, classify_tiles_runtime

    if group.mask_predicate is not None:
        table = classify_tiles(group.mask_predicate, L=L, S=S, block_m=bm, block_n=bn, B=B, H=H)
    else:
        table = classify_tiles_runtime(group.mask, {n: inputs[n] for n in group.captures}, L=L, S=S, block_m=bm,
                                       block_n=bn, B=B, H=H)
    return table.cols() if transpose else table.rows()


def reference(q, k, v, scale, score_mod=None, mask=None):
    """Dense float64 attention: (out, lse) with zeros / -inf for fully masked rows; differentiable."""
    B, H, L, E = q.shape
    G = H // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if score_mod is not None:
        s = score_mod(s, *index_grids(B, H, L, k.shape[2]))
    vis = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    m = torch.where(vis, s, -math.inf).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.where(vis, torch.exp(s - m), torch.zeros_like(s))
    den = e.sum(-1, keepdim=True)
    out = e @ vv / torch.where(den > 0, den, torch.ones_like(den))
    lse = torch.where(den[..., 0] > 0, m[..., 0] + torch.log(den[..., 0].clamp_min(1e-300)), -math.inf)
    return out, lse


def _err(x, r):
    x, r = x.double(), r.double()
    fin = torch.isfinite(r)
    assert torch.equal(fin, torch.isfinite(x)), "non-finite pattern differs"
    if not fin.any():
        return 0.0
    return ((x[fin] - r[fin]).abs().max() / max(1.0, r[fin].abs().max())).item()


# ------------------------------------------------------------------------------------- interpreter cases


def _offset_causal(L, S):
    def mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (S - L)
    return mod


def _late_rows(b, h, q_idx, kv_idx):
    """Causal, and rows before 7 see nothing (fully masked rows)."""
    return (q_idx >= kv_idx) & (q_idx >= 7)


def cases():
    """name -> dict(B, H, HKV, L, S, E, EV, dtype, score, mask, bm, bn, modes (table kinds), backward (and
    bwd_modes: the table kinds it runs with, the first by default), splits (decode runs), reverse)."""
    slopes = scores.alibi_slopes(4)
    doc = torch.tensor([0] * 9 + [1] * 14 + [2] * 3 + [3] * 11)           # 37 tokens, 4 documents

    def doc_mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    bias = torch.randn(2, 33, 29, generator=torch.Generator().manual_seed(3))

    def bias_softcap(score, b, h, q_idx, kv_idx):
        """A captured [H, L, S] bias, then soft-capping: exercises masked 2-D capture loads and d(score_mod)."""
        return 2.0 * torch.tanh((score + bias[h, q_idx, kv_idx]) / 2.0)

    return {
        "causal_fp32": dict(B=2, H=2, HKV=2, L=37, S=37, E=24, EV=16, dtype=F32, score=None, mask=masks.causal,
                            bm=16, bn=16, modes=("auto", "partial"), backward=True),
        "dense_rect_fp32": dict(B=1, H=2, HKV=2, L=21, S=50, E=16, EV=40, dtype=F32, score=None, mask=None,
                                bm=16, bn=32, modes=("auto", "full"), backward=True, bwd_modes=("full",),
                                reverse=True),
        "window_alibi_gqa_fp32": dict(B=1, H=4, HKV=2, L=40, S=40, E=16, EV=16, dtype=F32,
                                      score=scores.alibi(slopes), mask=masks.sliding_window(11), bm=16, bn=16,
                                      modes=("auto",), backward=True),
        "softcap_causal_fp16": dict(B=1, H=2, HKV=2, L=37, S=37, E=24, EV=24, dtype=torch.float16,
                                    score=scores.softcap(5.0), mask=masks.causal, bm=16, bn=16, modes=("auto",),
                                    backward=False),
        "bias2d_softcap_gqa_fp32": dict(B=1, H=2, HKV=1, L=33, S=29, E=16, EV=16, dtype=F32, score=bias_softcap,
                                        mask=masks.causal, bm=16, bn=16, modes=("partial",), backward=True),
        "fully_masked_rows_fp32": dict(B=1, H=2, HKV=2, L=37, S=37, E=16, EV=16, dtype=F32, score=None,
                                       mask=_late_rows, bm=16, bn=16, modes=("auto",), backward=True),
        "document_mask_capture_fp32": dict(B=1, H=2, HKV=2, L=37, S=37, E=16, EV=16, dtype=F32, score=None,
                                           mask=doc_mask, bm=16, bn=16, modes=("auto", "blocks"), backward=True,
                                           bwd_modes=("blocks",)),
        "neighborhood_dilated_blocks_fp32": dict(B=1, H=1, HKV=1, L=45, S=45, E=16, EV=16, dtype=F32, score=None,
                                                 mask=masks.neighborhood_1d(7, 2), bm=16, bn=16,
                                                 ref_mask=masks.neighborhood_1d(7, 2, 45), modes=("blocks",),
                                                 backward=True),
        "decode_L1_gqa_fp32": dict(B=2, H=2, HKV=1, L=1, S=200, E=16, EV=24, dtype=F32, score=None, mask=None,
                                   bm=16, bn=32, modes=("auto",), backward=False, splits=(1, 4)),
        "decode_L3_offset_causal_fp32": dict(B=1, H=2, HKV=2, L=3, S=200, E=24, EV=16, dtype=F32, score=None,
                                             mask=_offset_causal(3, 200), bm=16, bn=16, modes=("auto",),
                                             backward=False, splits=(2, 8)),
    }


def run_case(name, c, cache_dir):
    """Run one case; yields (label, error summary) and raises AssertionError on a mismatch."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    B, H, HKV, L, S, E, EV, dt = (c[k] for k in ("B", "H", "HKV", "L", "S", "E", "EV", "dtype"))
    q = torch.randn(B, H, L, E, generator=g).to(dt)
    k = torch.randn(B, HKV, S, E, generator=g).to(dt)
    v = torch.randn(B, HKV, S, EV, generator=g).to(dt)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)      # a strided (non-contiguous) k
    group, caps = make_group(c["score"], c["mask"], dt, gqa=HKV != H)
    inputs = {"q": q, "k": k, "v": v, **{f"capture{n}": t for n, t in enumerate(caps)}}
    mask = dense_mask(c.get("ref_mask", c["mask"]), B, H, L, S)   # ref_mask: the same mask, usable outside opgen
    ref_out, ref_lse = reference(q, k, v, group.scale, c["score"], mask)
    tol = 2e-5 if dt == F32 else 4e-3
    cfg = A.TritonAttentionConfig(block_m=c["bm"], block_n=c["bn"], num_warps=4, num_stages=1)
    for mode in c["modes"]:
        if mode == "blocks":
            rows = blocks_tables(group, inputs, B, H, L, S, c["bm"], c["bn"])
        else:
            rows = tile_tables(mask, B, H, L, S, c["bm"], c["bn"], mode, reverse=c.get("reverse", False))
        splits = c.get("splits")
        runs = [("forward", None)] + [("decode", s) for s in splits] if splits else [("forward", None)]
        for kind, sp in runs:
            if kind == "forward":
                got = A.run_forward(group, inputs, rows, cfg, cache_dir=cache_dir)
            else:
                got = A.run_decode(group, inputs, rows, A.TritonAttentionConfig(
                    block_m=c["bm"], block_n=c["bn"], num_warps=4, num_stages=1, splits=sp), cache_dir=cache_dir)
            assert got["out"].dtype == dt and got["lse"].dtype == F32
            eo, el = _err(got["out"], ref_out), _err(got["lse"], ref_lse)
            assert eo <= tol and el <= tol, f"{kind} {mode}: out err {eo:.2e}, lse err {el:.2e} > {tol}"
            dead = torch.isinf(ref_lse)
            if dead.any():
                assert (got["out"][dead] == 0).all() and torch.isneginf(got["lse"][dead]).all()
            yield f"{kind}{'' if sp is None else f'[splits={sp}]'} {mode}", f"out {eo:.1e} lse {el:.1e}"
        if c["backward"] and mode in c.get("bwd_modes", c["modes"][:1]):
            yield from _backward(group, inputs, c, mask, rows, mode, cache_dir, ref_out, got)


def _backward(group, inputs, c, mask, rows, mode, cache_dir, ref_out, fwd):
    B, H, L, S = c["B"], c["H"], c["L"], c["S"]
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(ref_out.shape, generator=g).to(c["dtype"])
    leaves = {n: inputs[n].detach().double().requires_grad_(True) for n in ("q", "k", "v")}
    out, _ = reference(leaves["q"], leaves["k"], leaves["v"], group.scale, c["score"], mask)
    ref = torch.autograd.grad(out, [leaves[n] for n in ("q", "k", "v")], dout.double())
    if mode == "blocks":
        cols = blocks_tables(group, inputs, B, H, L, S, c["bm"], c["bn"], transpose=True)
    else:
        cols = tile_tables(mask, B, H, L, S, c["bm"], c["bn"], mode, transpose=True)
    cfg = A.TritonAttentionConfig(block_m=c["bm"], block_n=c["bn"], num_warps=4, num_stages=1)
    got = A.run_backward(group, inputs, fwd["out"], fwd["lse"], dout, rows, cols, cfg, cache_dir=cache_dir)
    errs = []
    for n, r in zip(("q", "k", "v"), ref):
        assert got[n].shape == inputs[n].shape and got[n].dtype == inputs[n].dtype
        e = _err(got[n], r)
        errs.append(f"d{n} {e:.1e}")
        assert e <= 1e-4, f"backward {mode}: d{n} error {e:.2e} > 1e-4"
    yield f"backward {mode}", ", ".join(errs)


def main(argv):
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    cache_dir, only = argv[1], set(argv[2:])
    failures = 0
    for name, c in cases().items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            for label, summary in run_case(name, c, cache_dir):
                print(f"OK {name} {label}: {summary} ({time.perf_counter() - t0:.2f}s)", flush=True)
                t0 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 (report every case)
            import traceback

            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stdout)
    print(f"{failures} failures")
    return failures


# ------------------------------------------------------------------------------------ in-process tests


def test_import_does_not_import_triton_or_torch():
    code = ("import sys, opgen.targets.triton.attention as a; assert 'triton' not in sys.modules; "
            "assert 'torch' not in sys.modules; print(a.GENERATOR_VERSION)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == A.GENERATOR_VERSION


def test_render_is_pure_valid_python_and_inlines_mods():
    g, _ = make_group(scores.alibi(scores.alibi_slopes(2)), masks.sliding_window(64), gqa=True)
    m = A.render(g)
    assert A.render(g) is m
    compile(m.source, "<gen>", "exec")
    assert set(m.kernels) == {"attn_fwd", "attn_decode_split", "attn_decode_combine", "attn_bwd_preprocess",
                              "attn_bwd_dkdv", "attn_bwd_dq"}
    assert m.captures == ("capture0",) and "capture0_ptr" in m.kernels["attn_fwd"]
    assert "make_block_ptr" not in m.source and "libdevice" not in m.source
    assert "((qi - kj) < 64)" in m.source                      # the mask predicate, inlined
    assert "tl.load(capture0_ptr" in m.source                  # the ALiBi slope, a captured tensor
    assert not m.has_dscore                                    # d(score + bias)/d(score) = 1: no multiply
    soft, _ = make_group(scores.softcap(20.0), masks.causal)
    ms = A.render(soft)
    assert ms.has_dscore and "def _score_bwd" in ms.source and "* dsc" in ms.source
    plain, _ = make_group()
    mp = A.render(plain)
    assert "return qk" in mp.source and not mp.has_dscore and mp.dims == () and mp.captures == ()


def test_neighborhood_mask_reads_dims():
    g, _ = make_group(None, masks.neighborhood_1d(5))
    m = A.render(g)
    assert "S" in m.dims and "dim_S" in m.kernels["attn_fwd"]
    compile(m.source, "<gen>", "exec")


def test_dscore_is_the_symbolic_derivative():
    g, _ = make_group(scores.softcap(4.0))
    d, needed = A.dscore_expr(g)
    assert needed and d is not None
    plain, _ = make_group(scores.alibi(scores.alibi_slopes(2)))
    assert A.dscore_expr(plain) == (None, False)
    const, _ = make_group(lambda s, b, h, q, kv: (q - kv) * 0.5)
    assert A.dscore_expr(const) == (None, True)


def _shape(dtype=DType.bf16, L=4096, S=4096, E=128, EV=None, H=16, HKV=16, B=2):
    return A.AttentionShape(B, H, HKV, L, S, E, EV or E, dtype)


@pytest.mark.parametrize("dtype", [DType.bf16, DType.f16, DType.f32])
@pytest.mark.parametrize("E", [16, 24, 64, 80, 128, 256])
def test_default_configs_feasible_and_in_space(dtype, E):
    g, _ = make_group(None, masks.causal)
    for kind in A.KINDS:
        for L, S in ((4096, 4096), (37, 37), (1, 200), (3, 100000)):
            if kind == "decode" and L > 16:
                continue
            shape = _shape(dtype, L, S, E)
            cfg = A.default_config(g, shape, None, kind)
            assert A.check(g, cfg, shape, kind) is None, (kind, shape, cfg, A.check(g, cfg, shape, kind))
            sp = A.space(g, shape, None, kind)
            for knob, choices in sp.knobs.items():
                assert getattr(cfg, knob) in choices or knob == "block_m" and cfg.block_m == 16, (knob, cfg)
            assert A.TritonAttentionConfig.from_dict(cfg.to_dict()) == cfg
    dec = A.default_config(g, _shape(dtype, 1, 100000, E, B=1, H=8), None, "decode")
    assert dec.splits > 1 and dec.block_m == 16


def test_space_enumerates_feasible_configs_and_check_rejects():
    g, _ = make_group(None, masks.causal)
    shape = _shape(DType.bf16, 1024, 1024, 64)
    sp = A.space(g, shape)
    cfgs = list(sp.enumerate())
    assert cfgs and all(sp.infeasible(c) is None for c in cfgs) and sp.default in cfgs
    assert "not in" in A.check(g, {"block_m": 48}, shape)
    assert "unknown knobs" in A.check(g, {"tile": 3}, shape)
    assert "splits" in A.check(g, A.TritonAttentionConfig(splits=4), shape, "forward")
    assert "dot_precision" in A.check(g, A.TritonAttentionConfig(dot_precision="tf32"), shape)
    big = A.TritonAttentionConfig(block_m=128, block_n=128, num_warps=2, num_stages=4)
    assert A.check(g, big, _shape(DType.f32, 4096, 4096, 256)) is not None
    assert "head dim" in A.check(g, A.TritonAttentionConfig(), _shape(E=320))
    assert "shared memory" in A.check(g, A.TritonAttentionConfig(128, 128, 8, 4), _shape(E=256),
                                      caps=type("C", (), {"shared_memory": 48 * 1024})())
    f32 = _shape(DType.f32, 64, 64, 64)
    assert A.space(g, f32).knobs["dot_precision"] == A.PRECISIONS


def test_argument_errors_name_the_problem(monkeypatch):
    g, _ = make_group(None, masks.causal)
    q = torch.randn(1, 2, 20, 16)
    ok = {"q": q, "k": q.clone(), "v": q.clone()}
    rows = tile_tables(None, 1, 2, 20, 20, 16, 16)
    cfg = A.TritonAttentionConfig(16, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA device"):
        A.run_forward(g, ok, rows, cfg)
    monkeypatch.setenv("TRITON_INTERPRET", "1")     # every check below fails before anything is launched
    big = torch.randn(1, 2, 20, 300)
    with pytest.raises(ValueError, match="head dim E = 300"):
        A.run_forward(g, {"q": big, "k": big, "v": big}, rows, cfg)
    d = q.double()
    with pytest.raises(ValueError, match="float64"):
        A.run_forward(g, {"q": d, "k": d, "v": d}, rows, cfg)
    with pytest.raises(ValueError, match="rows.count"):
        A.run_forward(g, ok, rows, A.TritonAttentionConfig(32, 16))
    with pytest.raises(ValueError, match="int32"):
        A.run_forward(g, ok, tuple(t.long() for t in rows), cfg)
    with pytest.raises(ValueError, match="missing inputs"):
        A.run_forward(g, {"q": q}, rows, cfg)
    with pytest.raises(ValueError, match="invalid config"):
        A.run_forward(g, ok, rows, {"block_m": 24, "block_n": 16})
    with pytest.raises(ValueError, match="not declared with GQA"):
        A.run_forward(g, {"q": q, "k": q[:, :1], "v": q[:, :1]}, rows, cfg)
    lse = torch.zeros(1, 2, 20)
    with pytest.raises(ValueError, match="'lse' must be float32"):
        A.run_backward(g, ok, q, lse.double(), q, rows, rows, cfg)
    with pytest.raises(ValueError, match="'cols' must be"):
        A.run_backward(g, ok, q, lse, q, rows, None, cfg)
    with pytest.raises(ValueError, match="'q' has dtype f64"):
        A.render(fuse_attention(declare_attention(DType.f64, DType.f64, DType.f64)))
    assert "same dtype" in A.unsupported(fuse_attention(declare_attention(DType.f16, DType.bf16, DType.f16)))


def test_shape_of_binding_shapes_and_decode_choice():
    g, _ = make_group(None, masks.causal, gqa=True)
    shape = A.AttentionShape.of(g, {"q": (2, 8, 3, 80), "k": (2, 2, 5000, 80), "v": (2, 2, 5000, 40)})
    assert shape == A.AttentionShape(2, 8, 2, 3, 5000, 80, 40, DType.f32) and shape.group_size == 4
    assert A.use_decode(shape) and not A.use_decode(A.AttentionShape(2, 8, 2, 64, 5000, 80, 40, DType.f32))
    assert A.padded_dim(80) == 128 and A.padded_dim(3) == 16 and A.padded_dim(256) == 256


def test_reference_matches_sdpa():
    """The dense oracle itself agrees with torch's SDPA (causal, GQA)."""
    q, k, v = torch.randn(2, 4, 9, 8, dtype=F64), torch.randn(2, 2, 9, 8, dtype=F64), torch.randn(2, 2, 9, 5, dtype=F64)
    out, _ = reference(q, k, v, 0.3, None, dense_mask(masks.causal, 2, 4, 9, 9))
    sd = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                          is_causal=True, scale=0.3)
    assert (out - sd).abs().max() < 1e-12


def test_interpreter_matches_dense_reference(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, str(HERE), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("OK ", "FAIL "))]
    assert lines and all(ln.startswith("OK ") for ln in lines), out[-8000:]
    for name in cases():
        assert any(ln.startswith(f"OK {name} ") for ln in lines), name
    assert sum(" backward " in ln for ln in lines) >= 6 and sum(" decode[" in ln for ln in lines) >= 4


# ---------------------------------------------------------------------------------------------- AOT sm_90


@pytest.mark.parametrize("kind,E", [("forward", 64), ("forward", 128), ("backward", 64), ("backward", 128),
                                    ("decode", 128)])
def test_aot_sm90_default_config(kind, E, aot_ready, tmp_path):
    from opgen.targets.triton.compile import AotUnavailable, aot_compile

    # a score mod with a derivative and a captured tensor, so the backward's dscore path is compiled too
    g, _ = make_group(scores.softcap(30.0), masks.sliding_window(1024), torch.bfloat16, gqa=True)
    L = 8 if kind == "decode" else 4096
    shape = _shape(DType.bf16, L, 4096, E, H=16, HKV=4)
    cfg = A.default_config(g, shape, None, kind)
    src = A.render(g).source
    for kernel, sig, consts, warps, stages in A.aot_kernels(g, shape, cfg, kind):
        try:
            r = aot_compile(src, kernel, sig, consts, tmp_path, warps, stages)
        except AotUnavailable as e:
            pytest.skip(str(e))
        assert r.shared <= H100_SMEM, f"{kernel} {cfg}: {r.shared} bytes of shared memory"
        if r.stack is None:
            pytest.skip("cuobjdump is unavailable: cannot read register/spill usage")
        assert r.stack == 0, f"{kernel} {cfg}: register spills ({r.stack} bytes of stack, {r.registers} registers)"
        if kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_decode_split"):
            assert r.ptx_has_mma, f"{kernel}: the dots should use tensor cores"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
