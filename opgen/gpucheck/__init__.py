"""``python -m opgen.gpucheck --out DIR [--quick] [--interpret]`` (also ``opgen gpucheck``): one prepared run of
everything a GPU session should check.

1. correctness (:mod:`.cases`): every Triton kernel variant against the reference at small odd shapes, fp32 and
   bf16;
2. timing (:mod:`.timing`): the goal cases of BENCHMARKS.md against GPU baselines with ``do_bench``;
3. tuning (:mod:`.tuning`): a short tuning run of one op per family;
4. the report (:mod:`.report`): ``DIR/gpucheck.json`` and ``DIR/gpucheck.md``; one record per case with its
   status (ok / wrong / crashed / slow / skipped), message and timing. A failing case never stops the run.

``--interpret`` sets ``TRITON_INTERPRET=1`` and runs the correctness cases at tiny sizes on CPU tensors in Triton's
interpreter (timing and tuning become ``skipped: no GPU`` records), so CI proves the script end to end.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["run_check", "estimate_gpu_seconds"]


def estimate_gpu_seconds(quick: bool) -> float:
    """The estimated wall time of a GPU run (sum of the per-case estimates; first compiles included)."""
    from . import cases, timing, tuning

    return (sum(c.est_gpu_s for c in cases.all_cases(quick)) + sum(c.est_gpu_s for c in timing.cases(quick))
            + sum(c.est_gpu_s for c in tuning.cases(quick)))


def _progress(total: int) -> tuple[Callable[[str], None], Callable[[], None]]:
    """(line per finished case, close); a tqdm bar when tqdm is importable, else plain lines on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        bar = tqdm(total=total, unit="case", file=sys.stderr)

        def step(line: str) -> None:
            bar.write(line, file=sys.stderr)
            bar.update(1)
        return step, bar.close
    count = [0]

    def plain(line: str) -> None:
        count[0] += 1
        print(f"[{count[0]}/{total}] {line}", file=sys.stderr, flush=True)
    return plain, lambda: None


#: seconds after which the remaining timing and tuning cases are recorded as skipped (the full run must end within
#: 8 minutes on an H100, the quick one within 4)
BUDGET_S = {False: 420.0, True: 210.0}


def run_check(out: Path | str, quick: bool = False, interpret: bool = False,
              only: Iterable[str] = (), budget_s: float | None = None) -> int:
    """Run the check and write the report into ``out``. Returns 0 when no case is wrong or crashed, 1 otherwise,
    2 when there is neither a CUDA device nor ``interpret``. ``only``: substrings of case names to run.
    ``budget_s``: wall seconds after which the remaining timing and tuning cases are skipped (default
    :data:`BUDGET_S`; the correctness cases always run)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"     # before any generated kernel is loaded (read by @triton.jit)
    import torch

    if not interpret and not torch.cuda.is_available():
        print("opgen gpucheck: no CUDA device is visible (use --interpret to run the cases in Triton's CPU "
              "interpreter)", file=sys.stderr)
        return 2
    from . import cases, report, timing, tuning

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    only = tuple(only)
    keep = (lambda name: any(o in name for o in only)) if only else (lambda name: True)
    t_begin = time.perf_counter()
    rep = report.Report("interpret" if interpret else "gpu", quick, report.environment(),
                        {} if interpret else timing.peaks())
    rep.environment["estimated_gpu_s"] = round(estimate_gpu_seconds(quick))
    corr = [c for c in cases.all_cases(quick) if keep(c.name)]
    tcases = [c for c in timing.cases(quick) if keep(c.name)]
    ucases = [c for c in tuning.cases(quick) if keep(c.name)]
    step, close = _progress(len(corr) + len(tcases) + len(ucases))
    kernel_cache = str(out / "kernels")     # generated kernel sources of this run

    def record(r: report.CaseResult) -> None:
        rep.results.append(r)
        step(f"{r.section} {r.status:7s} {r.seconds:6.1f}s {r.name}" + (f": {r.message[:160]}" if r.message and
                                                                        r.status != "ok" else ""))
        rep.seconds = time.perf_counter() - t_begin
        report.write(rep, out)     # after every case: a killed run still leaves its report

    budget = BUDGET_S[quick] if budget_s is None else budget_s

    def over_budget(section: str, name: str) -> report.CaseResult | None:
        spent = time.perf_counter() - t_begin
        if spent <= budget:
            return None
        return report.CaseResult(section, name, "skipped", f"time budget: {spent:.0f} s spent of {budget:.0f} s")

    try:
        ctx = cases.Ctx("cpu" if interpret else "cuda", interpret, interpret, Path(kernel_cache))
        torch.manual_seed(0)
        for c in corr:
            record(cases.check(c, ctx))
        for c in tcases:
            record(report.CaseResult("timing", c.name, "skipped", "no GPU (interpreter run)") if interpret
                   else over_budget("timing", c.name) or timing.run_case(c, rep.peaks, kernel_cache))
        for c in ucases:
            record(report.CaseResult("tuning", c.name, "skipped", "no GPU (interpreter run)") if interpret
                   else over_budget("tuning", c.name) or tuning.run_case(c, out, kernel_cache))
    finally:
        close()
    rep.seconds = time.perf_counter() - t_begin
    jpath, mpath = report.write(rep, out)
    counts = ", ".join(f"{n} {s}" for s, n in rep.counts().items() if n)
    print(f"opgen gpucheck: {len(rep.results)} cases in {rep.seconds:.1f} s ({counts}); wrote {jpath} and {mpath}")
    return 1 if rep.failed() else 0
