"""opgen.tune: the autotuner (Optuna TPE over a schedule :class:`~opgen.schedules.space.Space`).

One job per module:

- :mod:`~opgen.tune.key`     the study key (op, shape bucket, dtypes, target, generator, space) and its name
- :mod:`~opgen.tune.problem` what is tuned: a picklable :class:`ProblemSpec` and the :class:`Problem` protocol
- :mod:`~opgen.tune.encode`  knobs <-> Optuna params (powers of two as log2 ints)
- :mod:`~opgen.tune.store`   the embedded journal store under ``<cache_dir>/tune/`` or a storage URL
  (:mod:`~opgen.tune.procs`: which process owns a trial or a lock; :mod:`~opgen.tune.journal`: the lock and storage)
- :mod:`~opgen.tune.measure` build, check and time one config in a child process with a timeout
- :mod:`~opgen.tune.tuner`   :func:`tune`: the study loop, warm start, repeat cache, budgets, progress bar
- :mod:`~opgen.tune.lookup`  :func:`best_config` for call-time lookup (cached, never creates a study)
- :mod:`~opgen.tune.call_config` an op's study key and knob space on a target, and its tuned config at call time
- :mod:`~opgen.tune.records` pinned records: export best configs to versioned JSON, import them (data only;
  the file format and the pinned file's cache are :mod:`~opgen.tune.records_file`)
- :mod:`~opgen.tune.report`  :func:`write_report`: history and importance PNGs plus a markdown table of a study
- :mod:`~opgen.tune.declared` :func:`tune_op`: tune an op a user declared (``op.tune(...)``, ``opgen tune mod:fn``)
- :mod:`~opgen.tune.testing` a pure-torch problem with planted failures, for tests and demos

``import opgen.tune`` is light: optuna and torch load when a submodule that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import Any

from .key import GENERATOR_VERSION, KeyParts, StudyKey, bucket_dim, study_key

_LAZY = {
    "ProblemSpec": "problem", "Problem": "problem",
    "Measurer": "measure", "MeasureOptions": "measure", "Result": "measure", "Status": "measure",
    "tune": "tuner", "TuneResult": "tuner", "TuneError": "tuner", "problem_key": "tuner",
    "best_config": "lookup", "clear_cache": "lookup", "tune_op": "declared",
    "Record": "records", "RecordsError": "records", "RecordsWarning": "records", "export_records": "records",
    "import_records": "records", "read_records": "records", "write_records": "records",
    "pinned_config": "records", "pinned_path": "records",
    "open_storage": "store", "default_store_path": "store", "StoreRecoveredWarning": "store",
    "write_report": "report", "Report": "report", "ReportError": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"opgen.tune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'opgen.tune' has no attribute {name!r}")


__all__ = ["GENERATOR_VERSION", "KeyParts", "StudyKey", "bucket_dim", "study_key", *_LAZY]
