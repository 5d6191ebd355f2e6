"""What the tuner tunes: a :class:`Problem` (one kernel group at one concrete shape on one target) and the
picklable :class:`ProblemSpec` that rebuilds it in the measuring child process.

A problem makes its inputs itself, from its seed, so nothing large crosses the process boundary: the
child calls ``spec.create()``, computes ``reference()`` once, then for each config ``build(config)()``.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from opgen.schedules.space import Space

from .key import KeyParts


@dataclass(frozen=True)
class ProblemSpec:
    """``factory`` is ``"package.module:function"``; ``kwargs`` are JSON-serializable."""

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"factory must be 'module:function', got {self.factory!r}")
        json.dumps(dict(self.kwargs), sort_keys=True)      # fail early, in the parent

    def create(self) -> "Problem":
        module, _, fn = self.factory.partition(":")
        obj: Any = importlib.import_module(module)
        for part in fn.split("."):
            obj = getattr(obj, part)
        return obj(**dict(self.kwargs))

    def as_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}

    @property
    def ident(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


@runtime_checkable
class Problem(Protocol):
    """One tunable kernel. Optional extras the tuner reads when present:

    - ``known_good() -> list[dict]``: configs worth measuring first (after the space's default);
    - ``tolerance() -> tuple[float, float]``: ``(rtol, atol)`` of the check against the reference;
      the default depends on the outputs' dtype (see :func:`default_tolerance`).
    """

    spec: ProblemSpec

    def key_parts(self) -> KeyParts:
        """Op fingerprint, concrete dims, dtypes, target name and fingerprint."""
        ...

    def space(self) -> Space:
        """The schedule space of this problem."""
        ...

    def build(self, config: Mapping[str, Any]) -> Callable[[], Any]:
        """Compile ``config``; the result runs the kernel on the problem's own inputs and returns its outputs
        (a tensor, or a tuple/list/dict of tensors)."""
        ...

    def reference(self) -> Any:
        """The expected outputs for the same inputs, in the same structure as the kernel's."""
        ...


def as_problem(problem: "Problem | ProblemSpec") -> "Problem":
    """A problem instance from either form; an instance must carry its ``spec``."""
    if isinstance(problem, ProblemSpec):
        return problem.create()
    if not isinstance(getattr(problem, "spec", None), ProblemSpec):
        raise TypeError(f"{type(problem).__name__} has no .spec (a ProblemSpec that rebuilds it in the measuring "
                        "process); give the problem one or pass a ProblemSpec")
    return problem


_TOLERANCE = {"float64": (1e-9, 1e-12), "float32": (1e-4, 1e-5), "float16": (1e-2, 1e-3), "bfloat16": (2e-2, 1e-2)}


def default_tolerance(dtype_name: str) -> tuple[float, float]:
    """``(rtol, atol)`` for outputs of a torch dtype (``"float32"``...); loose for low precision."""
    return _TOLERANCE.get(dtype_name.replace("torch.", ""), (1e-4, 1e-5))
