"""A pure-torch tuning problem with planted failures, for tests and demos of the tuner without TVM/Triton.

The kernel is a row-wise cumulative sum of an ``R x L`` float32 matrix on ``device`` (``cpu`` or ``cuda``:
the latter exercises the ``do_bench`` timing path). Knobs:

- ``algo``: ``torch`` (``torch.cumsum``), ``blocked`` (cumsum inside blocks of ``block`` columns, then add
  the carried block totals) or ``loop`` (a Python loop over the blocks; slow for small blocks);
- ``block``: 16 .. 1024, a power of two; must divide ``L``; ``loop`` allows at most 64 blocks;
- ``fault`` (only with ``faults=True``): ``none``, or a planted failure: ``compile_error`` (``build``
  raises), ``wrong`` (the blocked kernel without the carry: fast and wrong), ``segfault`` (the kernel sends
  itself SIGSEGV), ``hang`` (the kernel sleeps an hour), ``infeasible`` (rejected by the space's check).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Mapping

from opgen.schedules.space import Knob, Space

from .key import KeyParts, fingerprint
from .problem import ProblemSpec

FAULTS = ("none", "compile_error", "wrong", "segfault", "hang", "infeasible")
BLOCKS = (16, 32, 64, 128, 256, 512, 1024)
OP_FINGERPRINT = fingerprint("opgen.tune.testing.cumsum", 1, length=64)


def _check(rows: int, length: int) -> Callable[[Mapping[str, Any]], str | None]:
    def check(cfg: Mapping[str, Any]) -> str | None:
        if cfg["fault"] == "infeasible":
            return "planted infeasible config"
        if length % cfg["block"]:
            return f"block {cfg['block']} does not divide L={length}"
        if cfg["algo"] == "loop" and length // cfg["block"] > 64:
            return f"loop over {length // cfg['block']} blocks (at most 64)"
        return None
    return check


def sparse_space(rows: int, length: int) -> Space:
    """The fault-free cumsum knobs with the default block 32: at a length most blocks do not divide (96: 6 of 21
    configs feasible) a tuner that samples the knob product blindly mostly proposes infeasible configs."""
    return Space("sparse_cumsum", (Knob("algo", ("blocked", "torch", "loop")), Knob("block", BLOCKS),
                                   Knob("fault", ("none",))),
                 {"algo": "blocked", "block": 32, "fault": "none"}, check=_check(rows, length))


@dataclass(frozen=True)
class CumsumProblem:
    rows: int = 64
    length: int = 4096
    seed: int = 0
    faults: bool = False
    device: str = "cpu"

    @property
    def spec(self) -> ProblemSpec:
        return ProblemSpec("opgen.tune.testing:make_cumsum", {"rows": self.rows, "length": self.length,
                                                              "seed": self.seed, "faults": self.faults,
                                                              "device": self.device})

    def key_parts(self) -> KeyParts:
        target = fingerprint(f"torch-{self.device}", metadata.version("torch"), os.cpu_count())
        return KeyParts.of("test_cumsum", OP_FINGERPRINT, {"R": self.rows, "L": self.length}, ("float32",),
                           f"torch-{self.device}", target)

    def space(self) -> Space:
        knobs = (Knob("algo", ("blocked", "torch", "loop")), Knob("block", BLOCKS),
                 Knob("fault", FAULTS if self.faults else ("none",)))
        return Space("test_cumsum", knobs, {"algo": "blocked", "block": 64, "fault": "none"},
                     check=_check(self.rows, self.length))

    def known_good(self) -> list[dict[str, Any]]:
        return [{"algo": "torch", "block": 64, "fault": "none"}]

    def _input(self) -> Any:
        import torch

        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.rows, self.length, generator=g).to(self.device)

    def reference(self) -> Any:
        import torch

        return torch.cumsum(self._input().double(), dim=1).float()

    def build(self, config: Mapping[str, Any]) -> Callable[[], Any]:
        import torch

        algo, b, fault = config["algo"], config["block"], config["fault"]
        if fault == "compile_error":
            raise RuntimeError(f"planted compile error: no lowering for block={b}")
        x = self._input()
        r, n = self.rows, self.length // b

        def blocked(carry: bool = True) -> Any:
            c = x.view(r, n, b).cumsum(dim=2)
            if carry:
                totals = c[:, :, -1].cumsum(dim=1)
                c[:, 1:, :] += totals[:, :-1, None]
            return c.view(r, self.length)

        def loop() -> Any:
            out = torch.empty_like(x)
            carry = torch.zeros(r, 1, device=x.device)
            for i in range(n):
                out[:, i * b:(i + 1) * b] = x[:, i * b:(i + 1) * b].cumsum(dim=1) + carry
                carry = out[:, (i + 1) * b - 1:(i + 1) * b]
            return out

        if fault == "wrong":
            return lambda: blocked(carry=False)
        if fault == "segfault":
            return lambda: os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "hang":
            return lambda: time.sleep(3600)
        if algo == "torch":
            return lambda: torch.cumsum(x, dim=1)
        return blocked if algo == "blocked" else loop


def make_cumsum(rows: int = 64, length: int = 4096, seed: int = 0, faults: bool = False,
                device: str = "cpu") -> CumsumProblem:
    """The factory named by :attr:`CumsumProblem.spec` (what the measuring process calls)."""
    return CumsumProblem(rows, length, seed, faults, device)


def make_broken(**kwargs: Any) -> Any:
    """A factory that fails, to test how a problem that cannot be created is reported."""
    raise ValueError("planted setup failure")
