"""Declare a new scan in the IR, tune it, and call it from torch.

A minimal gated linear RNN with a small expanded state (HGRN-style): for each channel c and state slot n,
``h[t] = k[t] * h[t-1] + (1 - k[t]) * x[t]`` with ``k = sigmoid(f[t] + r[c, n])`` (per-slot decay rates), read out
as ``y = sum_n w[c, n] * h`` and gated by ``silu(g)``. opgen fuses the gates, the recurrence, the read-out and the
output gate into one scan kernel (TVM on CPU), tunes its schedule with Optuna (each trial compiled, checked
against the reference interpreter and timed in a child process), and the call then uses the best config found.
Run: ``python examples/gated_rnn.py [--trials N]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import opgen
from opgen import Float


@opgen.op
def gated_rnn(x: Float["B C L"], f: Float["B C L"], g: Float["B C L"], r: Float["C N"], w: Float["C N"]):
    b, c, n, t = opgen.axes("b c n t")
    keep = opgen.sigmoid(f[b, c, t] + r[c, n])
    h = opgen.scan(t, a=keep, b=(1.0 - keep) * x[b, c, t], state=n, axes=(b, c, n, t))
    y = opgen.sum(n, h[b, c, n, t] * w[c, n], axes=(b, c, t))
    return opgen.compute(y[b, c, t] * opgen.silu(g[b, c, t]), (b, c, t))


def declare():
    """The op's IR (the tuner's worker process imports this function by name)."""
    return gated_rnn.build()


def torch_loop(x, f, g, r, w):
    h, out = x.new_zeros(x.shape[0], x.shape[1], r.shape[1]), []
    for t in range(x.shape[-1]):
        k = torch.sigmoid(f[..., t, None] + r)
        h = k * h + (1 - k) * x[..., t, None]
        out.append((h * w).sum(-1))
    return torch.stack(out, -1) * torch.nn.functional.silu(g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    args = ap.parse_args()
    op = declare()
    print(op.pretty())
    from opgen.ir.passes import fuse_scan

    print(fuse_scan(op).describe())

    dims = {"B": 2, "C": 256, "L": 512, "N": 4}
    x, f, g = (torch.randn(dims["B"], dims["C"], dims["L"]) for _ in range(3))
    r, w = torch.randn(dims["C"], dims["N"]), torch.randn(dims["C"], dims["N"]) / 2
    y = opgen.run(op, x=x, f=f, g=g, r=r, w=w)["out"]
    print(f"untuned: max |opgen - torch loop| = {(y - torch_loop(x, f, g, r, w)).abs().max().item():.2e}")

    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")  # the worker imports us
    sys.path.insert(0, here)
    from opgen.tune.library import IRProblem
    from opgen.tune.tuner import tune

    cache = os.environ.get("OPGEN_CACHE_DIR") or tempfile.mkdtemp(prefix="opgen-example-")
    problem = IRProblem("gated_rnn:declare", dims, "tvm", cache_dir=cache)
    res = tune(problem, trials=args.trials, cache_dir=cache, progress=False)
    print(res.summary())

    from opgen.config import Config
    from opgen.runtime import make_session

    session = make_session(Config(cache_dir=__import__("pathlib").Path(cache)))
    inputs = {"x": x, "f": f, "g": g, "r": r, "w": w}
    session.run(op, inputs)  # first call compiles the tuned config (or loads it from the disk cache)
    t0 = time.perf_counter()
    y = session.run(op, inputs)["out"]
    ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    ref = torch_loop(x, f, g, r, w)
    ref_ms = (time.perf_counter() - t0) * 1e3
    print(f"tuned: {ms:.2f} ms vs torch loop {ref_ms:.2f} ms; max |opgen - torch loop| = "
          f"{(y - ref).abs().max().item():.2e}")
    assert (y - ref).abs().max().item() < 1e-4


if __name__ == "__main__":
    main()
