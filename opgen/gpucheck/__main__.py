"""``python -m opgen.gpucheck --out DIR [--quick] [--interpret]``."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="directory for gpucheck.json and gpucheck.md")
    p.add_argument("--quick", action="store_true", help="fewer cases (fp32 plus one bf16 case per family)")
    p.add_argument("--interpret", action="store_true",
                   help="set TRITON_INTERPRET=1: tiny sizes on CPU tensors in Triton's interpreter (no GPU needed)")
    p.add_argument("--only", action="append", default=[], metavar="TEXT",
                   help="run only the cases whose name contains TEXT (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="python -m opgen.gpucheck",
                                                 description="Check opgen's Triton kernels, timings and tuning on "
                                                             "a GPU and write a report.")).parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"    # before triton is imported
    from . import run_check

    return run_check(args.out, quick=args.quick, interpret=args.interpret, only=args.only)


if __name__ == "__main__":
    sys.exit(main())
