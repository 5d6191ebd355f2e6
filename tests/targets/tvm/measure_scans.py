"""A quick timing of the TVM scan kernels against the reference backend and plain torch loops (not a test).

    TVM_NUM_THREADS=1 python tests/targets/tvm/measure_scans.py [--repeats 20] [--cache-dir DIR]

Cases: linear_scan 1024 channels x 2048 steps fp32; selective_scan B=2, D=256, N=16, L=512 fp32, plain and
with D, z, delta_bias and softplus. Times are medians of ``--repeats`` calls, interleaved (one call of each
contender per round), with one thread for torch and TVM. Every TVM output is checked against the reference first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def _med(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--slow-repeats", type=int, default=5, help="repeats of the slow torch contenders")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import torch
    import torch.nn.functional as F

    from opgen.ir import DType, bind
    from opgen.ops.scan import declare_linear_scan, declare_selective_scan
    from opgen.targets.reference import evaluate

    from opgen.targets.tvm import TVMTarget

    torch.set_num_threads(1)
    tgt = TVMTarget(cache_dir=args.cache_dir)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads: torch {torch.get_num_threads()}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}; {tgt.caps().name}")

    # linear scan ------------------------------------------------------------------------------------------
    P, L = 1024, 2048
    op = declare_linear_scan()
    a = 0.9 + 0.1 * torch.rand(P, L, 1, generator=g)
    b = torch.randn(P, L, 1, generator=g)
    inputs = {"a": a, "b": b}
    bd = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    t0 = time.perf_counter()
    tgt.kernel(op, bd)
    compile_s = time.perf_counter() - t0
    ref = evaluate(op, inputs, bd)["h"]
    err = (tgt.run(op, inputs, bd)["h"] - ref).abs().max().item()

    def loop_ls():
        h = torch.zeros(P, 1)
        out = torch.empty(P, L, 1)
        for t in range(L):
            h = torch.addcmul(b[:, t], a[:, t], h)
            out[:, t] = h
        return out

    fast = _med({"tvm": lambda: tgt.run(op, inputs, bd)}, args.repeats)
    slow = _med({"reference": lambda: evaluate(op, inputs, bd), "torch loop": loop_ls}, args.slow_repeats)
    _report(f"linear_scan {P} channels x {L} steps fp32", tgt.config_for(op, bd), compile_s, err,
            ref.abs().max().item(), {**fast, **slow})

    # selective scan -----------------------------------------------------------------------------------------
    Bt, D, N, L = 2, 256, 16, 512
    for full in (False, True):
        kw = dict(D=DType.f32, z=DType.f32, delta_bias=DType.f32, delta_softplus=True) if full else {}
        op = declare_selective_scan(**kw)
        inputs = {"u": torch.randn(Bt, D, L, generator=g), "delta": 0.1 * torch.rand(Bt, D, L, generator=g),
                  "A": -2 * torch.rand(D, N, generator=g), "B": torch.randn(Bt, N, L, generator=g),
                  "C": torch.randn(Bt, N, L, generator=g)}
        if full:
            inputs.update(D=torch.randn(D, generator=g), z=torch.randn(Bt, D, L, generator=g),
                          delta_bias=0.1 * torch.randn(D, generator=g))
        bd = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
        t0 = time.perf_counter()
        tgt.kernel(op, bd)
        compile_s = time.perf_counter() - t0
        ref = evaluate(op, inputs, bd)["out"]
        err = (tgt.run(op, inputs, bd)["out"] - ref).abs().max().item()

        def loop_ss(inputs=inputs, full=full):
            dt = inputs["delta"]
            if full:
                dt = F.softplus(dt + inputs["delta_bias"][:, None])
            dA = torch.exp(dt[..., None] * inputs["A"][None, :, None, :])                 # [B, D, L, N]
            dBu = (dt * inputs["u"])[..., None] * inputs["B"].transpose(1, 2)[:, None]
            Cm = inputs["C"].transpose(1, 2)
            h = torch.zeros(Bt, D, N)
            ys = []
            for t in range(L):
                h = torch.addcmul(dBu[:, :, t], dA[:, :, t], h)
                ys.append(torch.einsum("bdn,bn->bd", h, Cm[:, t]))
            y = torch.stack(ys, -1)
            if full:
                y = (y + inputs["D"][:, None] * inputs["u"]) * F.silu(inputs["z"])
            return y

        fast = _med({"tvm": lambda: tgt.run(op, inputs, bd)}, args.repeats)
        slow = _med({"reference": lambda: evaluate(op, inputs, bd), "torch loop": loop_ss}, args.slow_repeats)
        name = f"selective_scan B={Bt} D={D} N={N} L={L} fp32{' +D +z +delta_bias +softplus' if full else ''}"
        _report(name, tgt.config_for(op, bd), compile_s, err, ref.abs().max().item(), {**fast, **slow})


def _report(name, cfg, compile_s, err, mag, times) -> None:
    tvm = times["tvm"]
    parts = ", ".join(f"{k} {v:.2f} ms ({v / tvm:.1f}x)" for k, v in times.items() if k != "tvm")
    print(f"{name}: tvm {tvm:.2f} ms; {parts}")
    print(f"    max |tvm - reference| {err:.2g} (max |out| {mag:.3g}); compile {compile_s:.2f} s; config {cfg}")


if __name__ == "__main__":
    main()
