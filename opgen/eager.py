"""Plain eager calls of the library ops without a trip through torch's dispatcher.

``torch.ops.opgen.*`` are Python custom ops: every call goes through the dispatcher, the autograd wrapper and
dynamo's guards, ~70 us before the op's own code runs (``opgen.ops.linear_scan`` at 8 x 16: 156 us through the
custom op, 80 us calling its implementation). For a plain eager call (no autograd, no compile or jit trace, no
dispatch or function mode, no functorch transform, plain CPU or CUDA tensors) none of that machinery does anything, so
:func:`call` runs the implementation directly; every other call goes through the custom op as before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_DEVICES = frozenset({"cpu", "cuda"})


def direct_ok(*tensors: Any) -> bool:
    """Whether a call with these arguments (tensors or None; other values are ignored) may skip the dispatcher."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._get_tracing_state() is not None:          # torch.jit.trace records the op
        return False
    if torch.autograd.forward_ad._current_level >= 0:       # dual tensors: the op must see their tangents
        return False
    if _get_current_dispatch_mode() is not None or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if type(t) is not torch.Tensor or t.device.type not in _DEVICES or (grad and t.requires_grad):
                return False
    return True


def call(custom_op: Callable, impl: Callable, *args: Any) -> Any:
    """``impl(*args)`` when :func:`direct_ok`, else ``custom_op(*args)`` (the registered torch op)."""
    return impl(*args) if direct_ok(*args) else custom_op(*args)
