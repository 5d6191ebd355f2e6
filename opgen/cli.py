"""The ``opgen`` command line: ``list``, ``show``, ``demo``."""
from __future__ import annotations

import argparse
import sys

STAGES = ("ir", "verified", "fused")


def _cmd_list(args: argparse.Namespace) -> int:
    from opgen.library import LIBRARY

    width = max(len(e.name) for e in LIBRARY)
    for e in LIBRARY:
        print(f"{e.name.ljust(width)}  {e.family:<9}  {e.summary}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from opgen.library import get

    try:
        entry = get(args.op)
    except KeyError as exc:
        print(f"opgen show: {exc.args[0]}", file=sys.stderr)
        return 2
    op = entry.declare()
    if args.stage == "fused":
        print(_fused(op))
        return 0
    print(op.pretty(verified=args.stage == "verified"))
    if args.stage == "verified":
        print(f"  fingerprint {op.fingerprint}")
    return 0


def _fused(op) -> str:
    from opgen.ir.passes import classify, derive_scan_variants, fuse_scan

    lines = [f"op {op.name}: " + ", ".join(f"{k} {v.value}" for k, v in classify(op).items())]
    group = fuse_scan(op)
    if group is None:
        lines.append("no fused kernel group yet for this op: it runs node by node on the reference backend")
    else:
        lines.append(group.describe())
        lines.append("variants: " + ", ".join(v.value for v in derive_scan_variants(group)))
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from opgen.demo import format_table, run_demo

    rows = run_demo(size=args.size, repeats=args.repeats, only=args.op or None, progress=not args.no_progress)
    print(format_table(rows))
    print("\nbackend 'reference' is opgen's torch interpreter of the IR (the correctness oracle); compiled TVM and "
          "Triton backends replace it as they land.")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from opgen.bench import environment, format_results, write_json
    from opgen.bench_cases import SUITES

    names = args.op or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"opgen bench: no benchmark cases for {unknown}; available: {sorted(SUITES)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for n in names:
        results += SUITES[n](args.repeats, args.quick)
    env = environment()
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    print(format_results(results))
    if args.json:
        write_json(results, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="opgen", description="Operator generator and autotuner for scans, "
                                "convolutions and attention variants.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the library ops").set_defaults(func=_cmd_list)
    s = sub.add_parser("show", help="print an op at a pipeline stage")
    s.add_argument("op")
    s.add_argument("--stage", choices=STAGES, default="ir",
                   help="ir: as declared; verified: with inferred extents and per-access bound proofs; "
                   "fused: node classes, the fused kernel group and its algorithm variants")
    s.set_defaults(func=_cmd_show)
    d = sub.add_parser("demo", help="run the library ops beside their torch baselines and print a table")
    d.add_argument("--size", choices=("quick", "full"), default="quick")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--op", action="append", help="only this op (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)
    b = sub.add_parser("bench", help="measure ops against their baselines in one process (medians, ratios)")
    b.add_argument("op", nargs="*", help="ops to measure (default: all with cases)")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, default=0, help="torch (and TVM) threads; 0 leaves the default")
    b.add_argument("--quick", action="store_true", help="smaller sizes")
    b.add_argument("--json", help="also write the results and environment to this JSON file")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``opgen`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
