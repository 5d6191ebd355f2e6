"""The backend interface: a :class:`Target` is a small object plus a frozen :class:`Caps` record.

Backends are collected in an explicit :class:`TargetRegistry` value (no global registry): it rejects
conflicting duplicates and picks the first available target that supports an op on a device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from opgen.ir import Binding, Op


@dataclass(frozen=True)
class Caps:
    """What a target's hardware offers; schedules read it, never the device directly."""

    device_kind: str                 # "cpu" | "cuda"
    name: str = ""
    cores: int = 1                   # CPU cores or GPU SMs
    shared_memory: int = 0           # bytes per block (GPU)
    registers: int = 0               # per SM (GPU)
    vector_bits: int = 0             # SIMD width (CPU)
    peak_flops: float = 0.0          # fp32 FLOP/s, 0 when unknown
    bandwidth: float = 0.0           # bytes/s, 0 when unknown
    extra: Mapping[str, object] = field(default_factory=dict)


@runtime_checkable
class Target(Protocol):
    """A backend: reports availability, decides support, runs an op on bound inputs."""

    name: str

    def caps(self) -> Caps:
        """The capability record of the device this target runs on."""
        ...

    def available(self) -> tuple[bool, str]:
        """(True, "") when usable here; otherwise (False, a sentence saying why)."""
        ...

    def supports(self, op: "Op", device_kind: str) -> bool:
        """Whether this target can run ``op`` on a device of ``device_kind``."""
        ...

    def run(self, op: "Op", inputs: Mapping[str, "torch.Tensor"], binding: "Binding") -> dict[str, "torch.Tensor"]:
        """Compute the op's outputs."""
        ...


class TargetRegistry:
    """An ordered set of targets (first match wins); duplicates by name are rejected.

    A target may also offer kernels for single nodes that it would not take as a whole op (the reductions of a
    generated backward op, run node by node): ``supports_node(op, device_kind, binding) -> bool`` and
    ``run_node(op, inputs, binding) -> dict`` (:meth:`select_node`); ``prepare(op, binding, config)``: its
    ``run`` at fixed sizes as a callable ``inputs -> outputs``, or None (the session memoizes it per call
    signature); and ``device_kinds``: the device kinds it compiles for, whether or not it is available here (a
    target without it is taken to serve the ``device_kind`` of its :meth:`~Target.caps` when available; see
    :meth:`no_compiled_target`). The target named ``"reference"`` is the interpreter, not a compiled target."""

    def __init__(self, targets: tuple[Target, ...] = ()) -> None:
        self._targets: list[Target] = []
        for t in targets:
            self.add(t)

    def add(self, target: Target) -> None:
        """Append ``target``; a second target with the same name is an error."""
        if any(t.name == target.name for t in self._targets):
            raise ValueError(f"a target named {target.name!r} is already registered")
        self._targets.append(target)

    def names(self) -> list[str]:
        return [t.name for t in self._targets]

    def get(self, name: str) -> Target:
        for t in self._targets:
            if t.name == name:
                return t
        raise KeyError(f"no target {name!r}; registered: {self.names()}")

    def select_node(self, op: "Op", device_kind: str, binding=None) -> Target | None:
        """The first available target with a node kernel for the single-node ``op`` (at ``binding``'s sizes),
        or None."""
        for t in self._targets:
            supports = getattr(t, "supports_node", None)
            if supports is not None and t.available()[0] and supports(op, device_kind, binding):
                return t
        return None

    def available_targets(self) -> list[Target]:
        """The targets usable here, in preference order."""
        return [t for t in self._targets if t.available()[0]]

    def select(self, op: "Op", device_kind: str) -> Target:
        """The first available target that supports ``op`` on ``device_kind``."""
        reasons = []
        for t in self._targets:
            ok, why = t.available()
            if ok and t.supports(op, device_kind):
                return t
            reasons.append(f"{t.name}: {why or 'does not support this op'}")
        raise LookupError(f"no target can run {op.name} on {device_kind}: " + "; ".join(reasons))

    def no_compiled_target(self, device_kind: str) -> str:
        """Why no compiled target can run anything on ``device_kind`` here, as a sentence ("" when one is
        available: an op it does not take is then that op's matter). It names the unavailable targets that
        compile for ``device_kind`` and their reasons (when none says it does, every unavailable target)."""
        reasons, unknown = [], []
        for t in self._targets:
            if t.name == "reference":
                continue
            ok, why = t.available()
            kinds = getattr(t, "device_kinds", None)
            if kinds is None:
                if not ok:               # (which devices it would serve is not known)
                    unknown.append((t.name, why or "unavailable"))
                    continue
                kinds = (t.caps().device_kind,)
            if device_kind not in kinds:
                continue
            if ok:
                return ""
            reasons.append((t.name, why or "unavailable"))
        reasons = reasons or unknown
        if not reasons:
            return f"no registered target compiles for {device_kind}"
        if len(reasons) == 1:
            return reasons[0][1]
        return "; ".join(f"{name}: {why}" for name, why in reasons)
