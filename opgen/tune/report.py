"""A tuning report for one study: ``history.png``, ``importances.png`` and ``report.md`` in a folder.

:func:`write_report` reads a study written by :func:`opgen.tune.tuner.tune` and writes:

- ``history.png``: the time of every valid trial (log scale), the best-so-far line, and the rejected
  trials as red crosses along the top (their count is in the legend);
- ``importances.png``: how much each knob matters (Optuna's default evaluator, PED-ANOVA), over the
  distinct configs that ran correctly; skipped, with the reason, below 2 such configs or when they differ
  in no knob;
- ``report.md``: the key, the counts per status, best against default, the top configs, the rejections
  grouped by status (first reason of each) and the images. The tables are padded to aligned columns, so
  the file reads in a terminal as well as rendered.

The plots are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display, the
process's backend left alone); without matplotlib (``pip install 'opgen[report]'``) the plots are skipped
and the markdown is still written. Every file is written to a temporary name in ``out_dir`` and renamed
over the target, so an interrupted report never leaves a half-written file.

Counting: a config is judged by its first finished measurement in the study, as the tuner's repeat cache
does (later trials of the same config, user attr ``dup_of``, are repeats); the best config and its time
are therefore the ones :class:`~opgen.tune.tuner.TuneResult` reports.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from opgen.atomic import atomic_write

from .key import StudyKey

#: Rows in the table of best configs.
TOP = 10
#: Longest reason shown in the rejection table (the rest is cut, with "...").
REASON_CHARS = 100
#: Status order in the tables (others follow, sorted).
STATUS_ORDER = ("ok", "infeasible", "compile_error", "wrong", "crash", "timeout", "abandoned", "fail",
                "running", "waiting", "pruned")

HISTORY = "history.png"
IMPORTANCES = "importances.png"
MARKDOWN = "report.md"


class ReportError(RuntimeError):
    """The report cannot be written: no such study or store, or a study with no finished trial."""


@dataclass
class Report:
    """What :func:`write_report` wrote: ``files`` (paths, ``report.md`` last) and ``skipped`` (file name ->
    why it was not written)."""

    study_name: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def markdown(self) -> Path:
        return self.out_dir / MARKDOWN

    def __str__(self) -> str:
        text = f"report of {self.study_name}: " + ", ".join(str(p) for p in self.files)
        for name, why in self.skipped.items():
            text += f"; {name} skipped: {why}"
        return text


# -- reading the study -------------------------------------------------------------------------------

@dataclass
class _Row:
    """The first finished measurement of one config."""

    number: int
    config: dict[str, Any]
    status: str
    value: float
    reason: str
    source: str
    trial: Any


@dataclass
class _Data:
    name: str
    storage: str
    attrs: dict[str, Any]
    knobs: list[str]
    trials: list[Any]                   # every trial, by number
    first: dict[str, _Row]              # canonical config -> first finished measurement (COMPLETE, no dup_of)
    ok: list[_Row]                      # distinct ok configs, fastest first
    default: _Row | None
    default_config: dict[str, Any] | None

    @property
    def best(self) -> _Row | None:
        return self.ok[0] if self.ok else None


def _status_of(t: Any) -> str:
    from optuna.trial import TrialState

    status = t.user_attrs.get("status")
    if t.state == TrialState.COMPLETE:
        return str(status) if status else "complete"
    if t.state == TrialState.FAIL:
        return str(status) if status else "fail"
    return t.state.name.lower()


def _status_key(status: str) -> tuple[int, str]:
    return (STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER), status)


def _open(storage: Any) -> Any:
    from .store import open_storage

    if storage is None:
        raise ReportError("give a storage: an Optuna storage object, a URL or a journal file "
                          "(opgen.tune.store.open_storage(None, cache_dir=..., key=...) opens the default one)")
    if isinstance(storage, (str, os.PathLike)):
        text = os.fspath(storage)
        try:
            opened = open_storage(text, create=False)
        except ValueError as exc:
            raise ReportError(str(exc)) from None
        if opened is None:
            raise ReportError(f"no tuning store at {text}: the journal file does not exist")
        return opened
    return storage


def _load(storage: Any, study_name: str) -> _Data:
    from optuna.trial import TrialState

    from .encode import canonical
    from .store import describe

    where = describe(storage)
    names = sorted(s.study_name for s in storage.get_all_studies())
    if study_name not in names:
        held = ("it holds these studies:\n  " + "\n  ".join(names)) if names else "it holds no study"
        raise ReportError(f"no study named {study_name!r} in {where}; {held}")
    sid = storage.get_study_id_from_name(study_name)
    attrs = dict(storage.get_study_user_attrs(sid))
    trials = sorted(storage.get_all_trials(sid, deepcopy=False), key=lambda t: t.number)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    if not finished:
        waiting = len(trials)
        raise ReportError(f"study {study_name!r} in {where} has no finished trial yet"
                          + (f" ({waiting} waiting or running)" if waiting else "") + ": tune it first")
    first: dict[str, _Row] = {}
    default_config = None
    for t in trials:
        cfg = t.user_attrs.get("config")
        if default_config is None and t.user_attrs.get("source") == "default" and cfg is not None:
            default_config = dict(cfg)
        if (t.state != TrialState.COMPLETE or cfg is None or t.user_attrs.get("status") is None
                or t.user_attrs.get("dup_of") is not None):
            continue
        first.setdefault(canonical(cfg), _Row(t.number, dict(cfg), str(t.user_attrs["status"]), float(t.value),
                                              str(t.user_attrs.get("reason", "")),
                                              str(t.user_attrs.get("source", "tpe")), t))
    ok = sorted((r for r in first.values() if r.status == "ok" and math.isfinite(r.value)),
                key=lambda r: (r.value, r.number))
    knobs = [k for k, _ in attrs.get("opgen.space", [])]
    for r in first.values():
        knobs += [k for k in r.config if k not in knobs]
    default = first.get(canonical(default_config)) if default_config is not None else None
    return _Data(study_name, where, attrs, knobs, trials, first, ok, default, default_config)


# -- writing files -----------------------------------------------------------------------------------

def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, renamed over it when complete."""
    atomic_write(path, write, mode=0o644)


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas: no pyplot, so neither the global backend nor pyplot's figures change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    _atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _plot_title(data: _Data) -> str:
    key = data.attrs.get("opgen.key")
    if not key:
        return data.name
    dims = " ".join(f"{k}={v}" for k, v in key.get("bucket", []))
    return f"{key.get('op_name', '?')} [{dims}] {'/'.join(key.get('dtypes', []))} on {key.get('target', '?')}"


def _history(data: _Data, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    ok_pts, bad = [], []
    for t in data.trials:
        status = _status_of(t)
        if status == "ok" and t.value is not None and math.isfinite(t.value):
            ok_pts.append((t.number, float(t.value)))
        elif status not in ("running", "waiting"):
            bad.append(t.number)
    fig = _figure(9, 4.8)
    ax = fig.add_subplot()
    if ok_pts:
        xs, ys = zip(*ok_pts)
        ax.scatter(xs, ys, s=22, color="tab:blue", zorder=3, label=f"valid ({len(ok_pts)})")
        best_x, best_y, cur = [], [], math.inf
        for x, y in ok_pts:
            if y < cur:
                cur = y
                best_x.append(x)
                best_y.append(y)
        last = max(t.number for t in data.trials)
        ax.step(best_x + [last], best_y + [best_y[-1]], where="post", color="tab:orange", linewidth=1.8,
                zorder=2, label=f"best so far ({best_y[-1]:.4g} ms)")
        ax.set_yscale("log")
        lo, hi = math.log10(min(ys)), math.log10(max(ys))
        span = max(hi - lo, 0.3)
        ax.set_ylim(10 ** (lo - 0.08 * span), 10 ** (hi + (0.3 if bad else 0.08) * span))   # room for the crosses
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no valid trial", transform=ax.transAxes, ha="center", va="center", color="0.4")
    if bad:
        ax.scatter(bad, [0.96] * len(bad), transform=ax.get_xaxis_transform(), marker="x", color="tab:red",
                   s=30, zorder=3, clip_on=False, label=f"rejected ({len(bad)}, not to scale)")
    numbers = [t.number for t in data.trials]
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("time (ms, log scale)" if ok_pts else "time (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)
    ax.set_title(f"Optimization history: {_plot_title(data)}\n{len(ok_pts)} valid, {len(bad)} rejected",
                 fontsize="medium")
    _save(fig, path)


def _param_label(name: str, knobs: Sequence[str]) -> str:
    return name[5:] if name.startswith("log2_") and name[5:] in knobs else name


def importances(data: _Data) -> tuple[dict[str, float] | None, str]:
    """Knob importances over the distinct ok configs (None and the reason when they cannot be computed)."""
    import optuna
    from optuna.trial import create_trial

    rows = [r for r in data.ok if r.trial.params]
    if len(rows) < 2:
        return None, (f"needs at least 2 distinct valid configs, the study has {len(rows)}")
    varying = sorted({p for r in rows for p in r.trial.params
                      if len({repr(x.trial.params.get(p)) for x in rows}) > 1})
    if not varying:
        return None, "the valid configs differ in no knob"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(direction="minimize")
            for r in rows:
                study.add_trial(create_trial(params=dict(r.trial.params), distributions=dict(r.trial.distributions),
                                             value=r.value))
            imp = optuna.importance.get_param_importances(study, params=varying)
        except Exception as exc:           # an evaluator's own limits: report, do not fail the report
            return None, f"the importance evaluator failed: {type(exc).__name__}: {exc}"
        finally:
            optuna.logging.set_verbosity(verbosity)
    for w in caught:
        if "too small" in str(w.message):
            return None, f"too few valid configs ({len(rows)}) to rank the knobs"
    return {_param_label(k, data.knobs): float(v) for k, v in imp.items()}, ""


def _importance_plot(data: _Data, imp: Mapping[str, float], path: Path) -> None:
    items = sorted(imp.items(), key=lambda kv: kv[1])
    fig = _figure(8, 1.2 + 0.45 * len(items))
    ax = fig.add_subplot()
    bars = ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for _, v in items], padding=3, fontsize="small")
    ax.set_xlim(0, max(1.0, max(imp.values()) * 1.15))
    ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
    ax.set_title(f"Knob importance: {_plot_title(data)}\nover {len(data.ok)} distinct valid configs",
                 fontsize="medium")
    _save(fig, path)


# -- the markdown ------------------------------------------------------------------------------------

def _cell(v: Any) -> str:
    return str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def _short(text: str, n: int = REASON_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Iterable[int] = ()) -> list[str]:
    """A markdown table padded to aligned columns (readable as plain text); ``right``: right-aligned columns."""
    right = set(right)
    head = [_cell(h) for h in headers]
    body = [[_cell(c) for c in r] for r in rows]
    widths = [max([3, len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "| " + " | ".join("-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return [line(head), rule] + [line(r) for r in body]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g} ms"


def _markdown(data: _Data, rep: Report, imp: Mapping[str, float] | None, top: int) -> str:
    out: list[str] = [f"# Tuning report: {data.name}", ""]
    key = data.attrs.get("opgen.key")
    if key:
        try:
            k = StudyKey.from_dict(key)
            dims = " ".join(f"{n}={v}" for n, v in k.bucket) or "scalar"
            out += [f"- op: `{k.op_name}` (fingerprint {k.op_fingerprint[:12]})",
                    f"- shape bucket: {dims}",
                    f"- dtypes: {', '.join(k.dtypes) or '-'}",
                    f"- target: `{k.target}` (fingerprint {k.target_fingerprint[:12]})",
                    f"- generator: g{k.generator} (tuner v{k.tuner}, space {k.space_fingerprint[:12]})"]
        except (KeyError, TypeError, ValueError):
            out += [f"- key: `{key}`"]
    else:
        out += ["- key: not recorded (a study not written by `opgen tune`)"]
    problem = data.attrs.get("opgen.problem")
    if problem:
        out += [f"- problem: `{problem.get('factory', '?')}` {problem.get('kwargs', {})}"]
    out += [f"- store: {data.storage}", ""]

    # counts
    by: dict[str, list[int]] = {}
    for t in data.trials:
        c = by.setdefault(_status_of(t), [0, 0, 0])
        c[0] += 1
        if t.user_attrs.get("dup_of") is not None:
            c[1] += 1
    for r in data.first.values():
        by.setdefault(r.status, [0, 0, 0])[2] += 1
    rows = [[s, c[0], c[2], c[1]] for s, c in sorted(by.items(), key=lambda kv: _status_key(kv[0]))]
    rows.append(["total", len(data.trials), len(data.first), sum(c[1] for c in by.values())])
    out += ["## Trials", "", *table(["status", "trials", "configs", "repeats"], rows, right=(1, 2, 3)), "",
            "A config counts with its first measurement; repeats were answered from it without measuring.", ""]

    # best vs default
    best = data.best
    out += ["## Best against default", ""]
    if best is None:
        out += ["No valid config yet: every measured config was rejected (see below).", ""]
    else:
        out += [f"- best: {_ms(best.value)} (trial {best.number}, {best.source}): `{_config_text(best.config)}`"]
        d = data.default
        if data.default_config is None:
            out += ["- default: not recorded in this study"]
        elif d is None:
            out += [f"- default: not measured yet: `{_config_text(data.default_config)}`"]
        elif d.status != "ok":
            out += [f"- default: {d.status} (trial {d.number}): {_short(d.reason)}"]
        else:
            out += [f"- default: {_ms(d.value)} (trial {d.number}): `{_config_text(d.config)}`",
                    f"- speedup over the default: {d.value / best.value:.2f}x"]
        out += [""]

    # top configs
    shown = data.ok[:top]
    out += [f"## Top {len(shown)} of {len(data.ok)} valid configs" if shown else "## Top valid configs", ""]
    if shown:
        headers = ["rank", "time ms", "vs best", *data.knobs, "trial", "source"]
        rows = [[i + 1, f"{r.value:.4g}", f"{r.value / best.value:.2f}x", *[r.config.get(k, "-") for k in data.knobs],
                 r.number, r.source] for i, r in enumerate(shown)]
        out += table(headers, rows, right=(0, 1, 2, len(headers) - 2)) + [""]
    else:
        out += ["None.", ""]

    # rejections
    groups: dict[str, dict[str, Any]] = {}
    for t in data.trials:
        s = _status_of(t)
        if s in ("ok", "running", "waiting"):
            continue
        g = groups.setdefault(s, {"trials": 0, "configs": set(), "first": t})
        g["trials"] += 1
        cfg = t.user_attrs.get("config")
        g["configs"].add(repr(sorted(cfg.items())) if cfg else f"#{t.number}")
    out += ["## Rejected configs", ""]
    if groups:
        rows = [[s, len(g["configs"]), g["trials"], g["first"].number,
                 _short(g["first"].user_attrs.get("reason", "") or "-")]
                for s, g in sorted(groups.items(), key=lambda kv: _status_key(kv[0]))]
        out += table(["status", "configs", "trials", "first trial", "first reason"], rows, right=(1, 2, 3)) + [""]
        examples = [[s, g["first"].number, _config_text(g["first"].user_attrs.get("config") or {})]
                    for s, g in sorted(groups.items(), key=lambda kv: _status_key(kv[0]))]
        out += ["First rejected config of each status:", "",
                *table(["status", "trial", "config"], examples, right=(1,)), ""]
    else:
        out += ["None.", ""]

    # plots
    out += ["## Plots", ""]
    if HISTORY in rep.skipped:
        out += [f"Optimization history: not drawn ({rep.skipped[HISTORY]}).", ""]
    else:
        out += [f"![optimization history]({HISTORY})", ""]
    if imp is not None:
        rows = [[k, f"{v:.3f}"] for k, v in sorted(imp.items(), key=lambda kv: -kv[1])]
        out += ["Knob importance (PED-ANOVA over the distinct valid configs; rough with few configs):", "",
                *table(["knob", "importance"], rows, right=(1,)), ""]
    if IMPORTANCES in rep.skipped:
        out += [f"Knob importance: not drawn ({rep.skipped[IMPORTANCES]}).", ""]
    else:
        out += [f"![knob importance]({IMPORTANCES})", ""]
    return "\n".join(out)


def _config_text(cfg: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


# -- the entry point ---------------------------------------------------------------------------------

def write_report(storage: Any, study_name: str, out_dir: str | os.PathLike, *, top: int = TOP) -> Report:
    """Write ``history.png``, ``importances.png`` and ``report.md`` for ``study_name`` into ``out_dir``.

    ``storage``: an Optuna storage object (e.g. ``opgen.tune.store.open_storage(None, cache_dir=...,
    key=result.key)``), a storage URL, ``journal:PATH`` or a ``*.journal`` path. ``out_dir`` is created.
    A plot that cannot be drawn is skipped (``Report.skipped`` says why, and an older copy of it in
    ``out_dir`` is removed so the folder never shows a stale plot); the markdown is always written.
    ``top``: rows in the table of best configs.
    Raises :class:`ReportError` for a missing store, an unknown study (the message lists the studies the
    store holds) or a study with no finished trial.
    """
    store = _open(storage)
    data = _load(store, study_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(study_name, out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        mpl = "matplotlib is not installed; pip install 'opgen[report]'"
        rep.skipped[HISTORY] = mpl
        imp, why = importances(data)
        rep.skipped[IMPORTANCES] = mpl if imp is not None else why
    else:
        _history(data, out / HISTORY)
        rep.files.append(out / HISTORY)
        imp, why = importances(data)
        if imp is None:
            rep.skipped[IMPORTANCES] = why
        else:
            _importance_plot(data, imp, out / IMPORTANCES)
            rep.files.append(out / IMPORTANCES)
    for name in rep.skipped:        # a plot left by an earlier report would no longer match this one
        stale = out / name
        if stale.exists():
            stale.unlink()
    text = _markdown(data, rep, imp, top)
    _atomic_write(out / MARKDOWN, lambda f: f.write(text.encode()))
    rep.files.append(out / MARKDOWN)
    return rep
