"""The measuring protocol of ``opgen bench``: each case against its baselines in one process, interleaved, medians
and ratios.

A case builds its inputs once, warms every implementation up (>= 0.3 s and >= 3 calls each: a fresh process's
first calls fault in fresh output pages), then runs every implementation round-robin ``repeats`` times (so
machine noise hits all of them alike), checks each baseline's result against opgen's, and reports median
milliseconds, the ratio baseline/opgen, and for memory-bound ops the measured memory floor (a copy of the same
number of bytes).
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Impl:
    """One implementation of a case: a zero-argument callable returning the output tensor."""

    name: str
    fn: Callable[[], Any]
    compile_s: float = 0.0
    same_op: bool = True          # False: a timing reference only (not this op), no error column


@dataclass
class CaseResult:
    """The measured medians of one case."""

    op: str
    case: str
    ms: dict[str, float]
    max_err: dict[str, float]
    floor_ms: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def ratio(self, baseline: str) -> float:
        return self.ms[baseline] / self.ms["opgen"]


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _time_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _copy_floor(nbytes: int) -> Callable[[], Any]:
    """A copy that moves ``nbytes`` in all (reads nbytes/2, writes nbytes/2): the memory floor of a kernel
    that reads and writes ``nbytes`` altogether."""
    import torch

    src = torch.empty(max(1, nbytes // 8), dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


WARMUP_S = 0.3
WARMUP_CALLS = (3, 100)


def _warm_up(fns: list[Callable[[], Any]]) -> None:
    """Call each implementation (round-robin) until it has had ``WARMUP_S`` seconds and at least 3 calls (at most
    100). A fresh process's first calls of a memory-bound op are 2-3x slower than its steady state (fresh output
    buffers fault their pages in until the allocator keeps freed ones: linear_scan 1024 x 2048 took 3.1-4.0 ms a
    call for its first 4-15 calls, then 1.15 ms), and 10 timed calls straight after the first measured that
    instead of what a training loop gets."""
    spent = [0.0] * len(fns)
    calls = [0] * len(fns)
    lo, hi = WARMUP_CALLS
    todo = list(range(len(fns)))
    while todo:
        for k in todo:
            spent[k] += _time_ms(fns[k]) / 1e3
            calls[k] += 1
        todo = [k for k in todo if calls[k] < hi and (calls[k] < lo or spent[k] < WARMUP_S)]


def measure(op: str, case: str, impls: list[Impl], repeats: int = 10, floor_bytes: int | None = None) -> CaseResult:
    """Interleaved medians; errors are relative to the opgen implementation (the first impl)."""
    import torch

    with torch.no_grad():
        ref = _first(impls[0].fn()).double()
        errs = {}
        for im in impls[1:]:
            if not im.same_op:
                continue
            out = _first(im.fn()).double()
            e = (out - ref).abs().max().item()
            errs[im.name] = e if math.isfinite(e) else float("nan")
    floor = _copy_floor(floor_bytes) if floor_bytes else None
    _warm_up([im.fn for im in impls] + ([floor] if floor is not None else []))
    samples: dict[str, list[float]] = {im.name: [] for im in impls}
    floor_s: list[float] = []
    for _ in range(repeats):
        for im in impls:
            samples[im.name].append(_time_ms(im.fn))
        if floor is not None:
            floor_s.append(_time_ms(floor))
    notes = {im.name: f"compile {im.compile_s:.1f} s" for im in impls if im.compile_s}
    return CaseResult(op, case, {k: statistics.median(v) for k, v in samples.items()}, errs,
                      statistics.median(floor_s) if floor_s else None, notes)


def environment() -> dict[str, str]:
    """Machine and versions for the record."""
    import torch

    env = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    try:
        import tvm

        env["tvm"] = tvm.__version__
    except Exception:  # noqa: BLE001 (optional dependency)
        env["tvm"] = "unavailable"
    return env


def format_results(results: list[CaseResult]) -> str:
    """A table: one row per (case, baseline) with medians and the ratio."""
    rows = [("op", "case", "impl", "ms", "opgen ms", "speedup", "max |err|")]
    for r in results:
        rows.append((r.op, r.case, "opgen", f"{r.ms['opgen']:.3f}", "", "", ""))
        for name, ms in r.ms.items():
            if name == "opgen":
                continue
            err = f"{r.max_err[name]:.1e}" if name in r.max_err else ""
            rows.append(("", "", name, f"{ms:.3f}", f"{r.ms['opgen']:.3f}", f"{r.ratio(name):.2f}x", err))
        for name, note in r.notes.items():
            rows.append(("", "", f"  note: {name}", note, "", "", ""))
        if r.floor_ms is not None:
            rows.append(("", "", "memory floor (copy)", f"{r.floor_ms:.3f}", f"{r.ms['opgen']:.3f}",
                         f"{r.floor_ms / r.ms['opgen']:.2f} of floor", ""))
    widths = [max(len(str(x)) for x in col) for col in zip(*rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def write_json(results: list[CaseResult], path: str) -> None:
    """Results plus the environment, as JSON."""
    with open(path, "w") as f:
        json.dump({"environment": environment(), "results": [asdict(r) for r in results]}, f, indent=2)
