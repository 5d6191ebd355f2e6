"""Model-shaped blocks for ``opgen bench training``, written here so that the bench needs no model library.

Each block is a small ``nn.Module`` with an ``impl`` attribute: ``"opgen"`` runs its core with opgen's ops,
``"torch"`` with the torch formulation a user would otherwise write (the same parameters, so a deep copy with the
other ``impl`` computes the same function):

- :class:`Mamba1Block`: in-proj, causal depthwise conv1d + SiLU, x-proj, dt-proj, selective scan (D, z gate,
  delta_bias, softplus), out-proj; torch: ``F.conv1d`` and the sequential loop of transformers' slow path;
- :class:`Mamba2Block`: in-proj, conv, SSD (``opgen.ops.chunk_gla`` with one decay per head broadcast over the
  state axis), gated RMSNorm, out-proj; torch: the chunked SSD of transformers' Mamba2 torch path;
- :class:`ConvNeXtBlock`: depthwise 7x7, LayerNorm, MLP 4x, layer scale, residual (``opgen.ops.conv2d`` vs
  ``F.conv2d``);
- :class:`ResNetBasicBlock`: two 3x3 convs with BatchNorm (training statistics) and ReLU, identity shortcut;
- :class:`SwinBlock`: (shifted) window attention with a learnable relative-position bias table and an MLP;
  opgen: ``opgen.ops.attention`` on the window partitions with a ``score_mod`` that reads the table (and Swin's
  shift mask) by index arithmetic; torch: SDPA on the window partitions with the gathered bias as a float mask.

Only torch is imported at module level; opgen's ops are imported where the ``"opgen"`` path runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import ss_loop_plain

IMPLS = ("opgen", "torch")


class _Block(nn.Module):
    """A block whose core runs with opgen's ops (``impl="opgen"``) or with torch (``impl="torch"``)."""

    def __init__(self, impl: str) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl

    @property
    def opgen(self) -> bool:
        return self.impl == "opgen"


# ------------------------------------------------------------------------------------------------- Mamba-1


class Mamba1Block(_Block):
    """Mamba's mixer (mamba_ssm ``Mamba`` / transformers ``MambaMixer``) on ``[batch, L, d_model]``."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, impl: str = "opgen") -> None:
        super().__init__(impl)
        d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(d_inner, d_conv) / math.sqrt(d_conv))
        self.conv_bias = nn.Parameter(torch.randn(d_inner) * 0.1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        with torch.no_grad():     # mamba_ssm's dt init: softplus(bias) in [1e-3, 1e-1], log-uniform
            dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)          # [B, d_inner, L] each
        if self.opgen:
            import opgen

            x = opgen.ops.causal_conv1d(x, self.conv_weight, self.conv_bias, activation="silu")
        else:
            width = self.conv_weight.shape[1]
            x = F.silu(F.conv1d(x, self.conv_weight[:, None], self.conv_bias, padding=width - 1,
                                groups=self.d_inner)[..., :length])
        dt, Bm, Cm = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)                   # [B, d_inner, L], bias in the scan
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)                       # [B, N, L]
        A = -torch.exp(self.A_log)
        if self.opgen:
            import opgen

            y = opgen.ops.selective_scan(x, dt, A, Bm, Cm, D=self.D, z=z, delta_bias=self.dt_proj.bias,
                                         delta_softplus=True)
        else:
            y = ss_loop_plain(x, F.softplus(dt + self.dt_proj.bias[:, None]), A, Bm, Cm, self.D) * F.silu(z)
        return self.out_proj(y.transpose(1, 2))


# ------------------------------------------------------------------------------------------------- Mamba-2


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j+1 : i+1])`` for ``j <= i``, ``-inf`` above the diagonal (stable)."""
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)
    x = x.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), -1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), 0), -torch.inf)


def ssd_chunked(X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mamba-2's SSD in chunks (``ssd_minimal_discrete``, as transformers' Mamba2 torch path computes it).

    X ``[b, L, h, p]`` (inputs times dt), A ``[b, L, h]`` (dt times the head's decay, log space), B, C
    ``[b, L, h, n]``; L a multiple of ``chunk``. Returns ``Y [b, L, h, p]``, ``Y_t = sum_s C_t L_ts B_s X_s``.
    """
    b, length, h, p = X.shape
    nc = length // chunk
    X, B, C = (t.reshape(b, nc, chunk, *t.shape[2:]) for t in (X, B, C))
    A = A.reshape(b, nc, chunk, h).permute(0, 3, 1, 2)                        # [b, h, c, l]
    A_cumsum = torch.cumsum(A, dim=-1)
    Lmat = torch.exp(_segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    return (Y_diag + Y_off).reshape(b, length, h, p)


class Mamba2Block(_Block):
    """Mamba-2's mixer (transformers ``Mamba2Mixer``, one group) on ``[batch, L, d_model]``."""

    def __init__(self, d_model: int, d_state: int = 64, headdim: int = 64, expand: int = 2, d_conv: int = 4,
                 chunk: int = 64, impl: str = "opgen") -> None:
        super().__init__(impl)
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.headdim, self.nheads, self.chunk = (d_inner, d_state, headdim,
                                                                             d_inner // headdim, chunk)
        conv_dim = d_inner + 2 * d_state
        self.conv_dim = conv_dim
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(conv_dim, d_conv) / math.sqrt(d_conv))
        self.conv_bias = nn.Parameter(torch.randn(conv_dim) * 0.1)
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.rand(self.nheads) * 15 + 1))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, length, _ = hidden.shape
        h, p, n = self.nheads, self.headdim, self.d_state
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, h], dim=-1)
        xBC = xBC.transpose(1, 2)
        if self.opgen:
            import opgen

            xBC = opgen.ops.causal_conv1d(xBC, self.conv_weight, self.conv_bias, activation="silu")
        else:
            width = self.conv_weight.shape[1]
            xBC = F.silu(F.conv1d(xBC, self.conv_weight[:, None], self.conv_bias, padding=width - 1,
                                  groups=self.conv_dim)[..., :length])
        x, Bm, Cm = xBC.transpose(1, 2).split([self.d_inner, n, n], dim=-1)
        dt = F.softplus(dt + self.dt_bias)                                     # [b, L, h]
        A = -torch.exp(self.A_log)
        x = x.reshape(b, length, h, p)
        Bm = Bm[:, :, None, :].expand(b, length, h, n)
        Cm = Cm[:, :, None, :].expand(b, length, h, n)
        if self.opgen:
            import opgen

            g = (dt * A)[..., None].expand(b, length, h, n)
            y, _ = opgen.ops.chunk_gla(Cm, Bm, x * dt[..., None], g, scale=1.0)
        else:
            y = ssd_chunked(x * dt[..., None], dt * A, Bm, Cm, self.chunk)
        y = (y + x * self.D[:, None]).reshape(b, length, self.d_inner)
        y = y * F.silu(z)                                                      # gated RMSNorm (gate before norm)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight
        return self.out_proj(y)


# ------------------------------------------------------------------------------------------------- vision


def _conv2d(opgen_impl: bool, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, **kw) -> torch.Tensor:
    if opgen_impl:
        import opgen

        return opgen.ops.conv2d(x, w, bias, **kw)
    return F.conv2d(x, w, bias, **kw)


class ConvNeXtBlock(_Block):
    """ConvNeXt's block on ``[batch, C, H, W]``: depthwise 7x7, LayerNorm, Linear 4x, GELU, Linear, layer scale,
    residual. (``layer_scale`` is 1.0 here, not ConvNeXt's 1e-6, so that the output check sees the branch.)"""

    def __init__(self, dim: int, layer_scale: float = 1.0, impl: str = "opgen") -> None:
        super().__init__(impl)
        self.dw_weight = nn.Parameter(torch.randn(dim, 1, 7, 7) / 7)
        self.dw_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _conv2d(self.opgen, x, self.dw_weight, self.dw_bias, padding=3, groups=x.shape[1])
        y = self.pw2(F.gelu(self.pw1(self.norm(y.permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ResNetBasicBlock(_Block):
    """ResNet's basic block on ``[batch, C, H, W]``: conv3x3, BN, ReLU, conv3x3, BN, + identity, ReLU (BatchNorm
    with batch statistics, as in training)."""

    def __init__(self, dim: int, impl: str = "opgen") -> None:
        super().__init__(impl)
        self.w1 = nn.Parameter(torch.randn(dim, dim, 3, 3) * math.sqrt(2 / (9 * dim)))
        self.w2 = nn.Parameter(torch.randn(dim, dim, 3, 3) * math.sqrt(2 / (9 * dim)))
        self.bn1, self.bn2 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(_conv2d(self.opgen, x, self.w1, padding=1)))
        y = self.bn2(_conv2d(self.opgen, y, self.w2, padding=1))
        return F.relu(y + x)


def _swin_shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Swin's attention mask of the shifted windows: ``[nW, w*w, w*w]``, 0 within a region, -100 across."""
    img = torch.zeros(height, width)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1, window ** 2)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


class SwinBlock(_Block):
    """Swin's block on ``[batch, H*W, C]``: LayerNorm, (cyclic shift), window attention with a learnable
    relative-position bias, (shift back), residual; LayerNorm, MLP 4x, residual."""

    def __init__(self, dim: int, heads: int, resolution: int, window: int = 7, shift: int = 0,
                 impl: str = "opgen") -> None:
        super().__init__(impl)
        if resolution % window or shift >= window:
            raise ValueError(f"resolution {resolution} must be a multiple of window {window} > shift {shift}")
        self.dim, self.heads, self.res, self.window, self.shift = dim, heads, resolution, window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.register_buffer("shift_mask", _swin_shift_mask(resolution, resolution, window, shift) if shift
                             else None, persistent=False)

    def _score_mod(self, table: torch.Tensor):
        """The opgen ``score_mod``: the bias table read by index arithmetic on the window-local indices (and the
        shift mask of window ``b % nW``)."""
        w, mask = self.window, self.shift_mask
        n_windows = (self.res // w) ** 2

        def swin_bias(score, b, h, q_idx, kv_idx):
            rel = ((q_idx // w) - (kv_idx // w) + (w - 1)) * (2 * w - 1) + (q_idx % w) - (kv_idx % w) + (w - 1)
            score = score + table[rel, h]
            if mask is not None:
                score = score + mask[b % n_windows, q_idx, kv_idx]
            return score

        return swin_bias

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v ``[B, nW, heads, w*w, hd]`` -> same shape."""
        b, nw, h, n, hd = q.shape
        if self.opgen:
            import opgen

            # under no_grad the table is a constant; with grad it is passed as is (its gradient is the capture's)
            table = self.bias_table if torch.is_grad_enabled() else self.bias_table.detach()
            out = opgen.ops.attention(*(t.reshape(b * nw, h, n, hd) for t in (q, k, v)),
                                      score_mod=self._score_mod(table))
            return out.reshape(b, nw, h, n, hd)
        bias = self.bias_table[self.rel_index.reshape(-1)].reshape(n, n, h).permute(2, 0, 1)    # [h, n, n]
        mask = bias[None] if self.shift_mask is None else bias[None] + self.shift_mask[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r, w, s, h = self.res, self.window, self.shift, self.heads
        y = self.norm1(x).reshape(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = y.reshape(b, r // w, w, r // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, (r // w) ** 2, w * w, c)
        q, k, v = self.qkv(y).reshape(b, (r // w) ** 2, w * w, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
        y = self._attention(q, k, v).transpose(2, 3).reshape(b, (r // w) ** 2, w * w, c)
        y = self.proj(y).reshape(b, r // w, r // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, r * r, c)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
