"""A decoder layer in the style of Mistral / Gemma 2 local layers: RMSNorm, rotary embeddings, grouped-query
attention over a causal sliding window, SwiGLU MLP; the attention is one ``torch.ops.opgen.attention`` call.

    python examples/sliding_window_decoder.py [--backend aot_eager|inductor]

The layer is compiled once with ``torch.compile(fullgraph=True, dynamic=True)`` and run on two sequence lengths: the
opgen op is an opaque node whose fake kernel computes output shapes symbolically, so the second length reuses the
compiled frame. The check is the same layer with ``F.scaled_dot_product_attention``, the KV heads repeated for GQA
and an explicit ``[L, L]`` band mask, forward and backward.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from opgen.ops.attention_op import prepare_mods
from opgen.masks import sliding_window


def attend(q, k, v, score_mod=None, mask_mod=None, enable_gqa=False):
    """opgen attention as one custom op (what ``opgen.ops.attention`` does once it routes through the op)."""
    spec, captures, _ = prepare_mods("sliding_window_decoder", score_mod, mask_mod, q.dtype, k.dtype)
    return torch.ops.opgen.attention(q, k, v, list(captures), spec, q.shape[-1] ** -0.5, enable_gqa)[0]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) on ``[B, heads, L, d]``."""
    d, length = x.shape[-1], x.shape[-2]
    ang = torch.arange(length, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); GQA with ``q_heads / kv_heads`` groups."""

    def __init__(self, dim: int, q_heads: int, kv_heads: int, window: int, hidden: int) -> None:
        super().__init__()
        self.hq, self.hkv, self.d, self.window = q_heads, kv_heads, dim // q_heads, window
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.wq = nn.Linear(dim, q_heads * self.d, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.wo = nn.Linear(q_heads * self.d, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.mask_mod = sliding_window(window)          # causal: 0 <= q - kv < window; built outside compiled code
        self.register_buffer("inv_freq", 10000.0 ** (-torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, n, self.hq, self.d).transpose(1, 2)
        k, v = self.wkv(h).view(b, n, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        return rotary(q, self.inv_freq), rotary(k, self.inv_freq), v

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        x = x + self.wo(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # x: [B, L, dim]
        q, k, v = self.qkv(x)
        return self.finish(x, attend(q, k, v, mask_mod=self.mask_mod, enable_gqa=True))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        g = self.hq // self.hkv
        pos = torch.arange(x.shape[1])
        band = (pos[:, None] >= pos[None]) & (pos[:, None] - pos[None] < self.window)
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=band)
        return self.finish(x, o)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler)")
    args = ap.parse_args()
    torch.manual_seed(0)
    layer = DecoderLayer(dim=32, q_heads=4, kv_heads=2, window=6, hidden=48)
    counter = CompileCounterWithBackend(args.backend)
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    err = gerr = 0.0
    t0 = time.perf_counter()
    for length in (19, 33):                                            # two lengths, one compiled frame
        x = torch.randn(2, length, 32, requires_grad=True)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().mean(), [x, *layer.parameters()])
        ref = layer.forward_reference(x)
        ref_grads = torch.autograd.grad(ref.square().mean(), [x, *layer.parameters()])
        err = max(err, (out - ref).abs().max().item())
        gerr = max([gerr] + [(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])
    seconds = time.perf_counter() - t0
    print(f"sliding-window GQA decoder layer, L = 19 and 33: max |opgen - torch| out {err:.1e}, grads {gerr:.1e}; "
          f"{counter.frame_count} compiled frame ({seconds:.1f} s)")
    assert err < 1e-4 and gerr < 1e-4 and counter.frame_count == 1


if __name__ == "__main__":
    main()
