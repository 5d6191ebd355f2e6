"""Generated Triton sources are executed from memory, and a missing or unsafe cache costs one warning (issue 14).

- A planted ``__pycache__/*.pyc`` beside a generated source (matching its mtime and size) never runs.
- A cache directory that cannot be written (not a directory, read-only, full) or that others can write: the
  module still loads, ``inspect`` still finds the kernel's source (``@triton.jit`` and the interpreter need it),
  and one :class:`~opgen.targets.cache_files.CacheDirWarning` names the directory.
- The interpreter runs a kernel correctly with such a cache (subprocess: ``TRITON_INTERPRET=1`` must be set before
  triton is imported).
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest

pytest.importorskip("triton")

from opgen.ir.passes import fuse_scan  # noqa: E402
from opgen.ops.scan import declare_linear_scan  # noqa: E402
from opgen.targets.triton import render  # noqa: E402
from opgen.targets.triton import compile as tc  # noqa: E402

HERE = Path(__file__).parent
KERNEL = "linear_scan_sequential_kernel"


def _fresh_source() -> str:
    """A generated source no earlier test loaded (the loaded modules are cached in memory by content)."""
    return render(fuse_scan(declare_linear_scan()), "sequential").source + f"\n# test {uuid.uuid4().hex}\n"


def _cache_warnings(caught) -> list:
    from opgen.targets.cache_files import CacheDirWarning

    return [w for w in caught if issubclass(w.category, CacheDirWarning)]


def _check_module(mod, src: str) -> None:
    fn = getattr(mod, KERNEL).fn
    body = inspect.getsource(fn)
    assert body in src and f"def {KERNEL}(" in body, body[:200]
    assert callable(mod.launch)


def test_planted_bytecode_is_never_executed(tmp_path, plant_bytecode):
    src = _fresh_source()
    path = tc.write_source(src, tmp_path)
    sentinel = tmp_path / "planted-code-ran"
    pyc = plant_bytecode(path, sentinel)
    mod = tc.load_module(src, tmp_path)
    assert not sentinel.exists(), "a planted __pycache__ file was executed"
    _check_module(mod, src)
    assert [p.name for p in pyc.parent.iterdir()] == [pyc.name], "no bytecode is written"


def test_source_on_disk_is_not_what_runs(tmp_path):
    src = _fresh_source()
    path = tc.write_source(src, tmp_path)
    edited = src.replace("h_state = a * h_state + b", "h_state = a * h_state - b")
    assert edited != src
    path.write_text(edited)                         # edited after it was written: the text in memory runs
    mod = tc.load_module(src, tmp_path)
    _check_module(mod, src)
    assert path.read_text() == src


@pytest.mark.parametrize("how", ["not-a-directory", "read-only", "disk-full", "others-can-write", "chmod-0500", "no-temp-dir-either"])
def test_unusable_cache_dir_loads_with_one_warning(unusable_cache, how):
    cache = unusable_cache(how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = _fresh_source(), _fresh_source()
        _check_module(tc.load_module(first, cache), first)
        _check_module(tc.load_module(second, cache), second)
    (w,) = _cache_warnings(caught)
    assert str(cache) in str(w.message), w.message
    assert ("in memory only" in str(w.message)) == (how == "no-temp-dir-either"), w.message
    if how == "others-can-write":
        assert not (cache / "triton").exists() or not list((cache / "triton").iterdir())


def test_interpreter_runs_with_an_unwritable_cache(tmp_path):
    (tmp_path / "file").write_text("")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-W", "always", str(HERE / "interp_check.py"),
                        str(tmp_path / "file" / "cache"), "linear_scan_fwd"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FAIL" not in r.stdout and r.stdout.count("OK") == 2, r.stdout + r.stderr[-3000:]
    assert r.stderr.count("CacheDirWarning") == 1, r.stderr[-3000:]
