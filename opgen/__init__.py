"""opgen: declare an operator once in a symbolic IR; get fused, tuned kernels as torch ops.

``import opgen`` is light (sympy, networkx); torch and the backends load on first use of ``opgen.ops``,
``opgen.masks`` or ``opgen.scores``.
"""
from __future__ import annotations

import importlib
from typing import Any

from .ir import (BF16, F16, F32, F64, ArgumentError, BackendUnavailable, DType, Float, IRError, OpBuilder,
                 OpgenError, ShapeError, TraceError, absolute, axes, axis, cast, column_major, compute, dims, exp,
                 log, max, maximum, min, minimum, monoid, op, prod, reduce, row_major, scan, sigmoid, silu, softplus,
                 sqrt, strided, sum, tanh, where, zigzag)

__version__ = "0.1.0"

_LAZY = {"ops", "masks", "scores", "library", "config", "runtime", "cli", "tune", "bench"}


def run(op: Any, **tensors: Any) -> dict:
    """Run a declared op (an :class:`opgen.ir.Op`) on torch tensors by input name, on the best available
    backend with its tuned config; returns the outputs by name."""
    from .runtime import default_session

    return default_session().run(op, tensors, who=f"opgen.run({op.name})")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"opgen.{name}")
    raise AttributeError(f"module 'opgen' has no attribute {name!r}")


__all__ = [
    "BF16", "F16", "F32", "F64", "ArgumentError", "BackendUnavailable", "DType", "Float", "IRError", "OpBuilder",
    "OpgenError", "ShapeError", "TraceError", "absolute", "axes", "axis", "cast", "column_major", "compute", "dims",
    "exp", "log", "max", "maximum", "min", "minimum", "monoid", "op", "prod", "reduce", "row_major", "scan",
    "sigmoid", "silu", "softplus", "sqrt", "strided", "sum", "tanh", "where", "zigzag", "__version__", "run",
]
