"""One typed configuration object; environment variables only provide defaults.

Pass a :class:`Config` explicitly where behaviour must differ (tests do); :func:`from_env` reads the
``OPGEN_*`` variables once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from opgen.targets.cache_files import default_cache_dir


@dataclass(frozen=True)
class Config:
    """Settings of one opgen session.

    cache_dir: where generated sources, compiled kernels and the tuning store live. The kernel caches create
        missing directories with mode 0700 and do not use one that another user owns or can write, nor one that
        cannot be written: they then compile into a private temporary directory, with one warning.
    backend: "auto" picks the best available target; "reference" forces the torch interpreter.
    reference_max_elements: memory budget (elements) of one reference reduction before it is chunked.
    tune_storage: tuning store URL (None: the embedded journal under ``cache_dir``/tune).
    min_node_kernel_work: a reduction node of an op run node by node (a generated backward op) gets a compiled
        kernel only from this many terms (output elements x reduction extent) at the call's sizes; below, the
        interpreter runs it as fast as a kernel would, without a compile (~2 s per kernel).
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    backend: str = "auto"
    reference_max_elements: int = 1 << 26
    tune_storage: str | None = None
    min_node_kernel_work: int = 1 << 20


def from_env(env: dict[str, str] | None = None) -> Config:
    """A :class:`Config` from ``OPGEN_CACHE_DIR``, ``OPGEN_BACKEND``, ``OPGEN_TUNE_STORAGE``,
    ``OPGEN_REFERENCE_MAX_ELEMENTS``, ``OPGEN_MIN_NODE_KERNEL_WORK``."""
    env = dict(os.environ if env is None else env)
    kw: dict = {}
    if env.get("OPGEN_CACHE_DIR"):
        kw["cache_dir"] = Path(env["OPGEN_CACHE_DIR"]).expanduser()
    if env.get("OPGEN_BACKEND"):
        kw["backend"] = env["OPGEN_BACKEND"]
    if env.get("OPGEN_TUNE_STORAGE"):
        kw["tune_storage"] = env["OPGEN_TUNE_STORAGE"]
    if env.get("OPGEN_REFERENCE_MAX_ELEMENTS"):
        kw["reference_max_elements"] = int(env["OPGEN_REFERENCE_MAX_ELEMENTS"])
    if env.get("OPGEN_MIN_NODE_KERNEL_WORK"):
        kw["min_node_kernel_work"] = int(env["OPGEN_MIN_NODE_KERNEL_WORK"])
    return Config(**kw)
