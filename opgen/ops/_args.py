"""Argument checking for the public ops: every message names the op and argument, what was expected and what came."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from opgen.ir import ArgumentError, DType, as_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)} on {x.device}"
    r = repr(x)
    return f"{type(x).__name__} {r[:60] + '...' if len(r) > 60 else r}"


def tensor(who: str, name: str, x: Any, *, rank: int | Sequence[int] | None = None, layout: str = "",
           floating: bool = True, optional: bool = False) -> torch.Tensor | None:
    """Check that ``x`` is a tensor of an allowed rank and (by default) a floating dtype."""
    if x is None and optional:
        return None
    want = f"{layout} " if layout else ""
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"{who}: argument '{name}' expected a tensor {want}".rstrip() + f", got {describe(x)}")
    ranks = (rank,) if isinstance(rank, int) else tuple(rank) if rank is not None else None
    if ranks is not None and x.dim() not in ranks:
        rs = " or ".join(f"{r}-D" for r in ranks)
        raise ArgumentError(f"{who}: argument '{name}' expected a {rs} tensor {want}".rstrip()
                            + f", got {describe(x)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{who}: argument '{name}' expected a floating-point tensor (float16, bfloat16, "
                            f"float32 or float64), got {describe(x)}")
    if x.layout != torch.strided:
        raise ArgumentError(f"{who}: argument '{name}' expected a dense (strided) tensor, got layout {x.layout}")
    return x


def same_device(who: str, **named: torch.Tensor | None) -> torch.device:
    """All given tensors share one device; returns it."""
    items = [(k, v) for k, v in named.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ArgumentError(f"{who}: argument '{k}' is on {v.device} but '{items[0][0]}' is on {dev}; "
                                f"all tensors must be on one device")
    return dev


def dim_equal(who: str, name: str, x: torch.Tensor, k: int, expected: int, what: str) -> None:
    """``x.shape[k] == expected`` or an error naming ``what`` the size should match."""
    if x.shape[k] != expected:
        raise ArgumentError(f"{who}: argument '{name}' has shape {tuple(x.shape)}: dim {k} is {x.shape[k]} but "
                            f"must equal {what} = {expected}")


def ir_dtype(x: torch.Tensor | None) -> DType | None:
    """The IR dtype of a tensor (None passes through)."""
    return None if x is None else as_dtype(x.dtype)


def positive_int(who: str, name: str, v: Any, minimum: int = 1) -> int:
    """An int >= ``minimum`` (bools rejected)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ArgumentError(f"{who}: argument '{name}' expected an int >= {minimum}, got {describe(v)}")
    return v
