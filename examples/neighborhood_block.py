"""A NATTEN-style 2-D neighborhood attention block on image tokens, with the attention as one
``torch.ops.opgen.attention`` call, compiled with ``torch.compile(fullgraph=True)``.

    python examples/neighborhood_block.py [--backend aot_eager|inductor]

Neighborhood attention (Hassani et al., 2023) lets each pixel attend to the ``kh x kw`` pixels around it (every
``dilation``-th pixel for dilated NA), with the window shifted at the image borders so that every query sees exactly
``kh * kw`` keys. ``opgen.masks.neighborhood_2d`` states that rule as a ``mask_mod``; opgen traces it to a sympy
predicate and skips key tiles outside every neighborhood, so no ``L x L`` mask is ever built. The check is an
explicit NATTEN formulation in plain torch: gather each query's ``kh * kw`` neighbors and softmax over them.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from opgen.ops.attention_op import prepare_mods
from opgen.masks import neighborhood_2d


def attend(q, k, v, score_mod=None, mask_mod=None):
    """opgen attention as one custom op (what ``opgen.ops.attention`` does once it routes through the op)."""
    spec, captures, _ = prepare_mods("neighborhood_block", score_mod, mask_mod, q.dtype, k.dtype)
    return torch.ops.opgen.attention(q, k, v, list(captures), spec, q.shape[-1] ** -0.5, False)[0]


def natten_neighbors(length: int, kernel: int, dilation: int) -> torch.Tensor:
    """``[length, kernel]`` key positions of each query along one axis, by NATTEN's rule (written out)."""
    rows = []
    for i in range(length):
        r = i % dilation
        group_len = (length - 1 - r) // dilation + 1
        start = min(max(i // dilation - kernel // 2, 0), group_len - kernel)
        rows.append([(start + t) * dilation + r for t in range(kernel)])
    return torch.tensor(rows)


class NeighborhoodBlock(nn.Module):
    """LayerNorm -> 2-D neighborhood attention -> residual -> LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, height: int, width: int, kernel: tuple[int, int],
                 dilation: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.height, self.width, self.kernel, self.dilation = heads, height, width, kernel, dilation
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mask_mod = neighborhood_2d(height, width, kernel, dilation)   # built once, outside compiled code

    def heads_of(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]                                   # [B, heads, L, head_dim] each

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(o.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # x: [B, H*W, C]
        q, k, v = self.heads_of(x)
        return self.finish(x, attend(q, k, v, mask_mod=self.mask_mod))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Gather every query's neighbors and softmax over them (no mask, no opgen)."""
        q, k, v = self.heads_of(x)
        rows = natten_neighbors(self.height, self.kernel[0], self.dilation[0])      # [H, kh]
        cols = natten_neighbors(self.width, self.kernel[1], self.dilation[1])       # [W, kw]
        nbr = (rows[:, None, :, None] * self.width + cols[None, :, None, :]).reshape(self.height * self.width, -1)
        kn, vn = k[:, :, nbr], v[:, :, nbr]                              # [B, heads, L, kh*kw, d]
        att = torch.einsum("bhld,bhlkd->bhlk", q, kn) * q.shape[-1] ** -0.5
        return self.finish(x, torch.einsum("bhlk,bhlkd->bhld", torch.softmax(att, dim=-1), vn))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler)")
    args = ap.parse_args()
    torch.manual_seed(0)
    height, width, kernel, dilation = 7, 10, (3, 5), (2, 1)
    block = NeighborhoodBlock(dim=16, heads=2, height=height, width=width, kernel=kernel, dilation=dilation)
    x = torch.randn(2, height * width, 16, requires_grad=True)
    t0 = time.perf_counter()
    out = torch.compile(block, backend=args.backend, fullgraph=True)(x)
    grads = torch.autograd.grad(out.square().mean(), [x, *block.parameters()])
    seconds = time.perf_counter() - t0
    ref = block.forward_reference(x)
    ref_grads = torch.autograd.grad(ref.square().mean(), [x, *block.parameters()])
    err = (out - ref).abs().max().item()
    gerr = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
    print(f"neighborhood block {height}x{width} kernel {kernel} dilation {dilation}: max |opgen - torch| out "
          f"{err:.1e}, grads {gerr:.1e} (compile + fwd + bwd {seconds:.1f} s)")
    assert err < 1e-4 and gerr < 1e-4


if __name__ == "__main__":
    main()
