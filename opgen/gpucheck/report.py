"""The records of a GPU check and the two files it writes (``gpucheck.json``, ``gpucheck.md``).

Every case of every section ends as one :class:`CaseResult` with a status:

* ``ok``: ran and matched its reference within the tolerance (or was timed / tuned);
* ``wrong``: ran, but the result is outside the tolerance (or has NaNs / the wrong shape or dtype);
* ``crashed``: raised (compile error, launch error, out of memory, ...); the message is the exception;
* ``slow``: a timing case slower than its goal against the baseline (``ratio`` below ``goal``);
* ``skipped``: not run here (no GPU for timing, an optional baseline missing, or a documented gap of Triton's CPU
  interpreter, whose message names the gap and still shows the measured error).
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "wrong", "crashed", "slow", "skipped")


@dataclass
class CaseResult:
    """The outcome of one case."""

    section: str                 # "correctness" | "timing" | "tuning"
    name: str
    status: str
    message: str = ""
    seconds: float = 0.0         # wall time of the case (build, compile, run, compare)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")


@dataclass
class Report:
    """Everything a run wrote: the environment, the peaks used for the fractions, and the cases in order."""

    mode: str                    # "gpu" | "interpret"
    quick: bool
    environment: dict[str, Any]
    peaks: dict[str, Any]
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for r in self.results:
            out[r.status] += 1
        return out

    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in ("wrong", "crashed")]


def environment() -> dict[str, Any]:
    """Versions and the device, as far as they are importable."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write(report: Report, out: Path) -> tuple[Path, Path]:
    """Write ``out/gpucheck.json`` and ``out/gpucheck.md``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"mode": report.mode, "quick": report.quick, "seconds": round(report.seconds, 2),
            "environment": report.environment, "peaks": report.peaks, "counts": report.counts(),
            "results": [asdict(r) for r in report.results]}
    jpath = out / "gpucheck.json"
    jpath.write_text(json.dumps(data, indent=1, default=str) + "\n")
    mpath = out / "gpucheck.md"
    mpath.write_text(markdown(report))
    return jpath, mpath


def markdown(report: Report) -> str:
    c = report.counts()
    lines = [f"# opgen gpucheck ({report.mode}{', quick' if report.quick else ''})", "",
             f"{len(report.results)} cases in {report.seconds:.1f} s: "
             + ", ".join(f"{n} {s}" for s, n in c.items() if n), "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in report.environment.items()), "",
             "Peaks used for the fractions: " + (", ".join(f"{k} {_fmt(v)}" for k, v in report.peaks.items())
                                                   or "none (no GPU)"), ""]
    for section in ("correctness", "timing", "tuning"):
        rows = [r for r in report.results if r.section == section]
        if not rows:
            continue
        lines += [f"## {section}", "", "| case | status | s | details | message |", "|---|---|---|---|---|"]
        for r in rows:
            details = ", ".join(f"{k} {_fmt(v)}" for k, v in r.metrics.items())
            msg = r.message.replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {r.name} | {r.status} | {r.seconds:.2f} | {details} | {msg} |")
        lines.append("")
    return "\n".join(lines)
