"""The records file format and the pinned file: :class:`Record`, field-by-field validation, reading and writing a
records file, and the per-process cache of ``<cache_dir>/tune/records.json`` that call-time lookups read
(:func:`pinned_config`). The format is described in :mod:`opgen.tune.records`, which re-exports every name here and
adds export (from a tuning store) and import (into the pinned file).

Lower than :mod:`opgen.tune.lookup` (which asks :func:`pinned_config` first) and :mod:`opgen.tune.records`: it
imports neither, nor any store.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from opgen.atomic import atomic_write
from opgen.ir.errors import ArgumentError
from opgen.schedules.space import is_choice

from .key import GENERATOR_VERSION, StudyKey

FORMAT = "opgen.records"
#: The newest records file version this opgen reads and the one it writes.
RECORDS_VERSION = 1
PINNED_NAME = "records.json"

_FILE_FIELDS = ("format", "version", "generator", "created", "records")
_RECORD_FIELDS = ("key", "study", "config", "time_ms", "dims", "measured_at")
_KEY_FIELDS = ("op_name", "op_fingerprint", "bucket", "dtypes", "target", "target_fingerprint",
               "space_fingerprint", "generator", "tuner")


class RecordsError(ArgumentError):
    """A records file (or a record) is not valid; the message names the file, the record and the field."""


class RecordsWarning(UserWarning):
    """The pinned records file is damaged and is ignored (lookups fall back to the tuning store)."""


@dataclass(frozen=True)
class Record:
    """The best measured config of one study."""

    key: StudyKey
    config: Mapping[str, Any] = field(hash=False)
    time_ms: float
    dims: Mapping[str, int] | None = field(default=None, hash=False)
    study: str = ""
    measured_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (validated: raises :class:`RecordsError` for a record that could not be read back)."""
        d = {"key": self.key.as_dict(), "study": self.study or self.key.name,
             "config": {k: self.config[k] for k in sorted(self.config)}, "time_ms": self.time_ms,
             "dims": None if self.dims is None else dict(self.dims), "measured_at": self.measured_at}
        Record.from_json(d, where=f"record of {self.study or self.key.name}")
        return d

    @staticmethod
    def from_json(d: Any, *, where: str = "records", index: int | None = None) -> "Record":
        """A :class:`Record` from its JSON dict, checking every field (``where``/``index`` go into errors)."""
        at = _Where(where, index)
        _fields(d, _RECORD_FIELDS, at, "")
        return Record(key=_key_from_json(d["key"], at), config=_config(d["config"], at),
                      time_ms=_time(d["time_ms"], at), dims=_dims(d["dims"], at), study=_str(d["study"], at, "study"),
                      measured_at=_opt_str(d["measured_at"], at, "measured_at"))


# -- validation --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Where:
    file: str
    index: int | None

    def error(self, fld: str, expected: str, got: Any, *, described: bool = False) -> RecordsError:
        """``got`` is the value that came (shown as JSON), or with ``described`` a description of it."""
        rec = "" if self.index is None else f"record {self.index}: "
        name = f"field {fld!r}: " if fld else ""
        return RecordsError(f"{self.file}: {rec}{name}expected {expected}, got {got if described else _show(got)}")


def _show(v: Any) -> str:
    text = json.dumps(v) if _jsonable(v) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=True)
        return True
    except (TypeError, ValueError):
        return False


def _fields(d: Any, names: tuple[str, ...], at: _Where, prefix: str) -> None:
    if not isinstance(d, dict):
        raise at.error(prefix.rstrip("."), "an object with fields " + ", ".join(names), d)
    missing = [n for n in names if n not in d]
    if missing:
        raise at.error(prefix + missing[0], "this field to be present (fields: " + ", ".join(names) + ")",
                       "an object without it", described=True)
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise at.error(prefix + str(unknown[0]), "only the fields " + ", ".join(names), "an unknown field",
                       described=True)


def _str(v: Any, at: _Where, fld: str) -> str:
    if not isinstance(v, str) or not v:
        raise at.error(fld, "a non-empty string", v)
    return v


def _opt_str(v: Any, at: _Where, fld: str) -> str | None:
    return None if v is None else _str(v, at, fld)


def _int(v: Any, at: _Where, fld: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise at.error(fld, f"an integer >= {minimum}", v)
    return v


def _key_from_json(d: Any, at: _Where) -> StudyKey:
    _fields(d, _KEY_FIELDS, at, "key.")
    bucket = d["bucket"]
    if not isinstance(bucket, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                               and isinstance(p[1], int) and not isinstance(p[1], bool)
                                               and p[1] > 0 for p in bucket):
        raise at.error("key.bucket", "a list of [name, size] pairs with positive integer sizes", bucket)
    dtypes = d["dtypes"]
    if not isinstance(dtypes, list) or not all(isinstance(t, str) and t for t in dtypes):
        raise at.error("key.dtypes", "a list of dtype names", dtypes)
    s = {f: _str(d[f], at, "key." + f) for f in ("op_name", "op_fingerprint", "target", "target_fingerprint",
                                                 "space_fingerprint")}
    return StudyKey(s["op_name"], s["op_fingerprint"], tuple((k, v) for k, v in bucket), tuple(dtypes),
                    s["target"], s["target_fingerprint"], s["space_fingerprint"],
                    _int(d["generator"], at, "key.generator", 1), _int(d["tuner"], at, "key.tuner", 1))


def _config(d: Any, at: _Where) -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        raise at.error("config", "a non-empty object of knob -> value", d)
    for k, v in d.items():
        if not (v is None or isinstance(v, (str, bool, int))):
            raise at.error(f"config.{k}", "a knob value (an integer, a string, true/false or null; never a float)", v)
    return dict(d)


def check_config_in_space(config: Mapping[str, Any], knobs: Iterable[tuple[str, Iterable[Any]]], *,
                          where: str = "records", index: int | None = None) -> None:
    """Raise :class:`RecordsError` unless ``config`` sets exactly the knobs ``(name, choices)``, each to one of its
    choices with the same type (an int knob takes neither ``16.0`` nor ``true``)."""
    at = _Where(where, index)
    space = {name: tuple(choices) for name, choices in knobs}
    for name in space:
        if name not in config:
            raise at.error(f"config.{name}", f"a value for knob {name!r} (knobs: {', '.join(space)})",
                           "a config without it", described=True)
    for name, v in config.items():
        if name not in space:
            raise at.error(f"config.{name}", f"only the knobs {', '.join(space)}", "an unknown knob", described=True)
        if not is_choice(v, space[name]):
            kinds = sorted({type(c).__name__ for c in space[name]})
            raise at.error(f"config.{name}", f"one of {_show(list(space[name]))} ({' or '.join(kinds)})",
                           f"{_show(v)} ({type(v).__name__})", described=True)


def _time(v: Any, at: _Where) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise at.error("time_ms", "a finite time in ms > 0", v)
    return float(v)


def _dims(d: Any, at: _Where) -> dict[str, int] | None:
    if d is None:
        return None
    if not isinstance(d, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                          for v in d.values()):
        raise at.error("dims", "null or an object of dim name -> positive integer", d)
    return dict(d)


# -- files -------------------------------------------------------------------------------------------

def parse_records(text: str, where: str = "records") -> list[Record]:
    """The records of a records file's ``text`` (``where`` names it in errors); never evaluates anything."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise RecordsError(f"{where}: not a JSON file ({exc})") from None
    except RecursionError:
        raise RecordsError(f"{where}: expected a records file, got JSON nested too deeply to read") from None
    top = _Where(where, None)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise top.error("format", f"an opgen records file (format {FORMAT!r})", got)
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise top.error("version", f"an integer records version (1..{RECORDS_VERSION})", version)
    if version > RECORDS_VERSION:
        raise RecordsError(f"{where}: records version {version} was written by a newer opgen; this opgen reads "
                           f"versions up to {RECORDS_VERSION} (upgrade opgen to import it)")
    _fields(doc, _FILE_FIELDS, top, "")
    _int(doc["generator"], top, "generator", 1)
    _str(doc["created"], top, "created")
    if not isinstance(doc["records"], list):
        raise top.error("records", "a list of records", doc["records"])
    out = [Record.from_json(r, where=where, index=i) for i, r in enumerate(doc["records"])]
    first: dict[StudyKey, int] = {}
    for i, r in enumerate(out):
        if r.key in first:
            raise RecordsError(f"{where}: records {first[r.key]} and {i} have the same key ({r.key.name}); "
                               "keep one")
        first[r.key] = i
    return out


def read_records(path: str | os.PathLike) -> list[Record]:
    """The validated records of the file at ``path`` (:class:`RecordsError` if it cannot be read or is invalid)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path}: cannot read the records file ({exc})") from None
    return parse_records(text, str(path))


def _sorted(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.key.op_name, r.key.name))


def dumps_records(records: Iterable[Record]) -> str:
    """The text of a records file holding ``records`` (sorted by op and study name)."""
    doc = {"format": FORMAT, "version": RECORDS_VERSION, "generator": GENERATOR_VERSION,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "records": [r.to_json() for r in _sorted(records)]}
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    """Write a records file atomically (a temp file in the same folder, fsynced, then renamed over ``path``)."""
    path = Path(path)
    text = dumps_records(records)
    atomic_write(path, text, mode=0o644)
    with contextlib.suppress(OSError):          # make the rename durable (not possible everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


# -- the pinned file ---------------------------------------------------------------------------------

def pinned_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/tune/records.json``: the pinned records that call-time lookups use first."""
    if cache_dir is None:
        from opgen.config import from_env

        cache_dir = from_env().cache_dir
    return Path(cache_dir) / "tune" / PINNED_NAME


_lock = threading.Lock()
# path -> ((mtime_ns, size, inode), records by key or None when damaged)
_pinned: dict[str, tuple[tuple[int, int, int], dict[StudyKey, Record] | None]] = {}


def clear_pinned_cache() -> None:
    """Forget the pinned files read (damaged ones are remembered so that each damage warns once)."""
    with _lock:
        for p in [p for p, (_, recs) in _pinned.items() if recs is not None]:
            del _pinned[p]


def _load_pinned(path: Path) -> dict[StudyKey, Record] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    with _lock:
        hit = _pinned.get(str(path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            recs: dict[StudyKey, Record] | None = {r.key: r for r in read_records(path)}
        except Exception as exc:                # noqa: BLE001 - never fail an op call on this file
            recs = None
            msg = str(exc) if isinstance(exc, RecordsError) else f"{path}: {type(exc).__name__}: {exc}"
            warnings.warn(f"opgen tune: the pinned records file {path} is damaged and ignored; lookups use the "
                          f"tuning store instead. Fix it or import the records again. ({msg})", RecordsWarning,
                          stacklevel=4)
        _pinned[str(path)] = (stamp, recs)
        return recs


def pinned_record(key: StudyKey, cache_dir: str | os.PathLike | None = None) -> Record | None:
    """The pinned record of exactly ``key`` (every StudyKey field equal), or None; never raises for a bad file."""
    recs = _load_pinned(pinned_path(cache_dir))
    return None if recs is None else recs.get(key)


def pinned_config(key: StudyKey, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The pinned config of exactly ``key``, or None (no pinned file, no such record, or a damaged file)."""
    rec = pinned_record(key, cache_dir)
    return None if rec is None else dict(rec.config)
