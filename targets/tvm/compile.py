"""Compiling TVMScript source to callable kernels, cached in memory and on disk.

Key: sha256 of (source text, target JSON, tvm version, tvm-ffi version); the source is rendered from the
schedule config, so the key covers the config too. In memory a dict maps the key to the ``tvm_ffi.Function``
(``ex["main"]`` costs ~16-20 us per lookup, so it is looked up once).

On disk (``<cache_dir>/tvm``, see :mod:`opgen.targets.cache_files` for how the directory is chosen and checked)
the compiled module is exported to a temporary file, fsynced, renamed to ``<key>.so``, and then a sidecar
``<key>.so.sum`` holding the key, the size and the sha256 of the file's bytes is written (fsynced, last). A later
process reads the ``.so``, and only if its bytes match the sidecar (and the sidecar names this key) loads it with
``tvm.runtime.load_module`` (<1 ms instead of 0.1-0.5 s of compiling). A missing or malformed sidecar, a size or
hash mismatch (a truncated or damaged file), or the ``.so`` + sidecar of another key copied under this name are
never loaded: the kernel is compiled again and both files replaced (``CacheStats.rejected``). A cache directory
that is not owned by this user or that other users can write is not used at all.

The generated source is executed from the text in memory (``compile`` + ``exec``: no import system, so no
``__pycache__`` is read or written); the text is also written to ``<cache_dir>/tvm/src/<key>.py`` for reading
(best effort; TVMScript reads the function's source through ``linecache``, where the in-memory text is
registered, never from that file).

When the cache directory cannot be written (read-only, full, unwritable ``HOME``) kernels are still compiled and
kept in memory, with one :class:`~opgen.targets.cache_files.CacheDirWarning`.

tvm is imported on first use only, and only to compile. A kernel whose file is on disk is loaded and called
with ``tvm_ffi`` alone (``import tvm`` costs ~3.6 s, ``tvm_ffi`` ~1.2 s): the key's versions come from the package
metadata (:func:`tvm_versions`), the host target from ``<cache_dir>/tvm/host-target.json`` (written when tvm is
imported to compile, used only when it was computed on a CPU with this fingerprint and these versions:
:func:`cpu_fingerprint`), and the file is loaded by :func:`tvm_ffi.load_module` after ``libtvm_runtime`` is loaded
the way ``import tvm`` loads it (``RTLD_GLOBAL``, same file), so the kernel sees the same symbols. When any of
this is not possible (no metadata, no ``/proc/cpuinfo``, an absent or untrusted host-target file, a failed load),
the kernel goes the way it went before: ``import tvm``, load or compile.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import os
import platform
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache_files import cache_subdir, exec_source, give_up, read_private_file, read_verified
from ..cache_files import sidecar_path, temp_name, write_atomic, write_sidecar

_MODULE_IDS = itertools.count()


_IMPORT_FAILURE: list[str] = []


def import_tvm():
    """``import tvm``, or an ImportError that says apache-tvm cannot be imported and why (a missing module, a
    broken native library). :meth:`TVMTarget.available` only checks that the packages are installed; after such
    a failure it reports the target unavailable (:func:`tvm_import_failure`), so later calls go elsewhere."""
    try:
        import tvm
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError from a native library, ...
        why = f"apache-tvm cannot be imported ({type(exc).__name__}: {exc})"
        if not _IMPORT_FAILURE:
            _IMPORT_FAILURE.append(why)
        raise ImportError(f"opgen: the tvm target needs apache-tvm, which is installed but cannot be imported "
                          f"({type(exc).__name__}: {exc})") from exc
    return tvm


def tvm_import_failure() -> str:
    """Why ``import tvm`` failed in this process ("" when it did not fail or was not tried)."""
    return _IMPORT_FAILURE[0] if _IMPORT_FAILURE else ""


def host_target():
    """The LLVM target of this CPU (``Target.from_device("cpu")``: the host mcpu, never plain ``"llvm"``)."""
    return import_tvm().target.Target.from_device("cpu")


# ---------------------------------------------------------------------------------------- without importing tvm
# distributions that install the packages (checked against the package's location, so a tvm from another path,
# a source tree on PYTHONPATH, is not given the version of an installed wheel)
TVM_DISTRIBUTIONS = ("apache-tvm", "tvm")
TVM_FFI_DISTRIBUTIONS = ("apache-tvm-ffi", "tvm-ffi")
HOST_TARGET_FILE = "host-target.json"
_HOST_TARGET_SCHEMA = "opgen-host-target-v1"
_MAX_TARGET_CHARS = 1024


@functools.lru_cache(maxsize=None)
def installed_version(module: str, distributions: tuple[str, ...]) -> str | None:
    """The version of the distribution that installed ``module`` (from its metadata: no import), or None when
    no distribution of these names holds the ``module`` that an import would find."""
    try:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return None
        origin = Path(spec.origin).resolve()
        import importlib.metadata as md

        for name in distributions:
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                continue
            if Path(dist.locate_file(f"{module}/__init__.py")).resolve() == origin and dist.version:
                return str(dist.version)
    except Exception:  # noqa: BLE001 - odd metadata or import machinery: the caller imports the package
        return None
    return None


def tvm_versions() -> tuple[str, str]:
    """(tvm version, tvm-ffi version) for the cache key: the installed distributions' metadata
    (``apache-tvm``, ``apache-tvm-ffi``; equal to ``tvm.__version__`` / ``tvm_ffi.__version__``), else the
    imported packages' ``__version__``."""
    v = installed_version("tvm", TVM_DISTRIBUTIONS)
    if v is None:
        v = import_tvm().__version__
    f = installed_version("tvm_ffi", TVM_FFI_DISTRIBUTIONS)
    if f is None:
        import tvm_ffi

        f = getattr(tvm_ffi, "__version__", "")
    return v, f


_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "features",
               "cpu implementer", "cpu architecture", "cpu variant", "cpu part", "cpu revision", "isa")


def _cpuinfo_fields(text: str) -> list[tuple[str, str]]:
    """The identifying fields of the first processor in ``/proc/cpuinfo`` (not its clock or core numbers)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if sep and name in _CPU_FIELDS:
            out.append((name, " ".join(value.split())))
    return out


@functools.lru_cache(maxsize=8)
def cpu_fingerprint(versions: tuple[str, str]) -> str | None:
    """sha256 of this CPU as ``/proc/cpuinfo`` describes it (model, flags, ...), the machine and the TVM
    versions; None where there is no such file or it names no model and no flags (the host target is then
    computed by tvm)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = _cpuinfo_fields(f.read(1 << 20))
    except OSError:
        return None
    if not any(n in ("model name", "flags", "features", "cpu part") for n, _ in fields):
        return None
    h = hashlib.sha256(_HOST_TARGET_SCHEMA.encode())
    for part in (sys.platform, platform.machine(), *versions, *(f"{n}={v}" for n, v in fields)):
        h.update(b"\0" + part.encode())
    return h.hexdigest()


def _valid_target(text) -> bool:
    """A host target string as ``str(Target)`` writes it: bounded JSON of an llvm target whose values are
    plain strings, numbers, booleans or lists of strings."""
    if not isinstance(text, str) or not 0 < len(text) <= _MAX_TARGET_CHARS or not text.isprintable():
        return False
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    if not isinstance(obj, dict) or obj.get("kind") != "llvm":
        return False
    for k, v in obj.items():
        if not isinstance(k, str) or not (isinstance(v, (str, bool, int, float)) or
                                          (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            return False
    return True


def parse_host_target(data: bytes, fingerprint: str) -> str | None:
    """The target recorded in a host-target file when it is exactly
    ``{"schema": "opgen-host-target-v1", "fingerprint": <64 hex>, "target": <target>}`` and the fingerprint is
    ``fingerprint``; None for anything else."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or set(obj) != {"schema", "fingerprint", "target"}:
        return None
    if obj["schema"] != _HOST_TARGET_SCHEMA or obj["fingerprint"] != fingerprint:
        return None
    return obj["target"] if _valid_target(obj["target"]) else None


def _tvm_lib_paths() -> list[Path]:
    """Where ``tvm.libinfo.package_lib_paths`` looks for tvm's libraries (computed without importing tvm)."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise ImportError("tvm is not installed")
    pkg = Path(spec.origin).parent
    paths = [Path(os.environ["TVM_LIBRARY_PATH"])] if os.environ.get("TVM_LIBRARY_PATH") else []
    return paths + [pkg / "lib", pkg / ".." / ".." / "build" / "lib", pkg / ".." / ".." / "lib"]


_RUNTIME_LOCK = threading.Lock()
_RUNTIME: list = []                       # the loaded libtvm_runtime (kept alive)


def load_module_without_tvm(path: Path):
    """``tvm.runtime.load_module(path)`` without importing tvm: ``libtvm_runtime`` is loaded first as
    ``import tvm`` loads it (tvm/base.py: the same search, ``RTLD_GLOBAL``; a later ``import tvm`` gets the same
    handle), so the kernel's calls into the runtime (parallel launch, workspaces) resolve as they do there."""
    import tvm_ffi
    import tvm_ffi.libinfo

    with _RUNTIME_LOCK:
        if not _RUNTIME and "tvm" not in sys.modules:
            _RUNTIME.append(tvm_ffi.libinfo.load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL",
                                                             extra_lib_paths=_tvm_lib_paths()))
    return tvm_ffi.load_module(os.path.realpath(path))


@dataclass
class CacheStats:
    """Counters of the kernel cache (tests assert on them instead of timing)."""

    compiled: int = 0        # tvm.compile calls
    loaded: int = 0          # .so files loaded from disk
    memory_hits: int = 0
    load_failures: int = 0   # .so files not used (refused by the check, or failing to load): compiled again
    rejected: int = 0        # of those, refused before loading (no/wrong sidecar, size or sha256 mismatch)
    last_rejection: str = ""


@dataclass
class KernelCache:
    """Source text -> callable kernel; ``cache_dir`` None keeps compiled kernels in memory only."""

    cache_dir: Path | None = None
    target: Any = None                       # a tvm Target; the host CPU when None
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self._mem: dict[str, Any] = {}
        self._modules: dict[str, Any] = {}   # keep loaded modules alive alongside their functions
        self._lock = threading.RLock()
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)

    # keys and paths ----------------------------------------------------------------------------------------
    def _target(self):
        if self.target is None:
            self.target = host_target()
        return self.target

    def target_json(self) -> str:
        """The target's text for the key: ``str(target)``; for the host CPU, read from the host-target file when
        it was recorded on this CPU (no tvm import), else computed by tvm and recorded."""
        if getattr(self, "_target_json", None) is None:
            host = self.target is None
            if host and "tvm" not in sys.modules:
                recorded = self._recorded_host_target()
                if recorded is not None:
                    self._target_json, self._target_recorded = recorded, True
                    return recorded
            self._target_json, self._target_recorded = str(self._target()), False
            if host:
                self._record_host_target(self._target_json)
        return self._target_json

    def _host_target_path(self) -> Path | None:
        d = cache_subdir(self.cache_dir, "tvm")
        return None if d is None else d / HOST_TARGET_FILE

    def _recorded_host_target(self) -> str | None:
        """The host target in ``<cache_dir>/tvm/host-target.json`` when the file is private, well formed and was
        written on a CPU with this fingerprint and these TVM versions; None otherwise."""
        fp = cpu_fingerprint(tvm_versions())
        path = self._host_target_path() if fp is not None else None
        if path is None:
            return None
        try:
            data = read_private_file(path, limit=4096)
        except (OSError, ValueError):
            return None
        return parse_host_target(data, fp)

    def _record_host_target(self, text: str) -> None:
        """Record the host target computed by tvm (best effort: a failed write only costs a tvm import later)."""
        fp = cpu_fingerprint(tvm_versions())
        path = self._host_target_path() if fp is not None else None
        if path is None or not _valid_target(text):
            return
        record = json.dumps({"schema": _HOST_TARGET_SCHEMA, "fingerprint": fp, "target": text}) + "\n"
        try:
            if read_private_file(path, limit=4096).decode("utf-8", "replace") == record:
                return
        except (OSError, ValueError):
            pass
        try:
            write_atomic(path, record)
        except OSError:
            pass

    def _settle_target(self) -> None:
        """Before compiling: make the key's target the one tvm computes (a recorded host target is checked
        against it, and the record rewritten when they differ)."""
        if not getattr(self, "_target_recorded", False):
            return
        actual = str(self._target())
        self._target_recorded = False
        if actual != self._target_json:
            self._target_json = actual
            self._record_host_target(actual)

    def key(self, source: str) -> str:
        """sha256 of the source, the target and the TVM versions (:func:`tvm_versions`)."""
        h = hashlib.sha256()
        for part in (source, self.target_json(), *tvm_versions()):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def so_path(self, key: str) -> Path | None:
        """Where the compiled module of ``key`` lives (None: no usable cache directory, memory only)."""
        d = cache_subdir(self.cache_dir, "tvm")
        return None if d is None else d / f"{key}.so"

    def source_path(self, key: str) -> Path | None:
        """Where the generated source of ``key`` is written for reading (None: not written)."""
        d = cache_subdir(self.cache_dir, "tvm", "src")
        return None if d is None else d / f"{key}.py"

    # lookup ------------------------------------------------------------------------------------------------
    def get(self, source: str, func_name: str = "main"):
        """The compiled ``func_name`` of ``source`` (memory, then a verified file, then compile)."""
        key = self.key(source)
        fn = self._mem.get(key)
        if fn is not None:
            self.stats.memory_hits += 1
            return fn
        with self._lock:
            fn = self._mem.get(key)
            if fn is not None:
                self.stats.memory_hits += 1
                return fn
            fn = self._load(key, func_name)
            if fn is None:                   # compiling: the key's target must be tvm's (a recorded one may not be)
                self._settle_target()
                settled = self.key(source)
                if settled != key:
                    key = settled
                    fn = self._mem.get(key) or self._load(key, func_name)
            if fn is None:
                fn = self._compile(key, source, func_name)
            self._mem[key] = fn
            return fn

    def _load(self, key: str, func_name: str):
        path = self.so_path(key)
        if path is None:
            return None
        data, why = read_verified(path, key)
        if data is None:
            if why:                          # a file is there but is not the one this key's sidecar vouches for
                self.stats.load_failures += 1
                self.stats.rejected += 1
                self.stats.last_rejection = f"{path}: {why}"
            return None
        mod = fn = None
        if "tvm" not in sys.modules:
            try:                             # the fast way: tvm_ffi only
                mod = load_module_without_tvm(path)
                fn = mod[func_name]
            except Exception:  # noqa: BLE001 - any failure: the way through tvm below decides
                mod = fn = None
        try:
            if fn is None:
                mod = import_tvm().runtime.load_module(str(path))
                fn = mod[func_name]
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a verified file that still fails to load is rebuilt
            self.stats.load_failures += 1
            self.stats.last_rejection = f"{path}: {type(exc).__name__}: {exc}"
            return None
        self._modules[key] = mod
        self.stats.loaded += 1
        return fn

    def _compile(self, key: str, source: str, func_name: str):
        tvm = import_tvm()
        filename = self._write_source(key, source)
        module = exec_source(source, f"opgen_tvm_kernel_{key[:16]}_{next(_MODULE_IDS)}", filename)
        prim = getattr(module, func_name)
        ex = tvm.compile(prim, target=self._target())
        self.stats.compiled += 1
        fn = ex[func_name]
        self._modules[key] = ex
        self._export(key, ex)
        return fn

    def _write_source(self, key: str, source: str) -> str:
        """Write the source for reading (best effort); the file name its code and tracebacks will show."""
        path = self.source_path(key)
        if path is None:
            return f"<opgen tvm kernel {key[:16]}>"
        try:
            if read_private_file(path).decode() == source:
                return str(path)
        except (OSError, ValueError):
            pass
        try:
            write_atomic(path, source)
        except OSError as exc:
            give_up(self.cache_dir, path.parent, f"writing {path} failed: {exc.strerror or exc}")
            return f"<opgen tvm kernel {key[:16]}>"
        return str(path)

    def _export(self, key: str, ex) -> None:
        """``<key>.so`` (fsynced, renamed into place), then its sidecar (last); a failed write warns once and the
        kernel stays in memory."""
        path = self.so_path(key)
        if path is None:
            return
        tmp = temp_name(path, ".tmp.so")
        try:
            ex.export_library(str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            write_sidecar(path, key)
        except Exception as exc:  # noqa: BLE001 - OSError, or tvm's error when the linker cannot write
            for p in (tmp, sidecar_path(path)):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            lines = str(exc).strip().splitlines()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (lines[-1] if lines else
                                                                                      type(exc).__name__)
            give_up(self.cache_dir, path.parent, f"writing {path} failed: {reason}")

    def clear_memory(self) -> None:
        """Forget the in-memory kernels (the disk cache stays)."""
        with self._lock:
            self._mem.clear()
            self._modules.clear()
