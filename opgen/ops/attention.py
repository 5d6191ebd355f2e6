"""Attention with FlexAttention semantics: the public function and its argument checks (the IR declaration is
:mod:`opgen.ops.attention_ir`; the torch op, which traces the mods, is :mod:`opgen.ops.attention_op`)."""
from __future__ import annotations

import math

import torch


from . import _args
from .attention_op import eager_fallback, prepare_mods
from .attention_ir import _AXES, _EXTENTS, SCORE, declare_attention, trace  # noqa: F401  (re-exported)


def check_attention(who: str, q, k, v, score_mod, mask_mod, scale, enable_gqa) -> float:
    """The arguments of :func:`opgen.ops.attention` (shapes, heads, the mods' own size checks); returns the scale
    (``1/sqrt(E)`` when None)."""
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
    return scale


def attention(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False):
    """Scaled dot-product attention with ``torch.nn.attention.flex_attention`` semantics.

    q ``[B, Hq, L, E]``, k ``[B, Hkv, S, E]``, v ``[B, Hkv, S, Ev]`` -> ``[B, Hq, L, Ev]`` in q's dtype.
    ``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)`` are FlexAttention-style
    functions (see :mod:`opgen.masks`, :mod:`opgen.scores`); ``scale`` defaults to ``1/sqrt(E)``;
    ``enable_gqa`` lets ``Hq`` be a multiple of ``Hkv``. Rows whose keys are all masked give zeros.
    """
    who = "opgen.ops.attention"
    scale = check_attention(who, q, k, v, score_mod, mask_mod, scale, enable_gqa)
    spec, captures, unsupported = prepare_mods(who, score_mod, mask_mod, q.dtype, k.dtype)
    if unsupported:  # a mod the tracer has no IR for: dense eager attention with a FallbackWarning, or the error
        return eager_fallback(unsupported, q, k, v, score_mod, mask_mod, float(scale), bool(enable_gqa))
    captures = [t if t.device == q.device else t.to(q.device) for t in captures]
    return torch.ops.opgen.attention(q, k, v, captures, spec, scale, enable_gqa)[0]
