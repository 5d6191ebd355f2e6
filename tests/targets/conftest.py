"""Fixtures shared by the target tests: unusable cache dirs (built on ``deny_writes``, tests/conftest.py) and planted
bytecode."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import pytest



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
