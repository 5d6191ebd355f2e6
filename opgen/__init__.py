"""opgen: declare an operator once in a symbolic IR; get fused, tuned kernels as torch ops.

``import opgen`` is light (sympy, networkx): it does not import torch. The ``torch.ops.opgen.*`` ops (schemas,
fake kernels, autograd) are registered as soon as torch is imported, before or after opgen, so that
``torch.export.load`` of a program that uses them needs nothing but ``import opgen``; kernels and backends load
on first use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from typing import Any

from .ir import (BF16, F16, F32, F64, ArgumentError, BackendUnavailable, DType, Float, IRError, OpBuilder,
                 OpgenError, ShapeError, TraceError, absolute, axes, axis, cast, column_major, compute, dims, exp,
                 log, max, maximum, min, minimum, monoid, prod, reduce, row_major, scan, sigmoid, silu, softplus,
                 sqrt, strided, sum, tanh, where, zigzag)

from .declared import DeclaredOp, op  # noqa: E402  (the torch-op front end of opgen.ir.op)

__version__ = "0.1.0"

_LAZY = {"ops", "masks", "scores", "library", "config", "runtime", "cli", "tune", "bench"}


def run(op: Any, **tensors: Any) -> dict:
    """Run a built op (an :class:`opgen.ir.Op`) on torch tensors by input name, on the best available backend
    with its tuned config; returns the outputs by name. When an input requires grad, the call goes through the
    op's torch op (:func:`opgen.bridge.torch_op`), so gradients come from its generated backward op."""
    from .eager import direct_ok
    from .runtime import default_session

    if direct_ok(*tensors.values()):
        return default_session().run(op, tensors, who=f"opgen.run({op.name})")
    from .bridge import torch_op

    missing = [t.name for t in op.inputs if t.name not in tensors]
    extra = sorted(set(tensors) - {t.name for t in op.inputs})
    if missing or extra:
        raise ArgumentError(f"opgen.run({op.name}): expected the inputs {[t.name for t in op.inputs]}, got "
                            f"{sorted(tensors)}" + (f" (missing {missing})" if missing else "")
                            + (f" (unknown {extra})" if extra else ""))
    outs = torch_op(op)(*(tensors[t.name] for t in op.inputs))
    outs = (outs,) if len(op.outputs) == 1 else outs
    return {t.name: y for t, y in zip(op.outputs, outs)}


def _register_torch_ops() -> None:
    """Define every ``torch.ops.opgen.*`` op (cheap: schemas, fake kernels, autograd; no kernel is built)."""
    from .ops import attention_op, conv, scan  # noqa: F401


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Registers the torch ops right after ``torch`` finishes importing: finds torch's own spec with the other
    finders and wraps its loader's ``exec_module``; removes itself on first use."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register_after_torch()
        loader.exec_module = exec_module  # type: ignore[method-assign]  (this spec's own loader instance)
        return spec


def _register_after_torch() -> None:
    try:
        _register_torch_ops()
    except Exception as e:  # noqa: BLE001 - never break `import torch`; say why the ops are missing
        warnings.warn(f"opgen: registering the torch.ops.opgen ops failed ({type(e).__name__}: {e})", stacklevel=2)


if "torch" in sys.modules:
    _register_torch_ops()
elif not any(isinstance(f, _AfterTorchImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTorchImport())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"opgen.{name}")
    raise AttributeError(f"module 'opgen' has no attribute {name!r}")


__all__ = [
    "BF16", "F16", "F32", "F64", "ArgumentError", "BackendUnavailable", "DType", "Float", "IRError", "OpBuilder",
    "OpgenError", "ShapeError", "TraceError", "DeclaredOp", "absolute", "axes", "axis", "cast", "column_major", "compute", "dims",
    "exp", "log", "max", "maximum", "min", "minimum", "monoid", "op", "prod", "reduce", "row_major", "scan",
    "sigmoid", "silu", "softplus", "sqrt", "strided", "sum", "tanh", "where", "zigzag", "__version__", "run",
]
