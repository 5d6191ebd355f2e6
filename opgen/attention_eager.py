"""Dense eager attention that calls the user's mods on index tensors, as FlexAttention's eager mode does.

It is the fallback for mods the tracer cannot turn into IR (:mod:`opgen.trace`): the caller warns, then runs
this (differentiable through torch autograd, O(L x S) memory) instead of refusing the call.
"""
from __future__ import annotations

import math

import torch


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod=None, mask_mod=None,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``softmax(mask(score_mod(q k^T * scale))) v`` with fully masked rows giving zeros, in q's dtype."""
    B, HQ, L, E = q.shape
    HKV, S = k.shape[1], k.shape[2]
    if enable_gqa and HQ != HKV:
        k = k.repeat_interleave(HQ // HKV, dim=1)
        v = v.repeat_interleave(HQ // HKV, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(E))
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(HQ, device=dev).view(1, HQ, 1, 1)
    i = torch.arange(L, device=dev).view(1, 1, L, 1)
    j = torch.arange(S, device=dev).view(1, 1, 1, S)
    if score_mod is not None:
        s = score_mod(s, b, h, i, j).to(acc)
    if mask_mod is not None:
        keep = torch.broadcast_to(mask_mod(b, h, i, j), s.shape)
        s = s.masked_fill(~keep, -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = (p @ v.to(acc)) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)
