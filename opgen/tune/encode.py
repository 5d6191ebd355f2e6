"""Knobs <-> Optuna params: one param per knob, ordered where the values are ordered.

- a knob whose choices are consecutive powers of two (16, 32, 64, ...) becomes ``log2_<name>``, an int
  between the exponents (notes/optuna.md, section 1: TPE then sees the order; 1.037 against 1.110 of the
  optimum at 200 trials, compared with a categorical of the same values);
- a knob whose choices are consecutive ints becomes an int param of the same name;
- anything else (strings, bools, irregular ints) is a categorical of the same name, in the knob's order.

Changing these rules changes the params of a study: bump :data:`opgen.tune.key.TUNER_VERSION` with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from opgen.schedules.space import Config, Knob, Space


@dataclass(frozen=True)
class Param:
    """How one knob is asked for: ``kind`` is ``"log2"``, ``"int"`` or ``"categorical"``."""

    knob: str
    name: str
    kind: str
    low: int = 0
    high: int = 0
    choices: tuple[Any, ...] = ()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def param_of(knob: Knob) -> Param:
    vals = knob.choices
    if len(vals) > 1 and all(_is_int(v) for v in vals) and len(set(vals)) == len(vals):
        s = sorted(vals)
        if s[0] > 0 and all(v & (v - 1) == 0 for v in s):
            exps = [v.bit_length() - 1 for v in s]
            if exps == list(range(exps[0], exps[-1] + 1)):
                return Param(knob.name, f"log2_{knob.name}", "log2", exps[0], exps[-1])
        if s == list(range(s[0], s[-1] + 1)):
            return Param(knob.name, knob.name, "int", s[0], s[-1])
    return Param(knob.name, knob.name, "categorical", choices=tuple(vals))


def params_of_space(space: Space) -> tuple[Param, ...]:
    return tuple(param_of(k) for k in space.knobs)


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """Ask ``trial`` for every knob of ``space``; returns the config (knob values, not params)."""
    cfg: dict[str, Any] = {}
    for p in params_of_space(space):
        if p.kind == "log2":
            cfg[p.knob] = 1 << trial.suggest_int(p.name, p.low, p.high)
        elif p.kind == "int":
            cfg[p.knob] = trial.suggest_int(p.name, p.low, p.high)
        else:
            cfg[p.knob] = trial.suggest_categorical(p.name, p.choices)
    return cfg


def to_params(space: Space, config: Mapping[str, Any]) -> dict[str, Any]:
    """The Optuna params that make :func:`suggest` return ``config`` (for ``enqueue_trial``)."""
    out: dict[str, Any] = {}
    for p in params_of_space(space):
        v = config[p.knob]
        out[p.name] = v.bit_length() - 1 if p.kind == "log2" else v
    return out


def canonical(config: Mapping[str, Any]) -> str:
    """The repeat-cache key of a config (sorted JSON)."""
    return Config.of(config).to_json()
