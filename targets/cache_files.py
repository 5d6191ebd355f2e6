"""The files of the kernel caches: which directory to use, how to write into it, what may be loaded from it.

- :func:`cache_subdir` gives ``<root>/<parts>`` after checking that it can be trusted and written: missing
  directories are created with mode 0700; one that is not owned by this user, or that its group or other users
  can write, is never loaded from. When the root cannot be used (unsafe, read-only, on a full disk, under an
  unwritable ``HOME``), one :class:`CacheDirWarning` names it and why, and this process uses a private
  temporary directory instead (mode 0700, removed at exit; memory only if even that cannot be created).
- :func:`write_atomic` writes a temporary file in the target's directory, fsyncs it, renames it over the
  target and fsyncs the directory.
- :func:`write_sidecar` / :func:`read_verified` bind a compiled file to its cache key: the sidecar
  ``<file>.sum`` (written last) holds the key, the size and the sha256 of the file's bytes, and a file is only
  handed out for loading when all three match the bytes read just before.
- :func:`exec_source` runs generated Python from the text in memory (``compile`` + ``exec``), so neither the
  import system nor a bytecode cache (``__pycache__``) is involved, and registers the text in ``linecache`` so
  ``inspect`` (TVMScript, ``@triton.jit``) reads exactly that text whatever the file on disk holds.
"""
from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path
from typing import BinaryIO, Callable

from opgen.ir.errors import FallbackWarning
from opgen.targets.source_guard import check_generated_source

SIDECAR_SUFFIX = ".sum"
_SIDECAR_MAGIC = "opgen-cache-entry-v1"


class CacheDirWarning(FallbackWarning):
    """A cache directory is not used (unsafe or not writable); this process keeps its kernels privately."""


_LOCK = threading.RLock()
_ROOTS: dict[Path, Path | None] = {}       # requested root -> the root in use (itself, a private one, or None)


# ------------------------------------------------------------------------------------------------ directories


def unsafe_reason(path: Path) -> str | None:
    """Why ``path`` must not be loaded from; None for a directory owned by this user that nobody else can write."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("its group", 0o020), ("other users", 0o002)) if st.st_mode & bit)
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}, expected no group/other write)"
    return None


def make_private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (existing directories are left as they are)."""
    missing: list[Path] = []
    p = Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


def _private_root() -> Path | None:
    """A new private cache root (``mkdtemp``: mode 0700, removed at exit); None if it cannot be made."""
    try:
        root = Path(tempfile.mkdtemp(prefix="opgen-cache-"))
    except OSError:
        return None
    import atexit
    import shutil

    atexit.register(shutil.rmtree, root, True)
    return root


def _check(root: Path, sub: Path) -> str | None:
    """Create ``root/sub`` (0700) and check it and every directory from ``root`` down; None when usable."""
    target = root / sub
    try:
        make_private_dir(target)
        d = root
        for part in (None, *sub.parts):
            d = d if part is None else d / part
            reason = unsafe_reason(d)
            if reason is not None:
                return reason
        if not os.access(target, os.W_OK | os.X_OK):
            return f"{target} is not writable"
    except OSError as exc:
        return f"cannot create or inspect {exc.filename or target}: {exc.strerror or exc}"
    return None


def give_up(root: str | os.PathLike | None, failed: Path, reason: str) -> None:
    """Stop using ``root`` in this process after ``failed`` (a directory under the root in use) could not be
    written: warn once and switch to the private root; when the private root fails too, to memory only."""
    if root is None:
        return
    root = Path(root)
    with _LOCK:
        current = _ROOTS.get(root, root)
        if current is None or not (failed == current or current in Path(failed).parents):
            return                                 # another thread moved on already
        if current != root:
            _ROOTS[root] = None                    # the private root failed too: memory only, no second warning
            return
        private = _private_root()
        _ROOTS[root] = private                     # root is left once per process: one warning
    where = f"in the private temporary directory {private}" if private is not None else "in memory only"
    warnings.warn(f"opgen: the cache directory {root} is not used: {reason}. Kernels compiled by this process "
                  f"are kept {where} and compiled again by the next process; set OPGEN_CACHE_DIR to a writable "
                  "directory owned by you that no other user can write.", CacheDirWarning, stacklevel=3)


def cache_subdir(root: str | os.PathLike | None, *parts: str) -> Path | None:
    """``<root>/<parts>`` when it is safe and writable, else the same under the private root (one warning per
    root); None when no directory can be used (the caller keeps its kernels in memory)."""
    if root is None:
        return None
    root = Path(root)
    sub = Path(*parts)
    for _ in range(3):
        with _LOCK:
            current = _ROOTS.setdefault(root, root)
            if current is None:
                return None
            reason = _check(current, sub)        # every time: a few stat calls, on in-memory misses only
            if reason is None:
                return current / sub
        give_up(root, current, reason)
    return None


# ----------------------------------------------------------------------------------------------------- writes


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse to fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = ".tmp") -> Path:
    """A unique temporary name beside ``path`` (a dot file: never taken for a cache entry)."""
    return path.with_name(f".{path.name[:40]}.{os.getpid()}.{os.urandom(4).hex()}{suffix}")


def write_atomic(path: Path, data: bytes | str | Callable[[BinaryIO], None], mode: int | None = None) -> None:
    """Write ``data`` (bytes, text, or a function writing to a binary file) to ``path`` through a fsynced
    temporary file, ``os.replace`` and a fsync of the directory, so a crash leaves the old file or the new one,
    never half of one; ``mode``: the result's permission bits (default 0o600). Raises OSError (the temporary file
    is removed)."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------- verified entries


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _record(key: str, data: bytes) -> str:
    return f"{_SIDECAR_MAGIC} {key} {len(data)} {hashlib.sha256(data).hexdigest()}\n"


def read_private_file(path: Path, limit: int = 1 << 30) -> bytes:
    """The bytes of the regular file ``path`` (not a symlink), owned by this user and not writable by others;
    OSError / ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ValueError(f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o} "
                             f"(expected uid {os.geteuid()}, no group/other write)")
        if st.st_size > limit:
            raise ValueError(f"{path} has {st.st_size} bytes (more than {limit})")
        return f.read(limit + 1)


def write_sidecar(path: Path, key: str) -> None:
    """Fsync ``path`` (already in place) and record its key, size and sha256 beside it, last."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read()
        os.fsync(f.fileno())
    write_atomic(sidecar_path(path), _record(key, data))


def read_verified(path: Path, key: str) -> tuple[bytes | None, str]:
    """``(bytes, "")`` when ``path`` exists and its sidecar names ``key`` with the size and sha256 of the bytes
    read now; else ``(None, why)`` (``why`` empty when there is no file at all)."""
    try:
        data = read_private_file(path)
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {exc}"
    try:
        record = read_private_file(sidecar_path(path), limit=4096).decode("ascii", "replace")
    except FileNotFoundError:
        return None, "no content hash beside it"
    except (OSError, ValueError) as exc:
        return None, f"its content hash is unreadable: {exc}"
    want = _record(key, data)
    if record != want:
        fields = record.split()
        if len(fields) != 4 or fields[0] != _SIDECAR_MAGIC:
            return None, "its content hash file is malformed"
        if fields[1] != key:
            return None, f"its content hash names another entry ({fields[1][:16]}...)"
        return None, f"its bytes do not match the recorded size and sha256 (size {len(data)}, recorded {fields[2]})"
    return data, ""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/opgen`` or ``~/.cache/opgen``; without a home directory, ``<tmp>/opgen-cache-<uid>``
    (the kernel caches refuse it, with a warning, unless it is this user's and private)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "opgen"
    try:
        return Path.home() / ".cache" / "opgen"
    except (RuntimeError, KeyError):
        import tempfile

        return Path(tempfile.gettempdir()) / f"opgen-cache-{os.geteuid()}"


# ---------------------------------------------------------------------------------------------- generated code


def exec_source(source: str, module_name: str, filename: str, *, keep: bool = False) -> types.ModuleType:
    """Run ``source`` as a new module ``module_name`` whose ``__file__`` is ``filename``.

    The code object is compiled from ``source`` itself (no import system, no ``.pyc`` read or written), and the
    text is put in ``linecache`` as an entry that is never re-read from disk, so ``inspect.getsource`` of the
    module's functions returns this text. The module is in ``sys.modules`` while it runs (TVMScript and Triton
    look it up); ``keep`` leaves it there. The text must first pass :func:`check_generated_source` (the
    syntax-tree guard against anything no renderer writes); a source that fails is never compiled or run.
    """
    check_generated_source(source, f"generated module {module_name}")
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    code = compile(source, filename, "exec", dont_inherit=True)
    mod = types.ModuleType(module_name)
    mod.__file__ = filename
    sys.modules[module_name] = mod
    try:
        exec(code, mod.__dict__)  # noqa: S102 - opgen's own generated source, from memory
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    if not keep:
        sys.modules.pop(module_name, None)
    return mod
