"""How the TVM target runs an attention op: fusion, tile plan, forward and backward kernels.

The target (:mod:`opgen.targets.tvm.target`) delegates here for ops that fuse into an
:class:`~opgen.ir.passes.attention.AttentionGroup`; the kernels themselves live in :mod:`.attention` (forward)
and :mod:`.attention_backward`.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Mapping

from opgen.ir import DType, IRError, Op
from opgen.ir.passes.attention import AttentionGroup, fuse_attention

from ..tiles import attention_sizes, tile_plan

SUPPORTED = frozenset({DType.f32, DType.f64})


@functools.lru_cache(maxsize=512)
def attention_group(op: Op) -> AttentionGroup | None:
    """The op's attention group, or None when it is not a softmax-contraction chain."""
    if op.name != "attention" and len(op.nodes) not in (7, 8):
        return None
    try:
        return fuse_attention(op)
    except IRError:
        return None


def supports_attention(op: Op) -> bool:
    """An attention op whose q, k, v share one dtype the CPU kernels compute in (float32 / float64)."""
    g = attention_group(op)
    if g is None:
        return False
    dts = {op.tensor(n).dtype for n in (g.q, g.k, g.v)}
    return len(dts) == 1 and dts <= SUPPORTED


def forward_config(group: AttentionGroup, inputs: Mapping[str, Any], caps, config=None):
    """The forward config of a call: ``config`` (an AttentionConfig or its dict) or the default."""
    from .attention import as_attention_config, default_attention_config

    if config is not None:
        return as_attention_config(config)
    dtype = group.op.tensor(group.q).dtype
    return default_attention_config(group, attention_sizes(group, inputs), caps, dtype)


def run_forward(group: AttentionGroup, inputs: Mapping[str, Any], binding, cache, caps, config=None) -> dict:
    """``{"out", "lse"}`` by the blocked online-softmax kernel over the tiles the mask leaves."""
    from .attention import attention_forward

    cfg = forward_config(group, inputs, caps, config)
    plan = tile_plan(group, inputs, binding.dims, cfg.block_m, cfg.block_n)
    res = attention_forward(group, inputs, plan.rows, cfg, cache)
    return {group.out: res["out"], group.lse: res["lse"]}


def run_backward(group: AttentionGroup, inputs: Mapping[str, Any], binding, out, lse, dout, cache,
                 config=None) -> dict:
    """``{"q", "k", "v"}`` gradients by the flash backward (recomputation over the same tile classes)."""
    from .attention_backward import as_backward_config, attention_backward

    from opgen.schedules.attention import backward_block_m

    dtype = group.op.tensor(group.q).dtype
    cfg = as_backward_config(config, dtype)
    if config is None:   # the default: a query tile that fits a short sequence (a Swin window) exactly
        bm = backward_block_m(int(inputs[group.q].shape[2]), cfg.block_m)
        cfg = as_backward_config(replace(cfg, block_m=bm), dtype) if bm != cfg.block_m else cfg
    plan = tile_plan(group, inputs, binding.dims, cfg.block_m, cfg.block_n)
    return attention_backward(group, inputs, out, lse, dout, plan.rows, plan.cols, cfg, cache)
