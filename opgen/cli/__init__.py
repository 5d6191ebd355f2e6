"""The ``opgen`` command line, one module per command group: :mod:`~opgen.cli.show` (``list``, ``show``),
:mod:`~opgen.cli.demo` (``demo``), :mod:`~opgen.cli.tune` (``tune``, ``tune-worker``), :mod:`~opgen.cli.records`
(``records``), :mod:`~opgen.cli.bench` (``bench``),
:mod:`~opgen.cli.gpucheck` (``gpucheck``); :mod:`~opgen.cli.args` holds the argument types they share.
The commands import the library, never the reverse."""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from . import bench, demo, gpucheck, records, show, tune

    p = argparse.ArgumentParser(prog="opgen", description="Operator generator and autotuner for scans, "
                                "convolutions and attention variants.")
    sub = p.add_subparsers(dest="command", required=True)
    show.add_parsers(sub)
    demo.add_parsers(sub)
    tune.add_tune_parsers(sub)
    records.add_parsers(sub)
    bench.add_parsers(sub)
    gpucheck.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``opgen`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)
