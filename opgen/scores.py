"""Score helpers written as FlexAttention ``score_mod`` functions ``(score, b, h, q_idx, kv_idx) -> score``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from opgen.ir import ArgumentError


@dataclass(frozen=True, eq=False)
class alibi:  # noqa: N801 (used like a function)
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)`` with one slope per query head (a captured tensor)."""

    slopes: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.slopes, torch.Tensor) or self.slopes.dim() != 1:
            raise ArgumentError(f"opgen.scores.alibi: argument 'slopes' expected a 1-D tensor [heads], got "
                                f"{type(self.slopes).__name__} {getattr(self.slopes, 'shape', '')}")

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.slopes[h] * (kv_idx - q_idx)


def alibi_slopes(heads: int) -> torch.Tensor:
    """The standard ALiBi slopes ``2 ** (-8 * i / heads)`` for ``i = 1..heads``."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


@dataclass(frozen=True)
class softcap:  # noqa: N801
    """Soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``."""

    cap: float

    def __post_init__(self) -> None:
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)) or self.cap <= 0:
            raise ArgumentError(f"opgen.scores.softcap: argument 'cap' expected a positive number, got {self.cap!r}")

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)
