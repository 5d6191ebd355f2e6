"""FlexAttention-style score and mask mods with ``opgen.ops.attention``, checked against SDPA.

    python examples/attention_mods.py

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and a ``score_mod(score, b, h, q_idx, kv_idx) -> score`` are plain
Python functions written with torch operators, as for ``torch.nn.attention.flex_attention``. opgen *traces*
them once with symbolic indices: a pure index mask becomes one sympy predicate over the axes ``b, h, i`` (query)
and ``j`` (key), which the compiler can reason about (block sparsity); tensors a mod captures (ALiBi slopes)
become extra inputs of the op.

Each check below applies the *same* mod to real index tensors (``torch.arange``) to build an explicit mask or
bias, and compares with ``F.scaled_dot_product_attention``.
"""
import textwrap

import torch
import torch.nn.functional as F

import opgen
import opgen.masks as masks
import opgen.scores as scores
from opgen.ops.attention import trace   # the tracer the op uses (opgen.ops.attention itself is the function)


def show_traced(name, score_mod=None, mask_mod=None):
    traced = trace(f"example {name}", score_mod, mask_mod)
    if score_mod is not None:
        print(f"  traced score: {traced.score}")
        for n, t in enumerate(traced.captures):
            print(f"  capture{n}: tensor of shape {tuple(t.shape)}")
    if mask_mod is not None:
        print("  traced mask : " + textwrap.shorten(str(traced.mask), 300, placeholder=" ..."))


def index_tensors(H, L, S):
    """b, h, q_idx, kv_idx as broadcasting index tensors of shape [H, L, S] (b is 0: one batch row here)."""
    return (torch.tensor(0), torch.arange(H)[:, None, None], torch.arange(L)[None, :, None],
            torch.arange(S)[None, None, :])


def check(name, L, score_mod=None, mask_mod=None, heads=2, head_dim=16):
    print(f"{name} (L = {L})")
    show_traced(name, score_mod, mask_mod)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, L, head_dim) for _ in range(3))
    out = opgen.ops.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)

    b, h, qi, kv = index_tensors(heads, L, L)
    bias = torch.zeros(heads, L, L)
    if score_mod is not None:                  # additive mods: score_mod(0) is the bias SDPA adds
        bias = score_mod(bias, b, h, qi, kv)
    if mask_mod is not None:
        allowed = mask_mod(b, h, qi, kv).expand(heads, L, L)
        bias = bias.masked_fill(~allowed, float("-inf"))
        print(f"  keys attended per query: {allowed[0].sum(-1).min().item()}..{allowed[0].sum(-1).max().item()} "
              f"of {L}")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    err = (out - ref).abs().max().item()
    print(f"  max |opgen - SDPA| = {err:.2e}\n")
    assert err < 1e-5, name


# Causal sliding window: each query sees itself and the 4 keys before it.
check("sliding_window(5)", 37, mask_mod=masks.sliding_window(5))

# NATTEN 2-D neighborhood attention on a 5x7 token grid (flattened row-major): 3x3 neighborhoods, shifted at the
# borders so every query sees exactly 9 keys.
check("neighborhood_2d(5x7, kernel 3)", 35, mask_mod=masks.neighborhood_2d(height=5, width=7, kernel=3))

# Swin windows of 3x3 on a 6x9 image, cyclically shifted by 1 (with Swin's region mask).
check("swin_window(6x9, window 3, shift 1)", 54, mask_mod=masks.swin_window(height=6, width=9, window=3, shift=1))

# ALiBi: a per-head linear bias (the slopes tensor is captured by the mod), with a causal mask.
check("alibi + causal", 29, score_mod=scores.alibi(scores.alibi_slopes(2)), mask_mod=masks.causal)


# A mask written by the user: prefix-LM (bidirectional over a 7-token prefix, causal after it).
PREFIX = 7


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < PREFIX) | (kv_idx <= q_idx)


check("prefix_lm (user mask_mod)", 23, mask_mod=prefix_lm)
print("all mods agree with SDPA")
