"""Loading generated Triton modules, and an ahead-of-time compile check for a GPU target.

A generated source is executed from the text in memory (``compile`` + ``exec`` into a fresh module, see
:func:`opgen.targets.cache_files.exec_source`): the import system is not involved, so no ``__pycache__`` is read
or written and the file on disk is never what runs. ``@triton.jit`` (and the interpreter) read the function's
source with ``inspect``, which finds the in-memory text through ``linecache``. The text is also written once,
atomically (a fsynced temporary file, ``os.replace``, a fsynced directory), to
``<cache_dir>/triton/<sha256 of the source>.py`` so that tracebacks and a reader can open it. A cache directory
that cannot be written, or that is not owned by this user or can be written by others, is replaced by a private
temporary one with one :class:`~opgen.targets.cache_files.CacheDirWarning` (the module loads either way).

Loaded modules are kept in memory per (source hash, interpreter mode): ``TRITON_INTERPRET`` is read when
``@triton.jit`` runs, so a module loaded in one mode stays in it. Triton's own compile cache is keyed by the
source text, so regenerated identical code reuses its binaries.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from ..cache_files import cache_subdir, default_cache_dir, exec_source, give_up, read_private_file, write_atomic

H100_SHARED_MEMORY = 232448   # bytes per block (sm_90 opt-in maximum)

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], ModuleType] = {}


def _default_cache_dir() -> Path:
    """The directory of generated sources: ``$OPGEN_CACHE_DIR`` when set, else the user cache directory."""
    if os.environ.get("OPGEN_CACHE_DIR"):
        return Path(os.environ["OPGEN_CACHE_DIR"]).expanduser()
    return default_cache_dir()


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (CPU tensors, no GPU needed)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def source_path(source: str, cache_dir: str | os.PathLike) -> Path:
    """Where ``source`` is written under ``cache_dir`` (when that directory can be used)."""
    return Path(cache_dir) / "triton" / f"{source_hash(source)}.py"


def write_source(source: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """Write ``source`` to its content-addressed path for reading (a no-op when it is already there) and return
    that path; under a private temporary directory when ``cache_dir`` cannot be used (one warning), None when no
    directory can be written. Never raises for an unwritable cache."""
    d = cache_subdir(cache_dir, "triton")
    if d is None:
        return None
    path = d / f"{source_hash(source)}.py"
    try:
        if read_private_file(path).decode() == source:
            return path
    except (OSError, ValueError):
        pass
    try:
        write_atomic(path, source)
    except OSError as exc:
        give_up(cache_dir, d, f"writing {path} failed: {exc.strerror or exc}")
        return write_source(source, cache_dir) if cache_subdir(cache_dir, "triton") not in (None, d) else None
    return path


def load_module(source: str, cache_dir: str | os.PathLike | None) -> ModuleType:
    """The module of ``source``, executed from memory (its text also written under ``cache_dir``); cached in
    memory."""
    interp = interpreter_enabled()
    key = (source_hash(source), interp)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        path = write_source(source, cache_dir)
        name = f"_opgen_triton_{key[0][:32]}{'_interp' if interp else ''}"
        filename = str(path) if path is not None else f"<opgen triton module {key[0][:16]}>"
        mod = exec_source(source, name, filename, keep=True)
        _MODULES[key] = mod
        return mod


def clear_memory_cache() -> None:
    """Forget loaded modules (the files stay)."""
    with _LOCK:
        for mod in _MODULES.values():
            sys.modules.pop(mod.__name__, None)
        _MODULES.clear()


# --------------------------------------------------------------------------------------------- AOT check


@dataclass(frozen=True)
class AotResult:
    """Resources of one kernel compiled ahead of time for a GPU architecture."""

    kernel: str
    arch: int
    shared: int               # bytes of shared memory per block
    registers: int | None     # per thread (None when cuobjdump is unavailable)
    stack: int | None         # bytes of local stack per thread (spills); None when unknown
    num_warps: int
    num_stages: int
    ptx_has_mma: bool         # tensor-core instructions (wgmma / mma) in the PTX

    @property
    def spills(self) -> bool | None:
        return None if self.stack is None else self.stack > 0


class AotUnavailable(RuntimeError):
    """The ahead-of-time compile cannot run here (no triton, no NVIDIA backend or no ptxas)."""


def _cuobjdump() -> str | None:
    try:
        import triton.knobs as knobs

        p = knobs.nvidia.cuobjdump.path
        if p and os.path.exists(p):
            return p
    except Exception:  # noqa: BLE001 (older triton: no knobs)
        pass
    return shutil.which("cuobjdump")


def aot_compile(source: str, kernel: str, signature: Mapping[str, str], constexprs: Mapping[str, Any],
                cache_dir: str | os.PathLike, num_warps: int = 4, num_stages: int = 2, arch: int = 90) -> AotResult:
    """Compile ``kernel`` of ``source`` for ``sm_<arch>`` without a GPU and report its resources.

    Raises :class:`AotUnavailable` when the toolchain is missing, and triton's compile errors otherwise.
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:  # pragma: no cover - triton is a dependency
        raise AotUnavailable(f"triton is not importable: {e}") from None
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        raise AotUnavailable(f"triton has no NVIDIA backend: {e}") from None
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        mod = _load_compiled(source, cache_dir)
        fn = getattr(mod, kernel)
        src = triton.compiler.ASTSource(fn, signature=dict(signature), constexprs=dict(constexprs))
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages,
                                               "enable_fp_fusion": True})
        except FileNotFoundError as e:
            raise AotUnavailable(f"the CUDA toolchain (ptxas) is missing: {e}") from None
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    regs = stack = None
    tool = _cuobjdump()
    if tool is not None and "cubin" in compiled.asm:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        finally:
            os.unlink(f.name)
        for tok in out.replace(",", " ").split():
            if tok.startswith("REG:"):
                regs = int(tok[4:])
            elif tok.startswith("STACK:"):
                stack = int(tok[6:])
    ptx = compiled.asm.get("ptx", "")
    return AotResult(kernel, arch, int(compiled.metadata.shared), regs, stack, num_warps, num_stages,
                     "wgmma" in ptx or "mma.sync" in ptx)


def _load_compiled(source: str, cache_dir) -> ModuleType:
    """The module of ``source`` with compiled (not interpreted) jit functions."""
    key = (source_hash(source), False)
    with _LOCK:
        mod = _MODULES.get(key)
    if mod is not None:
        return mod
    return load_module(source, cache_dir)
