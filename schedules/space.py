"""Schedule spaces as data: named knobs with finite choices, constraints checked before compiling, a default.

A :class:`Space` is what a target offers for one kernel group at one problem size; a config is a plain
``dict[str, int | str | bool]`` (JSON-serializable), frozen into a :class:`Config` for hashing and storage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping


def is_choice(value: Any, choices: tuple[Any, ...]) -> bool:
    """``value`` is one of ``choices`` with the same type (``16.0`` and ``True`` are not the int choices 16 and 1)."""
    return any(type(value) is type(c) and value == c for c in choices)


@dataclass(frozen=True)
class Knob:
    """One schedule decision and its allowed values (ints, strings or bools), in preference order."""

    name: str
    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"knob {self.name!r} has no choices")


@dataclass(frozen=True)
class Config:
    """A frozen, hashable schedule config."""

    items: tuple[tuple[str, Any], ...]

    @staticmethod
    def of(values: Mapping[str, Any]) -> "Config":
        return Config(tuple(sorted(values.items())))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    def __getitem__(self, k: str) -> Any:
        return self.as_dict()[k]


@dataclass(frozen=True)
class Space:
    """Knobs, a feasibility check (returns a reason when a config is invalid, else None) and the default."""

    name: str
    knobs: tuple[Knob, ...]
    default: Mapping[str, Any]
    check: Callable[[Mapping[str, Any]], str | None] = field(default=lambda cfg: None, compare=False)

    def __post_init__(self) -> None:
        names = [k.name for k in self.knobs]
        if sorted(names) != sorted(self.default):
            raise ValueError(f"space {self.name}: default {sorted(self.default)} must set exactly the knobs {names}")
        for k in self.knobs:
            if self.default[k.name] not in k.choices:
                raise ValueError(f"space {self.name}: default {k.name}={self.default[k.name]!r} not in {k.choices}")

    @property
    def fingerprint(self) -> str:
        """A hash of the knobs and their choices (part of a tuning study's key)."""
        text = json.dumps([[k.name, [repr(c) for c in k.choices]] for k in self.knobs])
        return hashlib.sha256(f"{self.name}:{text}".encode()).hexdigest()[:16]

    def infeasible(self, cfg: Mapping[str, Any]) -> str | None:
        """Why ``cfg`` cannot run (unknown knob, value outside its choices or of another type than the choice it
        equals, such as ``16.0`` or ``True`` for an int knob, failed constraint), or None."""
        for k in self.knobs:
            if k.name not in cfg:
                return f"missing knob {k.name}"
            if not is_choice(cfg[k.name], k.choices):
                return f"{k.name}={cfg[k.name]!r} not in {k.choices}"
        extra = set(cfg) - {k.name for k in self.knobs}
        if extra:
            return f"unknown knobs {sorted(extra)}"
        return self.check(cfg)

    def enumerate(self) -> Iterator[dict[str, Any]]:
        """Every feasible config (for small spaces and exhaustive baselines)."""
        def rec(i: int, cur: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(self.knobs):
                if self.infeasible(cur) is None:
                    yield dict(cur)
                return
            for c in self.knobs[i].choices:
                cur[self.knobs[i].name] = c
                yield from rec(i + 1, cur)
            cur.pop(self.knobs[i].name, None)
        yield from rec(0, {})


@dataclass(frozen=True)
class TargetKnob:
    """A knob as a target describes it: its allowed values (``values``) and what it does (``doc``); the tuner turns
    these into :class:`Knob` s."""

    name: str
    values: tuple
    doc: str


@dataclass(frozen=True)
class TargetSpace:
    """A target's description of a kernel's schedule space: its knobs and, as text, the constraints a config must
    satisfy (the target's check function enforces them)."""

    knobs: tuple[TargetKnob, ...]
    constraints: tuple[str, ...]

    def to_json(self) -> dict:
        return {"knobs": {k.name: {"values": list(k.values), "doc": k.doc} for k in self.knobs},
                "constraints": list(self.constraints)}


def config_from_mapping(cls: type, data: Mapping[str, Any]) -> Any:
    """The config dataclass ``cls`` from ``data``: unknown keys are a ValueError naming them and the known knobs;
    missing ones take the defaults (one rule for every family's ``from_dict``)."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown knobs {sorted(unknown)} (known: {sorted(known)})")
    return cls(**dict(data))
