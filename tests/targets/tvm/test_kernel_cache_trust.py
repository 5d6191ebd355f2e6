"""The TVM kernel cache trusts nothing it reads from disk, and works without a writable cache (issue 14, 2 and 3).

- A ``.so`` is loaded only when its bytes match the sidecar written beside it for the same key: a truncated file,
  flipped bytes, another kernel's ``.so`` (alone or with its sidecar) or a missing sidecar mean a rebuild. Loading
  such files used to kill the process (SIGBUS / SIGSEGV) or return another kernel's numbers, so those cases run in
  a subprocess that must exit 0.
- Generated TVMScript is executed from the text in memory: a planted ``__pycache__/*.pyc`` never runs.
- New cache directories are 0700; a directory owned by someone else or writable by group/others is not used.
- With a read-only, full or impossible cache directory (or an unwritable ``HOME``) kernels still compile, with one
  warning. Root ignores permission bits, so read-only and full disks are simulated by failing the writes
  (``deny_writes``, tests/targets/conftest.py); the real ``chmod 0500`` case runs only as a normal user.

Kernels: ``linear_scan`` forward and reverse (same signature, different numbers), the smallest scan kernels.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from opgen.ir import bind  # noqa: E402
from opgen.ops.scan import declare_linear_scan  # noqa: E402
from opgen.targets.tvm import ScanConfig, TVMTarget  # noqa: E402

SCALAR = ScanConfig()


def _inputs():
    g = torch.Generator().manual_seed(14)
    return {"a": 0.5 + 0.5 * torch.rand(2, 5, 3, generator=g), "b": torch.randn(2, 5, 3, generator=g)}


def _expected(inputs, reverse: bool) -> torch.Tensor:
    a, b = inputs["a"].double(), inputs["b"].double()
    h = torch.zeros_like(b)
    state = torch.zeros_like(b[:, 0])
    steps = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for t in steps:
        state = a[:, t] * state + b[:, t]
        h[:, t] = state
    return h


def _run(cache_dir, reverse: bool = False):
    op = declare_linear_scan(reverse=reverse)
    inputs = _inputs()
    target = TVMTarget(cache_dir=cache_dir)
    h = target.run(op, inputs, bind(op, {k: tuple(v.shape) for k, v in inputs.items()}), SCALAR)["h"]
    torch.testing.assert_close(h.double(), _expected(inputs, reverse), rtol=1e-5, atol=1e-5)
    return target


def _cache_warnings(caught) -> list:
    from opgen.targets.cache_files import CacheDirWarning

    return [w for w in caught if issubclass(w.category, CacheDirWarning)]


# --------------------------------------------------------------------------------------- damaged cache files

_DAMAGE_SCRIPT = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import torch
    from opgen.ir import bind
    from opgen.ops.scan import declare_linear_scan
    from opgen.targets.tvm import ScanConfig, TVMTarget

    cache, cases = Path(sys.argv[1]), sys.argv[2].split(",")
    g = torch.Generator().manual_seed(0)
    inputs = {"a": 0.5 + 0.5 * torch.rand(2, 5, 3, generator=g), "b": torch.randn(2, 5, 3, generator=g)}
    fwd, rev = declare_linear_scan(), declare_linear_scan(reverse=True)
    b = bind(fwd, {k: tuple(v.shape) for k, v in inputs.items()})
    first = TVMTarget(cache_dir=cache)
    good = first.run(fwd, inputs, b, ScanConfig())["h"]
    first.run(rev, inputs, b, ScanConfig())
    so = {op: cache / "tvm" / f"{first.cache.key(first.source(op, b, ScanConfig()).text)}.so" for op in (fwd, rev)}
    saved = {p: p.read_bytes() for p in so.values()}
    saved.update({Path(f"{p}.sum"): Path(f"{p}.sum").read_bytes() for p in so.values() if Path(f"{p}.sum").exists()})

    def put(path, data):   # replaced, as another writer would (a loaded file stays mapped)
        tmp = path.with_name("damage.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    target, side = so[fwd], Path(f"{so[fwd]}.sum")
    for case in cases:
        put(target, saved[target])
        if side in saved:
            put(side, saved[side])
        data = saved[target]
        if case == "truncated":
            put(target, data[: len(data) // 2])
        elif case.startswith("flip"):
            i = int(case[4:]) * len(data) // 8
            put(target, data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
        elif case == "foreign":               # another kernel with the same signature, alone
            put(target, saved[so[rev]])
        elif case == "foreign_pair":          # another kernel with its own sidecar
            put(target, saved[so[rev]])
            put(side, saved[Path(f"{so[rev]}.sum")])
        elif case == "no_sidecar":
            side.unlink()
        t = TVMTarget(cache_dir=cache)
        h = t.run(fwd, inputs, b, ScanConfig())["h"]
        st = t.cache.stats
        assert torch.equal(h, good), (case, "wrong numbers", (h - good).abs().max().item())
        assert st.loaded == 0 and st.compiled == 1 and st.rejected == 1 and st.load_failures == 1, (case, st)
        print("OK", case, "|", st.last_rejection.split(": ", 1)[1], flush=True)
    last = TVMTarget(cache_dir=cache)
    assert torch.equal(last.run(fwd, inputs, b, ScanConfig())["h"], good)
    assert last.cache.stats.loaded == 1 and last.cache.stats.compiled == 0, last.cache.stats
    print("OK rebuilt file loads")
''')

DAMAGE_CASES = ["truncated", "flip3", "foreign", "foreign_pair", "no_sidecar"]


def test_damaged_or_foreign_so_is_rebuilt_never_loaded(tmp_path):
    script = tmp_path / "damage.py"
    script.write_text(_DAMAGE_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), ",".join(DAMAGE_CASES)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.count("OK ") == len(DAMAGE_CASES) + 1, r.stdout


def test_sidecar_is_written_after_the_so_and_names_the_key(tmp_path):
    t = _run(tmp_path)
    (so,) = (tmp_path / "tvm").glob("*.so")
    side = Path(f"{so}.sum").read_text().split()
    assert side[1] == so.stem and int(side[2]) == so.stat().st_size
    assert Path(f"{so}.sum").stat().st_mtime_ns >= so.stat().st_mtime_ns
    assert t.cache.stats.compiled == 1
    assert not [p for p in (tmp_path / "tvm").iterdir() if p.name.startswith(".")], "no temporary files left"


# ------------------------------------------------------------------------------------------- generated source


def test_planted_bytecode_is_never_executed(tmp_path, plant_bytecode):
    first = _run(tmp_path)
    (src,) = (tmp_path / "tvm" / "src").glob("*.py")
    for p in (tmp_path / "tvm").glob("*.so*"):
        p.unlink()                                  # the next process must compile from the source
    sentinel = tmp_path / "planted-code-ran"
    pyc = plant_bytecode(src, sentinel)
    second = _run(tmp_path)
    assert not sentinel.exists(), "a planted __pycache__ file was executed"
    assert second.cache.stats.compiled == 1 and first.cache.stats.compiled == 1
    assert [p.name for p in pyc.parent.iterdir()] == [pyc.name], "no bytecode is written"


def test_no_bytecode_written_and_new_dirs_are_private(tmp_path):
    root = tmp_path / "new" / "cache"
    _run(root)
    for d in (tmp_path / "new", root, root / "tvm", root / "tvm" / "src"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, (d, oct(d.stat().st_mode))
    assert not list(root.rglob("__pycache__"))


# ------------------------------------------------------------------------------------- untrusted directories


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "foreign-owner"])
def test_cache_dir_writable_by_others_is_not_loaded_from(tmp_path, how):
    _run(tmp_path)                                  # a valid cache entry
    tvm_dir = tmp_path / "tvm"
    before = sorted(p.name for p in tvm_dir.iterdir())
    if how == "foreign-owner":
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        os.chown(tvm_dir, 4242, -1)
    else:
        os.chmod(tvm_dir, 0o777 if how == "world-writable" else 0o770)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = _run(tmp_path)
        _run(tmp_path, reverse=True)
    assert t.cache.stats.loaded == 0 and t.cache.stats.compiled == 1, t.cache.stats
    assert sorted(p.name for p in tvm_dir.iterdir()) == before, "nothing is written to an unsafe directory"
    (w,) = _cache_warnings(caught)
    assert str(tvm_dir) in str(w.message) and ("writable by" in str(w.message) or "owned by" in str(w.message))


# ------------------------------------------------------------------------------------------ no writable cache


@pytest.mark.parametrize("how", ["not-a-directory", "read-only", "disk-full", "chmod-0500", "no-temp-dir-either"])
def test_unwritable_cache_dir_still_compiles_with_one_warning(unusable_cache, how):
    cache = unusable_cache(how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t1 = _run(cache)
        t2 = _run(cache, reverse=True)
        _run(cache)
    assert t1.cache.stats.compiled == 1 and t2.cache.stats.compiled == 1
    (w,) = _cache_warnings(caught)
    assert str(cache) in str(w.message), w.message
    assert ("in memory only" in str(w.message)) == (how == "no-temp-dir-either"), w.message


def test_unwritable_home_without_cache_dir_setting(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("")              # HOME is a file: nothing can be created below it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("OPGEN_CACHE_DIR", raising=False)
    from opgen.config import from_env

    cfg = from_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(cfg.cache_dir)
    assert len(_cache_warnings(caught)) == 1


def test_no_home_directory_at_all(tmp_path, monkeypatch):
    import pwd

    for var in ("HOME", "XDG_CACHE_HOME", "OPGEN_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    from opgen.config import from_env

    cfg = from_env()                                # used to raise RuntimeError("Could not determine home ...")
    assert cfg.cache_dir == tmp_path / f"opgen-cache-{os.geteuid()}"
    _run(cfg.cache_dir)
    assert stat.S_IMODE(cfg.cache_dir.stat().st_mode) == 0o700
