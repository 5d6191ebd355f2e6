"""Fixtures shared by the target tests: a directory whose writes fail (full disk, read-only) even for root."""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path
from typing import Callable

import pytest

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under(path, root: str) -> bool:
    if isinstance(path, int):
        return False
    p = os.path.abspath(os.fspath(path))
    return p == root or p.startswith(root + os.sep)


@pytest.fixture
def deny_writes(monkeypatch) -> Callable[[Path, int], None]:
    """``deny_writes(root, errno.ENOSPC)``: every file creation, write-mode open, mkdir and rename into ``root``
    raises ``OSError(errno)`` (root ignores permission bits, so a chmod cannot simulate a read-only directory)."""

    def deny(root: Path, code: int = errno.EACCES) -> None:
        top = os.path.abspath(root)
        exc_type = PermissionError if code in (errno.EACCES, errno.EPERM) else OSError

        def fail(path):
            raise exc_type(code, os.strerror(code), os.fspath(path))

        real_os_open, real_io_open, real_mkdir = os.open, io.open, os.mkdir
        real_replace, real_rename = os.replace, os.rename

        def os_open(path, flags, *a, **k):
            if flags & _WRITE_FLAGS and _under(path, top):
                fail(path)
            return real_os_open(path, flags, *a, **k)

        def io_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and _under(file, top):
                fail(file)
            return real_io_open(file, mode, *a, **k)

        def mkdir(path, *a, **k):
            if _under(path, top):
                fail(path)
            return real_mkdir(path, *a, **k)

        def replace(src, dst, *a, **k):
            if _under(dst, top):
                fail(dst)
            return real_replace(src, dst, *a, **k)

        def rename(src, dst, *a, **k):
            if _under(dst, top):
                fail(dst)
            return real_rename(src, dst, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(io, "open", io_open)
        monkeypatch.setattr(builtins, "open", io_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    return deny


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "mkdtemp")


@pytest.fixture
def unusable_cache(tmp_path, deny_writes, monkeypatch) -> Callable[[str], Path]:
    """``unusable_cache(how)``: a cache dir path that cannot be used, by ``how``: "not-a-directory", "read-only",
    "disk-full", "others-can-write", "chmod-0500" (skipped as root) or "no-temp-dir-either" (no private temporary
    directory can be made either)."""
    made: list[Path] = []

    def make(how: str) -> Path:
        cache = tmp_path / "cache"
        if how == "no-temp-dir-either":
            monkeypatch.setattr("tempfile.mkdtemp", _no_space)
        if how in ("not-a-directory", "no-temp-dir-either"):
            (tmp_path / "file").write_text("")
            return tmp_path / "file" / "cache"
        if how == "chmod-0500":
            if os.geteuid() == 0:
                pytest.skip("root ignores permission bits (the read-only case is covered by deny_writes)")
            cache.mkdir()
            cache.chmod(0o500)
            made.append(cache)
        elif how == "others-can-write":
            cache.mkdir()
            cache.chmod(0o777)
        else:
            cache.mkdir(mode=0o700)
            deny_writes(cache, errno.EACCES if how == "read-only" else errno.ENOSPC)
        return cache

    yield make
    for d in made:
        d.chmod(0o700)


@pytest.fixture
def plant_bytecode() -> Callable[[Path, Path], Path]:
    """``plant_bytecode(source, sentinel)``: see :func:`_plant_bytecode`."""
    return _plant_bytecode


def _plant_bytecode(source: Path, sentinel: Path) -> Path:
    """Write a ``__pycache__`` file for ``source`` that matches its mtime and size (so the import system would
    trust it) and whose code creates ``sentinel`` when executed; returns the planted file's path."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    evil = compile(f"open({str(sentinel)!r}, 'w').close()\n", str(source), "exec")
    st = source.stat()
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(bytes(_code_to_timestamp_pyc(evil, int(st.st_mtime), st.st_size)))
    return pyc
