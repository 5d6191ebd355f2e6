"""Fixtures of the Triton tests."""
from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="module")
def aot_ready():
    """Skip unless triton with its NVIDIA backend is importable (the sm_90 ahead-of-time compile tier)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no NVIDIA backend: {e}")
    return True
