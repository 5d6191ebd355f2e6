"""Pinned tuning records: export, import, lookups that prefer them, strict validation, the CLI."""
from __future__ import annotations

import copy
import json
import threading
import warnings
from dataclasses import replace
from datetime import datetime

import pytest

from opgen.cli import main
from opgen.tune import lookup
from opgen.tune.key import GENERATOR_VERSION
from opgen.tune.records import (FORMAT, RECORDS_VERSION, Record, RecordsError, RecordsWarning, export_records,
                                import_records, parse_records, pinned_config, pinned_path, read_records,
                                write_records)
from opgen.tune.store import default_store_path
from opgen.tune.testing import CumsumProblem
from opgen.tune.tuner import tune

PLANTED = {"algo": "loop", "block": 1024, "fault": "none"}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, measurer):
    """One tuned study in its own cache dir (shared by the module's tests: do not write to it)."""
    src = tmp_path_factory.mktemp("src")
    r = tune(CumsumProblem(rows=16, length=1024), trials=4, cache_dir=src, seed=0, progress=False,
             measurer=measurer)
    assert r.best_config is not None and r.best_config != PLANTED
    return src, r


@pytest.fixture(autouse=True)
def _fresh_lookups():
    lookup.clear_cache()
    yield
    lookup.clear_cache()


def _good_doc(tuned, tmp_path) -> dict:
    src, _ = tuned
    path = write_records(tmp_path / "good.json", export_records(cache_dir=src))
    return json.loads(path.read_text())


def test_export_holds_the_best_ok_trial_with_its_key(tuned, tmp_path):
    src, r = tuned
    recs = export_records(cache_dir=src)
    assert len(recs) == 1
    rec = recs[0]
    assert rec.key == r.key and rec.study == r.study_name
    assert rec.config == r.best_config and rec.time_ms == pytest.approx(r.best_time_ms)
    assert rec.dims == {"R": 16, "L": 1024}
    assert datetime.fromisoformat(rec.measured_at).tzinfo is not None
    assert export_records(cache_dir=src, op="test_cumsum") == recs
    assert export_records(cache_dir=src, op="no_such_op") == []
    assert export_records(f"journal:{default_store_path(src, r.key)}") == recs


def test_export_file_format(tuned, tmp_path):
    src, r = tuned
    doc = _good_doc(tuned, tmp_path)
    assert doc["format"] == FORMAT == "opgen.records" and doc["version"] == RECORDS_VERSION == 1
    assert doc["generator"] == GENERATOR_VERSION
    assert datetime.fromisoformat(doc["created"]).tzinfo is not None
    (rec,) = doc["records"]
    assert set(rec) == {"key", "study", "config", "time_ms", "dims", "measured_at"}
    assert rec["key"] == r.key.as_dict()
    assert rec["key"]["op_fingerprint"] == r.key.op_fingerprint and rec["key"]["bucket"] == [["R", 16], ["L", 1024]]
    assert rec["key"]["target_fingerprint"] == r.key.target_fingerprint and rec["key"]["generator"] == 1
    assert rec["config"] == r.best_config and rec["time_ms"] > 0
    assert not list(tmp_path.glob(".good.json.*"))            # no temp file left behind


def test_round_trip_and_deterministic_order(tuned, tmp_path):
    src, r = tuned
    (rec,) = export_records(cache_dir=src)
    others = [replace(rec, key=replace(rec.key, op_name=n), study="") for n in ("zeta", "alpha")]
    write_records(tmp_path / "a.json", [rec, *others])
    write_records(tmp_path / "b.json", [*reversed(others), rec])
    a, b = read_records(tmp_path / "a.json"), read_records(tmp_path / "b.json")
    assert a == b and [x.key.op_name for x in a] == ["alpha", "test_cumsum", "zeta"]
    assert rec in a and Record.from_json(rec.to_json()) == rec


def test_import_pins_configs_for_an_empty_store(tuned, tmp_path):
    src, r = tuned
    f = write_records(tmp_path / "r.json", export_records(cache_dir=src))
    other = tmp_path / "other"
    assert lookup.best_config(r.key, cache_dir=other) is None
    assert import_records(f, cache_dir=other) == (1, 0, 0)
    assert lookup.best_config(r.key, cache_dir=other) == r.best_config      # import cleared the cache
    assert not default_store_path(other, r.key).exists()
    before = pinned_path(other).stat().st_mtime_ns
    assert import_records(f, cache_dir=other) == (0, 0, 1)
    assert pinned_path(other).stat().st_mtime_ns == before                 # nothing changed, nothing written


def test_pinned_record_wins_over_the_store(tuned, tmp_path, measurer):
    r = tune(CumsumProblem(rows=16, length=1024), trials=2, cache_dir=tmp_path, seed=0, progress=False,
             measurer=measurer)
    assert lookup.best_config(r.key, cache_dir=tmp_path) == r.best_config != PLANTED
    planted = Record(r.key, PLANTED, 5.0, {"R": 16, "L": 1024}, r.study_name)
    assert import_records(write_records(tmp_path / "p.json", [planted]), cache_dir=tmp_path) == (1, 0, 0)
    assert lookup.best_config(r.key, cache_dir=tmp_path) == PLANTED
    url = f"journal:{default_store_path(tmp_path, r.key)}"
    assert lookup.best_config(r.key, url, cache_dir=tmp_path) == PLANTED    # pinned wins for any storage
    assert lookup.best_config(r.study_name, url) == r.best_config         # a lookup by name reads the store
    again = replace(planted, config={**PLANTED, "block": 512})
    assert import_records(write_records(tmp_path / "q.json", [again]), cache_dir=tmp_path) == (0, 1, 0)
    assert lookup.best_config(r.key, cache_dir=tmp_path) == again.config
    assert read_records(pinned_path(tmp_path)) == [again]


def _mutate(doc, how):
    doc = copy.deepcopy(doc)
    rec = doc["records"][0]
    if how == "format":
        doc["format"] = "something.else"
    elif how == "version":
        doc["version"] = RECORDS_VERSION + 1
    elif how == "config_list":
        rec["config"]["block"] = [64]
    elif how == "config_dict":
        rec["config"]["algo"] = {"__class__": "os.system"}
    elif how == "negative_time":
        rec["time_ms"] = -1.0
    elif how == "nan_time":
        return json.dumps(doc).replace('"time_ms": ' + json.dumps(rec["time_ms"]), '"time_ms": NaN')
    elif how == "missing_field":
        del rec["key"]["target_fingerprint"]
    elif how == "unknown_field":
        rec["code"] = "import os"
    elif how == "duplicate":
        doc["records"].append(copy.deepcopy(rec))
    elif how == "not_json":
        return "{'format': 'opgen.records'"
    return json.dumps(doc)


BAD = {"format": ["field 'format'", "opgen records file", "something.else"],
       "version": ["records version 2", "newer opgen", "up to 1"],
       "config_list": ["record 0", "field 'config.block'", "a knob value", "[64]"],
       "config_dict": ["record 0", "field 'config.algo'", "a knob value", "__class__"],
       "negative_time": ["record 0", "field 'time_ms'", "> 0", "-1.0"],
       "nan_time": ["record 0", "field 'time_ms'", "finite", "NaN"],
       "missing_field": ["record 0", "field 'key.target_fingerprint'", "to be present"],
       "unknown_field": ["record 0", "field 'code'", "unknown field"],
       "duplicate": ["records 0 and 1", "same key"],
       "not_json": ["not a JSON file"]}


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_files_are_refused_and_change_nothing(tuned, tmp_path, how):
    src, r = tuned
    doc = _good_doc(tuned, tmp_path)
    pinned_dir = tmp_path / "pinned"
    planted = Record(r.key, PLANTED, 5.0)
    import_records(write_records(tmp_path / "p.json", [planted]), cache_dir=pinned_dir)
    before = pinned_path(pinned_dir).read_bytes()
    bad = tmp_path / f"bad-{how}.json"
    bad.write_text(_mutate(doc, how))
    with pytest.raises(RecordsError) as err:
        import_records(bad, cache_dir=pinned_dir)
    msg = str(err.value)
    assert str(bad) in msg
    for part in BAD[how]:
        assert part in msg, (part, msg)
    assert pinned_path(pinned_dir).read_bytes() == before
    assert lookup.best_config(r.key, cache_dir=pinned_dir) == PLANTED


def test_a_record_must_be_valid_to_be_written(tuned):
    src, r = tuned
    with pytest.raises(RecordsError, match="config.block"):
        Record(r.key, {"block": [1]}, 1.0).to_json()
    with pytest.raises(RecordsError, match="time_ms"):
        Record(r.key, {"block": 1}, float("inf")).to_json()
    with pytest.raises(RecordsError, match="key.bucket"):
        Record(replace(r.key, bucket=(("R", 0),)), {"block": 1}, 1.0).to_json()


def test_a_damaged_pinned_file_warns_once_and_lookups_fall_back(tuned, tmp_path, measurer):
    r = tune(CumsumProblem(rows=16, length=1024), trials=2, cache_dir=tmp_path, seed=0, progress=False,
             measurer=measurer)
    path = pinned_path(tmp_path)
    path.write_text('{"format": "opgen.records", "version": 1, "records": [')
    with pytest.warns(RecordsWarning) as caught:
        assert lookup.best_config(r.key, cache_dir=tmp_path) == r.best_config
    assert len(caught) == 1 and str(path) in str(caught[0].message) and "not a JSON file" in str(caught[0].message)
    lookup.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordsWarning)
        assert lookup.best_config(r.key, cache_dir=tmp_path) == r.best_config
        assert pinned_config(r.key, tmp_path) is None
    with pytest.raises(RecordsError, match="damaged, fix or remove it"):
        import_records(write_records(tmp_path / "p.json", [Record(r.key, PLANTED, 5.0)]), cache_dir=tmp_path)
    path.unlink()
    assert import_records(tmp_path / "p.json", cache_dir=tmp_path) == (1, 0, 0)
    assert lookup.best_config(r.key, cache_dir=tmp_path) == PLANTED


def test_records_of_another_generator_or_target_are_not_used(tuned, tmp_path):
    src, r = tuned
    newer = replace(r.key, generator=GENERATOR_VERSION + 1)
    elsewhere = replace(r.key, target_fingerprint="0" * 16)
    other_space = replace(r.key, space_fingerprint="f" * 16)
    f = write_records(tmp_path / "r.json", [Record(k, PLANTED, 5.0) for k in (newer, elsewhere, other_space)])
    assert import_records(f, cache_dir=tmp_path) == (3, 0, 0)
    assert lookup.best_config(r.key, cache_dir=tmp_path) is None
    assert pinned_config(r.key, tmp_path) is None
    assert pinned_config(newer, tmp_path) == PLANTED and pinned_config(elsewhere, tmp_path) == PLANTED


def test_concurrent_imports_keep_every_record(tuned, tmp_path):
    src, r = tuned
    files = [write_records(tmp_path / f"r{i}.json", [Record(replace(r.key, op_name=f"op{i}"), PLANTED, 1.0 + i)])
             for i in range(8)]
    results = []
    threads = [threading.Thread(target=lambda f=f: results.append(import_records(f, cache_dir=tmp_path / "c")))
               for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(1, 0, 0)] * 8
    assert sorted(x.key.op_name for x in read_records(pinned_path(tmp_path / "c"))) == [f"op{i}" for i in range(8)]


def test_parse_never_evaluates(tmp_path):
    text = json.dumps({"format": FORMAT, "version": 1, "generator": 1, "created": "now", "records": []})
    assert parse_records(text) == []
    with pytest.raises(RecordsError, match="opgen records file"):
        parse_records(json.dumps("__import__('os').system('false')"))
    with pytest.raises(RecordsError, match="not a JSON file"):
        parse_records("__import__('os')")


def test_cli_export_and_import(tuned, tmp_path, monkeypatch, capsys):
    src, r = tuned
    monkeypatch.delenv("OPGEN_TUNE_STORAGE", raising=False)
    monkeypatch.setenv("OPGEN_CACHE_DIR", str(src))
    out = tmp_path / "exported.json"
    assert main(["records", "export", str(out)]) == 0
    assert f"exported 1 record from {src}/tune to {out}" in capsys.readouterr().out
    assert [x.config for x in read_records(out)] == [r.best_config]
    assert main(["records", "export", str(tmp_path / "none.json"), "--op", "no_such_op"]) == 0
    assert read_records(tmp_path / "none.json") == []

    other = tmp_path / "other"
    monkeypatch.setenv("OPGEN_CACHE_DIR", str(other))
    assert main(["records", "import", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"imported {out}: 1 added, 0 replaced, 0 unchanged; pinned file {pinned_path(other)}" in line
    assert lookup.best_config(r.key) == r.best_config

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "opgen.records", "version": 99}')
    assert main(["records", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "newer opgen" in err
    assert main(["records", "import", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_config_must_fit_its_knob_space_to_be_imported(tuned, tmp_path):
    """``16.0`` for an int knob passed import and then broke every op call at that shape: refused now, naming the
    file, the record, the knob, what was expected and what came; so are a bool for an int, a value outside the
    choices, and a missing or unknown knob (checked against the study's space, known from the store)."""
    import random
    import shutil

    from opgen.ir import ArgumentError
    from opgen.schedules.space import Knob, Space

    src, r = tuned
    dst = tmp_path / "dst"
    shutil.copytree(src / "tune", dst / "tune", ignore=shutil.ignore_patterns("records.json*"))
    doc = _good_doc(tuned, tmp_path)
    block = random.choice([16, 32, 64, 128])
    bad = {"block": float(block), "fault": "none"}, {"block": True}, {"block": 48}, {"fault": None}, {"extra": 1}
    want = [f"config.block': expected a knob value (an integer, a string, true/false or null; never a float), got "
            f"{float(block)}", "config.block': expected one of [16, 32, 64, 128, 256, 512, 1024] (int), got true (bool)",
            "config.block': expected one of [16, 32", "config.fault': expected one of [\"none\"] (str), got null",
            "config.extra': expected only the knobs algo, block, fault, got an unknown knob"]
    for change, msg in zip(bad, want):
        err = _import_error(doc, tmp_path, change, dst)
        assert str(tmp_path / "one.json") in err and "record 0" in err and msg in err, err
    assert not pinned_path(dst).exists()
    # without a known space a float is still refused (no knob takes one), and a lookup never returns one
    assert f"config.block': expected a knob value" in _import_error(doc, tmp_path, {"block": 16.0}, tmp_path / "e")
    space = Space("s", (Knob("block", (16, 32)), Knob("fast", (True, False))), {"block": 16, "fast": True})
    assert space.infeasible({"block": 16.0, "fast": True}) and space.infeasible({"block": 16, "fast": 1})
    assert space.infeasible({"block": 32, "fast": False}) is None


def _import_error(doc: dict, tmp_path, change: dict, cache_dir) -> str:
    d = copy.deepcopy(doc)
    d["records"][0]["config"].update(change)
    f = tmp_path / "one.json"
    f.write_text(json.dumps(d))
    with pytest.raises(RecordsError) as exc:
        import_records(f, cache_dir=cache_dir)
    return str(exc.value)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    from opgen.ir import ArgumentError

    depth = 50_000 + __import__("random").randrange(50_000)
    f = tmp_path / "deep.json"
    f.write_text('{"format": "opgen.records", "version": 1, "records": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ArgumentError, match=r"deep\.json: expected a records file, got JSON nested too deeply"):
        read_records(f)
    with pytest.raises(ArgumentError, match="nested too deeply"):
        import_records(f, cache_dir=tmp_path)
