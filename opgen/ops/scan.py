"""Scan ops declared in the IR: ``linear_scan``, ``selective_scan`` (Mamba) and ``chunk_gla`` (GLA)."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from opgen.bridge import StaticArg, TensorArg, TorchOp, given_inputs
from opgen.eager import call
from opgen.ir import DType, OpBuilder, accum_dtype, dims, exp, promote, silu, softplus
from opgen.ir.symbols import Dim, make_axes

from . import _args
from ._args import ir_dtype as _dt

# --------------------------------------------------------------------------------------------- linear_scan


@functools.lru_cache(maxsize=None)
def declare_linear_scan(a: DType = DType.f32, b: DType = DType.f32, reverse: bool = False,
                        initial: DType | None = None):
    """``h[p, t, q] = a[p, t, q] * h[p, t-1, q] + b[p, t, q]`` over t (reversed if asked), h[-1] = initial[p, q]."""
    P, L, Q = dims("P L Q")
    with OpBuilder("linear_scan", attrs={"reverse": reverse}) as bld:
        ta = bld.input("a", (P, L, Q), a)
        tb = bld.input("b", (P, L, Q), b)
        ti = bld.input("initial", (P, Q), initial) if initial is not None else None
        p, t, q = make_axes("p t q")
        h = bld.scan(t, a=ta[p, t, q], b=tb[p, t, q], init=ti[p, q] if ti is not None else None, reverse=reverse,
                     axes=(p, t, q))
        return bld.build({"h": h})


def check_linear_scan(who: str, a, b, initial, reverse) -> None:
    """The arguments of the canonical ``[P, L, Q]`` op ``torch.ops.opgen.linear_scan`` (and its backward)."""
    _args.shapes(who, {"a": (a, "P L Q"), "b": (b, "P L Q"), "initial": (initial, "P Q")})
    _args.flag(who, "reverse", reverse)


def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int = -1, reverse: bool = False,
                initial: torch.Tensor | None = None) -> torch.Tensor:
    """The first-order linear recurrence ``h[t] = a[t] * h[t-1] + b[t]`` along ``dim``.

    ``a`` and ``b`` have the same shape; ``initial`` (shape of ``a`` without ``dim``) is ``h[-1]`` (zeros by
    default). ``reverse=True`` runs from the end: ``h[t] = a[t] * h[t+1] + b[t]``. Computed exactly (no
    cumprod/cumsum closed form), so decays close to 1 over long sequences stay finite.
    """
    who = "opgen.ops.linear_scan"
    _args.tensor(who, "a", a, rank=range(1, 17))
    _args.tensor(who, "b", b, rank=range(1, 17))
    if a.shape != b.shape:
        raise _args.ArgumentError(f"{who}: argument 'b' has shape {tuple(b.shape)} but must match a's shape "
                                  f"{tuple(a.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -a.dim() <= dim < a.dim():
        raise _args.ArgumentError(f"{who}: argument 'dim' expected an int in [{-a.dim()}, {a.dim()}), "
                                  f"got {_args.describe(dim)}")
    _args.flag(who, "reverse", reverse)
    dim = dim % a.dim()
    rest = tuple(a.shape[:dim]) + tuple(a.shape[dim + 1:])
    _args.tensor(who, "initial", initial, optional=True)
    if initial is not None and tuple(initial.shape) != rest:
        raise _args.ArgumentError(f"{who}: argument 'initial' has shape {tuple(initial.shape)} but must be a's "
                                  f"shape without dim {dim}: {rest}")
    _args.same_device(who, a=a, b=b, initial=initial)
    shape3 = (math.prod(a.shape[:dim]), a.shape[dim], math.prod(a.shape[dim + 1:]))
    init = initial.reshape(shape3[0], shape3[2]) if initial is not None else None
    out = call(LINEAR_SCAN.forward_op, LINEAR_SCAN.impl, a.reshape(shape3), b.reshape(shape3), init, reverse)
    return out.reshape(a.shape)


# ------------------------------------------------------------------------------------------ selective_scan

_BC_LAYOUT = {2: "shared", 3: "variable", 4: "grouped"}


@functools.lru_cache(maxsize=None)
def declare_selective_scan(u: DType = DType.f32, delta: DType = DType.f32, A: DType = DType.f32,
                           B: DType = DType.f32, C: DType = DType.f32, B_layout: str = "variable",
                           C_layout: str = "variable", D: DType | None = None, z: DType | None = None,
                           delta_bias: DType | None = None, delta_softplus: bool = False,
                           last_state: bool = False):
    """Mamba's selective scan as one affine matrix of scans over the state axis n, projected by C.

    ``h[b, d, n, t] = exp(dt * A[d, n]) * h[b, d, n, t-1] + dt * B[.., n, t] * u[b, d, t]`` with
    ``dt = softplus?(delta[b, d, t] + delta_bias[d])``; ``y = sum_n h * C[.., n, t]`` (+ ``D[d] * u``)
    (* ``silu(z)``). B/C layouts: shared ``[D, N]``, variable ``[B, N, L]``, grouped ``[B, G, N, L]``.
    """
    Bt, Dd, L, N = dims("B D L N")
    attrs = {"B": B_layout, "C": C_layout, "delta_softplus": delta_softplus}
    with OpBuilder("selective_scan", attrs=attrs) as bld:
        tu = bld.input("u", (Bt, Dd, L), u)
        tdelta = bld.input("delta", (Bt, Dd, L), delta)
        tA = bld.input("A", (Dd, N), A)
        b, d, n, t = make_axes("b d n t")

        def proj(name: str, dt: DType, layout: str):
            if layout == "shared":
                return bld.input(name, (Dd, N), dt)[d, n]
            if layout == "variable":
                return bld.input(name, (Bt, N, L), dt)[b, n, t]
            G, Dg = Dim(f"G{name}"), Dim(f"Dg{name}")
            bld.derive(Dg, Dd / G)
            return bld.input(name, (Bt, G, N, L), dt)[b, d // Dg, n, t]

        Bv = proj("B", B, B_layout)
        Cv = proj("C", C, C_layout)
        tD = bld.input("D", (Dd,), D) if D is not None else None
        tz = bld.input("z", (Bt, Dd, L), z) if z is not None else None
        tbias = bld.input("delta_bias", (Dd,), delta_bias) if delta_bias is not None else None
        dt = tdelta[b, d, t]
        if tbias is not None:
            dt = dt + tbias[d]
        if delta_softplus:
            dt = softplus(dt)
        h = bld.scan(t, a=exp(dt * tA[d, n]), b=dt * Bv * tu[b, d, t], state=(n,), axes=(b, d, n, t), name="h")
        y = bld.reduce(n, h[b, d, n, t] * Cv, axes=(b, d, t), name="y")
        out = y[b, d, t]
        if tD is not None:
            out = out + tD[d] * tu[b, d, t]
        if tz is not None:
            out = out * silu(tz[b, d, t])
        outputs = {"out": bld.map(out, (b, d, t), name="out", dtype=u)}
        if last_state:
            outputs["last_state"] = bld.map(h[b, d, n, L - 1], (b, d, n), name="last_state")
        return bld.build(outputs)


_BC_DIMS = {2: "dim N", 3: "batch N L", 4: "batch G{} N L"}
_BC_HELP = "[dim, N], [batch, N, L] or [batch, G, N, L]"


def check_selective_scan(who: str, u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> None:
    """The arguments of ``selective_scan`` (the public function, ``torch.ops.opgen.selective_scan`` and its
    backward): layouts, sizes, dtypes, one device; B / C groups dividing dim."""
    for name, x in (("B", B), ("C", C)):
        _args.tensor(who, name, x, rank=(2, 3, 4), layout=_BC_HELP)
    _args.shapes(who, {"u": (u, "batch dim L"), "delta": (delta, "batch dim L"), "A": (A, "dim N"),
                       "B": (B, _BC_DIMS[B.dim()].format("_B")), "C": (C, _BC_DIMS[C.dim()].format("_C")),
                       "D": (D, "dim"), "z": (z, "batch dim L"), "delta_bias": (delta_bias, "dim")})
    channels = u.shape[1]
    for name, x in (("B", B), ("C", C)):
        if x.dim() == 4 and (x.shape[1] == 0 or channels % x.shape[1]):
            raise _args.ArgumentError(f"{who}: argument '{name}' has {x.shape[1]} groups (shape {tuple(x.shape)}), "
                                      f"which must divide dim = {channels} (u.shape[1])")
    _args.flag(who, "delta_softplus", delta_softplus)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Mamba's selective scan with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

    u, delta ``[batch, dim, L]``; A ``[dim, N]`` (real); B, C ``[dim, N]``, ``[batch, N, L]`` or grouped
    ``[batch, G, N, L]``; D, delta_bias ``[dim]``; z ``[batch, dim, L]``. Returns ``out`` (u's dtype) or
    ``(out, last_state)`` with ``last_state`` ``[batch, dim, N]`` in float32 (float64 for float64 inputs).
    """
    who = "opgen.ops.selective_scan"
    check_selective_scan(who, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    _args.flag(who, "return_last_state", return_last_state)
    out, last_state = call(SELECTIVE_SCAN.forward_op, SELECTIVE_SCAN.impl, u, delta, A, B, C, D, z, delta_bias,
                           delta_softplus)
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------------------------------------- chunk_gla


@functools.lru_cache(maxsize=None)
def declare_chunk_gla(q: DType = DType.f32, k: DType = DType.f32, v: DType = DType.f32, g: DType = DType.f32,
                      scale: float = 1.0, initial_state: DType | None = None, final_state: bool = False):
    """Gated linear attention as a matrix-state scan: ``S[b,h,:,:,t] = diag(exp(g_t)) S[t-1] + k_t^T v_t``,
    ``o[b,t,h,:] = scale * q_t S_t``."""
    Bt, T, H, K, V = dims("B T H K V")
    with OpBuilder("chunk_gla", attrs={"scale": scale}) as bld:
        tq = bld.input("q", (Bt, T, H, K), q)
        tk = bld.input("k", (Bt, T, H, K), k)
        tv = bld.input("v", (Bt, T, H, V), v)
        tg = bld.input("g", (Bt, T, H, K), g)
        t0 = bld.input("initial_state", (Bt, H, K, V), initial_state) if initial_state is not None else None
        b, t, h, kk, vv = make_axes("b t h kk vv")
        S = bld.scan(t, a=exp(tg[b, t, h, kk]), b=tk[b, t, h, kk] * tv[b, t, h, vv],
                     init=t0[b, h, kk, vv] if t0 is not None else None, state=(kk, vv), axes=(b, h, kk, vv, t),
                     name="S")
        o = bld.reduce(kk, tq[b, t, h, kk] * scale * S[b, h, kk, vv, t], axes=(b, t, h, vv), name="o", dtype=q)
        outputs = {"o": o}
        if final_state:
            outputs["final_state"] = bld.map(S[b, h, kk, vv, T - 1], (b, h, kk, vv), name="final_state",
                                             dtype=accum_dtype(promote(q, k, v, g)))
        return bld.build(outputs)


def check_chunk_gla(who: str, q, k, v, g, initial_state, scale) -> None:
    """The arguments of ``chunk_gla`` (the public function, ``torch.ops.opgen.chunk_gla`` and its backward)."""
    _args.shapes(who, {"q": (q, "B T H K"), "k": (k, "B T H K"), "v": (v, "B T H V"), "g": (g, "B T H K"),
                       "initial_state": (initial_state, "B H K V")})
    _args.real(who, "scale", scale)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """Gated linear attention with flash-linear-attention's ``chunk_gla`` layout and semantics.

    q, k, g ``[B, T, H, K]`` (g: log-space forget gates), v ``[B, T, H, V]``, initial_state ``[B, H, K, V]``.
    Returns ``(o, final_state)``: o ``[B, T, H, V]`` in q's dtype; final_state ``[B, H, K, V]`` in float32
    (float64 for float64 inputs) when ``output_final_state``, else None. ``scale`` defaults to ``K ** -0.5``.
    """
    who = "opgen.ops.chunk_gla"
    if scale is None:
        scale = q.shape[-1] ** -0.5 if isinstance(q, torch.Tensor) and q.dim() and q.shape[-1] else 1.0
    check_chunk_gla(who, q, k, v, g, initial_state, scale)
    _args.flag(who, "output_final_state", output_final_state)
    o, final_state = call(CHUNK_GLA.forward_op, CHUNK_GLA.impl, q, k, v, g, initial_state, float(scale))
    return o, (final_state if output_final_state else None)


# ------------------------------------------------------------------------------------- the torch ops (bridge)
# ``torch.ops.opgen.{linear_scan, selective_scan, chunk_gla}`` and their ``*_backward`` ops: the declarations above
# through :class:`opgen.bridge.TorchOp`. A call with a zero-size dim (no IR: dims are positive) takes the op's
# closed form at that size, and its gradients come from torch autograd through it.

def _acc_torch(*xs: torch.Tensor) -> torch.dtype:
    from opgen.ir.dtypes import to_torch

    return to_torch(accum_dtype(promote(*(_dt(x) for x in xs))))


def _linear_scan_zero(a, b, initial, reverse):
    """linear_scan with a zero-size dim: h is empty."""
    return a.new_zeros(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


def _selective_scan_zero(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """selective_scan with a zero-size dim: the state sum is empty (N = 0) or the output is (batch, dim or L
    = 0), so ``out = D * u * silu(z)`` (each factor when given); ``last_state`` is zero (h[-1] at L = 0)."""
    acc = _acc_torch(u, delta, A, B, C)
    y = u.to(acc) * D.to(acc)[:, None] if D is not None else u.new_zeros(u.shape, dtype=acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=acc)


def _chunk_gla_zero(q, k, v, g, initial_state, scale):
    """chunk_gla with a zero-size dim: o is empty or (K = 0) zero; the state never changes from its initial
    value (T = 0) or is empty."""
    acc = _acc_torch(q, k, v, g)
    o = q.new_zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    if initial_state is not None:
        return o, initial_state.to(acc, copy=True)
    return o, q.new_zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), dtype=acc)


LINEAR_SCAN = TorchOp(
    "linear_scan", [TensorArg("a"), TensorArg("b"), TensorArg("initial", optional=True)], [StaticArg("reverse", bool)],
    lambda t, s: declare_linear_scan(_dt(t["a"]), _dt(t["b"]), s["reverse"], _dt(t["initial"])),
    outputs=["h"], adapt=given_inputs, check=check_linear_scan, closed_form=_linear_scan_zero,
    run_who="opgen.ops.linear_scan", warn_fallback=False)

SELECTIVE_SCAN = TorchOp(
    "selective_scan", [TensorArg(n) for n in ("u", "delta", "A", "B", "C")]
    + [TensorArg(n, optional=True) for n in ("D", "z", "delta_bias")], [StaticArg("delta_softplus", bool)],
    lambda t, s: declare_selective_scan(
        _dt(t["u"]), _dt(t["delta"]), _dt(t["A"]), _dt(t["B"]), _dt(t["C"]), _BC_LAYOUT[t["B"].dim()],
        _BC_LAYOUT[t["C"].dim()], _dt(t["D"]), _dt(t["z"]), _dt(t["delta_bias"]), bool(s["delta_softplus"]), True),
    outputs=["out", "last_state"], adapt=given_inputs, check=check_selective_scan, closed_form=_selective_scan_zero,
    run_who="opgen.ops.selective_scan", warn_fallback=False)

CHUNK_GLA = TorchOp(
    "chunk_gla", [TensorArg(n) for n in ("q", "k", "v", "g")] + [TensorArg("initial_state", optional=True)],
    [StaticArg("scale", float)],
    lambda t, s: declare_chunk_gla(_dt(t["q"]), _dt(t["k"]), _dt(t["v"]), _dt(t["g"]), float(s["scale"]),
                                   _dt(t["initial_state"]), True),
    outputs=["o", "final_state"], adapt=given_inputs, check=check_chunk_gla, closed_form=_chunk_gla_zero,
    run_who="opgen.ops.chunk_gla", warn_fallback=False)
