"""The IR declaration of attention with FlexAttention semantics: a softmax-contraction chain (imported by the public
function :func:`opgen.ops.attention` and by its torch op in :mod:`opgen.ops.attention_op`).

``score_mod`` and ``mask_mod`` are traced into IR expressions (:mod:`opgen.trace`); captured tensors become
inputs. The chain is scores -> score_mod -> masked row max -> exp -> row sum -> contraction with V -> divide,
with fully masked rows giving zeros (not NaN), as FlexAttention does.
"""
from __future__ import annotations

import functools
import math

from opgen.ir import DType, Expr, OpBuilder, dims, exp, load, log, where
from opgen.ir.symbols import Dim, make_axes
from opgen.trace import trace_mods


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
                      captures: tuple[tuple[DType, tuple[Dim, ...]], ...] = (), capture_grads: tuple[str, ...] = (),
                      gathers: tuple[tuple[DType, tuple[Dim, ...]], ...] = ()):
    """The attention op for traced ``score`` (over the raw score tensor ``score``) and ``mask`` expressions.

    ``capture_grads`` names the captured inputs whose gradients a backward of this op computes (the op attribute
    ``capture_grads``, read by :attr:`~opgen.ir.passes.attention.AttentionGroup.grad_captures`); forward ops
    leave it empty, so one forward op serves every call. ``gathers`` are the inputs ``gather{m}`` (captured tensors
    gathered by captured integer tensors, :class:`opgen.trace.Gather`), computed by the caller."""
    Bt, HQ, L, S = _EXTENTS
    HKV, E, EV = dims("HKV E EV")
    b, h, i, j = _AXES
    e, ev = make_axes("e ev")
    attrs = {"scale": scale, "gqa": gqa, **({"capture_grads": tuple(capture_grads)} if capture_grads else {})}
    with OpBuilder("attention", attrs=attrs) as bld:
        tq = bld.input("q", (Bt, HQ, L, E), q)
        tk = bld.input("k", (Bt, HKV if gqa else HQ, S, E), k)
        tv = bld.input("v", (Bt, HKV if gqa else HQ, S, EV), v)
        for n, (dt, shape) in enumerate(captures):
            bld.input(f"capture{n}", shape, dt, lookup=True)
        for m, (dt, shape) in enumerate(gathers):
            bld.input(f"gather{m}", shape, dt, lookup=True)
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
