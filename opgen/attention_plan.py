"""The ``plan`` stage of an attention op for ``opgen show``: the fused group, the default kernel configs and
the tile classes (full / partial / empty) that the mask predicate gives at typical sizes, for the op's own
mask and for each mask of :mod:`opgen.masks`."""
from __future__ import annotations

import sympy

from opgen.ir import Op
from opgen.ir.passes.attention import fuse_attention
from opgen.ir.passes.blocks import classify_tiles, describe, kv_tile_bounds


def _standard_masks(length: int) -> list[tuple[str, object, int]]:
    """(label, mask_mod, sequence length) for the library masks on 64 x 64 image tokens / 4096-long sequences."""
    from opgen import masks

    side = 64
    return [("causal", masks.causal, length),
            ("sliding_window(256)", masks.sliding_window(256), length),
            ("prefix_lm(512)", lambda b, h, q, k: (k <= q) | (k < 512), length),
            ("neighborhood_2d 64x64 kernel 7", masks.neighborhood_2d(side, side, 7), side * side),
            ("neighborhood_2d 64x64 kernel 7 dilation 2", masks.neighborhood_2d(side, side, 7, 2), side * side),
            ("swin_window 64x64 window 8 shift 4", masks.swin_window(side, side, 8, 4), side * side)]


def attention_plan(op: Op, length: int = 4096, block: int = 64) -> str:
    """The printout: fused group, tile classes of ``op``'s mask at ``length`` and of the library masks."""
    from opgen.ops.attention import trace
    from opgen.targets.tvm.attention import default_attention_config

    group = fuse_attention(op)
    fwd = default_attention_config(group, {"L": length, "S": length})
    lines = [group.describe(), f"tvm forward default config: {fwd.to_json()}", ""]
    pred = group.mask_predicate
    bm, bn = fwd.block_m, fwd.block_n
    if pred is None:
        lines.append("mask reads tensors: its tile table is built at run time from per-tile [min, max] of them")
    else:
        lines.append(f"tile classes of this op's mask at L = S = {length}:")
        lines.append(describe(classify_tiles(pred, L=length, S=length, block_m=bm, block_n=bn), max_picture=0))
        lines += _bounds(pred, bm, bn)
    lines += ["", f"tile classes of the library masks ({block} x {block} tiles):"]
    for label, mask, n in _standard_masks(length):
        p = trace("opgen show", None, mask).mask
        table = classify_tiles(p.sym if p is not None else sympy.true, L=n, S=n, block_m=block, block_n=block)
        c = table.counts()
        lines.append(f"  {label:<42} L={n:<5} full {c['full']:>5}  partial {c['partial']:>5}  empty "
                     f"{c['empty']:>5}  visited {table.density:6.1%}")
    return "\n".join(lines)


def _bounds(pred, bm: int, bn: int) -> list[str]:
    i, j = (next((s for s in pred.free_symbols if s.name == n), sympy.Symbol(n)) for n in "ij")
    bounds = kv_tile_bounds(pred, i, j, bm, bn)
    if bounds is None:
        return ["  key-tile loop bounds: from the table (the predicate is not a conjunction of affine inequalities)"]
    first, stop = bounds
    return [f"  key-tile loop bounds for query tile t: [{first}, {stop})"]


def attention_source(op: Op, stage: str, length: int = 1024, head_dim: int = 64) -> str:
    """The generated kernel source of ``op``: the TVM forward (``stage == "tvm"``) at head dim ``head_dim``, or
    the Triton module (``"triton"``; sizes are launch arguments there)."""
    group = fuse_attention(op)
    if stage == "triton":
        from opgen.targets.triton.attention import render

        return f"# triton attention module of {op.name}\n" + render(group).source
    from opgen.targets.tvm.attention import default_attention_config, render_attention_forward

    dtype = op.tensor(group.q).dtype
    cfg = default_attention_config(group, {"L": length, "S": length}, None, dtype)
    return (f"# tvm attention forward of {op.name}, head dim {head_dim}, default config {cfg.to_json()}\n"
            + render_attention_forward(group, cfg, dtype, (head_dim, head_dim)))
