"""``opgen records export`` / ``opgen records import``: tuned configs to a JSON file, or pinned from one."""
from __future__ import annotations

import argparse
import sys


def _cmd_records_export(args: argparse.Namespace) -> int:
    from opgen.config import from_env
    from opgen.tune.records import RecordsError, export_records, write_records

    cfg = from_env()
    source = args.storage or cfg.tune_storage or None
    try:
        records = export_records(source, op=args.op, cache_dir=cfg.cache_dir)
        write_records(args.file, records)
    except (RecordsError, OSError, ValueError) as exc:
        print(f"opgen records export: {exc}", file=sys.stderr)
        return 2
    where = source or f"{cfg.cache_dir}/tune"
    print(f"exported {len(records)} record{'s' if len(records) != 1 else ''} from {where} to {args.file}")
    return 0


def _cmd_records_import(args: argparse.Namespace) -> int:
    from opgen.config import from_env
    from opgen.tune.records import RecordsError, import_records, pinned_path

    cfg = from_env()
    try:
        added, replaced, unchanged = import_records(args.file, cache_dir=cfg.cache_dir)
    except (RecordsError, OSError) as exc:
        print(f"opgen records import: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.file}: {added} added, {replaced} replaced, {unchanged} unchanged; pinned file "
          f"{pinned_path(cfg.cache_dir)}")
    return 0


def add_parsers(sub) -> None:
    """Add ``records`` (``export``, ``import``) to the ``opgen`` subcommands."""
    r = sub.add_parser("records", help="export tuned configs to a JSON file, or import (pin) them from one")
    rsub = r.add_subparsers(dest="records_command", required=True)
    re_ = rsub.add_parser("export", help="write the best config of every tuned study to FILE")
    re_.add_argument("file", metavar="FILE")
    re_.add_argument("--storage", help="Optuna storage URL or journal file (default: OPGEN_TUNE_STORAGE, else "
                     "every journal in the cache dir)")
    re_.add_argument("--op", help="only this op")
    re_.set_defaults(func=_cmd_records_export)
    ri = rsub.add_parser("import", help="pin the records of FILE: lookups use them before the tuning store")
    ri.add_argument("file", metavar="FILE")
    ri.set_defaults(func=_cmd_records_import)
