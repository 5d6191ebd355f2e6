"""Triton kernels in the interpreter vs the reference backend, at tiny shapes (run as a script).

``test_triton_interpreter.py`` runs this file in a subprocess with ``TRITON_INTERPRET=1`` set before triton is
imported (the interpreter is chosen when ``@triton.jit`` runs). Each case prints one ``OK`` or ``FAIL`` line;
the exit code is the number of failures. Inputs are fp32 (bf16 dots and fp32->bf16 casts are wrong in the
interpreter, see notes/triton.md) or fp64. Sizes are not powers of two so state padding and lane tails are
exercised, and every buffer is checked for NaNs (out-of-bounds reads are not detected by the interpreter, so
padded reads must come from masks).

Usage: ``TRITON_INTERPRET=1 python interp_check.py CACHE_DIR [CASE ...]``
"""
from __future__ import annotations

import os
import sys
import time
import traceback

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from opgen.ir import DType, bind  # noqa: E402
from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan  # noqa: E402
from opgen.targets.reference import evaluate  # noqa: E402
from opgen.targets.triton import TritonTarget  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from custom_ops import (declare_gla_reverse, declare_index_math, declare_lane_free,  # noqa: E402
                        declare_ssd_like)

F32, F64 = torch.float32, torch.float64
TOL = {F32: 2e-5, F64: 1e-12}


def gen(seed: int):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=F32, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)


def rand(g, *shape, lo=0.0, hi=1.0, dtype=F32):
    return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=F64)).to(dtype)


def cases():
    """name -> (op, inputs, [configs]); a config None means the target's default config."""
    out = {}
    g = gen(1)
    P, L, Q = 2, 11, 3
    out["linear_scan_fwd"] = (declare_linear_scan(), dict(a=rand(g, P, L, Q, lo=0.5), b=randn(g, P, L, Q)),
                              [None, {"variant": "sequential", "BLOCK": 4, "STATE_TILE": 0, "num_warps": 1,
                                      "num_stages": 1}])
    g = gen(2)
    out["linear_scan_reverse_initial"] = (
        declare_linear_scan(reverse=True, initial=DType.f32),
        dict(a=rand(g, P, L, Q, lo=0.5), b=randn(g, P, L, Q), initial=randn(g, P, Q)),
        [None, {"variant": "sequential", "BLOCK": 8, "STATE_TILE": 0, "num_warps": 1, "num_stages": 1}])
    g = gen(3)
    out["linear_scan_fp64"] = (
        declare_linear_scan(DType.f64, DType.f64, initial=DType.f64),
        dict(a=rand(g, P, 7, Q, lo=0.5, dtype=F64), b=randn(g, P, 7, Q, dtype=F64), initial=randn(g, P, Q, dtype=F64)),
        [None])
    g = gen(4)
    Bt, D, L, N = 2, 3, 10, 5
    ss = declare_selective_scan(D=DType.f32, z=DType.f32, delta_bias=DType.f32, delta_softplus=True, last_state=True)
    out["selective_scan_full"] = (ss, dict(
        u=randn(g, Bt, L, D).transpose(1, 2),  # a strided (non-contiguous) view
        delta=randn(g, Bt, D, L, scale=0.5), A=-rand(g, D, N, lo=0.1, hi=2.0),
        B=randn(g, Bt, N, L), C=randn(g, Bt, N, L), D=randn(g, D), z=randn(g, Bt, D, L), delta_bias=randn(g, D)),
        [None, {"variant": "sequential", "BLOCK": 4, "STATE_TILE": 0, "num_warps": 1, "num_stages": 2}])
    g = gen(5)
    Bt, D, L, N, G = 2, 4, 9, 3, 2
    ssg = declare_selective_scan(B_layout="grouped", C_layout="shared", last_state=True)
    out["selective_scan_grouped_B_shared_C"] = (ssg, dict(
        u=randn(g, Bt, D, L), delta=rand(g, Bt, D, L, lo=0.05, hi=0.5), A=-rand(g, D, N, lo=0.1, hi=2.0),
        B=randn(g, Bt, G, N, L), C=randn(g, D, N)),
        [None, {"variant": "sequential", "BLOCK": 8, "STATE_TILE": 0, "num_warps": 1, "num_stages": 1}])
    g = gen(6)
    Bt, T, H, K, V = 1, 13, 2, 5, 6
    gla = declare_chunk_gla(scale=0.3, initial_state=DType.f32, final_state=True)
    gla_in = dict(q=randn(g, Bt, T, H, K), k=randn(g, Bt, T, H, K), v=randn(g, Bt, T, H, V),
                  g=-rand(g, Bt, T, H, K, hi=0.5), initial_state=randn(g, Bt, H, K, V))
    out["chunk_gla_sequential"] = (gla, gla_in, [
        {"variant": "sequential", "BLOCK": 2, "STATE_TILE": 0, "num_warps": 1, "num_stages": 1},
        {"variant": "sequential", "BLOCK": 1, "STATE_TILE": 4, "num_warps": 1, "num_stages": 1}])
    out["chunk_gla_default"] = (gla, gla_in, [None])
    out["chunk_gla_chunked"] = (gla, gla_in, [
        {"variant": "chunked-matmul", "BT": 16, "BV": 16, "num_warps": 4, "num_stages": 2,
         "dot_precision": "ieee"}])
    g = gen(7)
    Bt, T, H, K, V = 1, 37, 1, 20, 18
    gla2 = declare_chunk_gla(scale=0.25, final_state=True)
    out["chunk_gla_chunked_multi_chunk_strong_decay"] = (gla2, dict(
        q=randn(g, Bt, T, H, K), k=randn(g, Bt, T, H, K), v=randn(g, Bt, T, H, V),
        g=-rand(g, Bt, T, H, K, hi=8.0)), [
        {"variant": "chunked-matmul", "BT": 16, "BV": 16, "num_warps": 4, "num_stages": 2,
         "dot_precision": "tf32x3"}])
    g = gen(8)
    Bt, T, H, N, P = 1, 21, 2, 4, 3
    out["ssd_like_reverse_scalar_decay_epilogue"] = (declare_ssd_like(), dict(
        x=randn(g, Bt, T, H, P), dt=rand(g, Bt, T, H, lo=0.05, hi=0.5), A=-rand(g, H, lo=0.5, hi=2.0),
        Bm=randn(g, Bt, T, N), Cm=randn(g, Bt, T, N), z=randn(g, Bt, T, H, P)), [
        {"variant": "chunked-matmul", "BT": 16, "BV": 16, "num_warps": 4, "num_stages": 2,
         "dot_precision": "ieee"},
        {"variant": "sequential", "BLOCK": 2, "STATE_TILE": 0, "num_warps": 1, "num_stages": 1}])
    for dtype, seed in ((F32, 10), (F64, 11)):
        g = gen(seed)
        Bt, T, H, K, V = 2, 19, 1, 6, 17
        ir = DType.f32 if dtype == F32 else DType.f64
        out[f"gla_reverse_initial_{ir}"] = (declare_gla_reverse(ir), dict(
            q=randn(g, Bt, T, H, K, dtype=dtype), k=randn(g, Bt, T, H, K, dtype=dtype),
            v=randn(g, Bt, T, H, V, dtype=dtype), g=-rand(g, Bt, T, H, K, hi=1.0, dtype=dtype),
            s0=randn(g, Bt, H, K, V, dtype=dtype)), [
            {"variant": "chunked-matmul", "BT": 16, "BV": 16, "num_warps": 4, "num_stages": 2,
             "dot_precision": "ieee"},
            {"variant": "sequential", "BLOCK": 1, "STATE_TILE": 8, "num_warps": 1, "num_stages": 1}])
    g = gen(12)
    out["lane_free_vector_state"] = (declare_lane_free(), dict(x=randn(g, 9, 3), w=randn(g, 3)), [
        None, {"variant": "sequential", "BLOCK": 4, "STATE_TILE": 0, "num_warps": 1, "num_stages": 1}])
    g = gen(9)
    out["index_math_padded_floor_mod"] = (declare_index_math(), dict(x=randn(g, 2, 13, 3), w=randn(g, 2, 3)),
                                          [None])
    return out


def main(argv: list[str]) -> int:
    cache_dir = argv[1]
    only = set(argv[2:])
    target = TritonTarget(cache_dir=cache_dir)
    ok, why = target.available()
    if not ok:
        print(f"FAIL available: {why}")
        return 1
    failures = 0
    for name, (op, inputs, configs) in cases().items():
        if only and name not in only:
            continue
        binding = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
        ref = evaluate(op, inputs, binding)
        for cfg in configs:
            used = dict(cfg) if cfg is not None else target.config(op, binding)
            label = f"{name} {used['variant']} {'default' if cfg is None else 'explicit'}"
            t0 = time.perf_counter()
            try:
                if not target.supports(op, "cpu"):
                    raise AssertionError("target.supports(op, 'cpu') is False under the interpreter")
                got = target.run(op, inputs, binding, cfg)
                errs = []
                for k, r in ref.items():
                    x = got[k]
                    assert x.dtype == r.dtype and x.shape == r.shape, f"{k}: {x.dtype}{tuple(x.shape)} vs " \
                                                                      f"{r.dtype}{tuple(r.shape)}"
                    assert torch.isfinite(x).all(), f"{k} has non-finite values"
                    scale = max(1.0, r.abs().max().item())
                    err = (x.double() - r.double()).abs().max().item() / scale
                    tol = TOL[r.dtype]
                    errs.append(f"{k} {err:.1e}")
                    assert err <= tol, f"{k}: relative error {err:.3e} > {tol:g}"
                print(f"OK {label}: {', '.join(errs)} ({time.perf_counter() - t0:.2f}s) cfg={used}")
            except Exception as e:  # noqa: BLE001 (report every case)
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {e} cfg={used}")
                traceback.print_exc(file=sys.stdout)
    print(f"{failures} failures")
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv))
