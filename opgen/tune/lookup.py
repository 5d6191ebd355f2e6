"""Call-time lookup of the best tuned config of a study key.

Cheap after the first call: answers (None included) are cached in memory per process, per (store, study);
opened storages are kept, so a miss for another shape bucket does not reload the store. A lookup never
creates anything: no store file where none exists, no study. :func:`opgen.tune.tuner.tune` clears the
cache when it finishes; call :func:`clear_cache` to see results that other processes wrote since.

Pinned records (:mod:`opgen.tune.records`, ``opgen records import``) come first: a lookup by
:class:`StudyKey` answers from ``<cache_dir>/tune/records.json`` when it holds a record of exactly that
key, whatever ``storage`` is (the default store or a URL), so every process and rank that shares the cache
dir uses the same config. A lookup by study name reads only the storage it names. A damaged pinned file
warns once (:class:`~opgen.tune.records.RecordsWarning`) and is ignored.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from .key import StudyKey
from .records_file import clear_pinned_cache, pinned_config, pinned_path

_lock = threading.Lock()
_answers: dict[tuple[str, str, str], dict[str, Any] | None] = {}
_storages: dict[str, Any] = {}


def clear_cache() -> None:
    """Forget cached answers and pinned records (opened storages are kept; they re-read their file or database)."""
    with _lock:
        _answers.clear()
    clear_pinned_cache()


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
    a URL, ``journal:PATH`` / ``*.journal``, or an Optuna storage object. A pinned record of a
    :class:`StudyKey` wins over the storage (see the module doc).
    """
    name = key.name if isinstance(key, StudyKey) else str(key)
    with _lock:
        ident = _storage_ident(key, storage, cache_dir)
        pinned = _pinned_ident(key, cache_dir)
        if (ident, name, pinned) in _answers:
            hit = _answers[(ident, name, pinned)]
            return dict(hit) if hit is not None else None
        answer = pinned_config(key, cache_dir) if isinstance(key, StudyKey) else None
        if answer is None:
            answer = _best(_open(ident), name)
        _answers[(ident, name, pinned)] = answer
        return dict(answer) if answer is not None else None


def _pinned_ident(key: StudyKey | str, cache_dir: str | os.PathLike | None) -> str:
    if not isinstance(key, StudyKey):
        return ""
    if cache_dir is None:
        from opgen.config import from_env

        cache_dir = from_env().cache_dir
    return os.path.abspath(pinned_path(cache_dir))


def best_trial(storage: Any, study_id: int) -> Any | None:
    """The best trial of a study: COMPLETE, status ok, with a config, the smallest value (first on ties)."""
    from optuna.trial import TrialState

    best = None
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("status") != "ok" or "config" not in t.user_attrs or t.value is None:
            continue
        if best is None or t.value < best.value:
            best = t
    return best


def _best(storage: Any, name: str) -> dict[str, Any] | None:
    if storage is None:
        return None
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    best = best_trial(storage, sid)
    return dict(best.user_attrs["config"]) if best is not None else None
