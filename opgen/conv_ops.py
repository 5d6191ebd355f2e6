"""The convolutions as ``torch.ops.opgen.*`` custom ops: ``conv2d``, ``causal_conv1d`` and ``long_conv``.

Like :mod:`opgen.torch_ops`: each forward runs the op's IR on the session's best target; the fake kernels compute
output sizes with symbolic-int arithmetic only (no ``int()``, no branches on sizes), so
``torch.compile(fullgraph=True, dynamic=True)`` sees one opaque node for every spatial size or length; the backward
is another custom op running the IR produced by :func:`opgen.ir.passes.grad.grad_op`, for just the inputs that
need gradients (``ctx.needs_input_grad``). As there, the registered ops check their arguments with the public
functions' checks, and zero-size calls take the op's closed form. A gradient whose single-input backward op a compiled target takes (a
TVM window kernel) runs as its own op; the others run together in one backward op.

Registration happens on import of this module.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from opgen.ir import ArgumentError, Op
from opgen.runtime import default_session
from opgen.torch_ops import (_backward, _dt, _none_if_empty, _run, any_empty, autograd_inside_op, who_op,
                             zero_size_grads, zero_size_outputs)

from .ops import _args
from .ops.conv import (check_causal_conv1d, check_conv2d, check_long_conv, declare_causal_conv1d, declare_conv2d,
                       declare_depthwise_conv2d, declare_long_conv)


@functools.lru_cache(maxsize=256)
def _groups(op: Op, wrt: tuple[str, ...], device: str) -> tuple[tuple[str, ...], ...]:
    """The backward ops to run for ``wrt``: each gradient a compiled target runs alone, the rest together."""
    if len(wrt) < 2:
        return (wrt,) if wrt else ()
    sess = default_session()
    alone = [k for k in wrt if sess.target_for(_backward(op, (k,)), device).name != "reference"]
    rest = tuple(k for k in wrt if k not in alone)
    return tuple((k,) for k in alone) + ((rest,) if rest else ())


def _run_grads(op: Op, inputs: dict, grads: dict, mask: Sequence[bool], who: str) -> list[Tensor]:
    """Gradients of the inputs given whose ``mask`` entry is set, in ``inputs`` order (empty tensors elsewhere)."""
    present = {k: v.contiguous() for k, v in inputs.items() if v is not None}
    wrt = tuple(k for (k, v), m in zip(inputs.items(), mask) if v is not None and m)
    full = {f"grad_{k}": g.contiguous() for k, g in grads.items()}
    res: dict = {}
    ref = next(iter(present.values()))
    for group in _groups(op, wrt, ref.device.type):
        try:
            res.update(default_session().run(_backward(op, group), {**present, **full}, who=who + " (backward)"))
        except ArgumentError:
            # the bounds check rejects some generated backward ops whose reads are in bounds (stride-1 grouped
            # conv2d dx reads weight[.., g - C*(g // C), ..]): torch autograd through the reference interpreter
            res.update(_reference_grads(op, present, full, group))
    return [res[f"grad_{k}"].contiguous() if f"grad_{k}" in res else ref.new_empty(0) for k in inputs]


def _reference_grads(op: Op, present: dict, grads: dict, wrt: Sequence[str]) -> dict:
    """The gradients ``wrt`` by torch autograd through the differentiable reference interpreter."""
    with autograd_inside_op():
        leaves = {k: v.detach().requires_grad_(k in wrt) for k, v in present.items()}
        outs = default_session().run(op, leaves, who=f"{op.name} (reference backward)")
        names = [t.name for t in op.outputs]
        gs = torch.autograd.grad([outs[n] for n in names], [leaves[k] for k in wrt],
                                 [grads[f"grad_{n}"] for n in names], allow_unused=True)
    return {f"grad_{k}": g if g is not None else torch.zeros_like(present[k]) for k, g in zip(wrt, gs)}


def _grads_fake(tensors: Sequence[Optional[Tensor]], mask: Sequence[bool]) -> list[Tensor]:
    """Contiguous gradients (what the kernels return), whatever the inputs' strides: inductor checks them."""
    ref = next(t for t in tensors if t is not None)
    return [t.new_empty(t.shape) if t is not None and m else ref.new_empty(0) for t, m in zip(tensors, mask)]


def _mask(ctx, n: int) -> list[bool]:
    return [bool(b) for b in ctx.needs_input_grad[:n]]


def _nones(gs: Sequence[Tensor], given: Sequence[Optional[Tensor]], mask: Sequence[bool]) -> list[Optional[Tensor]]:
    return [g if m else None for g, m in zip(_none_if_empty(gs, given), mask)]


# -------------------------------------------------------------------------------------------------- conv2d

def _depthwise(x, weight, groups) -> bool:
    """One filter per channel (groups = channels in = channels out): the plain-index depthwise op."""
    return groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1


def _conv2d_op(x, weight, bias, stride, padding, dilation, groups) -> Op:
    if _depthwise(x, weight, groups):
        return declare_depthwise_conv2d(_dt(x), _dt(weight), _dt(bias), tuple(stride), tuple(padding),
                                        tuple(dilation))
    return declare_conv2d(_dt(x), _dt(weight), _dt(bias), tuple(stride), tuple(padding), tuple(dilation),
                          int(groups))


def _conv2d_weight(x, weight, groups):
    """The weight as the op declares it (``[C, KH, KW]`` for the depthwise op)."""
    return weight.reshape(weight.shape[0], *weight.shape[2:]) if _depthwise(x, weight, groups) else weight


def _conv2d_zero(x, weight, bias, stride, padding, dilation, groups) -> Tensor:
    """conv2d with a zero-size batch or channel dim: every sum is empty, so the output is the bias (or 0)."""
    out = x.new_zeros(_conv2d_shape(x, weight, stride, padding, dilation))
    return out + bias.to(x.dtype)[:, None, None] if bias is not None else out


def _conv2d_shape(x, weight, stride, padding, dilation) -> tuple:
    """``[N, C_out, OH, OW]`` (symbolic-int arithmetic only: the fake kernel uses it)."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, weight.shape[0], oh, ow)


def conv2d_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Tensor:
    """``F.conv2d`` on NCHW with ``padding`` = (top, bottom, left, right); returns x's dtype (arguments already
    checked)."""
    if any_empty(x, weight, bias):
        return zero_size_outputs(_conv2d_zero, x, weight, bias, stride, padding, dilation, groups)[0]
    op = _conv2d_op(x, weight, bias, stride, padding, dilation, groups)
    ins = {"x": x.contiguous(), "weight": _conv2d_weight(x, weight.contiguous(), groups), "bias": bias}
    return _run(op, ins, "opgen.ops.conv2d")["out"]


@torch.library.custom_op("opgen::conv2d", mutates_args=())
def conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
              dilation: list[int], groups: int) -> Tensor:
    """:func:`conv2d_impl` after checking the arguments."""
    check_conv2d(who_op("conv2d"), x, weight, bias, stride, padding, dilation, groups)
    return conv2d_impl(x, weight, bias, stride, padding, dilation, groups)


@conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    torch._check(x.shape[1] == weight.shape[1] * groups)
    return x.new_empty(_conv2d_shape(x, weight, stride, padding, dilation))


@torch.library.custom_op("opgen::conv2d_backward", mutates_args=())
def conv2d_backward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], grad_out: Tensor, stride: list[int],
                       padding: list[int], dilation: list[int], groups: int, mask: list[bool]) -> list[Tensor]:
    """(dx, dweight, dbias) of :func:`conv2d_op` for the inputs whose ``mask`` entry is set (empty elsewhere)."""
    who = who_op("conv2d_backward")
    check_conv2d(who, x, weight, bias, stride, padding, dilation, groups)
    _args.shape_is(who, "grad_out", grad_out, _conv2d_shape(x, weight, stride, padding, dilation),
                   "the shape of the output")
    _args.flag_list(who, "mask", mask, 3)
    if any_empty(x, weight, bias):
        return zero_size_grads(_conv2d_zero, (x, weight, bias, stride, padding, dilation, groups), (grad_out,),
                               mask)
    op = _conv2d_op(x, weight, bias, stride, padding, dilation, groups)
    dx, dw, db = _run_grads(op, {"x": x, "weight": _conv2d_weight(x, weight, groups), "bias": bias},
                            {"out": grad_out}, mask, "opgen.ops.conv2d")
    return [dx, dw.reshape(weight.shape) if dw.numel() else dw, db]


@conv2d_backward_op.register_fake
def _(x, weight, bias, grad_out, stride, padding, dilation, groups, mask):
    return _grads_fake((x, weight, bias), mask)


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, *attrs = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.attrs = attrs


def _conv2d_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    mask = _mask(ctx, 3)
    gs = conv2d_backward_op(x, weight, bias, grad, *ctx.attrs, mask)
    return (*_nones(gs, (x, weight, bias), mask), None, None, None, None)


conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


# ------------------------------------------------------------------------------------------- causal_conv1d

def _causal_op(x, weight, bias, silu) -> Op:
    return declare_causal_conv1d(_dt(x), _dt(weight), _dt(bias), "silu" if silu else None)


def _causal_conv1d_zero(x, weight, bias, silu) -> Tensor:
    """causal_conv1d with a zero-size dim (batch, dim or L; W >= 1 is checked): the output is empty."""
    return x.new_zeros(x.shape)


def causal_conv1d_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """Causal depthwise conv1d: x ``[batch, dim, L]``, weight ``[dim, W]``, optional SiLU; returns x's dtype
    (arguments already checked)."""
    if any_empty(x, weight, bias):
        return zero_size_outputs(_causal_conv1d_zero, x, weight, bias, silu)[0]
    ins = {"x": x.contiguous(), "weight": weight.contiguous(), "bias": bias}
    return _run(_causal_op(x, weight, bias, silu), ins, "opgen.ops.causal_conv1d")["out"]


@torch.library.custom_op("opgen::causal_conv1d", mutates_args=())
def causal_conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    """:func:`causal_conv1d_impl` after checking the arguments."""
    check_causal_conv1d(who_op("causal_conv1d"), x, weight, bias, silu)
    return causal_conv1d_impl(x, weight, bias, silu)


@causal_conv1d_op.register_fake
def _(x, weight, bias, silu):
    torch._check(x.shape[1] == weight.shape[0])
    return x.new_empty(x.shape)


@torch.library.custom_op("opgen::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], grad_out: Tensor, silu: bool,
                              mask: list[bool]) -> list[Tensor]:
    """(dx, dweight, dbias) of :func:`causal_conv1d_op` for the inputs whose ``mask`` entry is set."""
    who = who_op("causal_conv1d_backward")
    check_causal_conv1d(who, x, weight, bias, silu)
    _args.shape_is(who, "grad_out", grad_out, x.shape, "the shape of the output")
    _args.flag_list(who, "mask", mask, 3)
    if any_empty(x, weight, bias):
        return zero_size_grads(_causal_conv1d_zero, (x, weight, bias, silu), (grad_out,), mask)
    return _run_grads(_causal_op(x, weight, bias, silu), {"x": x, "weight": weight, "bias": bias},
                      {"out": grad_out}, mask, "opgen.ops.causal_conv1d")


@causal_conv1d_backward_op.register_fake
def _(x, weight, bias, grad_out, silu, mask):
    return _grads_fake((x, weight, bias), mask)


def _causal_setup(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _causal_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    mask = _mask(ctx, 3)
    gs = causal_conv1d_backward_op(x, weight, bias, grad, ctx.silu, mask)
    return (*_nones(gs, (x, weight, bias), mask), None)


causal_conv1d_op.register_autograd(_causal_backward, setup_context=_causal_setup)


# ----------------------------------------------------------------------------------------------- long_conv

def _long_conv_zero(u, k) -> Tensor:
    """long_conv with a zero-size dim: the output is empty, or zero for an empty filter (Lk = 0)."""
    return u.new_zeros(u.shape)


def long_conv_impl(u: Tensor, k: Tensor) -> Tensor:
    """Causal long convolution: u ``[B, H, L]``, k ``[H, Lk]`` (Lk <= L); returns ``[B, H, L]`` in u's dtype
    (arguments already checked)."""
    if any_empty(u, k):
        return zero_size_outputs(_long_conv_zero, u, k)[0]
    return _run(declare_long_conv(_dt(u), _dt(k)), {"u": u.contiguous(), "k": k.contiguous()},
                "opgen.ops.long_conv")["y"]


@torch.library.custom_op("opgen::long_conv", mutates_args=())
def long_conv_op(u: Tensor, k: Tensor) -> Tensor:
    """:func:`long_conv_impl` after checking the arguments."""
    check_long_conv(who_op("long_conv"), u, k)
    return long_conv_impl(u, k)


@long_conv_op.register_fake
def _(u, k):
    torch._check(u.shape[1] == k.shape[0])
    return u.new_empty(u.shape)


@torch.library.custom_op("opgen::long_conv_backward", mutates_args=())
def long_conv_backward_op(u: Tensor, k: Tensor, grad_y: Tensor, mask: list[bool]) -> list[Tensor]:
    """(du, dk) of :func:`long_conv_op` for the inputs whose ``mask`` entry is set (empty elsewhere)."""
    who = who_op("long_conv_backward")
    check_long_conv(who, u, k)
    _args.shape_is(who, "grad_y", grad_y, u.shape, "the shape of y")
    _args.flag_list(who, "mask", mask, 2)
    if any_empty(u, k):
        return zero_size_grads(_long_conv_zero, (u, k), (grad_y,), mask)
    return _run_grads(declare_long_conv(_dt(u), _dt(k)), {"u": u, "k": k}, {"y": grad_y}, mask,
                      "opgen.ops.long_conv")


@long_conv_backward_op.register_fake
def _(u, k, grad_y, mask):
    return _grads_fake((u, k), mask)


def _long_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _long_backward(ctx, grad):
    u, k = ctx.saved_tensors
    mask = _mask(ctx, 2)
    return tuple(_nones(long_conv_backward_op(u, k, grad, mask), (u, k), mask))


long_conv_op.register_autograd(_long_backward, setup_context=_long_setup)
