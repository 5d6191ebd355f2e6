"""The journal store's lock and storage classes (imported lazily by :mod:`opgen.tune.store`: they need Optuna).

:class:`JournalLock`: Optuna's ``<file>.lock`` symlink, taken while holding a kernel ``flock`` of
``<file>.owner``. Every opgen writer takes the flock first, so a symlink found by the flock's holder was left by a
process that died inside an append (the kernel released its flock): when the link points at the owner file (an
opgen link) it is removed at once, with a :class:`~opgen.tune.procs.StaleLockWarning` naming the dead process.
A link of a plain Optuna process (pointing at the journal) is waited for, and broken only after it stayed
unchanged for ``FOREIGN_LOCK_GRACE`` seconds, as Optuna itself does.

:class:`OwnedJournalStorage`: a ``JournalStorage`` that records which process runs each trial (user attr
``owner``) before the trial can be seen RUNNING: a new trial is created RUNNING with the attr in the same log
entry; a queued trial gets the attr just before it is popped (and the objective writes it again once it runs,
so a process that lost the pop race does not stay the owner).
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import FrozenTrial, TrialState

from . import procs


class JournalLock(BaseJournalFileLock):
    """Exclusive append lock of one journal file; see the module doc. Not reentrant."""

    def __init__(self, journal: str | os.PathLike) -> None:
        self.journal = Path(os.path.abspath(journal))
        self.link = Path(f"{self.journal}.lock")       # Optuna's JournalFileSymlinkLock name
        self.owner_file = Path(f"{self.journal}.owner")  # absolute: the link's target, whatever the caller's cwd
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.owner_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
            me = f"{procs.HOST} {os.getpid()}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            self._take_link(previous)
        except BaseException:
            os.close(fd)                                 # closing drops the flock
            raise
        self._fd = fd
        return True

    def _take_link(self, previous: str) -> None:
        seen: tuple[float, float] | None = None          # (mtime of the foreign link's target, since when)
        while True:
            try:
                os.symlink(self.owner_file, self.link)
                return
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            try:
                target = os.readlink(self.link)
            except OSError:                              # released meanwhile (a plain Optuna writer)
                continue
            if os.path.basename(target) == self.owner_file.name:   # opgen's, and we hold the flock: holder died
                self._break(f"left by process {previous or '?'}, which ended while appending to it")
                continue
            try:
                mtime = os.stat(self.link).st_mtime
            except OSError:
                mtime = -1.0
            now = time.monotonic()
            if seen is None or seen[0] != mtime:
                seen = (mtime, now)
            elif now - seen[1] > procs.FOREIGN_LOCK_GRACE:
                self._break(f"held by another Optuna process and unchanged for {procs.FOREIGN_LOCK_GRACE:.0f} s")
                seen = None
                continue
            time.sleep(0.01)

    def _break(self, why: str) -> None:
        try:
            os.unlink(self.link)
        except FileNotFoundError:
            return
        warnings.warn(f"opgen tune: released the journal lock {self.link} {why}", procs.StaleLockWarning,
                      stacklevel=5)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError(f"release of {self.link}, which this process does not hold")
        try:
            os.unlink(self.link)
        except FileNotFoundError:                        # broken by a plain Optuna process after its grace period
            pass
        finally:
            os.close(fd)


class OwnedJournalStorage(JournalStorage):
    """A ``JournalStorage`` that stamps the trials this process starts with user attr ``owner``; see module doc."""

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is None:                       # Study.ask(): a new RUNNING trial, owner in the same entry
            now = datetime.now(tz=timezone.utc)
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, values=None, datetime_start=now,
                datetime_complete=None, params={}, distributions={}, user_attrs={"owner": procs.owner()},
                system_attrs={}, intermediate_values={}, trial_id=-1)
        return super().create_new_trial(study_id, template_trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state == TrialState.RUNNING:                  # popping a queued trial: claim it first
            try:
                self.set_trial_user_attr(trial_id, "owner", procs.owner())
            except (UpdateFinishedTrialError, KeyError):    # finished or unknown: the pop itself reports it
                pass
        return super().set_trial_state_values(trial_id, state, values)


def open_file(path: Path) -> Any:
    """An :class:`OwnedJournalStorage` on ``path`` with a :class:`JournalLock` (replays the file)."""
    return OwnedJournalStorage(JournalFileBackend(str(path), lock_obj=JournalLock(path)))
