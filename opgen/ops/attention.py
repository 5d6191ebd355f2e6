"""Attention with FlexAttention semantics, declared in the IR as a softmax-contraction chain.

``score_mod`` and ``mask_mod`` are traced into IR expressions (:mod:`opgen.trace`); captured tensors become
inputs. The chain is scores -> score_mod -> masked row max -> exp -> row sum -> contraction with V -> divide,
with fully masked rows giving zeros (not NaN), as FlexAttention does.
"""
from __future__ import annotations

import functools
import math

import torch

from opgen.attention_op import eager_fallback, prepare_mods
from opgen.ir import DType, Expr, OpBuilder, dims, exp, load, log, where
from opgen.ir.symbols import Dim, make_axes
from opgen.trace import trace_mods

from . import _args

_AXES = make_axes("b h i j")
_EXTENTS = dims("B HQ L S")
SCORE = "score"


def trace(who: str, score_mod, mask_mod, score_dtype: DType = DType.f32):
    """Trace the mods over the canonical axes ``(b, h, i, j)`` of the declared attention op; the raw score is
    read in ``score_dtype`` (the accumulation dtype of q and k)."""
    raw = load(SCORE, _AXES, score_dtype)
    return trace_mods(who, score_mod, mask_mod, raw, _AXES, _EXTENTS)


@functools.lru_cache(maxsize=256)
def declare_attention(q: DType = DType.f32, k: DType = DType.f32, v: DType = DType.f32, scale: float = 1.0,
                      gqa: bool = False, score: Expr | None = None, mask: Expr | None = None,
                      captures: tuple[tuple[DType, tuple[Dim, ...]], ...] = ()):
    """The attention op for traced ``score`` (over the raw score tensor ``score``) and ``mask`` expressions."""
    Bt, HQ, L, S = _EXTENTS
    HKV, E, EV = dims("HKV E EV")
    b, h, i, j = _AXES
    e, ev = make_axes("e ev")
    with OpBuilder("attention", attrs={"scale": scale, "gqa": gqa}) as bld:
        tq = bld.input("q", (Bt, HQ, L, E), q)
        tk = bld.input("k", (Bt, HKV if gqa else HQ, S, E), k)
        tv = bld.input("v", (Bt, HKV if gqa else HQ, S, EV), v)
        for n, (dt, shape) in enumerate(captures):
            bld.input(f"capture{n}", shape, dt, lookup=True)
        kvh = h
        if gqa:
            G = bld.derive(Dim("G"), HQ / HKV)
            kvh = h // G
        raw = bld.reduce(e, tq[b, h, i, e] * tk[b, kvh, j, e] * scale, axes=(b, h, i, j), name=SCORE)
        s = raw[b, h, i, j]
        if score is not None and score != load(SCORE, _AXES, raw.dtype):
            s = bld.map(score, (b, h, i, j), name="modified")[b, h, i, j]
        m = bld.reduce(j, s, monoid=_max(), where=mask, axes=(b, h, i), name="row_max")[b, h, i]
        m_safe = where(m.eq(-math.inf), 0.0, m)
        p_val = exp(s - m_safe) if mask is None else where(mask, exp(s - m_safe), 0.0)
        p = bld.map(p_val, (b, h, i, j), name="p")
        denom = bld.reduce(j, p[b, h, i, j], axes=(b, h, i), name="denom")[b, h, i]
        acc = bld.reduce(j, p[b, h, i, j] * tv[b, kvh, j, ev], axes=(b, h, i, ev), name="acc")[b, h, i, ev]
        out = bld.map(where(denom > 0, acc / denom, 0.0), (b, h, i, ev), name="out", dtype=q)
        lse = bld.map(where(denom > 0, m_safe + log(denom), -math.inf), (b, h, i), name="lse")
        return bld.build({"out": out, "lse": lse})


def _max():
    from opgen.ir import MAX

    return MAX


def attention(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False):
    """Scaled dot-product attention with ``torch.nn.attention.flex_attention`` semantics.

    q ``[B, Hq, L, E]``, k ``[B, Hkv, S, E]``, v ``[B, Hkv, S, Ev]`` -> ``[B, Hq, L, Ev]`` in q's dtype.
    ``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)`` are FlexAttention-style
    functions (see :mod:`opgen.masks`, :mod:`opgen.scores`); ``scale`` defaults to ``1/sqrt(E)``;
    ``enable_gqa`` lets ``Hq`` be a multiple of ``Hkv``. Rows whose keys are all masked give zeros.
    """
    who = "opgen.ops.attention"
    _args.tensor(who, "q", q, rank=4, layout="[B, Hq, L, E]")
    _args.tensor(who, "k", k, rank=4, layout="[B, Hkv, S, E]")
    _args.tensor(who, "v", v, rank=4, layout="[B, Hkv, S, Ev]")
    _args.same_device(who, q=q, k=k, v=v)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise _args.ArgumentError(f"{who}: argument 'k' / 'v' batch sizes {k.shape[0]} / {v.shape[0]} must equal "
                                  f"q's batch size {q.shape[0]} (q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                  f"v {tuple(v.shape)})")
    if k.shape[3] != q.shape[3]:
        raise _args.ArgumentError(f"{who}: argument 'k' has head dim {k.shape[3]} (shape {tuple(k.shape)}) but q has "
                                  f"head dim {q.shape[3]} (shape {tuple(q.shape)}); they must match")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise _args.ArgumentError(f"{who}: argument 'v' has shape {tuple(v.shape)} but must have k's heads and "
                                  f"length {tuple(k.shape[1:3])} (k {tuple(k.shape)})")
    hq, hkv = q.shape[1], k.shape[1]
    if _args.flag(who, "enable_gqa", enable_gqa):
        if hkv == 0 or hq % hkv:
            raise _args.ArgumentError(f"{who}: argument 'k' has {hkv} heads, which must divide q's {hq} heads for "
                                      f"enable_gqa (q {tuple(q.shape)}, k {tuple(k.shape)})")
    elif hq != hkv:
        raise _args.ArgumentError(f"{who}: argument 'k' has {hkv} heads (shape {tuple(k.shape)}) but q has {hq} "
                                  f"(shape {tuple(q.shape)}); they must match (or pass enable_gqa=True when {hkv} "
                                  f"divides {hq})")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3]) if q.shape[3] else 1.0   # (E = 0: every score is 0 at any scale)
    scale = _args.real(who, "scale", scale)
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        check = getattr(mod, "check", None)
        if callable(check):
            try:
                check(q.shape[2], k.shape[2])
            except _args.ArgumentError as exc:
                raise _args.ArgumentError(f"{who}: argument '{name}': {exc}") from None
    spec, captures, unsupported = prepare_mods(who, score_mod, mask_mod, q.dtype, k.dtype)
    if unsupported:  # a mod the tracer has no IR for: dense eager attention with a FallbackWarning, or the error
        return eager_fallback(unsupported, q, k, v, score_mod, mask_mod, float(scale), bool(enable_gqa))
    captures = [t if t.device == q.device else t.to(q.device) for t in captures]
    return torch.ops.opgen.attention(q, k, v, captures, spec, scale, enable_gqa)[0]

