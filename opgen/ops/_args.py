"""Argument checking for the public ops: every message names the op and argument, what was expected and what came."""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

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


def flag(who: str, name: str, v: Any) -> bool:
    """A ``bool`` (not a truthy string, int or tensor: ``reverse="no"`` must not mean True)."""
    if not isinstance(v, bool):
        raise ArgumentError(f"{who}: argument '{name}' expected a bool (True or False), got {describe(v)}")
    return v


def real(who: str, name: str, v: Any) -> float:
    """A finite float (an int is accepted; bools are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ArgumentError(f"{who}: argument '{name}' expected a finite float, got {describe(v)}")
    return float(v)


def int_list(who: str, name: str, v: Any, length: int, minimum: int) -> list[int]:
    """A list (or tuple) of exactly ``length`` ints, each >= ``minimum`` (bools rejected)."""
    if (not isinstance(v, (list, tuple)) or len(v) != length
            or any(isinstance(s, bool) or not isinstance(s, int) or s < minimum for s in v)):
        raise ArgumentError(f"{who}: argument '{name}' expected a list of {length} ints >= {minimum}, "
                            f"got {describe(v)}")
    return list(v)


def flag_list(who: str, name: str, v: Any, length: int) -> list[bool]:
    """A list of exactly ``length`` bools."""
    if not isinstance(v, (list, tuple)) or len(v) != length or any(not isinstance(s, bool) for s in v):
        raise ArgumentError(f"{who}: argument '{name}' expected a list of {length} bools, got {describe(v)}")
    return list(v)


@functools.lru_cache(maxsize=256)
def _layout(layout: str) -> tuple[tuple[str, ...], str]:
    """The size names of a layout string and its bracketed text for messages (parsed once per layout)."""
    names = tuple(layout.split())
    return names, "[" + ", ".join(names) + "]"


def shapes(who: str, layouts: Mapping[str, tuple[torch.Tensor | None, str]]) -> dict[str, int]:
    """Check tensors against named layouts (``{"u": (u, "B D L"), "A": (A, "D N")}``; None tensors skipped):
    floating dtype, rank, one device, and every size name equal wherever it appears. Returns the sizes. (On every
    eager call: messages are formatted only on failure.)"""
    sizes: dict[str, int] = {}
    origin: dict[str, tuple[str, int]] = {}
    for name, (x, layout) in layouts.items():
        names, text = _layout(layout)
        tensor(who, name, x, rank=len(names), layout=text, optional=True)
        if x is None:
            continue
        for k, (d, n) in enumerate(zip(names, x.shape)):
            have = sizes.get(d)
            if have is None:
                sizes[d], origin[d] = n, (name, k)
            elif n != have:
                src, j = origin[d]
                raise ArgumentError(f"{who}: argument '{name}' has shape {tuple(x.shape)}: dim {k} ({d}) is "
                                    f"{n} but must equal {d} = {have} from {src}.shape[{j}]")
    same_device(who, **{name: x for name, (x, _) in layouts.items()})
    return sizes


def shape_is(who: str, name: str, x: Any, shape: Sequence[int], what: str) -> torch.Tensor:
    """A floating tensor of exactly ``shape`` (``what`` says where that shape comes from)."""
    tensor(who, name, x, rank=len(shape))
    if tuple(x.shape) != tuple(shape):
        raise ArgumentError(f"{who}: argument '{name}' expected shape {tuple(shape)} ({what}), got {describe(x)}")
    return x
