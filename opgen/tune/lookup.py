"""Call-time lookup of the best tuned config of a study key.

Cheap after the first call: answers (None included) are cached in memory per process, per (store, study);
opened storages are kept, so a miss for another shape bucket does not reload the store. A lookup never
creates anything: no store file where none exists, no study. :func:`opgen.tune.tuner.tune` clears the
cache when it finishes; call :func:`clear_cache` to see results that other processes wrote since.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from .key import StudyKey

_lock = threading.Lock()
_answers: dict[tuple[str, str], dict[str, Any] | None] = {}
_storages: dict[str, Any] = {}


def clear_cache() -> None:
    """Forget cached answers (opened storages are kept; they re-read their file or database)."""
    with _lock:
        _answers.clear()


def _storage_ident(key: StudyKey | str, storage: Any, cache_dir: str | os.PathLike | None) -> str:
    if storage is None:
        if not isinstance(key, StudyKey):
            raise TypeError("looking up a study by name needs its storage; pass a StudyKey to use the default store")
        from .store import default_store_path

        if cache_dir is None:
            from opgen.config import from_env

            cache_dir = from_env().cache_dir
        return "journal:" + os.path.abspath(default_store_path(cache_dir, key))
    if isinstance(storage, (str, os.PathLike)):
        return os.fspath(storage)
    _storages.setdefault(f"object:{id(storage)}", storage)
    return f"object:{id(storage)}"


def _open(ident: str) -> Any:
    st = _storages.get(ident)
    if st is None:
        from .store import open_storage

        st = open_storage(ident, create=False)
        if st is not None:
            _storages[ident] = st
    return st


def best_config(key: StudyKey | str, storage: Any = None, *, cache_dir: str | os.PathLike | None = None
                ) -> dict[str, Any] | None:
    """The fastest correct config recorded for ``key`` (a :class:`StudyKey` or a study name), or None.

    ``storage``: None for the embedded store under ``cache_dir`` (default: :func:`opgen.config.from_env`),
    a URL, ``journal:PATH`` / ``*.journal``, or an Optuna storage object.
    """
    name = key.name if isinstance(key, StudyKey) else str(key)
    with _lock:
        ident = _storage_ident(key, storage, cache_dir)
        if (ident, name) in _answers:
            hit = _answers[(ident, name)]
            return dict(hit) if hit is not None else None
        answer = _best(_open(ident), name)
        _answers[(ident, name)] = answer
        return dict(answer) if answer is not None else None


def _best(storage: Any, name: str) -> dict[str, Any] | None:
    if storage is None:
        return None
    from optuna.trial import TrialState

    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    best = None
    for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("status") != "ok" or "config" not in t.user_attrs or t.value is None:
            continue
        if best is None or t.value < best.value:
            best = t
    return dict(best.user_attrs["config"]) if best is not None else None
