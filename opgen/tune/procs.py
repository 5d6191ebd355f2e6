"""Process identity for the tuning store: which process owns a trial or a journal lock, and whether it still runs.

Lower than :mod:`opgen.tune.store` and :mod:`opgen.tune.journal` (both use it; it imports neither). The names are
re-exported by :mod:`opgen.tune.store`.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Mapping


class StaleLockWarning(UserWarning):
    """A journal lock left by a process that no longer runs was released."""


# -- process identity (to fail the RUNNING trials of dead tuner processes) ---------------------------

HOST = socket.gethostname()
FOREIGN_LOCK_GRACE = 30.0   # seconds a lock of a plain Optuna process may stay unchanged before it is broken


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), or None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def start_token(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a reused pid apart), where /proc exists."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def owner() -> dict[str, Any]:
    """This process as a trial owner: ``{"host", "pid", "start"}``."""
    return {"host": HOST, "pid": os.getpid(), "start": start_token(os.getpid())}


def alive(who: Mapping[str, Any]) -> bool:
    """Whether the process ``who`` (an :func:`owner` dict of this host) still runs; a zombie does not."""
    pid = int(who.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:                      # no /proc: trust kill(0)
        return True
    if fields[0] in ("Z", "X"):             # exited, not yet reaped
        return False
    start = who.get("start")
    return start is None or fields[19] == start
