"""A Swin Transformer block (shifted-window attention with a relative-position bias) on image tokens, with the
attention as one ``torch.ops.opgen.attention`` call, compiled with ``torch.compile(fullgraph=True)``.

    python examples/swin_block.py [--backend aot_eager|inductor]

Swin (Liu et al., 2021) rolls the image by ``-shift``, cuts it into ``window x window`` windows, attends inside each
window with a learned bias ``table[relative position, head]``, masks pairs that the roll brought together from
opposite borders, and rolls back. Here the tokens stay in image order: the window-and-region rule is the mask
``opgen.masks.swin_window`` (a sympy predicate, so whole key tiles outside a query's window are skipped) and the bias
is a ``score_mod`` that indexes the table, a tensor the mod captures. The check is the classic roll / partition /
per-window softmax formulation in plain torch, forward and backward.

The bias table is a fixed buffer here to keep the check short; a captured table that requires grad gets its
gradient from the flash backward (see ``tests/ops/test_attention_capture_grads.py``).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from opgen.ops.attention_op import prepare_mods
from opgen.masks import swin_window


def attend(q, k, v, score_mod=None, mask_mod=None):
    """opgen attention as one custom op (what ``opgen.ops.attention`` does once it routes through the op)."""
    spec, captures, _ = prepare_mods("swin_block", score_mod, mask_mod, q.dtype, k.dtype)
    return torch.ops.opgen.attention(q, k, v, list(captures), spec, q.shape[-1] ** -0.5, False)[0]


class SwinBias:
    """``score_mod``: Swin's relative-position bias ``table[(dy + M - 1) * (2M - 1) + dx + M - 1, h]``, with tokens
    in image order (row-major, ``width`` per row). Offsets are clamped so that pairs the mask removes still index
    inside the table (a score_mod is evaluated before the mask, as in FlexAttention)."""

    def __init__(self, table: torch.Tensor, width: int, window: int) -> None:
        self.table, self.width, self.m = table, width, window

    def __call__(self, score, b, h, q_idx, kv_idx):
        m, w = self.m, self.width
        dy = torch.clamp(q_idx // w - kv_idx // w, -(m - 1), m - 1)
        dx = torch.clamp(q_idx % w - kv_idx % w, -(m - 1), m - 1)
        return score + self.table[(dy + m - 1) * (2 * m - 1) + dx + m - 1, h]


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention with relative-position bias -> residual -> LayerNorm -> MLP."""

    def __init__(self, dim: int, heads: int, height: int, width: int, window: int, shift: int) -> None:
        super().__init__()
        self.heads, self.height, self.width, self.window, self.shift = heads, height, width, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer("table", torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        self.score_mod = SwinBias(self.table, width, window)          # built once, outside the compiled code
        self.mask_mod = swin_window(height, width, window, shift)

    def heads_of(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]                                 # [B, heads, L, head_dim] each

    def forward(self, x: torch.Tensor) -> torch.Tensor:              # x: [B, H*W, C]
        q, k, v = self.heads_of(x)
        o = attend(q, k, v, self.score_mod, self.mask_mod)
        x = x + self.proj(o.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The classic Swin formulation: roll, window partition, per-window attention, reverse, roll back."""
        b, n, c = x.shape
        hh, ww, m, s, nh = self.height, self.width, self.window, self.shift, self.heads
        q, k, v = (t.reshape(b, nh, hh, ww, c // nh) for t in self.heads_of(x))
        q, k, v = (torch.roll(t, (-s, -s), dims=(2, 3)) for t in (q, k, v))
        part = lambda t: (t.reshape(b, nh, hh // m, m, ww // m, m, -1).permute(0, 2, 4, 1, 3, 5, 6)  # noqa: E731
                          .reshape(b, hh // m, ww // m, nh, m * m, -1))
        q, k, v = part(q), part(k), part(v)                           # [B, nWh, nWw, heads, M*M, d]
        yy, xx = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
        rel = (yy.flatten()[:, None] - yy.flatten()[None] + m - 1) * (2 * m - 1) \
            + xx.flatten()[:, None] - xx.flatten()[None] + m - 1
        bias = self.table[rel].permute(2, 0, 1)                       # [heads, M*M, M*M]
        region = lambda size: torch.tensor([0 if p < size - m else 1 if p < size - s else 2  # noqa: E731
                                            for p in range(size)])
        reg = (region(hh)[:, None] * 3 + region(ww)[None]) if s else torch.zeros(hh, ww, dtype=torch.long)
        reg = reg.reshape(hh // m, m, ww // m, m).permute(0, 2, 1, 3).reshape(hh // m, ww // m, m * m)
        same = (reg[..., :, None] == reg[..., None, :])[:, :, None]   # [nWh, nWw, 1, M*M, M*M]
        att = (q @ k.transpose(-1, -2)) * (c // nh) ** -0.5 + bias
        o = torch.softmax(att.masked_fill(~same, float("-inf")), dim=-1) @ v
        o = (o.reshape(b, hh // m, ww // m, nh, m, m, -1).permute(0, 3, 1, 4, 2, 5, 6)
             .reshape(b, nh, hh, ww, -1))
        o = torch.roll(o, (s, s), dims=(2, 3)).reshape(b, nh, n, -1)
        x = x + self.proj(o.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler)")
    args = ap.parse_args()
    torch.manual_seed(0)
    height, width, window, shift = 6, 9, 3, 1
    block = SwinBlock(dim=24, heads=3, height=height, width=width, window=window, shift=shift)
    x = torch.randn(2, height * width, 24, requires_grad=True)
    t0 = time.perf_counter()
    out = torch.compile(block, backend=args.backend, fullgraph=True)(x)
    grads = torch.autograd.grad(out.square().mean(), [x, *block.parameters()])
    seconds = time.perf_counter() - t0
    ref = block.forward_reference(x)
    ref_grads = torch.autograd.grad(ref.square().mean(), [x, *block.parameters()])
    err = (out - ref).abs().max().item()
    gerr = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
    print(f"swin block {height}x{width} window {window} shift {shift}: max |opgen - torch| out {err:.1e}, "
          f"grads {gerr:.1e} (compile + fwd + bwd {seconds:.1f} s)")
    assert err < 1e-4 and gerr < 1e-4


if __name__ == "__main__":
    main()
