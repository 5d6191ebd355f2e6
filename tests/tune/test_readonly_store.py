"""``opgen tune`` on a store it cannot write: one clear error naming the path and why, exit code 2, no traceback.

Root ignores permission bits, so "read-only" and "disk full" fail the writes under the store directory with
``PermissionError`` / ``OSError(ENOSPC)``; the real ``chmod 0500`` case runs only as a normal user.
"""
from __future__ import annotations

import errno
import os

import pytest

from opgen.cli import main

pytest.importorskip("tvm")

ARGS = ["tune", "linear_scan", "--shape", "C=4,L=8", "--trials", "1", "--no-progress", "--backend", "tvm"]


@pytest.mark.parametrize("how", ["storage-under-a-file", "cache-dir-under-a-file", "read-only", "disk-full",
                                 "chmod-0500"])
def test_tune_says_why_it_cannot_store_results(tmp_path, monkeypatch, capsys, deny_writes, how):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "cache"
    args = list(ARGS)
    if how == "storage-under-a-file":
        where = tmp_path / "file"
        args += ["--storage", f"journal:{where}/tune.journal"]
        cache.mkdir()
    elif how == "cache-dir-under-a-file":
        cache = where = tmp_path / "file" / "cache"
    elif how == "chmod-0500":
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits (the read-only case fails the writes instead)")
        cache.mkdir()
        cache.chmod(0o500)
        where = cache
    else:
        cache.mkdir()
        where = cache
    monkeypatch.setenv("OPGEN_CACHE_DIR", str(cache))
    monkeypatch.delenv("OPGEN_TUNE_STORAGE", raising=False)
    if how in ("read-only", "disk-full"):
        deny_writes(cache / "tune", errno.EACCES if how == "read-only" else errno.ENOSPC)
    try:
        rc = main(args)
    finally:
        if how == "chmod-0500":
            cache.chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("opgen tune: cannot store the tuning results")]
    assert len(lines) == 1, err
    assert str(where) in lines[0], lines[0]
    want = {"read-only": "not writable", "chmod-0500": "not writable", "disk-full": "disk full"}.get(
        how, "not a directory")
    assert want in lines[0], lines[0]


def test_tune_worker_says_why_it_cannot_store_results(tmp_path, capsys):
    """Failed before: a traceback (FileExistsError) from the journal's directory creation."""
    (tmp_path / "file").write_text("")
    args = ["tune-worker", "linear_scan", "--shape", "C=4,L=8", "--backend", "tvm",
            "--storage", f"journal:{tmp_path / 'file'}/tune.journal"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "opgen tune-worker: cannot store the tuning results" in err and "a file is in the way" in err, err
    assert "Traceback" not in err
