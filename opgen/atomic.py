"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed over the target, so a crash
never leaves a half-written file where a complete one was (tuning records, reports, generated sources)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Any], None], mode: int | None = None) -> Path:
    """Write ``data`` (text, bytes, or a function writing to a binary file object) to ``path`` atomically;
    ``mode``: permission bits of the result (default: mkstemp's 0o600). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:32]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
