"""Two recurrences of recent sequence models, declared with @opgen.op, checked against torch loops and trained.

* minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): ``h_t = (1 - z_t) * h_{t-1} + z_t * h~_t`` with
  ``z_t = sigmoid(k_t)``; the op takes the two linear maps of x_t (the gate pre-activation k and the candidate
  h~) and computes the gate inside the scan kernel.
* The Mamba-2 SSD scan (Dao & Gu 2024), per head h: scalar decay ``a_t = exp(dt_t * A_h)``, state
  ``H_t[n, p] = a_t H_{t-1}[n, p] + dt_t B_t[n] x_t[p]``, output ``y_t[p] = sum_n C_t[n] H_t[n, p] + D_h x_t[p]``;
  B and C are shared by groups of heads (head h reads group h * G // H; G = 1: one B, C for all heads).

Each op is compared with a plain torch loop (forward and every gradient, through the backward op that opgen
generates from the declaration), then a tiny model around it is trained for a few Adam steps under
``torch.compile(fullgraph=True, dynamic=True)`` on sequences of two lengths (one compiled frame).
Run: ``python examples/declared_rnns.py [--L 128] [--D 64] [--H 4 --P 16 --N 16 --G 2] [--steps 8]``.
"""
import argparse
import timeit

import torch
import torch.nn as nn
import torch.nn.functional as F

import opgen
from opgen import Float


@opgen.op
def min_gru(k: Float["B L D"], v: Float["B L D"]):
    b, t, d = opgen.axes("b t d")
    z = opgen.sigmoid(k[b, t, d])
    return opgen.scan(t, a=1.0 - z, b=z * v[b, t, d], axes=(b, t, d))


@opgen.op
def ssd_scan(x: Float["B L H P"], dt: Float["B L H"], A: Float["H"], Bm: Float["B L G N"], Cm: Float["B L G N"],
             D: Float["H"]):
    b, t, h, n, p = opgen.axes("b t h n p")
    H, G = opgen.dims("H G")
    g = h * G // H                                               # the group of head h
    decay = opgen.exp(dt[b, t, h] * A[h])
    state = opgen.scan(t, a=decay, b=dt[b, t, h] * Bm[b, t, g, n] * x[b, t, h, p], state=(n, p),
                       axes=(b, h, n, p, t))
    y = opgen.sum(n, Cm[b, t, g, n] * state[b, h, n, p, t], axes=(b, t, h, p))
    return opgen.compute(y[b, t, h, p] + D[h] * x[b, t, h, p], (b, t, h, p))


def min_gru_loop(k, v):
    h, out = k.new_zeros(k.shape[0], k.shape[2]), []
    for t in range(k.shape[1]):
        z = torch.sigmoid(k[:, t])
        h = (1 - z) * h + z * v[:, t]
        out.append(h)
    return torch.stack(out, 1)


def ssd_loop(x, dt, A, Bm, Cm, D):
    heads = x.shape[2]
    Bm, Cm = (m.repeat_interleave(heads // m.shape[2], dim=2) for m in (Bm, Cm))    # [B, L, H, N]
    h, out = x.new_zeros(x.shape[0], heads, Bm.shape[-1], x.shape[-1]), []       # [B, H, N, P]
    for t in range(x.shape[1]):
        a = torch.exp(dt[:, t] * A)[..., None, None]
        h = a * h + (dt[:, t, :, None, None] * Bm[:, t, :, :, None]) * x[:, t, :, None, :]
        out.append(torch.einsum("bhn,bhnp->bhp", Cm[:, t], h) + D[:, None] * x[:, t])
    return torch.stack(out, 1)


def check(name, op, loop, inputs, tol):
    """Forward and gradients of ``op`` against ``loop`` (relative max errors, printed, asserted below ``tol``);
    ``inputs``: the op's tensor arguments by name, in order."""
    names, inputs = list(inputs), [x.detach().requires_grad_() for x in inputs.values()]
    y, ref = op(*inputs), loop(*inputs)                           # the first call compiles the kernel
    ms = [timeit.timeit(lambda f=f: f(*inputs), number=3) / 3 * 1e3 for f in (op, loop)]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_grads = torch.autograd.grad(ref, inputs, dy)
    err = (y - ref).abs().max().item() / ref.abs().max().item()
    gerr = {p: ((g - r).abs().max() / r.abs().max()).item() for p, g, r in zip(names, grads, ref_grads)}
    print(f"{name}: max |opgen - torch loop| / max |loop| = {err:.1e}; gradients: "
          + ", ".join(f"{p} {e:.1e}" for p, e in gerr.items())
          + f"; forward {ms[0]:.2f} ms vs loop {ms[1]:.2f} ms")
    assert err < tol and max(gerr.values()) < tol, (err, gerr)


class MinGRU(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.kv, self.out = nn.Linear(d_in, 2 * d), nn.Linear(d, 1)

    def forward(self, u):                                        # u [B, L, d_in] -> [B, L]
        k, v = self.kv(u).chunk(2, dim=-1)
        return self.out(min_gru(k.contiguous(), v.contiguous())).squeeze(-1)


class SSD(nn.Module):
    def __init__(self, d_in, heads, head_dim, d_state, groups):
        super().__init__()
        self.sizes = [heads * head_dim, heads, groups * d_state, groups * d_state]
        self.shape = (heads, head_dim, groups, d_state)
        self.proj, self.out = nn.Linear(d_in, sum(self.sizes)), nn.Linear(heads * head_dim, 1)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 4, heads)))
        self.D = nn.Parameter(torch.ones(heads))

    def forward(self, u):                                        # u [B, L, d_in] -> [B, L]
        (bsz, length), (heads, head_dim, groups, d_state) = u.shape[:2], self.shape
        x, dt, Bm, Cm = self.proj(u).split(self.sizes, dim=-1)
        y = ssd_scan(x.reshape(bsz, length, heads, head_dim), F.softplus(dt).contiguous(), -torch.exp(self.A_log),
                     Bm.reshape(bsz, length, groups, d_state), Cm.reshape(bsz, length, groups, d_state), self.D)
        return self.out(y.reshape(bsz, length, heads * head_dim)).squeeze(-1)


def train(name, model, steps, lengths, d_in):
    """A few Adam steps on one compiled frame: predict an exponential moving average (decay 0.9) of the first input
    feature (which is what a minGRU with a constant gate z = sigmoid(-2.2) ~ 0.1 computes)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = torch.compile(lambda u, target: F.mse_loss(model(u), target), fullgraph=True, dynamic=True)
    data = [(u, 3 * min_gru_loop(torch.full_like(u[..., :1], -2.2), u[..., :1])[..., 0]) for n in lengths
            for u in [torch.randn(4, n, d_in)]]
    losses = []
    for i in range(steps):
        loss = step(*data[i % len(data)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    per_len = [losses[j::len(data)] for j in range(len(data))]
    print(f"{name} training loss: " + "; ".join(f"L={n}: " + " ".join(f"{v:.3f}" for v in ls)
                                                 for n, ls in zip(lengths, per_len)))
    assert all(ls[-1] < ls[0] for ls in per_len), losses


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("B", 2), ("L", 64), ("D", 32), ("H", 4), ("P", 8), ("N", 16), ("G", 2), ("steps", 8)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    torch.manual_seed(0)
    check("min_gru", min_gru, min_gru_loop, {"k": torch.randn(a.B, a.L, a.D), "v": torch.randn(a.B, a.L, a.D)}, 1e-4)
    check("ssd_scan", ssd_scan, ssd_loop, {
        "x": torch.randn(a.B, a.L, a.H, a.P), "dt": F.softplus(torch.randn(a.B, a.L, a.H)) / 4,
        "A": -torch.rand(a.H) - 0.5, "Bm": torch.randn(a.B, a.L, a.G, a.N), "Cm": torch.randn(a.B, a.L, a.G, a.N),
        "D": torch.randn(a.H)}, 1e-3)   # dA sums B * L * N * P terms a head in fp32
    lengths = (a.L * 3 // 4, a.L)
    train("minGRU", MinGRU(8, a.D), a.steps, lengths, 8)
    train("SSD", SSD(8, a.H, a.P, a.N, a.G), a.steps, lengths, 8)


if __name__ == "__main__":
    main()
