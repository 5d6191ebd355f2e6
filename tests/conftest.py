"""Shared pytest options and fixtures: ``--update-golden`` rewrites the golden snapshots under tests/golden/;
``deny_writes`` makes every write into a directory fail (full disk, read-only) even for root."""
from __future__ import annotations

import builtins
import errno
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden snapshot files")


@pytest.fixture
def golden(request):
    """``golden(name, text)``: compare ``text`` with tests/golden/name (or write it with --update-golden)."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if update or not path.exists():
            if not update:
                pytest.fail(f"golden file {path} is missing; run pytest --update-golden to create it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            return
        expected = path.read_text().rstrip("\n")
        assert text == expected, f"{name} differs from its golden snapshot (rerun with --update-golden if intended)"
    return check


@pytest.fixture
def reference_backend(monkeypatch):
    """Run the library ops on the reference interpreter (a session with ``backend="reference"``): for tests of an
    op's semantics against independent formulations, whose kernels are tested per backend under tests/targets
    (this spares one cold kernel build per parametrization)."""
    import opgen.ops.attention_op
    import opgen.bridge
    from opgen.config import from_env
    from opgen.runtime import make_session

    session = make_session(replace(from_env(), backend="reference"))
    for module in (opgen.ops.attention_op, opgen.bridge):
        monkeypatch.setattr(module, "default_session", lambda: session)
    return session


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
