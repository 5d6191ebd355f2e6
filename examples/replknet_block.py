"""A RepLKNet / ConvNeXt block whose 31x31 depthwise convolution is ``torch.ops.opgen.conv2d``, compiled once with
``torch.compile(fullgraph=True)`` for every spatial size, checked against ``F.conv2d`` and trained for a few steps.

    python examples/replknet_block.py [--steps N] [--backend aot_eager|inductor]

The block (Ding et al., 2022 / Liu et al., 2022): a depthwise 31x31 convolution with a parallel depthwise 5x5
branch, LayerNorm over channels, a pointwise MLP (C -> 4C, GELU, 4C -> C), a layer scale and the residual. RepLKNet
trains the two branches and, for inference, folds the small kernel into the large one (structural
re-parameterisation: zero-pad the 5x5 kernel to 31x31 and add it, add the biases). Here the block always runs the
folded kernel, so one ``opgen.ops.conv2d(x, w31 + pad(w5), b31 + b5, padding=15, groups=C)`` call does both
branches while autograd still gives each branch its own gradient; the reference is the unfolded two-branch block in
plain torch (two ``F.conv2d`` calls), forward and all parameter / input gradients, fp32, at two spatial sizes that go
through the same compiled frame (the height and width are marked dynamic, and the example fails if it recompiles).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import opgen

RTOL = ATOL = 1e-4  # fp32: opgen's direct window sum vs torch's convolution, both accumulating in fp32


class RepLKBlock(nn.Module):
    """Depthwise large-kernel conv (+ folded small-kernel branch) -> LayerNorm -> MLP -> layer scale -> residual."""

    def __init__(self, dim: int, large: int = 31, small: int = 5, mlp_ratio: int = 4, ls_init: float = 0.5) -> None:
        super().__init__()
        self.dim, self.large, self.small = dim, large, small
        self.w_large = nn.Parameter(torch.randn(dim, 1, large, large) / large)
        self.b_large = nn.Parameter(torch.randn(dim) * 0.1)
        self.w_small = nn.Parameter(torch.randn(dim, 1, small, small) / small)
        self.b_small = nn.Parameter(torch.randn(dim) * 0.1)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), ls_init))        # layer scale (ConvNeXt uses 1e-6 at init)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RepLKNet's re-parameterisation: the 5x5 kernel zero-padded into the middle of the 31x31 one."""
        p = (self.large - self.small) // 2
        return self.w_large + F.pad(self.w_small, (p, p, p, p)), self.b_large + self.b_small

    def mix(self, x: torch.Tensor) -> torch.Tensor:                 # x: [N, C, H, W] -> [N, C, H, W]
        w, b = self.folded()
        return opgen.ops.conv2d(x, w, b, padding=self.large // 2, groups=self.dim)

    def mix_reference(self, x: torch.Tensor) -> torch.Tensor:       # the unfolded two-branch form, plain torch
        return (F.conv2d(x, self.w_large, self.b_large, padding=self.large // 2, groups=self.dim)
                + F.conv2d(x, self.w_small, self.b_small, padding=self.small // 2, groups=self.dim))

    def tail(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(y.permute(0, 2, 3, 1)))               # channels-last for LayerNorm and the MLP
        return x + (self.gamma * y).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x, self.mix(x))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x, self.mix_reference(x))


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (one per compiled frame / recompile)."""

    def __init__(self, backend: str) -> None:
        self.backend, self.frames = backend, 0

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``allclose`` with rtol RTOL and atol ATOL relative to the reference's largest entry."""
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL * b.abs().max().item())


def scaled_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend (inductor needs a C++ compiler)")
    args = ap.parse_args()
    torch.manual_seed(0)
    batch, dim = 2, 16
    block = RepLKBlock(dim)
    counter = CountingBackend(args.backend)
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    params = dict(block.named_parameters())
    ok = True

    for hw in ((20, 23), (17, 26)):                                   # two spatial sizes, one compiled frame
        x = torch.randn(batch, dim, *hw, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 2)
        torch._dynamo.mark_dynamic(x, 3)
        t0 = time.perf_counter()
        out = compiled(x)
        cot = torch.randn_like(out)                                   # a random cotangent: O(1) gradients
        grads = torch.autograd.grad(out, [x, *params.values()], cot)
        seconds = time.perf_counter() - t0
        ref = block.forward_reference(x)
        ref_grads = torch.autograd.grad(ref, [x, *params.values()], cot)
        pairs = {"out": (out, ref), "grad x": (grads[0], ref_grads[0])}
        pairs.update({f"grad {n}": (g, r) for n, g, r in zip(params, grads[1:], ref_grads[1:])})
        errs = {k: scaled_err(*v) for k, v in pairs.items()}
        worst = max((k for k in errs if k.startswith("grad")), key=errs.get)
        print(f"{hw[0]}x{hw[1]}: max |opgen - torch| / max |torch|: out {errs['out']:.1e}, "
              f"grad w_large {errs['grad w_large']:.1e}, grad w_small {errs['grad w_small']:.1e}, "
              f"grad x {errs['grad x']:.1e}, worst grad {errs[worst]:.1e} ({worst}) "
              f"(compile + fwd + bwd {seconds:.1f} s)")
        bad = [k for k, v in pairs.items() if not close(*v)]
        if bad:
            print(f"  MISMATCH (rtol {RTOL:g}, atol {ATOL:g} x max |ref|): {', '.join(bad)}")
        ok &= not bad

    opt = torch.optim.SGD(block.parameters(), lr=1.0)
    x = torch.randn(batch, dim, 20, 23)
    target = torch.roll(x, shifts=(3, -4), dims=(2, 3))             # a long-range spatial shift to learn
    x.requires_grad_()                                                # as in the checks: same guards, no recompile
    torch._dynamo.mark_dynamic(x, 2)
    torch._dynamo.mark_dynamic(x, 3)
    losses = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = F.mse_loss(compiled(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step}  loss {loss.item():.4f}  ({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    print(f"compiled frames: {counter.frames} (tolerances rtol {RTOL:g}, atol {ATOL:g} x max |ref|); "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    ok &= counter.frames == 1 and losses[-1] < losses[0]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
