"""The embedded store: where it lives, storage strings, and recovery from a damaged journal file."""
from __future__ import annotations

import optuna
import pytest

from opgen.tune.key import KeyParts, study_key
from opgen.tune.store import StoreRecoveredWarning, default_store_path, open_storage

KEY = study_key(KeyParts.of("scan", "ab" * 32, {"L": 100}, "float32", "tvm", "t"), "s")


def _study_with_trials(storage, name: str, n: int) -> None:
    s = optuna.create_study(study_name=name, storage=storage)
    for i in range(n):
        s.add_trial(optuna.trial.create_trial(value=float(i)))


def test_default_store_is_one_journal_per_op_under_cache_dir(tmp_path):
    path = default_store_path(tmp_path, KEY)
    assert path.parent == tmp_path / "tune" and path.name == "scan-abababababab.journal"
    assert open_storage(None, cache_dir=tmp_path, key=KEY, create=False) is None and not path.exists()
    st = open_storage(None, cache_dir=tmp_path, key=KEY)
    assert path.exists() and st.get_all_studies() == []


def test_storage_strings(tmp_path):
    j = open_storage(f"journal:{tmp_path / 'a.log'}")
    _study_with_trials(j, "x", 1)
    again = open_storage(f"journal://{tmp_path / 'a.log'}")
    assert [s.study_name for s in again.get_all_studies()] == ["x"]
    assert [s.study_name for s in open_storage(str(tmp_path / "a.log.journal")).get_all_studies()] == []
    rdb = open_storage(f"sqlite:///{tmp_path / 'b.db'}")
    _study_with_trials(rdb, "y", 2)
    assert len(optuna.load_study(study_name="y", storage=rdb).trials) == 2
    mem = optuna.storages.InMemoryStorage()
    assert open_storage(mem) is mem
    with pytest.raises(ValueError, match="unknown storage"):
        open_storage(str(tmp_path / "c.txt"))


def _damage(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.mark.parametrize("garbage", [b"\x00\xffnot json\n{\"op_code\": 5}\n", b"{\"op_code\": 99}\n",
                                     b"{\"op_code\": 0, \"worker_id\": \"w\", \"stu"])
def test_damaged_journal_is_set_aside_and_earlier_studies_are_kept(tmp_path, garbage):
    path = tmp_path / "t.journal"
    st = open_storage(str(path))
    _study_with_trials(st, "kept", 3)
    _damage(path, garbage)
    with pytest.warns(StoreRecoveredWarning, match=r"is damaged .* moved to .*t\.journal\.corrupt-") as rec:
        fresh = open_storage(str(path))
    msg = str(rec[0].message)
    assert "kept, not deleted" in msg and "'kept'" in msg
    aside = list(tmp_path.glob("t.journal.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().endswith(garbage)      # nothing thrown away
    assert len(optuna.load_study(study_name="kept", storage=fresh).trials) == 3
    _study_with_trials(fresh, "new", 1)                                      # and it takes writes again
    reopened = open_storage(str(path))
    assert sorted(s.study_name for s in reopened.get_all_studies()) == ["kept", "new"]


def test_unreadable_from_the_first_byte_gives_an_empty_store(tmp_path):
    path = tmp_path / "t.journal"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.warns(StoreRecoveredWarning, match="no complete study"):
        st = open_storage(str(path))
    assert st.get_all_studies() == [] and len(list(tmp_path.glob("t.journal.corrupt-*"))) == 1


@pytest.mark.parametrize("victim", ["create_trial", "user_attr"])
def test_one_damaged_byte_early_loses_only_that_entry(tmp_path, victim):
    """A damaged line early in the log used to drop every later entry (every later study of the op): the lines after
    it that parse are kept; a damaged trial creation becomes a FAIL placeholder so later entries keep their trial."""
    import random

    path = tmp_path / "t.journal"
    st = open_storage(str(path))
    a = optuna.create_study(study_name="a", storage=st)
    values = [random.random() for _ in range(5)]
    for v in values[:3]:
        t = a.ask()
        t.set_user_attr("config", {"block": 16})
        a.tell(t, v)
    _study_with_trials(st, "later", 2)
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    want = {"create_trial": b'"op_code":4', "user_attr": b'"op_code":8'}[victim]
    n = [i for i, line in enumerate(lines) if want in line][1]              # the second such entry: trial 1's
    damaged = bytearray(original)
    damaged[sum(map(len, lines[:n])) + random.randrange(26, 50)] = ord("\x07")        # inside the worker id
    path.write_bytes(bytes(damaged))
    with pytest.warns(StoreRecoveredWarning, match=rf"line {n + 1} .*unreadable") as rec:
        fresh = open_storage(str(path))
    assert "kept, not deleted" in str(rec[0].message)
    aside = list(tmp_path.glob("t.journal.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(damaged)     # the original, byte for byte
    later = optuna.load_study(study_name="later", storage=fresh).get_trials(deepcopy=False)
    assert [t.value for t in later] == [0.0, 1.0]
    ts = optuna.load_study(study_name="a", storage=fresh).get_trials(deepcopy=False)
    assert [t.number for t in ts] == [0, 1, 2]
    assert ts[0].value == values[0] and ts[2].value == values[2]
    if victim == "create_trial":
        assert ts[1].state == optuna.trial.TrialState.FAIL and ts[1].user_attrs["status"] == "damaged"
    else:
        assert ts[1].value == values[1] and "config" not in ts[1].user_attrs
    _study_with_trials(fresh, "new", 1)                                       # and it takes writes again
    assert "new" in [s.study_name for s in open_storage(str(path)).get_all_studies()]
