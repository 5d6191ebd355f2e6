"""This host's CPU as the TVM CPU target sees it (from /proc/cpuinfo): its name, its flags and its SIMD width.

A module of its own so that the kernel modules (window, attention) read the SIMD width without importing the
target module that imports them.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def host_vector_bits() -> int:
    """SIMD width of this CPU from /proc/cpuinfo (512 with AVX-512F, 256 with AVX2, 128 otherwise; 0 unknown)."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        return 512
    if "avx2" in flags:
        return 256
    if "sse2" in flags or "asimd" in flags:
        return 128
    return 0
