"""Compiling TVMScript source to callable kernels, cached in memory and on disk.

Key: sha256 of (source text, target JSON, tvm version, tvm-ffi version). In memory a dict maps the key to the
``tvm_ffi.Function`` (``ex["main"]`` costs ~16-20 us per lookup, so it is looked up once). On disk the compiled
module is exported to ``<cache_dir>/tvm/<key>.so`` (written to a temporary file, then ``os.replace``d, so a
concurrent reader never sees half a file) and a later process loads it with ``tvm.runtime.load_module`` instead of
compiling (<1 ms instead of 0.1-0.5 s). A file that fails to load (corrupted, truncated, foreign) is compiled again
and replaced. Generated sources are written the same way to ``<cache_dir>/tvm/src/<key>.py`` and imported under a
unique module name: TVMScript reads the source of the function it parses, so it must live in a real file.

tvm is imported on first use only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MODULE_IDS = itertools.count()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_SRC_DIR: Path | None = None


def _process_src_dir() -> Path:
    """One temporary directory per process for the sources of caches without a cache_dir (removed at exit)."""
    global _SRC_DIR
    if _SRC_DIR is None:
        import atexit
        import shutil

        _SRC_DIR = Path(tempfile.mkdtemp(prefix="opgen-tvm-src-"))
        atexit.register(shutil.rmtree, _SRC_DIR, True)
    return _SRC_DIR


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
    load_failures: int = 0   # .so files that could not be loaded (then compiled again)


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
        return None if self.cache_dir is None else self.cache_dir / "tvm" / f"{key}.so"

    def source_path(self, key: str) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir / "tvm" / "src" / f"{key}.py"
        return _process_src_dir() / f"{key}.py"

    # lookup ------------------------------------------------------------------------------------------------
    def get(self, source: str, func_name: str = "main"):
        """The compiled ``func_name`` of ``source`` (memory, then disk, then compile)."""
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
        if path is None or not path.exists():
            return None
        import tvm

        try:
            mod = tvm.runtime.load_module(str(path))
            fn = mod[func_name]
        except Exception:  # noqa: BLE001 - any unreadable file is rebuilt
            self.stats.load_failures += 1
            return None
        self._modules[key] = mod
        self.stats.loaded += 1
        return fn

    def _compile(self, key: str, source: str, func_name: str):
        import tvm

        src_path = self.source_path(key)
        if not src_path.exists() or src_path.read_text() != source:
            _atomic_write_text(src_path, source)
        name = f"opgen_tvm_kernel_{key[:16]}_{next(_MODULE_IDS)}"
        spec = importlib.util.spec_from_file_location(name, src_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(name, None)
        prim = getattr(module, func_name)
        ex = tvm.compile(prim, target=self._target())
        self.stats.compiled += 1
        fn = ex[func_name]
        self._modules[key] = ex
        path = self.so_path(key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.so")
            try:
                ex.export_library(str(tmp))
                os.replace(tmp, path)
            except Exception:  # noqa: BLE001 - a read-only or full cache dir must not fail the call
                pass
            finally:
                if tmp.exists():
                    tmp.unlink()
        return fn

    def clear_memory(self) -> None:
        """Forget the in-memory kernels (the disk cache stays)."""
        with self._lock:
            self._mem.clear()
            self._modules.clear()
