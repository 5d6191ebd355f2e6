"""The TVM CPU backend: fused scans rendered to TVMScript and compiled with LLVM (tvm itself loads lazily).

Importing this package does not import tvm; :meth:`TVMTarget.available` reports whether it can be used.
"""
from .scan import KernelSource, ScanConfig, render_scan
from .target import Knob, Space, TVMTarget, as_config, check_config, default_config, legalize, space

__all__ = ["KernelSource", "ScanConfig", "render_scan", "Knob", "Space", "TVMTarget", "as_config", "check_config",
           "default_config", "legalize", "space"]
