"""``opgen gpucheck --out DIR [--quick] [--interpret]``: the prepared GPU check (:mod:`opgen.gpucheck`)."""
from __future__ import annotations

import argparse
import os


def add_parsers(sub) -> None:
    from opgen.gpucheck.__main__ import add_arguments

    p = sub.add_parser("gpucheck", help="check every Triton kernel variant, time the goal cases and tune one op "
                                        "per family on a GPU; write DIR/gpucheck.json and .md")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    from opgen.gpucheck import run_check

    return run_check(args.out, quick=args.quick, interpret=args.interpret, only=args.only)
