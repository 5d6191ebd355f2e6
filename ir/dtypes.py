"""Scalar dtypes of IR values and the promotion rule.

Promotion follows torch for the cases opgen uses: bool < integers < floats; among floats the wider wins and
``bf16`` with ``f16`` gives ``f32``. Python scalars are *weak*: they never widen a tensor's dtype. Arithmetic
on low-precision floats accumulates in ``f32`` (:func:`accum_dtype`).
"""
from __future__ import annotations

import enum


class DType(enum.Enum):
    """A scalar type. The value is the short name used in printed IR."""

    bool = "bool"
    i32 = "i32"
    i64 = "i64"
    f16 = "f16"
    bf16 = "bf16"
    f32 = "f32"
    f64 = "f64"

    @property
    def is_float(self) -> bool:
        return self in _FLOAT_BITS

    @property
    def is_int(self) -> bool:
        return self in (DType.i32, DType.i64)

    @property
    def bits(self) -> int:
        return _BITS[self]

    def __str__(self) -> str:
        return self.value


_BITS = {DType.bool: 1, DType.i32: 32, DType.i64: 64, DType.f16: 16, DType.bf16: 16, DType.f32: 32, DType.f64: 64}
_FLOAT_BITS = {DType.f16: 16, DType.bf16: 16, DType.f32: 32, DType.f64: 64}

_ALIASES = {
    "bool": DType.bool, "int32": DType.i32, "i32": DType.i32, "int64": DType.i64, "i64": DType.i64,
    "float16": DType.f16, "half": DType.f16, "f16": DType.f16, "bfloat16": DType.bf16, "bf16": DType.bf16,
    "float32": DType.f32, "float": DType.f32, "f32": DType.f32, "float64": DType.f64, "double": DType.f64,
    "f64": DType.f64,
}


def as_dtype(x: object) -> DType:
    """Canonicalize a DType, a name (``"bf16"``, ``"float32"``) or a ``torch.dtype`` into a :class:`DType`."""
    if isinstance(x, DType):
        return x
    name = str(x).removeprefix("torch.")
    try:
        return _ALIASES[name]
    except KeyError:
        raise TypeError(f"unknown dtype {x!r}; expected one of {sorted(set(_ALIASES))}") from None


def promote(*dtypes: DType) -> DType:
    """The dtype of an arithmetic result on operands of ``dtypes`` (torch-like rule, see module doc)."""
    if not dtypes:
        raise ValueError("promote() needs at least one dtype")
    out = dtypes[0]
    for d in dtypes[1:]:
        out = _promote2(out, d)
    return out


def _promote2(a: DType, b: DType) -> DType:
    if a == b:
        return a
    if a.is_float and b.is_float:
        if {a, b} == {DType.f16, DType.bf16}:
            return DType.f32
        return a if a.bits > b.bits else b
    if a.is_float:
        return a
    if b.is_float:
        return b
    if a == DType.bool:
        return b
    if b == DType.bool:
        return a
    return a if a.bits >= b.bits else b


def accum_dtype(d: DType) -> DType:
    """The dtype used to compute and accumulate values stored as ``d`` (``f16``/``bf16`` -> ``f32``)."""
    return DType.f32 if d in (DType.f16, DType.bf16) else d


def to_torch(d: DType):  # -> torch.dtype (torch imported lazily)
    """The ``torch.dtype`` of ``d``."""
    import torch

    return {DType.bool: torch.bool, DType.i32: torch.int32, DType.i64: torch.int64, DType.f16: torch.float16,
            DType.bf16: torch.bfloat16, DType.f32: torch.float32, DType.f64: torch.float64}[d]
