"""``opgen bench``: measure ops against their baselines in one process (the cases and the protocol are
:mod:`opgen.bench`)."""
from __future__ import annotations

import argparse
import sys


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    if args.threads:
        # TVM sizes its thread pool from TVM_NUM_THREADS when the pool starts (first parallel kernel): set it before
        # any kernel runs, or opgen's kernels run on every core while torch's baselines run on --threads (a fresh
        # `opgen bench --threads 1` measured causal_conv1d at 1.6x F.conv1d instead of 5-7x that way)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from opgen.bench import environment, format_results, write_json
    from opgen.bench.cases import OPT_IN, SUITES

    names = (args.op + args.suite) or [n for n in SUITES if n not in OPT_IN]
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
    plain = [r for r in results if "status" not in r.notes]
    if plain:
        print(format_results(plain))
    if len(plain) < len(results):     # the training suites (opgen.bench.training): status, check and memory columns
        from opgen.bench.training import format_training

        print(format_training(results))
    if args.json:
        write_json(results, args.json)
    wrong = [f"{r.op} {r.case}" for r in results if r.notes.get("status", "").startswith("wrong")]
    if wrong:
        print(f"opgen bench: opgen computed a different result than its baseline in {wrong}", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    """Add ``bench`` to the ``opgen`` subcommands."""
    b = sub.add_parser("bench", help="measure ops against their baselines in one process (medians, ratios)")
    b.add_argument("op", nargs="*", help="suites to measure: ops (linear_scan, conv, ...) or training, training.<part> "
                                         "(default: every op suite; the training suites run only when named)")
    b.add_argument("--suite", action="append", default=[], help="a suite to measure, like a positional name "
                                                                 "(repeatable): --suite training")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, default=0,
                   help="threads of torch and of opgen's TVM kernels (sets TVM_NUM_THREADS before the first kernel); "
                        "0 leaves the defaults")
    b.add_argument("--quick", action="store_true", help="smaller sizes")
    b.add_argument("--json", help="also write the results and environment to this JSON file")
    b.set_defaults(func=_cmd_bench)
