"""Atomic file writes for opgen's own data (tuning records, reports): the one implementation is
:func:`opgen.targets.cache_files.write_atomic` (a fsynced temporary file renamed over the target, then a fsync of
the folder), so a crash never leaves a half-written file where a complete one was."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from opgen.targets.cache_files import write_atomic


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Any], None], mode: int | None = None) -> Path:
    """Write ``data`` (text, bytes, or a function writing to a binary file object) to ``path`` atomically, creating
    its folder; ``mode``: permission bits of the result (default 0o600). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode)
    return path
