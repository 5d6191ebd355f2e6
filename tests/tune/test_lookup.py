"""Call-time lookup: None without creating anything, the best config after tuning, cached per process."""
from __future__ import annotations

import optuna

from opgen.tune import lookup
from opgen.tune.key import study_key
from opgen.tune.store import default_store_path, open_storage
from opgen.tune.testing import CumsumProblem
from opgen.tune.tuner import problem_key, tune


def test_lookup_creates_nothing(tmp_path):
    p = CumsumProblem()
    key = study_key(p.key_parts(), p.space().fingerprint)
    assert lookup.best_config(key, cache_dir=tmp_path) is None
    assert not default_store_path(tmp_path, key).exists()
    store = open_storage(None, cache_dir=tmp_path, key=key)          # a store without this study
    lookup.clear_cache()
    assert lookup.best_config(key, cache_dir=tmp_path) is None
    assert lookup.best_config(key.name, store) is None
    assert store.get_all_studies() == []


def test_lookup_after_tuning_and_its_cache(tmp_path, measurer):
    p = CumsumProblem(rows=16)
    r = tune(p, trials=2, cache_dir=tmp_path, progress=False, measurer=measurer)
    assert problem_key(p) == r.key
    assert lookup.best_config(r.key, cache_dir=tmp_path) == r.best_config
    url = f"journal:{default_store_path(tmp_path, r.key)}"
    assert lookup.best_config(r.study_name, url) == r.best_config
    default_store_path(tmp_path, r.key).unlink()                  # answered from memory now
    assert lookup.best_config(r.key, cache_dir=tmp_path) == r.best_config
    lookup.clear_cache()


def test_lookup_ignores_failed_and_infeasible_trials():
    store = optuna.storages.InMemoryStorage()
    s = optuna.create_study(study_name="k", storage=store)
    s.add_trial(optuna.trial.create_trial(value=float("inf"), user_attrs={"status": "wrong", "config": {"a": 1}}))
    s.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={"status": "ok", "config": {"a": 2}}))
    s.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"status": "ok", "config": {"a": 3}}))
    assert lookup.best_config("k", store) == {"a": 3}
