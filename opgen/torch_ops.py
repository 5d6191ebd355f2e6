"""The torch bridge: library ops as ``torch.ops.opgen.*`` custom ops with fake kernels and autograd.

Each registered op checks its arguments with the same checks (and messages) as the public function in
:mod:`opgen.ops`, then runs its IR on the session's best target; its fake kernel computes the output shapes with symbolic
sizes only (no ``int()``), so ``torch.compile(fullgraph=True)`` with dynamic lengths sees one opaque node. The
backward of each op is another custom op that runs the backward IR produced by the grad transform
(:func:`opgen.ir.passes.grad.grad_op`): no hand-written backward kernels. A call with a zero-size dim (B = 0,
L = 0, ...) has no kernel (IR dims are positive): its outputs come from the op's closed form at that size
(:func:`zero_size_outputs`; an empty tensor, zeros, or what is left of the op once a sum is empty) and its
gradients from torch autograd through that closed form (:func:`zero_size_grads`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from opgen.ir import DType, Op, accum_dtype, as_dtype, promote
from opgen.ir.passes.grad import grad_op
from opgen.ir.passes.restage import restage_windows
from opgen.runtime import default_session

from .ops import _args
from .ops.scan import (check_chunk_gla, check_linear_scan, check_selective_scan, declare_chunk_gla,
                       declare_linear_scan, declare_selective_scan)

_LAYOUT = {2: "shared", 3: "variable", 4: "grouped"}


def _dt(x: Optional[Tensor]) -> Optional[DType]:
    return None if x is None else as_dtype(x.dtype)


def _acc_torch(*xs: Tensor) -> torch.dtype:
    from opgen.ir.dtypes import to_torch

    return to_torch(accum_dtype(promote(*(as_dtype(x.dtype) for x in xs))))


@functools.lru_cache(maxsize=256)
def _backward(op: Op, wrt: tuple[str, ...]) -> Op:
    """The backward op, its gradient reductions restaged into window reductions where that makes them ones."""
    return restage_windows(grad_op(op, wrt))


def _run(op: Op, inputs: dict, who: str) -> dict:
    return default_session().run(op, {k: v for k, v in inputs.items() if v is not None}, who=who)


def _run_backward(op: Op, inputs: dict, grads: dict, who: str) -> list[Tensor]:
    """Gradients for every floating input given (an empty tensor for absent ones), in ``inputs`` order."""
    present = {k: v for k, v in inputs.items() if v is not None}
    wrt = tuple(present)
    back = _backward(op, wrt)
    full_grads = {}
    for t in op.outputs:
        g = grads.get(t.name)
        if g is None:
            from opgen.ir.dtypes import to_torch

            ref = next(iter(present.values()))
            shape = default_session().binding(op, {k: tuple(v.shape) for k, v in present.items()}, {}, who).shapes
            g = torch.zeros(shape[t.name], dtype=to_torch(t.dtype), device=ref.device)
        full_grads[f"grad_{t.name}"] = g.contiguous()
    res = default_session().run(back, {**present, **full_grads}, who=who + " (backward)")
    ref = next(iter(present.values()))
    # a fresh empty tensor per absent input: custom ops may not return one tensor twice (aliasing)
    return [res[f"grad_{k}"].contiguous() if v is not None else ref.new_empty(0) for k, v in inputs.items()]


def _fresh(x: Tensor) -> Tensor:
    """A contiguous tensor of ``x``'s shape (what the backward kernels return, whatever ``x``'s strides are:
    ``empty_like`` would keep a transposed input's strides, and inductor checks them)."""
    return x.new_empty(x.shape)


def _none_if_empty(gs: Sequence[Tensor], given: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    return [g if x is not None else None for g, x in zip(gs, given)]


def who_op(name: str) -> str:
    """How errors name the registered op ``name``."""
    return f"torch.ops.opgen.{name}"


def any_empty(*xs: Optional[Tensor]) -> bool:
    """Whether a call has a zero-size dim (every dim of these ops is the size of some input)."""
    return any(x is not None and x.numel() == 0 for x in xs)


def zero_size_outputs(formula: Callable, *args) -> tuple[Tensor, ...]:
    """The outputs of the closed form ``formula(*args)`` of a zero-size call (fresh tensors, no grad)."""
    with torch.no_grad():
        outs = formula(*args)
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


@contextlib.contextmanager
def autograd_inside_op():
    """Grad mode with the autograd dispatch keys back on (a custom op's kernel runs with them excluded)."""
    keys = [k for k in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                        torch._C.DispatchKey.ADInplaceOrView) if torch._C._dispatch_tls_is_dispatch_key_excluded(k)]
    try:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
        with torch.enable_grad():
            yield
    finally:
        for k in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, True)


def zero_size_grads(formula: Callable, args: Sequence, grads: Sequence[Optional[Tensor]],
                    mask: Sequence[bool]) -> list[Tensor]:
    """Gradients of the tensor ``args`` whose ``mask`` entry is set, by torch autograd through the closed form
    ``formula(*args)`` of a zero-size call (zeros where an input does not reach the outputs; an empty tensor
    for absent or unmasked inputs); ``grads`` are the output gradients (None: zero)."""
    ref = next(a for a in args if isinstance(a, Tensor))
    with autograd_inside_op():
        leaves = [a.detach().requires_grad_(bool(m)) if isinstance(a, Tensor) and m else a
                  for a, m in zip(args, list(mask) + [False] * (len(args) - len(mask)))]
        outs = formula(*leaves)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        wrt = [x for x in leaves if isinstance(x, Tensor) and x.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs],
                                  allow_unused=True) if wrt and pairs else [None] * len(wrt)
    it = iter(got)
    res = []
    for x in leaves[:len(mask)]:
        if isinstance(x, Tensor) and x.requires_grad:
            g = next(it)
            # (a clone: a gradient passed straight through, e.g. initial_state's, would alias an input)
            res.append(g.clone(memory_format=torch.contiguous_format) if g is not None
                       else torch.zeros_like(x, memory_format=torch.contiguous_format))
        else:
            res.append(ref.new_empty(0))
    return res


# ------------------------------------------------------------------------------------------- linear_scan

def _linear_scan_zero(a: Tensor, b: Tensor, initial: Optional[Tensor], reverse: bool) -> Tensor:
    """linear_scan with a zero-size dim: h is empty."""
    return a.new_zeros(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


def linear_scan_impl(a: Tensor, b: Tensor, initial: Optional[Tensor], reverse: bool) -> Tensor:
    """``h[p, t, q] = a * h[p, t-1, q] + b`` on the canonical [P, L, Q] layout (arguments already checked)."""
    if any_empty(a, b, initial):
        return zero_size_outputs(_linear_scan_zero, a, b, initial, reverse)[0]
    op = declare_linear_scan(_dt(a), _dt(b), reverse, _dt(initial))
    return _run(op, {"a": a, "b": b, "initial": initial}, "opgen.ops.linear_scan")["h"]


@torch.library.custom_op("opgen::linear_scan", mutates_args=())
def linear_scan_op(a: Tensor, b: Tensor, initial: Optional[Tensor], reverse: bool) -> Tensor:
    """:func:`linear_scan_impl` after checking the arguments."""
    check_linear_scan(who_op("linear_scan"), a, b, initial, reverse)
    return linear_scan_impl(a, b, initial, reverse)


@linear_scan_op.register_fake
def _(a, b, initial, reverse):
    return a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


@torch.library.custom_op("opgen::linear_scan_backward", mutates_args=())
def linear_scan_backward_op(a: Tensor, b: Tensor, initial: Optional[Tensor], grad_h: Tensor,
                            reverse: bool) -> list[Tensor]:
    """Gradients of :func:`linear_scan_op` (initial's is empty when it is None)."""
    who = who_op("linear_scan_backward")
    check_linear_scan(who, a, b, initial, reverse)
    _args.shape_is(who, "grad_h", grad_h, a.shape, "the shape of h")
    if any_empty(a, b, initial):
        return zero_size_grads(_linear_scan_zero, (a, b, initial, reverse), (grad_h,), (True, True, True))
    op = declare_linear_scan(_dt(a), _dt(b), reverse, _dt(initial))
    return _run_backward(op, {"a": a, "b": b, "initial": initial}, {"h": grad_h}, "opgen.ops.linear_scan")


@linear_scan_backward_op.register_fake
def _(a, b, initial, grad_h, reverse):
    return [_fresh(a), _fresh(b), _fresh(initial) if initial is not None else a.new_empty(0)]


def _ls_setup(ctx, inputs, output):
    a, b, initial, reverse = inputs
    ctx.save_for_backward(a, b, initial)
    ctx.reverse = reverse


def _ls_backward(ctx, grad):
    a, b, initial = ctx.saved_tensors
    gs = linear_scan_backward_op(a, b, initial, grad.contiguous(), ctx.reverse)
    return (*_none_if_empty(gs, (a, b, initial)), None)


linear_scan_op.register_autograd(_ls_backward, setup_context=_ls_setup)


# ---------------------------------------------------------------------------------------- selective_scan

def _ss_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> Op:
    return declare_selective_scan(_dt(u), _dt(delta), _dt(A), _dt(B), _dt(C), _LAYOUT[B.dim()], _LAYOUT[C.dim()],
                                  _dt(D), _dt(z), _dt(delta_bias), bool(delta_softplus), True)


def _selective_scan_zero(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    """selective_scan with a zero-size dim: the state sum is empty (N = 0) or the output is (batch, dim or L
    = 0), so ``out = D * u * silu(z)`` (each factor when given); ``last_state`` is zero (h[-1] at L = 0)."""
    acc = _acc_torch(u, delta, A, B, C)
    y = u.to(acc) * D.to(acc)[:, None] if D is not None else u.new_zeros(u.shape, dtype=acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=acc)


def selective_scan_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], delta_bias: Optional[Tensor],
                        delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """Mamba's selective scan; returns (out, last_state) (arguments already checked)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if any_empty(*args[:8]):
        return zero_size_outputs(_selective_scan_zero, *args)
    op = _ss_op(*args)
    res = _run(op, dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias),
               "opgen.ops.selective_scan")
    return res["out"], res["last_state"]


@torch.library.custom_op("opgen::selective_scan", mutates_args=())
def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], delta_bias: Optional[Tensor],
                      delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """:func:`selective_scan_impl` after checking the arguments."""
    check_selective_scan(who_op("selective_scan"), u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    state = u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=_acc_torch(u, delta, A, B, C))
    return u.new_empty(u.shape), state


@torch.library.custom_op("opgen::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                               z: Optional[Tensor], delta_bias: Optional[Tensor], grad_out: Tensor,
                               grad_last_state: Tensor, delta_softplus: bool) -> list[Tensor]:
    """Gradients of :func:`selective_scan_op` for every input (empty for absent optional inputs)."""
    who = who_op("selective_scan_backward")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    check_selective_scan(who, *args)
    _args.shape_is(who, "grad_out", grad_out, u.shape, "the shape of out")
    _args.shape_is(who, "grad_last_state", grad_last_state, (u.shape[0], u.shape[1], A.shape[1]),
                   "the shape of last_state")
    if any_empty(*args[:8]):
        return zero_size_grads(_selective_scan_zero, args, (grad_out, grad_last_state), [True] * 8)
    op = _ss_op(*args)
    return _run_backward(op, dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias),
                         {"out": grad_out, "last_state": grad_last_state}, "opgen.ops.selective_scan")


@selective_scan_backward_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last_state, delta_softplus):
    return [_fresh(x) if x is not None else u.new_empty(0) for x in (u, delta, A, B, C, D, z, delta_bias)]


def _ss_setup(ctx, inputs, output):
    *tensors, delta_softplus = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus = delta_softplus


def _ss_backward(ctx, grad_out, grad_last):
    tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(tensors[0])
    if grad_last is None:
        u, A = tensors[0], tensors[2]
        grad_last = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=_acc_torch(*tensors[:5]))
    gs = selective_scan_backward_op(*tensors, grad_out.contiguous(), grad_last.contiguous(), ctx.delta_softplus)
    return (*_none_if_empty(gs, tensors), None)


selective_scan_op.register_autograd(_ss_backward, setup_context=_ss_setup)


# --------------------------------------------------------------------------------------------- chunk_gla

def _gla_op(q, k, v, g, initial_state, scale) -> Op:
    return declare_chunk_gla(_dt(q), _dt(k), _dt(v), _dt(g), float(scale), _dt(initial_state), True)


def _chunk_gla_zero(q, k, v, g, initial_state, scale) -> tuple[Tensor, Tensor]:
    """chunk_gla with a zero-size dim: o is empty or (K = 0) zero; the state never changes from its initial
    value (T = 0) or is empty."""
    acc = _acc_torch(q, k, v, g)
    o = q.new_zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    if initial_state is not None:
        return o, initial_state.to(acc, copy=True)
    return o, q.new_zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype=acc)


def chunk_gla_impl(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Optional[Tensor],
                   scale: float) -> tuple[Tensor, Tensor]:
    """Gated linear attention; returns (o, final_state) (arguments already checked)."""
    if any_empty(q, k, v, g, initial_state):
        return zero_size_outputs(_chunk_gla_zero, q, k, v, g, initial_state, scale)
    res = _run(_gla_op(q, k, v, g, initial_state, scale),
               dict(q=q, k=k, v=v, g=g, initial_state=initial_state), "opgen.ops.chunk_gla")
    return res["o"], res["final_state"]


@torch.library.custom_op("opgen::chunk_gla", mutates_args=())
def chunk_gla_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Optional[Tensor],
                 scale: float) -> tuple[Tensor, Tensor]:
    """:func:`chunk_gla_impl` after checking the arguments."""
    check_chunk_gla(who_op("chunk_gla"), q, k, v, g, initial_state, scale)
    return chunk_gla_impl(q, k, v, g, initial_state, scale)


@chunk_gla_op.register_fake
def _(q, k, v, g, initial_state, scale):
    b, t, h, kd = q.shape
    o = q.new_empty((b, t, h, v.shape[3]))
    return o, q.new_empty((b, h, kd, v.shape[3]), dtype=_acc_torch(q, k, v, g))


@torch.library.custom_op("opgen::chunk_gla_backward", mutates_args=())
def chunk_gla_backward_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Optional[Tensor],
                          grad_o: Tensor, grad_final_state: Tensor, scale: float) -> list[Tensor]:
    """Gradients of :func:`chunk_gla_op`."""
    who = who_op("chunk_gla_backward")
    check_chunk_gla(who, q, k, v, g, initial_state, scale)
    b, t, h, kd = q.shape
    _args.shape_is(who, "grad_o", grad_o, (b, t, h, v.shape[3]), "the shape of o")
    _args.shape_is(who, "grad_final_state", grad_final_state, (b, h, kd, v.shape[3]), "the shape of final_state")
    if any_empty(q, k, v, g, initial_state):
        return zero_size_grads(_chunk_gla_zero, (q, k, v, g, initial_state, scale), (grad_o, grad_final_state),
                               [True] * 5)
    return _run_backward(_gla_op(q, k, v, g, initial_state, scale),
                         dict(q=q, k=k, v=v, g=g, initial_state=initial_state),
                         {"o": grad_o, "final_state": grad_final_state}, "opgen.ops.chunk_gla")


@chunk_gla_backward_op.register_fake
def _(q, k, v, g, initial_state, grad_o, grad_final_state, scale):
    return [_fresh(x) if x is not None else q.new_empty(0) for x in (q, k, v, g, initial_state)]


def _gla_setup(ctx, inputs, output):
    *tensors, scale = inputs
    ctx.save_for_backward(*tensors)
    ctx.scale = scale


def _gla_backward(ctx, grad_o, grad_final):
    q, k, v, g, s0 = ctx.saved_tensors
    if grad_o is None:
        grad_o = q.new_zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    if grad_final is None:
        grad_final = q.new_zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype=_acc_torch(q, k, v, g))
    gs = chunk_gla_backward_op(q, k, v, g, s0, grad_o.contiguous(), grad_final.contiguous(), ctx.scale)
    return (*_none_if_empty(gs, (q, k, v, g, s0)), None)


chunk_gla_op.register_autograd(_gla_backward, setup_context=_gla_setup)
