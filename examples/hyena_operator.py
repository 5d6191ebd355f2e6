"""A Hyena operator (Poli et al., 2023) of order 2 whose long convolutions are ``torch.ops.opgen.long_conv`` and short
convolution ``torch.ops.opgen.causal_conv1d``, compiled once with ``torch.compile(fullgraph=True)`` for every
sequence length, checked against an FFT long convolution in plain torch and trained for a few steps.

    python examples/hyena_operator.py [--steps N] [--backend aot_eager|inductor]

The operator: an in-projection to three streams (v, x1, x2), a short causal depthwise convolution (width 3) on all
of them, implicit long filters ``h_1, h_2`` (one per channel, as long as the sequence) produced by a small MLP with
sine activations over positional features (t, cos / sin of a few frequencies of t) times an exponentially decaying
window, then the recurrence ``v <- x_i * (h_i * v + D_i v)`` (``*`` the causal long convolution over time) for
i = 1, 2 and an out-projection. The reference computes each long convolution with ``torch.fft`` (rfft of size 2L,
multiply, irfft, keep the first L), the way Hyena's ``fftconv`` does; the check covers the output and every
gradient (the filter MLP's in particular), fp32, at two lengths that go through the same compiled frame (the
length is marked dynamic, and the example fails if it recompiles).
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import opgen

TOL = 1e-4  # fp32: max |opgen - fft| <= TOL * max |fft| for the output and each gradient


def fft_long_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The causal long convolution by FFT: u ``[B, H, L]``, k ``[H, Lk]`` (Lk <= L), zero-padded to 2L."""
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., :u.shape[-1]]


class Sin(nn.Module):
    """Hyena's filter activation ``sin(w * x)`` with a learned frequency per feature."""

    def __init__(self, dim: int, w: float = 10.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """Implicit long filters: MLP(positional features of t) * exp(-alpha_c t), for ``order`` x ``dim`` channels.

    Positions are normalised by a fixed ``max_len`` so that the filters do not depend on the length asked for."""

    def __init__(self, dim: int, order: int = 2, bands: int = 4, hidden: int = 32, max_len: int = 1024,
                 fast_decay: float = 0.3, slow_decay: float = 1.5) -> None:
        super().__init__()
        self.dim, self.order, self.max_len = dim, order, max_len
        self.register_buffer("bands", torch.arange(1, bands + 1, dtype=torch.float32) * 2 * math.pi)
        feats = 1 + 2 * bands
        self.mlp = nn.Sequential(nn.Linear(feats, hidden), Sin(hidden), nn.Linear(hidden, hidden), Sin(hidden),
                                 nn.Linear(hidden, order * dim, bias=False))
        decay = math.log(1e-2) / torch.linspace(fast_decay, slow_decay, order * dim)  # 1e-2 at t = 0.3..1.5
        self.register_buffer("decay", decay)

    def forward(self, length: int) -> torch.Tensor:                   # -> [order, dim, length]
        t = torch.arange(length, dtype=torch.float32, device=self.decay.device)[:, None] / self.max_len
        z = torch.cat([t, torch.cos(self.bands * t), torch.sin(self.bands * t)], dim=-1)   # [length, feats]
        h = self.mlp(z) * torch.exp(self.decay * t)                   # [length, order * dim]
        return h.t().reshape(self.order, self.dim, length)


class HyenaOperator(nn.Module):
    """Hyena of order 2: in-projection, short conv, implicit long convolutions with gating, out-projection."""

    def __init__(self, dim: int, order: int = 2, short: int = 3) -> None:
        super().__init__()
        self.dim, self.order = dim, order
        self.in_proj = nn.Linear(dim, (order + 1) * dim)
        self.short_w = nn.Parameter(torch.randn((order + 1) * dim, short) / short)
        self.short_b = nn.Parameter(torch.zeros((order + 1) * dim))
        self.filter = HyenaFilter(dim, order)
        self.skip = nn.Parameter(torch.randn(order, dim, 1))           # the D skip of each long convolution
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # x: [B, L, dim]
        length = x.shape[1]
        u = self.in_proj(x).transpose(1, 2).contiguous()            # [B, 3 dim, L]
        u = opgen.ops.causal_conv1d(u, self.short_w, self.short_b)
        v, *gates = u.split(self.dim, dim=1)
        h = self.filter(length)                                       # [order, dim, L]
        for i, g in enumerate(gates):
            v = g * (opgen.ops.long_conv(v.contiguous(), h[i]) + self.skip[i] * v)
        return self.out_proj(v.transpose(1, 2))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same operator with the long convolutions by FFT and the short one by ``F.conv1d``."""
        length, width = x.shape[1], self.short_w.shape[1]
        u = self.in_proj(x).transpose(1, 2)
        u = F.conv1d(F.pad(u, (width - 1, 0)), self.short_w[:, None], self.short_b, groups=u.shape[1])
        v, *gates = u.split(self.dim, dim=1)
        h = self.filter(length)
        for i, g in enumerate(gates):
            v = g * (fft_long_conv(v, h[i]) + self.skip[i] * v)
        return self.out_proj(v.transpose(1, 2))


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (one per compiled frame / recompile)."""

    def __init__(self, backend: str) -> None:
        self.backend, self.frames = backend, 0

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def scaled_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler)")
    args = ap.parse_args()
    torch.manual_seed(0)
    batch, dim = 2, 32
    op = HyenaOperator(dim)
    counter = CountingBackend(args.backend)
    compiled = torch.compile(op, backend=counter, fullgraph=True)
    params = dict(op.named_parameters())
    ok = True

    for length in (300, 237):                                         # two lengths, one compiled frame
        x = torch.randn(batch, length, dim, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 1)
        t0 = time.perf_counter()
        out = compiled(x)
        cot = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, *params.values()], cot)
        seconds = time.perf_counter() - t0
        ref = op.forward_reference(x)
        ref_grads = torch.autograd.grad(ref, [x, *params.values()], cot)
        errs = {"out": scaled_err(out, ref), "x": scaled_err(grads[0], ref_grads[0])}
        errs.update({n: scaled_err(g, r) for n, g, r in zip(params, grads[1:], ref_grads[1:])})
        filt = max((n for n in errs if n.startswith("filter.")), key=errs.get)
        rest = max((n for n in errs if n != "out" and not n.startswith("filter.")), key=errs.get)
        print(f"L={length}: max |opgen - fft| / max |fft|: out {errs['out']:.1e}, filter MLP grads "
              f"{errs[filt]:.1e} ({filt}), other grads {errs[rest]:.1e} ({rest}) "
              f"(compile + fwd + bwd {seconds:.1f} s)")
        bad = [n for n, e in errs.items() if not e <= TOL]
        if bad:
            print(f"  MISMATCH (tolerance {TOL:g} x max |ref|): {', '.join(bad)}")
        ok &= not bad

    # train: predict the input delayed by 40 steps (a long-range copy the implicit filters must learn)
    opt = torch.optim.Adam(op.parameters(), lr=1e-3)
    x = torch.randn(batch, 300, dim)
    target = F.pad(x, (0, 0, 40, 0))[:, :300]
    x.requires_grad_()                                                # as in the checks: same guards, no recompile
    torch._dynamo.mark_dynamic(x, 1)
    losses = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = F.mse_loss(compiled(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step}  loss {loss.item():.4f}  ({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    print(f"compiled frames: {counter.frames} (tolerance {TOL:g} x max |ref|); "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    ok &= counter.frames == 1 and losses[-1] < losses[0]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
