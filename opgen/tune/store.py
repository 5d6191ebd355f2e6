"""Where studies live: an embedded journal file per op under ``<cache_dir>/tune/``, or a storage URL.

Why a journal and not SQLite (measurements in notes/optuna.md, section 5): an Optuna ``JournalStorage``
over a ``JournalFileBackend`` costs about 4 ms per trial against 28 ms for SQLite, needs no schema (SQLite's
first use takes 0.4 s and several processes creating it at once crash with ``UNIQUE constraint failed:
alembic_version``), reloads 2,000 trials in 0.36 s against 4.5 s, and is safe for several processes on one
machine (appends under a lock file, each append fsynced). A process killed mid-trial leaves a readable log
with that trial RUNNING; :mod:`opgen.tune.tuner` marks such trials FAIL when their process is gone.

One file per op (``<op name>-<op fingerprint[:12]>.journal``) keeps call-time lookups cheap (only that op's
history is replayed) and confines damage to one op's studies.

A damaged file (a line that is not JSON, a log Optuna cannot replay, a torn last line that the next append
would turn into garbage) is moved aside as ``<file>.corrupt-<time>``, never deleted or changed; a new file is
written (a temporary file, then renamed over the path) from every line that still parses: an unreadable line is
left out, except that an unreadable trial creation becomes a FAIL trial (user attr ``status`` ``damaged``) in the
same study, so that the trials after it keep their numbers (Optuna numbers trials in log order). When that log
does not replay, the longest replayable prefix is kept instead (the journal is a log of operations, so any
prefix is an earlier consistent state). A :class:`StoreRecoveredWarning` says what happened, which line numbers
were unreadable and where the old file is.

Writers exclude each other with :class:`JournalLock`: Optuna's ``<file>.lock`` symlink (so a plain Optuna
process sharing the file is still excluded) taken under a kernel ``flock`` of ``<file>.owner``. The kernel drops
the flock when its holder dies, so a link left by an opgen process killed mid-append is removed at once
(Optuna's own lock waits 30 s, then breaks it). :class:`OwnedJournalStorage` stamps every trial it starts with
its process (user attr ``owner``: host, pid, start time) before or in the same log entry as the trial becomes
RUNNING, so a killed tuner never leaves a RUNNING trial that :func:`opgen.tune.tuner.fail_stale_trials` cannot
attribute.

Any string with ``://`` is an Optuna RDB URL (``sqlite:///path``, ``postgresql+psycopg2://...``): it is
opened with heartbeats, so trials of a dead worker are failed and retried once by the next worker.
``journal:PATH`` or a path ending in ``.journal`` names a journal file.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from .key import StudyKey, _slug
from .procs import FOREIGN_LOCK_GRACE, HOST, StaleLockWarning, alive, owner, start_token  # noqa: F401 (re-exported)

HEARTBEAT_INTERVAL = 10     # seconds, RDB storages only
GRACE_PERIOD = 600          # seconds without a heartbeat before a RUNNING trial is failed; > any compile+measure


class StoreRecoveredWarning(UserWarning):
    """A damaged tuning store was moved aside and a fresh one started."""


def default_store_path(cache_dir: str | os.PathLike, key: StudyKey) -> Path:
    """``<cache_dir>/tune/<op>-<op fingerprint[:12]>.journal``: the embedded store of ``key``'s op."""
    return Path(cache_dir) / "tune" / f"{_slug(key.op_name)}-{key.op_fingerprint[:12]}.journal"


def open_storage(storage: Any = None, *, cache_dir: str | os.PathLike | None = None, key: StudyKey | None = None,
                 create: bool = True, heartbeat_interval: float | None = None, grace_period: float | None = None) -> Any:
    """An Optuna storage object.

    ``storage``: None (the embedded journal of ``key``'s op under ``cache_dir``), an Optuna storage object
    (returned as is), a URL, ``journal:PATH`` or a ``*.journal`` path. With ``create=False`` a journal
    file that does not exist yet gives None instead of an empty new file (for read-only lookups).
    """
    if storage is not None and not isinstance(storage, (str, os.PathLike)):
        return storage
    if storage is None:
        if cache_dir is None or key is None:
            raise ValueError("the default store needs cache_dir and key")
        return open_journal(default_store_path(cache_dir, key), create=create)
    text = os.fspath(storage)
    if text.startswith("journal:"):
        return open_journal(Path(text[len("journal:"):].removeprefix("//")), create=create)
    if "://" in text:
        return _open_rdb(text, heartbeat_interval or HEARTBEAT_INTERVAL, grace_period or GRACE_PERIOD)
    if text.endswith(".journal"):
        return open_journal(Path(text), create=create)
    raise ValueError(f"unknown storage {text!r}: give a URL such as sqlite:///tune.db or "
                     "postgresql+psycopg2://user@host/db, or a journal file (journal:PATH or PATH.journal)")


def describe(storage: Any) -> str:
    """A short human description of a storage object (for messages)."""
    backend = getattr(storage, "_backend", None)
    if backend is not None and hasattr(backend, "_file_path"):
        return f"journal {backend._file_path}"
    url = getattr(storage, "url", None)
    if url:
        return str(url)
    return type(storage).__name__


@contextlib.contextmanager
def prepare_lock(storage: Any) -> Iterator[None]:
    """Hold an exclusive lock (``<journal>.prepare.lock``, flock) while a tuner creates a study and queues its
    candidates, so that processes starting at once on one machine do not both queue the same configs. A no-op
    for other storages (a distributed run prepares its study once, before the workers start)."""
    backend = getattr(storage, "_backend", None)
    path = getattr(backend, "_file_path", None)
    if path is None:
        yield
        return
    import fcntl

    with open(f"{path}.prepare.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _open_rdb(url: str, heartbeat_interval: float, grace_period: float) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("postgresql"):
        driver = url.split("://", 1)[0].partition("+")[2] or "psycopg2"
        try:
            __import__(driver)
        except ImportError:
            raise ValueError(f"the storage {url.split('@')[-1]!r} needs the PostgreSQL driver {driver!r}, which is "
                             "not installed: pip install 'opgen[postgres]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=int(max(1, heartbeat_interval)),
                          grace_period=int(max(1, grace_period)),
                          engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql") else None,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))


def open_journal(path: str | os.PathLike, create: bool = True) -> Any:
    """An :class:`OwnedJournalStorage` on ``path``; a damaged file is moved aside and a fresh store started (see
    module doc)."""
    path = Path(path)
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
    damage = _torn_tail(path)
    if damage is None:
        try:
            return _journal(path)
        except _REPLAY_ERRORS as exc:
            # a log Optuna cannot replay (JSONDecodeError, AssertionError("Should not reach."), ...); an OSError or
            # ImportError is no damage of the file and propagates
            damage = f"{type(exc).__name__}: {exc}"
    return _recover(path, damage)


def _journal(path: Path) -> Any:
    from .journal import open_file

    return open_file(path)


def JournalLock(path: str | os.PathLike) -> Any:      # noqa: N802 (a class, imported lazily)
    """The append lock of the journal ``path`` (:class:`opgen.tune.journal.JournalLock`)."""
    from .journal import JournalLock as cls

    return cls(path)


def _torn_tail(path: Path) -> str | None:
    """A reason when the file's last line is unterminated (Optuna tolerates it until the next append)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            return "the last entry is incomplete (no line end)"
    return None


#: what replaying a damaged log raises (an OSError or ImportError is no damage of the file, and propagates)
_REPLAY_ERRORS = (ValueError, KeyError, TypeError, IndexError, AssertionError, RecursionError)
_OP_CREATE_STUDY, _OP_CREATE_TRIAL, _OP_LAST = 0, 4, 10     # Optuna's JournalOperation codes


def _entry(line: bytes) -> dict | None:
    """The operation of one complete journal line, or None when it is not one."""
    if not line.endswith(b"\n"):
        return None
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):          # UnicodeDecodeError is a ValueError
        return None
    op = entry.get("op_code") if isinstance(entry, dict) else None
    if isinstance(op, bool) or not isinstance(op, int) or not 0 <= op <= _OP_LAST:
        return None
    return entry


def _placeholder(line: bytes, number: int) -> bytes | None:
    """A stand-in for an unreadable trial creation whose study id can still be read (keeps later trial numbers)."""
    import re
    from datetime import datetime, timezone

    op = re.search(rb'"op_code"\s*:\s*(\d+)\s*,', line)
    sid = re.search(rb'"study_id"\s*:\s*(\d+)\s*[,}]', line)
    if op is None or int(op.group(1)) != _OP_CREATE_TRIAL or sid is None:
        return None
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    entry = {"op_code": _OP_CREATE_TRIAL, "worker_id": "opgen-salvage", "study_id": int(sid.group(1)),
             "datetime_start": now, "datetime_complete": now, "state": 3, "value": None, "values": None,
             "distributions": {}, "params": {}, "system_attrs": {}, "intermediate_values": {},
             "user_attrs": {"status": "damaged", "reason": f"journal line {number} was unreadable"}}
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _salvage(raw: bytes) -> tuple[list[bytes], list[int], bool]:
    """The lines of ``raw`` that parse, placeholders for unreadable trial creations, the 1-based numbers of the
    unreadable lines, and whether the log is still complete (an unreadable study creation shifts every later study
    id: then only the lines before it are safe)."""
    good: list[bytes] = []
    bad: list[int] = []
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        if _entry(line) is not None:
            good.append(line)
            continue
        bad.append(number)
        stand_in = _placeholder(line, number)
        if stand_in is not None:
            good.append(stand_in)
        elif b'"op_code":%d,' % _OP_CREATE_STUDY in line.replace(b" ", b"") or b'"op_code"' not in line:
            return good, bad, False             # a study creation, or nothing to tell: keep what came before
    return good, bad, True


def _loads(path: Path, lines: list[bytes]) -> bool:
    path.write_bytes(b"".join(lines))
    return _replays(path)


def _replays(path: Path) -> bool:
    try:
        _journal(path)
        return True
    except _REPLAY_ERRORS:
        return False


def _longest_loadable(path: Path, good: list[bytes]) -> int:
    """Write to ``path`` the longest prefix of ``good`` that Optuna replays (binary search); its length."""
    tmp = path.with_name(path.name + ".salvage")
    lo, hi = 0, len(good)                      # prefix lo loads; find the largest such
    if _loads(tmp, good):
        lo = hi
    else:
        hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _loads(tmp, good[:mid]):
                lo = mid
            else:
                hi = mid - 1
    tmp.write_bytes(b"".join(good[:lo]))
    os.replace(tmp, path)
    return lo


def _recover(path: Path, damage: str) -> Any:
    lock = JournalLock(path)
    lock.acquire()
    try:
        if _torn_tail(path) is None and _replays(path):     # another process recovered it meanwhile
            return _journal(path)
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        raw = aside.read_bytes()
        total = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
        good, bad, whole = _salvage(raw)
        kept = _longest_loadable(path, good)
    finally:
        lock.release()
    storage = _journal(path)
    names = sorted(s.study_name for s in storage.get_all_studies())
    lines = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    if bad and whole and kept == len(good):
        what = (f"a new store was started from the readable entries: line{'s' * (len(bad) > 1)} {lines} of {total} "
                f"{'were' if len(bad) > 1 else 'was'} unreadable and left out (an unreadable trial creation kept as a "
                "FAIL trial), every other entry kept")
        lost = " Only the unreadable entries are missing from the new store."
    else:
        what = (f"a new store was started from the {kept} of {total} journal entries before the damage"
                + (f" (unreadable line{'s' * (len(bad) > 1)}: {lines})" if bad else ""))
        lost = " Results recorded after the damage are only in the moved file."
    warnings.warn(
        f"opgen tune: the tuning store {path} is damaged ({damage}). It was moved to {aside} (kept, not deleted), "
        f"and {what}" + (f"; it holds the studies {names}." if names else "; it holds no complete study.") + lost,
        StoreRecoveredWarning, stacklevel=3)
    return storage
