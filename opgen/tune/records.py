"""Pinned tuning records: export the best config of each study to a JSON file, import it elsewhere.

A records file is data only: it is read with :func:`json.loads` and validated field by field; no code is
ever loaded from it (kernels are regenerated from the IR and the config). Format::

    {"format": "opgen.records", "version": 1, "generator": 1, "created": "2026-11-21T14:00:00+00:00",
     "records": [{"key": {...StudyKey.as_dict()...}, "study": "opgen/...", "config": {"block": 64},
                  "time_ms": 0.12, "dims": {"R": 64, "L": 4096}, "measured_at": "2026-11-21T13:59:58+00:00"}]}

``key`` holds every :class:`~opgen.tune.key.StudyKey` field (op name and fingerprint, shape bucket,
dtypes, target name and fingerprint, space fingerprint, generator and tuner versions); ``config`` maps
knob names to knob values (integers, strings, true/false or null; never a float: no opgen knob takes one, and
``16.0`` for an int knob would make every op call at that shape fail); ``time_ms`` is the measured time (finite, > 0); ``dims`` the concrete sizes it
was measured at (or null); ``measured_at`` when (or null). Unknown or missing fields are errors
(:class:`RecordsError`, an :class:`~opgen.ir.ArgumentError`, names the file, the record and the field); so is
a ``version`` newer than :data:`RECORDS_VERSION`, and JSON nested too deeply to parse.

On import each config is also checked against its knob space, where this process can know it (the study of
the same key in the importing cache dir's store, which records its knobs, or the library op's space at the
record's ``dims``): the knobs must be exactly the space's, each value one of its choices with the choice's type.

:func:`import_records` merges a file into the pinned file ``<cache_dir>/tune/records.json`` (validated
first, then written atomically under a lock). :func:`pinned_config` answers call-time lookups from it
(:func:`opgen.tune.lookup.best_config` asks it first, so every process and rank that shares the cache dir
uses the same config). The pinned file is read once per process and re-read when its size or mtime
changes; a damaged pinned file gives one :class:`RecordsWarning` and is ignored (lookups fall back to the
tuning store): op calls never fail because of it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from .key import StudyKey, _slug
from .records_file import (FORMAT, PINNED_NAME, RECORDS_VERSION, Record, RecordsError,  # noqa: F401 (re-exported)
                           RecordsWarning, _sorted, _Where, _key_from_json, check_config_in_space,
                           clear_pinned_cache, dumps_records, parse_records, pinned_config, pinned_path,
                           pinned_record, read_records, write_records)


# -- export ------------------------------------------------------------------------------------------

def _journals(cache_dir: str | os.PathLike | None, op: str | None) -> list[Path]:
    if cache_dir is None:
        from opgen.config import from_env

        cache_dir = from_env().cache_dir
    found = sorted((Path(cache_dir) / "tune").glob("*.journal"))
    return [p for p in found if op is None or p.name.startswith(_slug(op) + "-")]


def _storages(source: Any, cache_dir: str | os.PathLike | None, op: str | None) -> Iterator[tuple[str, Any]]:
    from .store import describe, open_storage

    if source is None:
        sources: list[Any] = list(_journals(cache_dir, op))
    elif isinstance(source, (list, tuple)):
        sources = list(source)
    else:
        sources = [source]
    for src in sources:
        if isinstance(src, Path) or (isinstance(src, str) and "://" not in src and not src.startswith("journal:")
                                     and src.endswith(".journal")):
            st = open_storage(os.fspath(src), create=False)
            if st is None:
                raise RecordsError(f"{src}: no such tuning store")
        else:
            st = open_storage(src)
        yield (describe(st) if not isinstance(src, (str, Path)) else str(src)), st


def _measured_at(trial: Any) -> str | None:
    done = getattr(trial, "datetime_complete", None)
    return done.astimezone().isoformat(timespec="seconds") if done is not None else None


def export_records(source: Any = None, *, op: str | None = None, cache_dir: str | os.PathLike | None = None
                   ) -> list[Record]:
    """The best ok trial of every opgen study (one with user attr ``opgen.key``), as records.

    ``source``: None for every ``*.journal`` under ``<cache_dir>/tune/`` (default cache dir: from the
    environment), an Optuna storage object or URL, a journal path, or a list of these. ``op``: only this op.
    The best trial follows :func:`opgen.tune.lookup.best_trial` (status ok, a config, the smallest value).
    """
    from .lookup import best_trial

    best: dict[StudyKey, Record] = {}
    for where, storage in _storages(source, cache_dir, op):
        for s in storage.get_all_studies():
            raw = s.user_attrs.get("opgen.key")
            if raw is None:
                continue
            at = _Where(f"{where}: study {s.study_name}", None)
            key = _key_from_json(raw, at)
            if op is not None and key.op_name != op:
                continue
            t = best_trial(storage, s._study_id)
            if t is None:
                continue
            d = {"key": key.as_dict(), "study": s.study_name, "config": t.user_attrs["config"], "time_ms": t.value,
                 "dims": t.user_attrs.get("dims"), "measured_at": _measured_at(t)}
            rec = Record.from_json(d, where=at.file)
            if key not in best or rec.time_ms < best[key].time_ms:
                best[key] = rec
    return _sorted(best.values())


# -- import ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` (two importers never lose each other's records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as f:
        try:
            import fcntl
        except ImportError:                     # no flock on this platform: unlocked
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def import_records(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
                   ) -> tuple[int, int, int]:
    """Merge the records file ``path`` into the pinned file; returns (added, replaced, unchanged).

    The whole file is validated first (nothing is written if any record is invalid). A record with the same
    :class:`~opgen.tune.key.StudyKey` as a pinned one replaces it. The pinned file is rewritten atomically
    under a lock. A damaged pinned file is an error here (fix or remove it), not a silent overwrite.
    """
    incoming = read_records(path)
    for i, r in enumerate(incoming):
        knobs = _knob_space(r, cache_dir)
        if knobs is not None:
            check_config_in_space(r.config, knobs, where=str(path), index=i)
    target = pinned_path(cache_dir)
    with _locked(target):
        try:
            pinned = {r.key: r for r in read_records(target)} if target.exists() else {}
        except RecordsError as exc:
            raise RecordsError(f"cannot import {path}: the pinned file {target} is damaged, fix or remove it "
                               f"first ({exc})") from None
        added = replaced = unchanged = 0
        for r in incoming:
            old = pinned.get(r.key)
            if old is None:
                added += 1
            elif old == r:
                unchanged += 1
                continue
            else:
                replaced += 1
            pinned[r.key] = r
        if added or replaced or not target.exists():
            write_records(target, pinned.values())
    from . import lookup

    lookup.clear_cache()
    return added, replaced, unchanged


def _knob_space(rec: Record, cache_dir: str | os.PathLike | None) -> list[tuple[str, list[Any]]] | None:
    """The knobs ``(name, choices)`` of ``rec``'s study, where this process can know them: the same study in the
    default store of ``cache_dir`` (user attr ``opgen.space``), or the library op's space at ``rec.dims`` on the
    record's target (when that target is available here and the space's fingerprint matches); else None."""
    from .store import open_storage

    if cache_dir is None:
        from opgen.config import from_env

        cache_dir = from_env().cache_dir
    try:
        storage = open_storage(None, cache_dir=cache_dir, key=rec.key, create=False)
        if storage is not None:
            sid = storage.get_study_id_from_name(rec.key.name)
            stored = storage.get_study_user_attrs(sid).get("opgen.space")
            if isinstance(stored, list):
                return [(str(k), list(c)) for k, c in stored]
    except (KeyError, OSError, TypeError, ValueError):
        pass
    from .library import OPTIONAL_DIMS, SHAPE_DIMS

    if rec.dims is None or rec.key.op_name not in SHAPE_DIMS or rec.key.target not in ("tvm", "triton"):
        return None
    allowed = set(SHAPE_DIMS[rec.key.op_name]) | set(OPTIONAL_DIMS.get(rec.key.op_name, {}))
    try:
        from .library import LibraryProblem

        space = LibraryProblem(rec.key.op_name, {k: v for k, v in rec.dims.items() if k in allowed},
                               rec.key.target, dtype=rec.key.dtypes[0] if rec.key.dtypes else "float32").space()
    except Exception:                           # noqa: BLE001 - backend missing here, another shape rule: unknown
        return None
    if space.fingerprint != rec.key.space_fingerprint:
        return None
    return [(k.name, list(k.choices)) for k in space.knobs]
