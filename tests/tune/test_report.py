"""The tuning report: PNG plots and a markdown table of one study (opgen.tune.report)."""
from __future__ import annotations

import math
import os
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import create_trial

pytest.importorskip("matplotlib")

from opgen.tune.encode import canonical  # noqa: E402
from opgen.tune.report import ReportError, write_report  # noqa: E402
from opgen.tune.store import open_storage  # noqa: E402
from opgen.tune.testing import CumsumProblem  # noqa: E402
from opgen.tune.tuner import tune  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WRONG = {"algo": "blocked", "block": 64, "fault": "wrong"}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, measurer):
    """One real tuning run with planted failures (a wrong config among them), shared by this module."""
    cache = tmp_path_factory.mktemp("cache")
    p = CumsumProblem(faults=True)
    r = tune(p, trials=10, cache_dir=cache, seed=0, progress=False, measurer=measurer, warm_start=[WRONG])
    return r, open_storage(None, cache_dir=cache, key=r.key)


def _section(text: str, title: str) -> list[str]:
    """The lines of the markdown section whose heading starts with ``title``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("## " + title))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def _tables(lines: list[str]) -> list[list[list[str]]]:
    """Each markdown table in ``lines`` as rows of stripped cells (header first, rule left out)."""
    tables, cur = [], None
    for ln in lines + [""]:
        if ln.startswith("|"):
            cur = cur if cur is not None else []
            cur.append(ln)
        elif cur is not None:
            tables.append([[c.strip() for c in r.strip("|").split(" | ")] for i, r in enumerate(cur) if i != 1])
            cur = None
    return tables


def _check_png(path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _distinct_ok(study):
    first = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.user_attrs.get("dup_of") is None and "config" in t.user_attrs and "status" in t.user_attrs:
            first.setdefault(canonical(t.user_attrs["config"]), t)
    return sorted((t for t in first.values() if t.user_attrs["status"] == "ok"), key=lambda t: (t.value, t.number))


def test_report_of_a_tuning_run_with_failures(tuned, tmp_path):
    r, store = tuned
    before = "matplotlib.pyplot" in sys.modules
    rep = write_report(store, r.study_name, tmp_path / "rep")
    out = tmp_path / "rep"
    assert [p.name for p in rep.files] == ["history.png", "importances.png", "report.md"] and not rep.skipped
    assert sorted(os.listdir(out)) == ["history.png", "importances.png", "report.md"]    # no temp files left
    _check_png(out / "history.png")
    _check_png(out / "importances.png")
    assert ("matplotlib.pyplot" in sys.modules) == before     # drawn without pyplot (no global figure state)

    text = (out / "report.md").read_text()
    assert text.startswith(f"# Tuning report: {r.study_name}\n")
    assert f"best {r.best_time_ms:.4g} ms" in r.summary()
    assert f"- best: {r.best_time_ms:.4g} ms" in text
    assert f"- default: {r.default_time_ms:.4g} ms" in text and f"{r.speedup:.2f}x" in text
    for line in ("- op: `test_cumsum`", "- shape bucket: R=64 L=4096", "- dtypes: float32",
                 "- target: `torch-cpu`", "- generator: g1"):
        assert line in text
    assert "![optimization history](history.png)" in text and "![knob importance](importances.png)" in text

    # counts per status match this run (a fresh study: the run's counts are the study's)
    counts = {row[0]: int(row[1]) for row in _tables(_section(text, "Trials"))[0][1:]}
    assert counts.pop("total") == r.trials == 10
    assert counts == r.by_status

    # one row per distinct ok config, fastest first, at most 10
    study = optuna.load_study(study_name=r.study_name, storage=store)
    ok = _distinct_ok(study)
    assert len(ok) >= 2
    (top,) = _tables(_section(text, "Top"))
    header, rows = top[0], top[1:]
    assert header == ["rank", "time ms", "vs best", "algo", "block", "fault", "trial", "source"]
    assert len(rows) == min(10, len(ok))
    for i, (row, t) in enumerate(zip(rows, ok)):
        cfg = t.user_attrs["config"]
        assert row[0] == str(i + 1) and row[1] == f"{t.value:.4g}" and row[6] == str(t.number)
        assert row[3:6] == [str(cfg["algo"]), str(cfg["block"]), str(cfg["fault"])]
    assert rows[0][1] == f"{r.best_time_ms:.4g}" and rows[0][2] == "1.00x"

    # the planted wrong config is listed with its reason
    wrong = next(t for t in study.trials if t.user_attrs.get("config") == WRONG)
    assert wrong.user_attrs["status"] == "wrong"
    rejected = _tables(_section(text, "Rejected"))[0]
    row = next(row for row in rejected[1:] if row[0] == "wrong")
    assert row[3] == str(wrong.number)
    assert row[4].replace("\\|", "|").removesuffix("...") in wrong.user_attrs["reason"]
    assert row[4].startswith("wrong result: max err")
    assert "ok" not in [row[0] for row in rejected[1:]]

    # readable as plain text: every table's lines are aligned
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        assert len({len(ln) for ln in lines}) <= 1, block


def test_unknown_study_lists_the_known_ones(tuned, tmp_path):
    r, store = tuned
    with pytest.raises(ReportError) as e:
        write_report(store, "opgen/no/such/study", tmp_path / "rep")
    assert "opgen/no/such/study" in str(e.value) and r.study_name in str(e.value)
    assert not (tmp_path / "rep").exists()
    with pytest.raises(ReportError, match="does not exist"):
        write_report(str(tmp_path / "missing.journal"), r.study_name, tmp_path / "rep")
    assert not (tmp_path / "missing.journal").exists()


DISTS = {"algo": CategoricalDistribution(("blocked", "torch", "loop")), "log2_block": IntDistribution(4, 10)}


def _handmade(tmp_path, name, trials):
    """A study shaped like the tuner's: ``trials`` are (config, status, time or None, extra user attrs)."""
    storage = open_storage(str(tmp_path / "hand.journal"))
    study = optuna.create_study(study_name=name, storage=storage)
    study.set_user_attr("opgen.space", [["algo", ["blocked", "torch", "loop"]], ["block", [16, 1024]]])
    for cfg, status, ms, extra in trials:
        attrs = {"config": cfg, "status": status, **extra}
        if status == "ok":
            attrs["time_ms"] = ms
        else:
            attrs["reason"] = f"planted {status}"
        study.add_trial(create_trial(
            params={"algo": cfg["algo"], "log2_block": cfg["block"].bit_length() - 1}, distributions=DISTS,
            value=ms if status == "ok" else math.inf, user_attrs=attrs,
            system_attrs={"constraints:invalid": 0.0 if status == "ok" else 1.0}))
    return storage


def test_a_single_ok_config_skips_importances_with_a_reason(tmp_path):
    a, b = {"algo": "torch", "block": 64}, {"algo": "loop", "block": 16}
    storage = _handmade(tmp_path, "one-ok", [(a, "ok", 2.0, {"source": "default"}),
                                             (a, "ok", 2.0, {"dup_of": 0}),     # a repeat, not a second config
                                             (b, "infeasible", None, {})])
    rep = write_report(storage, "one-ok", tmp_path / "rep")
    assert "importances.png" in rep.skipped and "2 distinct valid configs" in rep.skipped["importances.png"]
    assert "has 1" in rep.skipped["importances.png"]
    assert not (tmp_path / "rep" / "importances.png").exists()
    _check_png(tmp_path / "rep" / "history.png")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Knob importance: not drawn (needs at least 2 distinct valid configs" in text
    assert "importances.png)" not in text
    assert len(_tables(_section(text, "Top"))[0]) == 2          # header + the one config
    assert "infeasible" in text and "planted infeasible" in text


def test_top_table_is_capped_and_ranked(tmp_path):
    configs = [{"algo": algo, "block": 1 << e} for algo in ("blocked", "torch") for e in range(4, 11)]
    trials = [(c, "ok", 1.0 + i * 0.5, {}) for i, c in enumerate(configs)]     # 14 distinct ok configs
    storage = _handmade(tmp_path, "many", trials)
    rep = write_report(storage, "many", tmp_path / "rep", top=10)
    assert not rep.skipped
    _check_png(tmp_path / "rep" / "importances.png")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Top 10 of 14 valid configs" in text
    rows = _tables(_section(text, "Top"))[0][1:]
    assert [row[0] for row in rows] == [str(i) for i in range(1, 11)]
    assert [row[1] for row in rows] == [f"{1.0 + i * 0.5:.4g}" for i in range(10)]
    assert rows[-1][2] == "5.50x"
    assert "## Rejected configs\n\nNone." in text


def test_empty_study_and_interrupted_write(tmp_path, monkeypatch):
    storage = open_storage(str(tmp_path / "hand.journal"))
    optuna.create_study(study_name="empty", storage=storage)
    with pytest.raises(ReportError, match="no finished trial"):
        write_report(storage, "empty", tmp_path / "rep")

    storage = _handmade(tmp_path, "two", [({"algo": "torch", "block": 64}, "ok", 1.0, {}),
                                          ({"algo": "loop", "block": 16}, "ok", 3.0, {})])
    write_report(storage, "two", tmp_path / "rep")
    old = (tmp_path / "rep" / "history.png").read_bytes()

    from matplotlib.figure import Figure

    def torn(self, f, **kw):
        f.write(PNG_MAGIC + b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        write_report(storage, "two", tmp_path / "rep")
    assert (tmp_path / "rep" / "history.png").read_bytes() == old       # the complete earlier file is kept
    assert sorted(os.listdir(tmp_path / "rep")) == ["history.png", "importances.png", "report.md"]
