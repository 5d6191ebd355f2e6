"""Loading generated Triton modules, and an ahead-of-time compile check for a GPU target.

A generated source is written once, atomically (a temporary file in the same directory, then ``os.replace``),
to ``<cache_dir>/triton/<sha256 of the source>.py`` and imported under a unique module name with
``importlib.util.spec_from_file_location``. ``@triton.jit`` needs the function's source file (it reads it with
``inspect``), hence files rather than ``exec``. Loaded modules are kept in memory per (source hash, interpreter
mode): ``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, so a module imported in one mode stays in it.
Triton's own compile cache is keyed by the source text, so regenerated identical code reuses its binaries.
"""
from __future__ import annotations

import hashlib
import importlib.util
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

H100_SHARED_MEMORY = 232448   # bytes per block (sm_90 opt-in maximum)

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], ModuleType] = {}


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (CPU tensors, no GPU needed)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def source_path(source: str, cache_dir: str | os.PathLike) -> Path:
    """Where ``source`` lives under ``cache_dir``."""
    return Path(cache_dir) / "triton" / f"{source_hash(source)}.py"


def write_source(source: str, cache_dir: str | os.PathLike) -> Path:
    """Write ``source`` to its content-addressed path (atomically; a no-op when it is already there)."""
    path = source_path(source, cache_dir)
    if path.exists():
        try:
            if path.read_text() == source:
                return path
        except OSError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_module(source: str, cache_dir: str | os.PathLike) -> ModuleType:
    """The imported module of ``source`` (written under ``cache_dir`` first); cached in memory."""
    interp = interpreter_enabled()
    key = (source_hash(source), interp)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        path = write_source(source, cache_dir)
        name = f"_opgen_triton_{key[0][:32]}{'_interp' if interp else ''}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import generated Triton source {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
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
