"""Convolution ops declared in the IR as window reductions over affine indices with zero padding:
``conv2d`` (F.conv2d semantics), ``causal_conv1d`` (causal-conv1d semantics) and ``long_conv`` (H3/Hyena)."""
from __future__ import annotations

import functools

from opgen.bridge import StaticArg, TensorArg, TorchOp, given_inputs
from opgen.eager import call
from opgen.ir import DType, OpBuilder, dims, silu
from opgen.ir.symbols import make_axes

from . import _args
from ._args import ir_dtype as _dt

# ------------------------------------------------------------------------------------------- causal_conv1d


@functools.lru_cache(maxsize=None)
def declare_causal_conv1d(x: DType = DType.f32, weight: DType = DType.f32, bias: DType | None = None,
                          activation: str | None = None):
    """``y[b, d, t] = act(bias[d] + sum_j weight[d, j] * x[b, d, t + j - (W-1)])`` with x zero for t < 0."""
    Bt, Dd, L, W = dims("B D L W")
    with OpBuilder("causal_conv1d", attrs={"activation": activation}) as bld:
        tx = bld.input("x", (Bt, Dd, L), x)
        tw = bld.input("weight", (Dd, W), weight)
        tb = bld.input("bias", (Dd,), bias) if bias is not None else None
        b, d, t, j = make_axes("b d t j")
        y = bld.reduce(j, tx.pad(0, 0, (W - 1, 0))[b, d, t + j - (W - 1)] * tw[d, j], axes=(b, d, t), name="acc")
        out = y[b, d, t]
        if tb is not None:
            out = out + tb[d]
        if activation is not None:
            out = silu(out)
        return bld.build({"out": bld.map(out, (b, d, t), name="out", dtype=x)})


def check_causal_conv1d(who: str, x, weight, bias, silu) -> None:
    """The arguments of ``causal_conv1d`` (the public function, ``torch.ops.opgen.causal_conv1d`` and its
    backward); ``silu`` is the op's flag (the public ``activation`` is not None)."""
    _args.shapes(who, {"x": (x, "batch dim L"), "weight": (weight, "dim W"), "bias": (bias, "dim")})
    if weight.shape[1] < 1:
        raise _args.ArgumentError(f"{who}: argument 'weight' has shape {tuple(weight.shape)}: the filter width W "
                                  f"(dim 1) must be >= 1")
    _args.flag(who, "silu", silu)


def causal_conv1d(x, weight, bias=None, activation=None):
    """Causal depthwise conv1d like ``causal_conv1d_fn``: x ``[batch, dim, L]``, weight ``[dim, W]``,
    bias ``[dim]``, activation None, "silu" or "swish". Returns ``[batch, dim, L]`` in x's dtype."""
    who = "opgen.ops.causal_conv1d"
    if activation not in (None, "silu", "swish"):
        raise _args.ArgumentError(f"{who}: argument 'activation' expected None, 'silu' or 'swish', "
                                  f"got {_args.describe(activation)}")
    check_causal_conv1d(who, x, weight, bias, activation is not None)
    return call(CAUSAL_CONV1D.forward_op, CAUSAL_CONV1D.impl, x, weight, bias, activation is not None)


# -------------------------------------------------------------------------------------------------- conv2d


@functools.lru_cache(maxsize=None)
def declare_conv2d(x: DType = DType.f32, weight: DType = DType.f32, bias: DType | None = None,
                   stride: tuple[int, int] = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                   dilation: tuple[int, int] = (1, 1), groups: int = 1):
    """``y[n, co, oh, ow] = sum_{ci, kh, kw} x.pad[n, g(co)*C + ci, oh*sh + kh*dh - pt, ow*sw + kw*dw - pl]
    * w[co, ci, kh, kw]`` (+ bias[co]); ``padding`` is (top, bottom, left, right)."""
    N, C, H, W, F, KH, KW = dims("N C H W F KH KW")
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    G = groups
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    with OpBuilder("conv2d", attrs=attrs) as bld:
        tx = bld.input("x", (N, G * C, H, W), x)
        tw = bld.input("weight", (G * F, C, KH, KW), weight)
        tb = bld.input("bias", (G * F,), bias) if bias is not None else None
        n, co, oh, ow, ci, kh, kw = make_axes("n co oh ow ci kh kw")
        chan = ci if G == 1 else (co // F) * C + ci
        xv = tx.pad(0, 0, (pt, pb), (pl, pr))[n, chan, oh * sh + kh * dh - pt, ow * sw + kw * dw - pl]
        y = bld.reduce((ci, kh, kw), xv * tw[co, ci, kh, kw], axes=(n, co, oh, ow), name="acc" if tb else "out",
                       dtype=None if tb is not None else x)
        if tb is None:
            return bld.build({"out": y})
        return bld.build({"out": bld.map(y[n, co, oh, ow] + tb[co], (n, co, oh, ow), name="out", dtype=x)})


@functools.lru_cache(maxsize=None)
def declare_depthwise_conv2d(x: DType = DType.f32, weight: DType = DType.f32, bias: DType | None = None,
                             stride: tuple[int, int] = (1, 1), padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                             dilation: tuple[int, int] = (1, 1)):
    """The depthwise case of :func:`declare_conv2d` (groups = channels, one filter per channel) with the weight
    as ``[C, KH, KW]``: ``y[n, c, oh, ow] = sum_{kh, kw} x.pad[n, c, oh*sh + kh*dh - pt, ow*sw + kw*dw - pl]
    * w[c, kh, kw]`` (+ bias[c]). Plain channel indices keep the generated gradients plain too: the data gradient
    is a depthwise window over the output gradient, the weight gradient a 2-D lag correlation."""
    N, C, H, W, KH, KW = dims("N C H W KH KW")
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    attrs = {"stride": stride, "padding": padding, "dilation": dilation}
    with OpBuilder("depthwise_conv2d", attrs=attrs) as bld:
        tx = bld.input("x", (N, C, H, W), x)
        tw = bld.input("weight", (C, KH, KW), weight)
        tb = bld.input("bias", (C,), bias) if bias is not None else None
        n, c, oh, ow, kh, kw = make_axes("n c oh ow kh kw")
        xv = tx.pad(0, 0, (pt, pb), (pl, pr))[n, c, oh * sh + kh * dh - pt, ow * sw + kw * dw - pl]
        y = bld.reduce((kh, kw), xv * tw[c, kh, kw], axes=(n, c, oh, ow), name="acc" if tb else "out",
                       dtype=None if tb is not None else x)
        if tb is None:
            return bld.build({"out": y})
        return bld.build({"out": bld.map(y[n, c, oh, ow] + tb[c], (n, c, oh, ow), name="out", dtype=x)})


def _pair(who: str, name: str, v, minimum: int) -> tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < minimum for s in vals):
        raise _args.ArgumentError(f"{who}: argument '{name}' expected an int >= {minimum} or a pair of them, "
                                  f"got {_args.describe(v)}")
    return vals  # type: ignore[return-value]


_WEIGHT = "[C_out, C/groups, KH, KW]"


def check_conv2d(who: str, x, weight, bias, stride, padding, dilation, groups) -> None:
    """The arguments of ``torch.ops.opgen.conv2d`` (and of the public function once its padding is the
    (top, bottom, left, right) list): layouts, group divisibility, a kernel that fits the padded input."""
    _args.int_list(who, "stride", stride, 2, 1)
    _args.int_list(who, "padding", padding, 4, 0)
    _args.int_list(who, "dilation", dilation, 2, 1)
    groups = _args.positive_int(who, "groups", groups)
    _args.tensor(who, "x", x, rank=4, layout="[N, C, H, W]")
    _args.tensor(who, "weight", weight, rank=4, layout=_WEIGHT)
    _args.tensor(who, "bias", bias, rank=1, layout="[C_out]", optional=True)
    _args.same_device(who, x=x, weight=weight, bias=bias)
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups:
        raise _args.ArgumentError(f"{who}: argument 'groups' = {groups} must divide the input channels "
                                  f"x.shape[1] = {c_in}")
    if c_out % groups:
        raise _args.ArgumentError(f"{who}: argument 'groups' = {groups} must divide the output channels "
                                  f"weight.shape[0] = {c_out}")
    if weight.shape[1] != c_in // groups:
        raise _args.ArgumentError(f"{who}: argument 'weight' has shape {tuple(weight.shape)}: dim 1 is "
                                  f"{weight.shape[1]} but must equal x.shape[1] / groups = {c_in} / {groups} = "
                                  f"{c_in // groups}")
    if bias is not None:
        _args.dim_equal(who, "bias", bias, 0, c_out, "weight.shape[0]")
    if min(x.shape[2:]) < 1 or min(weight.shape[2:]) < 1:
        raise _args.ArgumentError(f"{who}: argument '{'x' if min(x.shape[2:]) < 1 else 'weight'}' has an empty "
                                  f"spatial size (x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)}); "
                                  f"only the batch and channel dims may be 0 (as in F.conv2d)")
    for axis, size, k, d, lo, hi in (("height", x.shape[2], weight.shape[2], dilation[0], padding[0], padding[1]),
                                     ("width", x.shape[3], weight.shape[3], dilation[1], padding[2], padding[3])):
        if d * (k - 1) + 1 > size + lo + hi:
            raise _args.ArgumentError(f"{who}: argument 'weight' has a kernel {axis} of {k} (dilation {d}, spanning "
                                      f"{d * (k - 1) + 1}) larger than the padded input {axis} {size} + {lo + hi} "
                                      f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})")


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution with ``torch.nn.functional.conv2d`` semantics (NCHW; depthwise when groups = C).

    ``padding`` may be an int, a pair, ``"valid"`` or ``"same"`` (stride 1).
    """
    who = "opgen.ops.conv2d"
    sh, sw = _pair(who, "stride", stride, 1)
    dh, dw = _pair(who, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise _args.ArgumentError(f"{who}: argument 'padding' 'same' needs stride 1, got stride {(sh, sw)}")
            _args.tensor(who, "weight", weight, rank=4, layout=_WEIGHT)
            th, tw_ = dh * (weight.shape[2] - 1), dw * (weight.shape[3] - 1)
            pads = (th // 2, th - th // 2, tw_ // 2, tw_ - tw_ // 2)
        else:
            raise _args.ArgumentError(f"{who}: argument 'padding' expected an int, a pair, 'valid' or 'same', "
                                      f"got {_args.describe(padding)}")
    else:
        ph, pw = _pair(who, "padding", padding, 0)
        pads = (ph, ph, pw, pw)
    check_conv2d(who, x, weight, bias, [sh, sw], list(pads), [dh, dw], groups)
    return call(CONV2D.forward_op, CONV2D.impl, x, weight, bias, [sh, sw], list(pads), [dh, dw], groups)


# ----------------------------------------------------------------------------------------------- long_conv


@functools.lru_cache(maxsize=None)
def declare_long_conv(u: DType = DType.f32, k: DType = DType.f32):
    """``y[b, h, t] = sum_{j < Lk} k[h, j] * u[b, h, t - j]`` with u zero for negative time (causal)."""
    Bt, H, L, Lk = dims("B H L Lk")
    with OpBuilder("long_conv") as bld:
        tu = bld.input("u", (Bt, H, L), u)
        tk = bld.input("k", (H, Lk), k)
        bld.require(Lk <= L, "the filter length k.shape[1] must not exceed the sequence length u.shape[2]")
        b, h, t, j = make_axes("b h t j")
        y = bld.reduce(j, tk[h, j] * tu.pad(0, 0, (Lk - 1, 0))[b, h, t - j], axes=(b, h, t), name="y", dtype=u)
        return bld.build({"y": y})


def check_long_conv(who: str, u, k) -> None:
    """The arguments of ``long_conv`` (the public function, ``torch.ops.opgen.long_conv`` and its backward)."""
    sizes = _args.shapes(who, {"u": (u, "B H L"), "k": (k, "H Lk")})
    if sizes["Lk"] > sizes["L"]:
        raise _args.ArgumentError(f"{who}: argument 'k' has shape {tuple(k.shape)}: its length {k.shape[1]} "
                                  f"exceeds the sequence length L = {u.shape[2]} of u {tuple(u.shape)}")


def long_conv(u, k):
    """Causal long convolution (H3 / Hyena / FlashFFTConv): u ``[B, H, L]``, k ``[H, Lk]`` with Lk <= L,
    ``y[b, h, t] = sum_{0 <= s <= t, t - s < Lk} k[h, t - s] * u[b, h, s]``; returns ``[B, H, L]``."""
    check_long_conv("opgen.ops.long_conv", u, k)
    return call(LONG_CONV.forward_op, LONG_CONV.impl, u, k)


# ------------------------------------------------------------------------------------- the torch ops (bridge)
# ``torch.ops.opgen.{conv2d, causal_conv1d, long_conv}`` and their ``*_backward`` ops: the declarations above through
# :class:`opgen.bridge.TorchOp` (inputs made contiguous; a depthwise conv2d's weight passed as ``[C, KH, KW]``). A
# call with a zero-size dim takes the op's closed form at that size.

def _depthwise(x, weight, groups) -> bool:
    """One filter per channel (groups = channels in = channels out): the plain-index depthwise op."""
    return groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1


def conv2d_op_for(x, weight, bias, stride, padding, dilation, groups):
    """The IR op a conv2d call runs (the depthwise op for groups = channels, else the grouped dense op)."""
    if _depthwise(x, weight, groups):
        return declare_depthwise_conv2d(_dt(x), _dt(weight), _dt(bias), tuple(stride), tuple(padding),
                                        tuple(dilation))
    return declare_conv2d(_dt(x), _dt(weight), _dt(bias), tuple(stride), tuple(padding), tuple(dilation),
                          int(groups))


def conv2d_inputs(op, tensors, statics) -> dict:
    """The conv2d op's inputs: contiguous, the depthwise weight as ``[C, KH, KW]``."""
    x, weight = tensors["x"].contiguous(), tensors["weight"].contiguous()
    if _depthwise(x, weight, statics["groups"]):
        weight = weight.reshape(weight.shape[0], *weight.shape[2:])
    return given_inputs(op, {"x": x, "weight": weight, "bias": tensors["bias"]}, statics)


def _contiguous_inputs(op, tensors, statics) -> dict:
    return {k: v.contiguous() for k, v in given_inputs(op, tensors, statics).items()}


def _conv2d_zero(x, weight, bias, stride, padding, dilation, groups):
    """conv2d with a zero-size batch or channel dim: every sum is empty, so the output is the bias (or 0)."""
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = x.new_zeros((n, weight.shape[0], oh, ow))
    return out + bias.to(x.dtype)[:, None, None] if bias is not None else out


def _causal_conv1d_zero(x, weight, bias, silu):
    """causal_conv1d with a zero-size dim (batch, dim or L; W >= 1 is checked): the output is empty."""
    return x.new_zeros(x.shape)


def _long_conv_zero(u, k):
    """long_conv with a zero-size dim: the output is empty, or zero for an empty filter (Lk = 0)."""
    return u.new_zeros(u.shape)


_XWB = [TensorArg("x"), TensorArg("weight"), TensorArg("bias", optional=True)]

CONV2D = TorchOp(
    "conv2d", _XWB, [StaticArg(n, list) for n in ("stride", "padding", "dilation")] + [StaticArg("groups", int)],
    lambda t, s: conv2d_op_for(t["x"], t["weight"], t["bias"], s["stride"], s["padding"], s["dilation"],
                               s["groups"]),
    outputs=["out"], adapt=conv2d_inputs, check=check_conv2d, closed_form=_conv2d_zero, run_who="opgen.ops.conv2d",
    warn_fallback=False)

CAUSAL_CONV1D = TorchOp(
    "causal_conv1d", _XWB, [StaticArg("silu", bool)],
    lambda t, s: declare_causal_conv1d(_dt(t["x"]), _dt(t["weight"]), _dt(t["bias"]), "silu" if s["silu"] else None),
    outputs=["out"], adapt=_contiguous_inputs, check=check_causal_conv1d, closed_form=_causal_conv1d_zero,
    run_who="opgen.ops.causal_conv1d", warn_fallback=False)

LONG_CONV = TorchOp(
    "long_conv", [TensorArg("u"), TensorArg("k")], [], lambda t, s: declare_long_conv(_dt(t["u"]), _dt(t["k"])),
    outputs=["y"], adapt=_contiguous_inputs, check=check_long_conv, closed_form=_long_conv_zero,
    run_who="opgen.ops.long_conv", warn_fallback=False)
