"""The Triton backend (CUDA GPUs; CPU through the Triton interpreter when ``TRITON_INTERPRET=1``).

Importing this package imports neither triton nor torch: the renderer (:mod:`.expr`, :mod:`.scan`) is pure
text generation from the IR, and :mod:`.compile` / :mod:`.target` import triton and torch inside the functions
that need them.

* :func:`render` - a fused scan group (``opgen.ir.passes.fuse_scan``) to a Triton module (``KernelSpec``)
* :func:`default_config`, :func:`space` - schedule knobs as plain data, with constraints, for a tuner
* :mod:`.compile` - content-addressed source files, module loading, an ahead-of-time sm_90 compile check
* :class:`TritonTarget` - the :class:`opgen.targets.base.Target` implementation
"""
from .scan import (KernelSpec, MatmulForm, ScanSpace, default_config, launch_kwargs, matmul_form, render, space,
                   variants)
from .target import TritonTarget

__all__ = ["KernelSpec", "MatmulForm", "ScanSpace", "TritonTarget", "default_config", "launch_kwargs",
           "matmul_form", "render", "space", "variants"]
