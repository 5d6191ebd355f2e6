"""``opgen demo``: run every library op on the best available backend beside the torch code a user would
otherwise write, check they agree, and print a table of times and errors."""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo table."""

    op: str
    shape: str
    backend: str
    ms: float
    baseline: str
    baseline_ms: float
    max_err: float
    config: str = "default"

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ms if self.ms > 0 else float("nan")


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _tune(name: str, dims: dict, trials: int, backend: str, progress: bool) -> str:
    """Tune a library op at the demo's shape (a few trials); returns the best config as text."""
    from opgen.config import from_env
    from opgen.tune.library import LibraryProblem
    from opgen.tune.tuner import tune

    cfg = from_env()
    problem = LibraryProblem(name, dims, backend, cache_dir=str(cfg.cache_dir))
    res = tune(problem, trials=trials, cache_dir=cfg.cache_dir, progress=progress, storage=cfg.tune_storage)
    if res.best_config is None:
        return "default"
    return ", ".join(f"{k}={v}" for k, v in sorted(res.best_config.items()))


def run_demo(size: str = "quick", repeats: int = 3, only: list[str] | None = None, progress: bool = True,
             trials: int = 0) -> list[DemoRow]:
    """Run the demo (tuning each tunable op with ``trials`` trials first); returns the table rows."""
    import torch
    from tqdm import tqdm

    from opgen.library import LIBRARY
    from opgen.runtime import default_session

    session = default_session()
    entries = [e for e in LIBRARY if only is None or e.name in only]
    rows = []
    bar = tqdm(entries, desc="opgen demo", unit="op", disable=not progress, leave=False)
    for e in bar:
        bar.set_postfix_str(e.name)
        args, kwargs, shape = e.example(size)
        fn = e.op_function()
        backend = session.target_for(e.declare(), "cpu").name
        config = "default" if backend != "reference" else "-"
        if trials and e.tune_dims is not None and backend in ("tvm", "triton"):
            config = _tune(e.tune_op or e.name, e.tune_dims(size), trials, backend, progress)
        with torch.no_grad():
            out = _first(fn(*args, **kwargs))
            ref = _first(e.baseline(*args, **kwargs))
            err = (out.double() - ref.double()).abs().max().item()
            ms = _median_ms(lambda: fn(*args, **kwargs), repeats)
            bms = _median_ms(lambda: e.baseline(*args, **kwargs), repeats)
        rows.append(DemoRow(e.name, shape, backend, ms, e.baseline_name, bms, err, config))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table of demo rows."""
    head = ("op", "shape", "backend", "config", "ms", "baseline", "baseline ms", "speedup", "max |err|")
    body = [(r.op, r.shape, r.backend, r.config, f"{r.ms:.2f}", r.baseline, f"{r.baseline_ms:.2f}",
             f"{r.speedup:.2f}x", f"{r.max_err:.1e}") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _cmd_demo(args: argparse.Namespace) -> int:
    rows = run_demo(size=args.size, repeats=args.repeats, only=args.op or None, progress=not args.no_progress,
                    trials=args.trials)
    print(format_table(rows))
    print("\nscans, attention and convolutions run generated kernels (tvm on CPU, triton on CUDA), scans with the "
          "tuned config found in the store; backend 'reference' is opgen's torch interpreter of the IR (the "
          "oracle), used for what no kernel covers yet.")
    return 0


def add_parsers(sub) -> None:
    """Add ``demo`` to the ``opgen`` subcommands."""
    d = sub.add_parser("demo", help="run the library ops beside their torch baselines and print a table")
    d.add_argument("--size", choices=("quick", "full"), default="quick")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--op", action="append", help="only this op (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--trials", type=int, default=6, help="tuning trials per tunable op before timing (0: none)")
    d.set_defaults(func=_cmd_demo)
