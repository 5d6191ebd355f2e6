"""Running an op: bind sizes (cached per shape), pick a target, execute.

The session state is one :class:`Session` value (config + target registry + binding cache); the library
functions use :func:`default_session`, created on first use from the environment.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

from opgen.ir import ArgumentError, Binding, Op, ShapeError, bind
from opgen.targets.base import TargetRegistry

from .config import Config, from_env


@dataclass
class Session:
    """Config, targets and a bounded cache of bindings keyed by (op, shapes, dims)."""

    config: Config
    targets: TargetRegistry
    _bindings: OrderedDict = field(default_factory=OrderedDict)
    max_cached_bindings: int = 1024

    def binding(self, op: Op, shapes: Mapping[str, tuple[int, ...]], dims: Mapping[str, int], who: str) -> Binding:
        """Bind sizes once per distinct call signature; shape errors become :class:`ArgumentError`."""
        key = (op, tuple(sorted(shapes.items())), tuple(sorted(dims.items())))
        hit = self._bindings.get(key)
        if hit is not None:
            self._bindings.move_to_end(key)
            return hit
        try:
            b = bind(op, shapes, dims, who=who)
        except ShapeError as e:
            raise ArgumentError(str(e)) from None
        self._bindings[key] = b
        if len(self._bindings) > self.max_cached_bindings:
            self._bindings.popitem(last=False)
        return b

    def run(self, op: Op, inputs: Mapping, dims: Mapping[str, int] | None = None, who: str | None = None) -> dict:
        """Execute ``op`` on named torch ``inputs``; returns the outputs by name."""
        who = who or f"op {op.name}"
        shapes = {name: tuple(x.shape) for name, x in inputs.items()}
        b = self.binding(op, shapes, dict(dims or {}), who)
        device = next(iter(inputs.values())).device.type if inputs else "cpu"
        if self.config.backend == "auto":
            target = self.targets.select(op, device)
        else:
            target = self.targets.get(self.config.backend)
        return target.run(op, inputs, b)


def make_session(config: Config | None = None) -> Session:
    """A session with the targets available in this build (the reference target for now)."""
    from opgen.targets.reference import ReferenceTarget

    cfg = config or from_env()
    return Session(cfg, TargetRegistry((ReferenceTarget(max_elements=cfg.reference_max_elements),)))


@functools.lru_cache(maxsize=1)
def default_session() -> Session:
    """The process-wide session built from the environment on first use."""
    return make_session()
