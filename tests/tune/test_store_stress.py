"""The embedded store under stress: two tuning processes at once, a store from an older generator version."""
from __future__ import annotations

import collections
import functools
import json
import random
import subprocess
import sys
import textwrap

import optuna
from optuna.trial import TrialState

from opgen.tune import tuner
from opgen.tune.key import GENERATOR_VERSION, StudyKey, study_key
from opgen.tune.store import default_store_path, open_storage
from opgen.tune.testing import CumsumProblem, sparse_space

TUNER = textwrap.dedent("""
    import sys
    from opgen.tune.measure import MeasureOptions
    from opgen.tune.testing import CumsumProblem, sparse_space
    from opgen.tune.tuner import tune
    r = tune(CumsumProblem(rows=4, length=96), sparse_space(4, 96), trials=int(sys.argv[2]), cache_dir=sys.argv[1],
             progress=True, seed=int(sys.argv[3]), options=MeasureOptions(timeout=10, min_reps=3, min_time_s=0.01))
    print(r.measured, r.best_time_ms)
    sys.exit(0 if r.best_config is not None else 1)
""")


def test_two_processes_tuning_the_same_op_at_once_share_one_consistent_study(tmp_path):
    """On a space where 15 of 21 configs are infeasible (one of two such runs used to end with "3 trials,
    infeasible 3, best None", rc 1): both measure 3 feasible configs, the bar counts no infeasible one."""
    seed = random.randrange(1 << 20)
    procs = [subprocess.Popen([sys.executable, "-c", TUNER, str(tmp_path), "3", str(seed + i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    ran = [int(o.split()[0]) for o, _ in outs]
    assert ran == [3, 3]
    assert all("infeasible 0 / failed 0" in err for _, err in outs), outs      # the progress bar's counts
    p = CumsumProblem(rows=4, length=96)
    key = study_key(p.key_parts(), sparse_space(4, 96).fingerprint)
    store = open_storage(None, cache_dir=tmp_path, key=key)
    assert optuna.get_all_study_names(store) == [key.name]             # one study, not two
    trials = optuna.load_study(study_name=key.name, storage=store).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    states = collections.Counter(t.state.name for t in trials)
    # 3 configs measured by each (a repeat answered from the study comes on top), all feasible, shared
    assert states["COMPLETE"] == len(trials) and not states.get("RUNNING"), states
    assert sum("dup_of" not in t.user_attrs for t in trials) == 6, [(t.number, t.user_attrs) for t in trials]
    assert {t.user_attrs["status"] for t in trials} == {"ok"}
    assert len({json.dumps(t.user_attrs["config"], sort_keys=True) for t in trials}) >= 5    # (one race may repeat)
    # the default was enqueued once, not by both (the second process found it in the study)
    assert sum(t.user_attrs.get("source") == "default" for t in trials) == 1
    assert len({t.user_attrs["owner"]["pid"] for t in trials}) == 2
    # the file is a clean log: every line is one JSON operation, and it reloads
    lines = default_store_path(tmp_path, key).read_bytes().splitlines()
    assert lines and all(line.startswith(b"{") and line.endswith(b"}") for line in lines)


def test_a_store_of_an_older_generator_gives_a_new_study_warm_started_by_remeasuring(tmp_path, measurer, monkeypatch):
    p = CumsumProblem(rows=8, length=1024)
    with monkeypatch.context() as m:                      # tune as an older opgen would have
        m.setattr(tuner, "study_key", functools.partial(study_key, generator=GENERATOR_VERSION - 1))
        old = tuner.tune(p, trials=5, cache_dir=tmp_path, seed=0, progress=False, measurer=measurer)
    assert old.key.generator == GENERATOR_VERSION - 1 and old.best_config is not None
    new = tuner.tune(p, trials=5, cache_dir=tmp_path, seed=0, progress=False, measurer=measurer)
    assert new.key.generator == GENERATOR_VERSION and new.study_name != old.study_name
    store = open_storage(None, cache_dir=tmp_path, key=new.key)
    names = set(optuna.get_all_study_names(store))
    assert names == {old.study_name, new.study_name}                   # the old study is kept, untouched
    old_trials = optuna.load_study(study_name=old.study_name, storage=store).get_trials(deepcopy=False)
    assert len(old_trials) == 5
    fresh = optuna.load_study(study_name=new.study_name, storage=store).get_trials(deepcopy=False)
    assert StudyKey.from_dict(optuna.load_study(study_name=new.study_name, storage=store)
                              .user_attrs["opgen.key"]).generator == GENERATOR_VERSION
    nearby = [t for t in fresh if t.user_attrs.get("source") == "nearby"]
    assert nearby                                     # old results offered as warm starts...
    top = tuner._top_configs(store, store.get_study_id_from_name(old.study_name), tuner.NEARBY_TOP)
    assert all(c in [t.user_attrs["config"] for t in fresh] for c in top)   # (or already queued as default)
    for t in nearby:          # measured again in this study, never copied from the old one
        assert t.state == TrialState.COMPLETE and "dup_of" not in t.user_attrs and t.user_attrs["measure_s"] > 0
