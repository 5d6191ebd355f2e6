"""Knobs as Optuna params: powers of two as log2 ints, consecutive ints as ints, the rest categorical."""
from __future__ import annotations

import optuna

from opgen.schedules.space import Knob, Space
from opgen.tune.encode import canonical, param_of, suggest, to_params

SPACE = Space("s", (Knob("BM", (64, 16, 32, 128)), Knob("stages", (1, 2, 3)), Knob("algo", ("a", "b")),
                    Knob("odd", (3, 5)), Knob("vec", (True, False))),
              {"BM": 64, "stages": 2, "algo": "a", "odd": 3, "vec": True})


def test_param_kinds():
    kinds = {k.name: (param_of(k).name, param_of(k).kind, param_of(k).low, param_of(k).high) for k in SPACE.knobs}
    assert kinds["BM"] == ("log2_BM", "log2", 4, 7)
    assert kinds["stages"] == ("stages", "int", 1, 3)
    assert kinds["algo"][1] == kinds["odd"][1] == kinds["vec"][1] == "categorical"


def test_to_params_round_trips_through_suggest():
    cfg = {"BM": 128, "stages": 3, "algo": "b", "odd": 5, "vec": False}
    trial = optuna.trial.FixedTrial(to_params(SPACE, cfg))
    assert suggest(trial, SPACE) == cfg
    assert canonical(cfg) == canonical(dict(reversed(list(cfg.items()))))
