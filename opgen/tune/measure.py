"""Measuring one config in a child process: build, check against the reference, time.

The tuner keeps one warm **worker process** and sends it (problem spec, config) pairs. The worker rebuilds
the problem from its :class:`~opgen.tune.problem.ProblemSpec` once (inputs and the reference outputs are
computed once per worker, not per trial), then for each config:

1. ``space.infeasible(config)`` -> ``infeasible`` (the parent checks first and never sends such a config);
2. ``problem.build(config)``; an exception -> ``compile_error``;
3. one run, compared with the reference: ``max |out - ref| <= atol + rtol * max |ref|`` for every output
   (and equal shapes, no NaN where the reference has none); else ``wrong`` ("wrong result: max err ...");
   an exception while running -> ``crash`` (and the worker is replaced: a CUDA error poisons a process);
4. timing: on CUDA ``triton.testing.do_bench(..., return_mode="median")`` (CUDA events if triton is
   missing); on CPU repeated runs until ``min_reps`` and ``min_time_s`` are both reached, the median.
   A config already ``slow_factor`` times slower than the best so far is timed once (it cannot win).

The parent waits ``timeout`` seconds for the answer. A worker that dies (segfault, abort, ``os._exit``)
gives ``crash`` with the signal or exit code and the tail of its log; one that does not answer in time is
killed with its whole process group (compiler subprocesses included) and gives ``timeout``. Either way
the next measurement starts a fresh worker; the tuner process itself never runs a kernel.

Process context: a fresh interpreter started with ``subprocess`` (what multiprocessing's ``spawn`` does,
without re-importing the caller's ``__main__``), in its own session, talking over two pipes. Not ``fork``:
forking a process that holds torch/CUDA/OpenMP state is unsafe. Not one process per trial: a fresh
interpreter costs ~2 s here (torch import) plus the reference computation, which a warm worker pays once.
The worker dies with its parent (``PR_SET_PDEATHSIG`` on Linux, plus a watchdog thread), so a killed tuner
leaves no orphan. Its stdout and stderr go to a log file in ``log_dir`` (kept), else to a temporary file
unlinked at once (the parent keeps it open to quote its tail in a crash reason).
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping

from .problem import ProblemSpec, default_tolerance


class Status(str, Enum):
    """The outcome of measuring one config."""

    OK = "ok"
    INFEASIBLE = "infeasible"
    COMPILE_ERROR = "compile_error"
    WRONG = "wrong"
    CRASH = "crash"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Result:
    """``time_ms`` only when ``status`` is OK; ``reason`` says why otherwise; ``seconds`` is the wall time spent."""

    status: Status
    time_ms: float | None = None
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


@dataclass(frozen=True)
class MeasureOptions:
    """Limits and timing protocol. ``timeout``: build + check + time of one config; ``setup_timeout``:
    creating the problem and its reference in a new worker."""

    timeout: float = 60.0
    setup_timeout: float = 600.0
    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 200
    min_time_s: float = 0.2
    slow_factor: float = 4.0
    log_dir: str | None = None


_CACHED_PROBLEMS = 4      # problems (inputs + reference) a worker keeps


class ProblemSetupError(RuntimeError):
    """The worker could not create the problem or its reference: no config can be measured."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Measurer:
    """A warm worker process that measures configs; use as a context manager or call :meth:`close`."""

    def __init__(self, options: MeasureOptions | None = None) -> None:
        self.options = options or MeasureOptions()
        self.starts = 0                     # workers started (first one included)
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._log: Any = None                # a read handle on the worker's log (unlinked unless log_dir)
        self._ready: list[str] = []          # spec idents set up in the current worker, oldest first

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        if self.options.log_dir:
            Path(self.options.log_dir).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="worker-", suffix=".log", dir=self.options.log_dir)
        else:
            fd, name = tempfile.mkstemp(prefix="opgen-tune-worker-", suffix=".log")
        boot = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                "from opgen.tune.measure import _worker_main; _worker_main(*map(int, sys.argv[2:]))")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", boot, json.dumps(sys.path), str(p2c_r), str(c2p_w), str(os.getpid())],
                pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
            os.close(fd)
        self._send = Connection(p2c_w, readable=False)
        self._recv = Connection(c2p_r, writable=False)
        self._log = open(name, "rb")
        if not self.options.log_dir:         # nothing is left behind, even if this process is killed
            os.unlink(name)
        self._ready = []
        self.starts += 1

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    self._send.send(("exit",))
                    self._proc.wait(timeout=2)
                except Exception:
                    pass
                if self._proc.poll() is None:
                    _kill_group(self._proc)
            for c in (self._send, self._recv):
                try:
                    c.close()
                except OSError:
                    pass
        if self._log is not None:
            self._log.close()
        self._proc = self._send = self._recv = self._log = None
        self._ready = []

    def close(self) -> None:
        """Stop the worker."""
        self._stop()

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop()
        except Exception:
            pass

    # -- protocol ----------------------------------------------------------------------------------
    def _log_tail(self, lines: int = 4) -> str:
        """The gist of the worker's log: a fatal-error line and the innermost frame, else the last lines."""
        try:
            self._log.seek(0)
            text = self._log.read().decode(errors="replace") if self._log else ""
        except (OSError, AttributeError):
            return ""
        rows = [ln.strip() for ln in text.splitlines() if ln.strip()]
        fatal = [i for i, ln in enumerate(rows) if ln.startswith("Fatal Python error")]
        if fatal:
            i = fatal[-1]
            cur = next((j for j in range(i, len(rows)) if rows[j].startswith("Current thread")), i)
            frame = next((ln for ln in rows[cur:] if ln.startswith("File ")), "")
            return rows[i] + (f"; innermost frame: {frame}" if frame else "")
        return " | ".join(rows[-lines:])[-600:]

    def _dead(self, during: str) -> str:
        """Reap a dead (or dying) worker and describe its end."""
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(self._proc)
            code = self._proc.returncode
        tail = self._log_tail()
        self._stop()
        return f"worker {_describe_exit(code)} during {during}" + (f"; log: {tail}" if tail else "")

    def _ask(self, msg: tuple, timeout: float) -> tuple[str, Any]:
        """Send ``msg``; returns ("reply", value), ("timeout", None) or ("dead", None).

        Interrupted (KeyboardInterrupt...) while waiting, the worker is stopped: its late answer must not be
        taken for the answer to the next request."""
        try:
            try:
                self._send.send(msg)
            except (BrokenPipeError, OSError):
                return "dead", None
            if not self._recv.poll(timeout):
                return "timeout", None
            try:
                return "reply", self._recv.recv()
            except (EOFError, OSError):
                return "dead", None
        except BaseException:
            self._stop()
            raise

    def _setup(self, spec: ProblemSpec) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start()
        if spec.ident in self._ready:
            return
        how, reply = self._ask(("setup", spec.as_dict()), self.options.setup_timeout)
        if how == "timeout":
            _kill_group(self._proc)
            tail = self._log_tail()
            self._stop()
            raise ProblemSetupError(f"creating problem {spec.factory}({dict(spec.kwargs)}) and its reference took "
                                    f"longer than setup_timeout={self.options.setup_timeout:g} s"
                                    + (f"; log: {tail}" if tail else ""))
        if how == "dead":
            raise ProblemSetupError(f"problem {spec.factory}: {self._dead('problem setup')}")
        kind, payload = reply
        if kind != "ready":                             # the worker itself is fine
            raise ProblemSetupError(f"could not create problem {spec.factory}({dict(spec.kwargs)}) in the "
                                    f"measuring process:\n{payload}")
        self._ready.append(spec.ident)
        if len(self._ready) > _CACHED_PROBLEMS:         # the worker drops the oldest one too
            self._ready.pop(0)

    def measure(self, spec: ProblemSpec, config: Mapping[str, Any], best_ms: float | None = None) -> Result:
        """Build, check and time ``config`` of the problem ``spec`` in the worker (started on demand).

        ``best_ms``: the best time so far, so that a much slower config is timed once only.
        Raises :class:`ProblemSetupError` when the problem itself cannot be created (no trial is at fault).
        """
        t0 = time.perf_counter()
        self._setup(spec)
        opts = asdict(self.options)
        how, reply = self._ask(("measure", spec.ident, dict(config), best_ms, opts), self.options.timeout)
        spent = time.perf_counter() - t0
        if how == "timeout":
            _kill_group(self._proc)
            self._stop()
            return Result(Status.TIMEOUT, reason=f"no result within timeout={self.options.timeout:g} s "
                          "(worker killed)", seconds=spent)
        if how == "dead":
            return Result(Status.CRASH, reason=self._dead("measurement"), seconds=time.perf_counter() - t0)
        status, time_ms, reason, restart = reply
        if restart:
            self._stop()
        return Result(Status(status), time_ms, reason, spent)


# ---------------------------------------------------------------------------------------------------
# The worker side.

def _die_with_parent(parent: int) -> None:
    """Exit when the tuner process goes away (even if it was killed with SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
        except Exception:
            pass
    if os.getppid() != parent:
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    import threading

    threading.Thread(target=watch, daemon=True, name="opgen-parent-watch").start()


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaves(x: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(x, Mapping):
        return [leaf for k in sorted(x) for leaf in _leaves(x[k], f"{path}[{k!r}]")]
    if isinstance(x, (tuple, list)):
        return [leaf for i, v in enumerate(x) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path or "output", x)]


def compare(out: Any, ref: Any, rtol: float, atol: float) -> str | None:
    """None when ``out`` matches ``ref`` (see module doc), else a reason starting with "wrong result"."""
    import torch

    got, want = _leaves(out), _leaves(ref)
    if [p for p, _ in got] != [p for p, _ in want]:
        return f"wrong result: outputs {[p for p, _ in got]} where the reference has {[p for p, _ in want]}"
    for (name, o), (_, r) in zip(got, want):
        if not isinstance(r, torch.Tensor):
            if o != r:
                return f"wrong result: {name} is {o!r}, expected {r!r}"
            continue
        if not isinstance(o, torch.Tensor):
            return f"wrong result: {name} is a {type(o).__name__}, expected a tensor"
        if tuple(o.shape) != tuple(r.shape):
            return f"wrong result: {name} has shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        o64, r64 = o.detach().to("cpu", torch.float64), r.detach().to("cpu", torch.float64)
        bad_nan = torch.isnan(o64) & ~torch.isnan(r64)
        if bool(bad_nan.any()):
            return f"wrong result: {name} has {int(bad_nan.sum())} NaN where the reference has none"
        finite = torch.isfinite(r64)
        if r64.numel() == 0:
            continue
        err = float((o64 - r64)[finite].abs().max()) if bool(finite.any()) else 0.0
        scale = float(r64[finite].abs().max()) if bool(finite.any()) else 0.0
        allowed = atol + rtol * scale
        inf = torch.isinf(r64)
        if bool(inf.any()) and not torch.equal(o64[inf], r64[inf]):
            return f"wrong result: {name} differs from the reference where the reference is infinite"
        if not err <= allowed:
            return (f"wrong result: max err {err:.3g} in {name} (allowed {allowed:.3g} = atol {atol:g} + rtol {rtol:g}"
                    f" x max|ref| {scale:.3g})")
    return None


def _device_of(ref: Any) -> str:
    import torch

    for _, leaf in _leaves(ref):
        if isinstance(leaf, torch.Tensor):
            return leaf.device.type
    return "cpu"


def _dtype_of(ref: Any) -> str:
    import torch

    for _, leaf in _leaves(ref):
        if isinstance(leaf, torch.Tensor):
            return str(leaf.dtype).replace("torch.", "")
    return "float32"


def _time_cuda(fn: Any) -> float:
    import torch

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    start, end, times = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
    for _ in range(20):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _time_cpu(fn: Any, opts: Mapping[str, Any], best_ms: float | None) -> float:
    for _ in range(int(opts["warmup"])):
        fn()
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < int(opts["max_reps"]):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if best_ms is not None and len(times) == 1 and times[0] > opts["slow_factor"] * best_ms:
            break
        if len(times) >= int(opts["min_reps"]) and time.perf_counter() - begin >= opts["min_time_s"]:
            break
    return statistics.median(times)


def _measure_one(entry: dict, config: dict, best_ms: float | None, opts: Mapping[str, Any]) -> tuple:
    """(status, time_ms, reason, restart_worker)."""
    problem = entry["problem"]
    why = problem.space().infeasible(config)
    if why is not None:
        return Status.INFEASIBLE.value, None, why, False
    try:
        kernel = problem.build(config)
    except Exception as exc:
        traceback.print_exc()
        return Status.COMPILE_ERROR.value, None, _first_line(exc), False
    cuda = entry["device"] == "cuda"
    try:
        out = kernel()
        if cuda:
            import torch

            torch.cuda.synchronize()
    except Exception as exc:
        traceback.print_exc()
        return Status.CRASH.value, None, "exception while running: " + _first_line(exc), True
    wrong = compare(out, entry["reference"], *entry["tolerance"])
    del out
    if wrong is not None:
        return Status.WRONG.value, None, wrong, False
    try:
        ms = _time_cuda(kernel) if cuda else _time_cpu(kernel, opts, best_ms)
    except Exception as exc:
        traceback.print_exc()
        return Status.CRASH.value, None, "exception while timing: " + _first_line(exc), True
    return Status.OK.value, float(ms), "", False


def _worker_main(rfd: int, wfd: int, parent: int) -> None:
    """The worker loop (runs in the child): ("setup", spec) | ("measure", ident, config, best_ms, opts) | ("exit",)."""
    import faulthandler

    _die_with_parent(parent)
    try:                                   # a crashing kernel must not write a core file of a torch process
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    faulthandler.enable()
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    problems: dict[str, dict] = {}
    while True:
        try:
            msg = inbox.recv()
        except EOFError:
            return
        if msg[0] == "exit":
            return
        if msg[0] == "setup":
            spec = ProblemSpec(**msg[1])
            try:
                t0 = time.perf_counter()
                problem = spec.create()
                ref = problem.reference()
                tol = problem.tolerance() if hasattr(problem, "tolerance") else default_tolerance(_dtype_of(ref))
                problems.pop(spec.ident, None)
                problems[spec.ident] = {"problem": problem, "reference": ref, "device": _device_of(ref),
                                        "tolerance": tuple(tol)}
                if len(problems) > _CACHED_PROBLEMS:
                    problems.pop(next(iter(problems)))
                outbox.send(("ready", time.perf_counter() - t0))
            except Exception:
                outbox.send(("error", traceback.format_exc()))
        elif msg[0] == "measure":
            _, ident, config, best_ms, opts = msg
            outbox.send(_measure_one(problems[ident], config, best_ms, opts))
        sys.stdout.flush()
        sys.stderr.flush()
