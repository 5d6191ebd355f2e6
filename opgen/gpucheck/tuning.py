"""A short tuning run of one op per family (what ``opgen tune OP --backend triton --measured 3`` does): the
default config plus a few sampled configs, each built, checked against the reference and timed in the tuner's
child process. The record gives the default and best times, the speedup and the best config.

The studies go to ``DIR/tune`` (not the user's cache), so the check neither reads nor changes tuned records.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import CaseResult


@dataclass(frozen=True)
class TuningCase:
    name: str
    op: str
    dims: dict[str, int]
    dtype: str
    measured: int = 3
    est_gpu_s: float = 45.0     # child start + 3-4 compiles + checks + timings
    quick: bool = False


def cases(quick: bool) -> list[TuningCase]:
    out = [TuningCase("tune linear_scan C=4096 L=4096 fp32 (scan)", "linear_scan", dict(C=4096, L=4096), "float32",
                      quick=True),
           TuningCase("tune depthwise 7x7 C=256 56x56 N=16 bf16 (window)", "depthwise_conv2d",
                      dict(N=16, C=256, H=56, W=56, K=7), "bfloat16"),
           TuningCase("tune attention B=2 H=8 L=2048 D=64 bf16 (attention)", "attention", dict(B=2, H=8, L=2048, D=64),
                      "bfloat16", est_gpu_s=60.0)]
    return [c for c in out if c.quick] if quick else out


def run_case(case: TuningCase, out_dir: Path, cache_dir: str) -> CaseResult:
    """Tune one case with a budget of ``case.measured`` configs; never raises."""
    t0 = time.perf_counter()
    m: dict[str, Any] = {"dtype": case.dtype, "measured_budget": case.measured, "est_gpu_s": case.est_gpu_s}
    try:
        from opgen.tune.library import LibraryProblem
        from opgen.tune.tuner import tune

        p = LibraryProblem(case.op, case.dims, "triton", case.dtype, cache_dir=cache_dir)
        res = tune(p, trials=case.measured, measured=case.measured, seconds=120.0, cache_dir=out_dir / "tune",
                   progress=False, timeout=90.0, seed=0)
        m.update(default_ms=res.default_time_ms, best_ms=res.best_time_ms, speedup=res.speedup,
                 best_config=res.best_config, trials=res.trials, by_status=dict(res.by_status))
        if not res.best_time_ms:
            return CaseResult("tuning", case.name, "wrong", f"no config measured: {res.by_status}",
                              time.perf_counter() - t0, m)
        return CaseResult("tuning", case.name, "ok", res.summary().splitlines()[0][:300], time.perf_counter() - t0, m)
    except Exception as e:  # noqa: BLE001 (a case records its failure, the run goes on)
        return CaseResult("tuning", case.name, "crashed", f"{type(e).__name__}: {str(e)[:500]}",
                          time.perf_counter() - t0, m)
