"""Torch formulations of library ops that a user would otherwise run: the baselines of ``opgen bench`` and of
``opgen tune``'s comparison (:func:`opgen.tune.library.baseline_ms`). Only torch: nothing of opgen is imported here,
so the tuner can use them without importing the benchmark cases."""
from __future__ import annotations


def ss_loop_plain(u, delta, A, B, C, D):
    """The selective scan (delta as given, no gate) as a torch loop over time: ``y = C h + D u``."""
    import torch

    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for i in range(u.shape[2]):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, 2) + u * D[:, None]


def _ss_loop(u, delta, A, B, C, D, z):
    """Mamba's selective scan with delta_softplus and the SiLU gate z, as a torch loop."""
    import torch.nn.functional as F

    return ss_loop_plain(u, F.softplus(delta), A, B, C, D) * F.silu(z)


def _ss_scan_hop(u, delta, A, B, C, D, z):
    import torch
    import torch.nn.functional as F
    from torch._higher_order_ops import scan

    delta = F.softplus(delta)
    dA = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->lbdn", delta, B, u)
    Cl = C.permute(2, 0, 1)

    def step(x, xs):
        da, dbu, c = xs
        x = da * x + dbu
        return x, torch.einsum("bdn,bn->bd", x, c)

    _, ys = scan(step, u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), (dA, dBu, Cl), dim=0)
    return (ys.permute(1, 2, 0) + u * D[:, None]) * F.silu(z)
