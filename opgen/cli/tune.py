"""``opgen tune`` (in process, or as the coordinator of many workers) and ``opgen tune-worker``."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from typing import Any, Callable

from opgen.tune.store import GRACE_PERIOD, HEARTBEAT_INTERVAL

from .args import add_declared_args, declared_path, is_declared, parse_shape

#: exit code of a worker whose study cannot be run (missing, or its problem cannot be built): not restarted
EXIT_CANNOT_RUN = 3


def _problem_args(p: argparse.ArgumentParser) -> None:
    """Arguments that name the tuning problem and its store (the same for the coordinator and its workers)."""
    p.add_argument("op", help="a library op (opgen list), or a declared op as package.module:attribute naming an "
                   "@opgen.op declaration or a function returning an Op (importable from here or sys.path)")
    p.add_argument("--shape", type=parse_shape, required=True, help="e.g. B=2,D=256,N=16,L=512")
    p.add_argument("--backend", choices=("tvm", "triton"), help="default: triton with a GPU, else tvm")
    add_declared_args(p)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for one config (compile + check + time)")
    p.add_argument("--storage", help="Optuna storage: postgresql+psycopg2://USER@HOST:PORT/DB, sqlite:///FILE, "
                   "journal:FILE (default: OPGEN_TUNE_STORAGE, else the embedded journal in the cache dir)")
    p.add_argument("--heartbeat", type=float, default=HEARTBEAT_INTERVAL,
                   help="seconds between heartbeats of a running trial (RDB storages)")
    p.add_argument("--grace", type=float, default=GRACE_PERIOD,
                   help="seconds without a heartbeat before a trial is failed and retried; keep it above the "
                   "longest compile + measurement")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (reproducible runs)")


def add_tune_parsers(sub: Any) -> None:
    """Add ``tune`` and ``tune-worker`` to the ``opgen`` subcommands."""
    t = sub.add_parser("tune", help="tune an op at one shape with Optuna (child-process measurement, checked), in "
                       "this process or with --workers K processes on a shared store")
    _problem_args(t)
    t.add_argument("--trials", type=int, default=None, help="distinct feasible configs to measure in this run "
                   "(repeats and infeasible configs do not count; it stops early when the space has no more); with "
                   "--workers: trials shared by all; default 30")
    t.add_argument("--measured", type=int, default=None,
                   help="the same budget as --trials (the smaller wins); in-process tuning only")
    t.add_argument("--seconds", type=float, default=None, help="time budget (whichever of trials/seconds ends first;"
                   " in-process tuning only)")
    t.add_argument("--workers", type=int, default=0, help="worker processes on the store (0: tune in this process)")
    t.add_argument("--prepare-only", action="store_true",
                   help="create the study and its trial cap, print the worker command for a cluster scheduler, exit")
    t.add_argument("--max-restarts", type=int, default=2, help="restarts of a worker that dies (--workers)")
    t.add_argument("--report", metavar="DIR", help="write PNG plots and a markdown table of the study to DIR")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_tune)
    w = sub.add_parser("tune-worker", help="run trials of a study prepared by `opgen tune ... --prepare-only` "
                       "(start one per GPU); exits when the study holds its trial cap")
    _problem_args(w)
    w.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_tune_worker)


def _problem(args: argparse.Namespace, cmd: str) -> Any:
    import torch

    from opgen.config import from_env
    from opgen.tune.library import SHAPE_DIMS, LibraryProblem

    cfg = from_env()
    args.backend = args.backend or ("triton" if torch.cuda.is_available() else "tvm")
    if is_declared(args.op):
        from opgen.tune.declared import declared_problem

        declared_path()
        try:
            return declared_problem(args.op, args.shape, dtype=args.dtype, backend=args.backend,
                                    cache_dir=cfg.cache_dir, static=dict(args.static), who="op",
                                    shape_who="--shape")
        except (ValueError, RuntimeError) as exc:           # ArgumentError is a ValueError
            print(f"opgen {cmd}: {exc}", file=sys.stderr)
            return None
    if args.static:
        print(f"opgen {cmd}: --static applies to declared ops (package.module:attribute), not to library op "
              f"{args.op!r}", file=sys.stderr)
        return None
    args.dtype = args.dtype or "float32"
    try:
        return LibraryProblem(args.op, args.shape, args.backend, dtype=args.dtype, cache_dir=str(cfg.cache_dir))
    except (ValueError, RuntimeError) as exc:
        hint = "" if args.op in SHAPE_DIMS else "; or name a declared op as package.module:attribute"
        print(f"opgen {cmd}: {exc}{hint}", file=sys.stderr)
        return None


def _options(args: argparse.Namespace) -> Any:
    from opgen.tune.workers import WorkerOptions

    return WorkerOptions(heartbeat=args.heartbeat, grace=args.grace, timeout=args.timeout,
                         max_restarts=getattr(args, "max_restarts", 2))


def _storage(args: argparse.Namespace, key: Any = None) -> Any:
    """The store named on the command line or in the config; for workers, the default journal by path."""
    from opgen.config import from_env

    cfg = from_env()
    storage = args.storage or cfg.tune_storage
    if storage is None and key is not None:
        from opgen.tune.store import default_store_path

        storage = f"journal:{default_store_path(cfg.cache_dir, key)}"
    return storage


def _worker_args(args: argparse.Namespace, storage: str) -> list[str]:
    shape = ",".join(f"{k}={v}" for k, v in args.shape.items())
    out = [args.op, "--shape", shape, "--backend", args.backend, "--timeout", f"{args.timeout:g}",
           "--storage", storage, "--heartbeat", f"{args.heartbeat:g}", "--grace", f"{args.grace:g}"]
    out += ["--dtype", args.dtype] if args.dtype else []
    out += [a for k, v in args.static for a in ("--static", f"{k}={v!r}")]
    return out + (["--seed", str(args.seed)] if args.seed is not None else [])


def _cannot_store(exc: OSError) -> str | None:
    """``PATH: why`` when ``exc`` says a file or directory cannot be written (not writable, disk full, not a
    directory); None for any other error."""
    path = exc.filename
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "not writable"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "disk full"
    elif exc.errno == errno.ENOTDIR or (exc.errno == errno.EEXIST and path and os.path.exists(path)
                                        and not os.path.isdir(path)):
        why = "not a directory (a file is in the way)"
    else:
        return None
    return f"{path}: {why} ({exc.strerror})"


def _store_errors_exit_2(command: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[..., int]]:
    """Wrap a command so that a store it cannot write (not writable, disk full, a file in the way) ends it with one
    line naming the path and why, exit code 2, instead of a traceback; other errors propagate."""
    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def guarded(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except OSError as exc:
                what = _cannot_store(exc)
                if what is None:
                    raise
                print(f"{command}: cannot store the tuning results: {what}; give --storage or OPGEN_CACHE_DIR a "
                      "place you can write", file=sys.stderr)
                return 2
        return guarded
    return wrap


@_store_errors_exit_2("opgen tune")
def cmd_tune(args: argparse.Namespace) -> int:
    """``opgen tune``: in process, or prepare the study and run ``--workers`` worker processes on it; exit code 2
    with one line when the results cannot be stored."""
    return _cmd_tune(args)


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.workers < 0:
        print(f"opgen tune: --workers must be 0 or more, got {args.workers}", file=sys.stderr)
        return 2
    if (args.workers or args.prepare_only) and args.measured is not None:
        print("opgen tune: --measured budgets in-process tuning; with --workers or --prepare-only give --trials "
              "(the study's shared trial cap)", file=sys.stderr)
        return 2
    if args.trials is None:
        args.trials = 30 if args.measured is None else 10 * args.measured
    if (args.workers or args.prepare_only) and args.seconds is not None:
        print("opgen tune: --seconds budgets in-process tuning; with --workers or --prepare-only give --trials "
              "(the study's shared trial cap)", file=sys.stderr)
        return 2
    problem = _problem(args, "tune")
    if problem is None:
        return 2
    if args.workers or args.prepare_only:
        return _tune_distributed(args, problem)
    return _tune_in_process(args, problem)


def _tune_in_process(args: argparse.Namespace, problem: Any) -> int:
    from opgen.config import from_env
    from opgen.tune.library import baseline_ms
    from opgen.tune.tuner import TuneError, tune

    cfg = from_env()
    try:
        res = tune(problem, trials=args.trials, seconds=args.seconds, measured=args.measured, storage=_storage(args),
                   cache_dir=cfg.cache_dir,
                   progress=not args.no_progress, timeout=args.timeout, seed=args.seed)
    except (TuneError, ValueError) as exc:
        print(f"opgen tune: {exc}", file=sys.stderr)
        return 1
    print(res.summary())
    best = res.best_time_ms
    shape = ",".join(f"{k}={v}" for k, v in args.shape.items())
    rows = [["op", "shape", "backend", "best config", "best ms", "default ms", "vs default"],
            [args.op, shape, args.backend, str(res.best_config), f"{best:.4f}" if best else "-",
             f"{res.default_time_ms:.4f}" if res.default_time_ms else "-",
             f"{res.default_time_ms / best:.2f}x" if best and res.default_time_ms else "-"]]
    if not is_declared(args.op):                 # a declared op has no torch formulation to compare with
        torch_ms, torch_name = baseline_ms(problem)
        rows[0] += [torch_name, "vs torch"]
        rows[1] += [f"{torch_ms:.4f}", f"{torch_ms / best:.2f}x" if best else "-"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.report:
        _report(args, res.key, cfg.cache_dir)
    return 0 if best else 1


def _tune_distributed(args: argparse.Namespace, problem: Any) -> int:
    import time

    from opgen.config import from_env
    from opgen.tune.store import open_storage
    from opgen.tune.tuner import TuneError, problem_key
    from opgen.tune.workers import launch, prepare, summarize, worker_command

    cfg = from_env()
    options = _options(args)
    key = problem_key(problem)
    storage = _storage(args, key)
    t0 = time.perf_counter()
    try:
        prep = prepare(problem, trials=args.trials, storage=storage, cache_dir=cfg.cache_dir, options=options)
    except (TuneError, ValueError) as exc:
        print(f"opgen tune: {exc}", file=sys.stderr)
        return 1
    print(f"opgen tune: study {prep.key.name} ready in {prep.storage}: cap {prep.cap} finished trials "
          f"({prep.finished_before} before this run, {prep.enqueued} configs queued)", file=sys.stderr)
    wargs = _worker_args(args, storage)
    if args.prepare_only:
        import shlex

        print("start one worker per GPU with:\n  " + shlex.join(["opgen", *worker_command(wargs)[3:]]))
        return 0
    bar, progress = None, None
    if not args.no_progress:
        from optuna.trial import TrialState
        from tqdm import tqdm

        store = open_storage(storage, cache_dir=cfg.cache_dir, key=key)
        bar = tqdm(total=prep.cap - prep.finished_before, desc=f"tune {args.op} x{args.workers}", unit="trial",
                   file=sys.stderr, dynamic_ncols=True)
        sid = store.get_study_id_from_name(key.name)

        def poll() -> None:
            done = len(store.get_all_trials(sid, deepcopy=False, states=(TrialState.COMPLETE,)))
            bar.n = max(0, done - prep.finished_before)
            bar.refresh()
        progress = poll
    try:
        codes, restarts = launch(wargs, args.workers, options=options, progress=progress,
                                 log=lambda m: print(f"opgen tune: {m}", file=sys.stderr))
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(problem, storage=storage, cache_dir=cfg.cache_dir, options=options, restarts=restarts,
                        seconds=time.perf_counter() - t0)
    print(summary.text())
    if any(codes):
        print(f"opgen tune: worker exit codes {codes}", file=sys.stderr)
    if args.report:
        _report(args, key, cfg.cache_dir, storage)
    return 0 if summary.best_time_ms is not None and not any(codes) else 1


def _report(args: argparse.Namespace, key: Any, cache_dir: Any, storage: Any = None) -> None:
    from opgen.tune.report import ReportError, write_report
    from opgen.tune.store import open_storage

    store = open_storage(storage if storage is not None else _storage(args), cache_dir=cache_dir, key=key)
    try:
        print(write_report(store, key.name, args.report))
    except ReportError as exc:
        print(f"opgen tune: no report: {exc}", file=sys.stderr)


@_store_errors_exit_2("opgen tune-worker")
def cmd_tune_worker(args: argparse.Namespace) -> int:
    """``opgen tune-worker``: run trials of a prepared study until it holds its cap (exit code 2 with one line
    when its store cannot be written)."""
    from opgen.config import from_env
    from opgen.tune.tuner import TuneError, problem_key
    from opgen.tune.workers import work

    tag = f"opgen tune-worker{'' if args.worker_index is None else ' ' + str(args.worker_index)}"
    problem = _problem(args, "tune-worker")
    if problem is None:
        return 2
    cfg = from_env()
    storage = _storage(args, problem_key(problem))
    try:
        seed = None if args.seed is None else args.seed * 1009 + (args.worker_index or 0)   # workers differ
        rep = work(problem, storage=storage, cache_dir=cfg.cache_dir, options=_options(args), seed=seed,
                   log=lambda m: print(f"{tag}: {m}", file=sys.stderr))
    except (TuneError, ValueError) as exc:
        print(f"{tag}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.by_status.items())) or "none"
    print(f"{tag}: {rep.trials} trials ({counts}) on {rep.study_name}", file=sys.stderr)
    return 0
