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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``opgen`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
