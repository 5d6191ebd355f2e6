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

tvm is imported on first use only.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache_files import cache_subdir, exec_source, give_up, read_private_file, read_verified
from ..cache_files import sidecar_path, temp_name, write_atomic, write_sidecar

_MODULE_IDS = itertools.count()


def host_target():
    """The LLVM target of this CPU (``Target.from_device("cpu")``: the host mcpu, never plain ``"llvm"``)."""
    import tvm

    return tvm.target.Target.from_device("cpu")


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
        if getattr(self, "_target_json", None) is None:
            self._target_json = str(self._target())
        return self._target_json

    def key(self, source: str) -> str:
        """sha256 of the source, the target and the TVM versions."""
        import tvm
        import tvm_ffi

        h = hashlib.sha256()
        for part in (source, self.target_json(), tvm.__version__, getattr(tvm_ffi, "__version__", "")):
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
        import tvm

        try:
            mod = tvm.runtime.load_module(str(path))
            fn = mod[func_name]
        except Exception as exc:  # noqa: BLE001 - a verified file that still fails to load is rebuilt
            self.stats.load_failures += 1
            self.stats.last_rejection = f"{path}: {type(exc).__name__}: {exc}"
            return None
        self._modules[key] = mod
        self.stats.loaded += 1
        return fn

    def _compile(self, key: str, source: str, func_name: str):
        import tvm

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
