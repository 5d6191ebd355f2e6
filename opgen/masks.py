"""Mask helpers written as FlexAttention ``mask_mod`` functions ``(b, h, q_idx, kv_idx) -> bool``.

They use only torch operators and ``torch.where``, so the same function works in
``torch.nn.attention.flex_attention`` (on index tensors) and in ``opgen.ops.attention`` (traced into a sympy
predicate, from which block sparsity is derived).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opgen.ir import ArgumentError


def _int(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ArgumentError(f"opgen.masks: argument '{name}' expected an int >= {minimum}, got {v!r}")
    return v


def _pair(name: str, v: Any, minimum: int) -> tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2:
        raise ArgumentError(f"opgen.masks: argument '{name}' expected an int or a pair, got {v!r}")
    return _int(name, vals[0], minimum), _int(name, vals[1], minimum)


def _clip(x, lo, hi):
    """``min(max(x, lo), hi)`` with torch.where (works on tensors and traced indices)."""
    x = torch.where(x < lo, lo, x)
    return torch.where(x > hi, hi, x)


def causal(b, h, q_idx, kv_idx):
    """Keys at or before the query: ``kv_idx <= q_idx``."""
    return q_idx >= kv_idx


@dataclass(frozen=True)
class sliding_window:  # noqa: N801 (used like a function: opgen.masks.sliding_window(w))
    """Keys within ``window`` positions: causal ``0 <= q - kv < window``; otherwise ``|q - kv| < window``."""

    window: int
    causal: bool = True

    def __post_init__(self) -> None:
        _int("window", self.window, 1)

    def __call__(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        if self.causal:
            return (d >= 0) & (d < self.window)
        return torch.abs(d) < self.window


def _natten_window(i, j, length, kernel: int, dilation: int):
    """NATTEN's rule on one axis: query ``i`` sees the ``kernel`` keys of its dilation group around it, with the
    window shifted at the borders so that it always holds ``kernel`` keys."""
    r = i % dilation
    group_len = (length - 1 - r) // dilation + 1
    start = _clip(i // dilation - kernel // 2, 0, group_len - kernel)
    jg = j // dilation
    return ((j % dilation) == r) & (jg >= start) & (jg < start + kernel)


def _check_natten(length: int, kernel: int, dilation: int, what: str) -> None:
    if kernel * dilation > length:
        raise ArgumentError(f"opgen.masks: {what} needs kernel * dilation <= length, got kernel {kernel} * dilation "
                            f"{dilation} > {length}")


@dataclass(frozen=True)
class neighborhood_1d:  # noqa: N801
    """1-D neighborhood attention (NATTEN): each query attends to exactly ``kernel`` keys of its dilation group.

    ``length`` is the sequence length; when None it is taken from the traced index inside
    ``opgen.ops.attention`` (pass it explicitly to use the mask with FlexAttention).
    """

    kernel: int
    dilation: int = 1
    length: int | None = None

    def __post_init__(self) -> None:
        _int("kernel", self.kernel, 1)
        _int("dilation", self.dilation, 1)
        if self.kernel % 2 == 0:
            raise ArgumentError(f"opgen.masks.neighborhood_1d: argument 'kernel' must be odd, got {self.kernel}")
        if self.length is not None:
            _check_natten(_int("length", self.length, 1), self.kernel, self.dilation, "neighborhood_1d")

    def check(self, q_len: int, kv_len: int) -> None:
        """Sizes the mask needs (called by opgen.ops.attention with concrete lengths)."""
        n = self.length if self.length is not None else kv_len
        if q_len != kv_len or (self.length is not None and self.length != kv_len):
            raise ArgumentError(f"opgen.masks.neighborhood_1d: needs self-attention over {n} tokens, got "
                                f"{q_len} queries and {kv_len} keys")
        _check_natten(n, self.kernel, self.dilation, "neighborhood_1d")

    def __call__(self, b, h, q_idx, kv_idx):
        n = self.length if self.length is not None else getattr(kv_idx, "extent", None)
        if n is None:
            raise ArgumentError("opgen.masks.neighborhood_1d: pass length= to use this mask outside opgen")
        return _natten_window(q_idx, kv_idx, n, self.kernel, self.dilation)


@dataclass(frozen=True)
class neighborhood_2d:  # noqa: N801
    """2-D neighborhood attention (NATTEN) over ``height x width`` tokens flattened row-major."""

    height: int
    width: int
    kernel: Any
    dilation: Any = 1

    def __post_init__(self) -> None:
        _int("height", self.height, 1)
        _int("width", self.width, 1)
        kh, kw = _pair("kernel", self.kernel, 1)
        dh, dw = _pair("dilation", self.dilation, 1)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ArgumentError(f"opgen.masks.neighborhood_2d: argument 'kernel' must be odd, got {self.kernel}")
        _check_natten(self.height, kh, dh, "neighborhood_2d (height)")
        _check_natten(self.width, kw, dw, "neighborhood_2d (width)")

    def check(self, q_len: int, kv_len: int) -> None:
        n = self.height * self.width
        if q_len != n or kv_len != n:
            raise ArgumentError(f"opgen.masks.neighborhood_2d: needs {self.height}x{self.width} = {n} query and key "
                                f"tokens, got {q_len} queries and {kv_len} keys")

    def __call__(self, b, h, q_idx, kv_idx):
        kh, kw = _pair("kernel", self.kernel, 1)
        dh, dw = _pair("dilation", self.dilation, 1)
        qr, qc = q_idx // self.width, q_idx % self.width
        kr, kc = kv_idx // self.width, kv_idx % self.width
        return _natten_window(qr, kr, self.height, kh, dh) & _natten_window(qc, kc, self.width, kw, dw)


@dataclass(frozen=True)
class swin_window:  # noqa: N801
    """Swin (shifted) window attention on ``height x width`` tokens flattened row-major, in the original order.

    Tokens attend within the same ``window x window`` window of the image cyclically shifted by ``-shift``; with
    a shift, only tokens of the same region (Swin's attention mask) attend to each other.
    """

    height: int
    width: int
    window: int
    shift: int = 0

    def __post_init__(self) -> None:
        _int("height", self.height, 1)
        _int("width", self.width, 1)
        _int("window", self.window, 1)
        _int("shift", self.shift, 0)
        if self.height % self.window or self.width % self.window:
            raise ArgumentError(f"opgen.masks.swin_window: height {self.height} and width {self.width} must be "
                                f"multiples of window {self.window} (pad the image first)")
        if self.shift >= self.window:
            raise ArgumentError(f"opgen.masks.swin_window: shift {self.shift} must be smaller than window "
                                f"{self.window}")

    def check(self, q_len: int, kv_len: int) -> None:
        n = self.height * self.width
        if q_len != n or kv_len != n:
            raise ArgumentError(f"opgen.masks.swin_window: needs {self.height}x{self.width} = {n} query and key "
                                f"tokens, got {q_len} queries and {kv_len} keys")

    def _coords(self, idx, size: int, along_width: bool):
        c = idx % self.width if along_width else idx // self.width
        if self.shift:
            c = (c + (size - self.shift)) % size
        return c

    def _region(self, c, size: int):
        return torch.where(c < size - self.window, 0, torch.where(c < size - self.shift, 1, 2))

    def __call__(self, b, h, q_idx, kv_idx):
        m = self.window
        qr, kr = self._coords(q_idx, self.height, False), self._coords(kv_idx, self.height, False)
        qc, kc = self._coords(q_idx, self.width, True), self._coords(kv_idx, self.width, True)
        same = ((qr // m) == (kr // m)) & ((qc // m) == (kc // m))
        if not self.shift:
            return same
        return (same & (self._region(qr, self.height) == self._region(kr, self.height))
                & (self._region(qc, self.width) == self._region(kc, self.width)))
