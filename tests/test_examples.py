"""Every script in examples/ runs to completion (each checks its own results against torch).

The scripts run one after another in **one** fresh interpreter (``runpy`` with ``__name__ == "__main__"``, their
own working directory, captured output and arguments (``ARGS``: small sizes, few tuning trials), and
``torch._dynamo.reset()`` between them): importing torch and TVM costs ~8 s per process on the CI machine, which
one process per script paid nine times. A script that fails (an exception or a non-zero ``SystemExit``) fails its
own test, with its output and traceback.

The scripts are split into two halves, each an ``xdist_group``: with ``pytest -n 2 --dist loadgroup`` the halves run
in two interpreters on the two workers at once (each worker runs only the half its tests belong to).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
#: command-line arguments per script (default: none), to keep the suite's time down
ARGS = {
    "gated_rnn.py": ["--trials", "2", "--C", "32", "--L", "128"],
    "declared_rnns.py": ["--L", "32", "--steps", "6"],
}

DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
scripts, out_dir = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for script, args in scripts:
    work = os.path.join(out_dir, os.path.basename(script) + ".d")
    os.makedirs(work, exist_ok=True)
    old_cwd, old_argv, old_path = os.getcwd(), sys.argv, list(sys.path)
    buf = io.StringIO()
    rc = 0
    try:
        os.chdir(work)
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(script))
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(old_cwd)
        sys.argv, sys.path[:] = old_argv, old_path
        try:
            import torch._dynamo
            torch._dynamo.reset()
        except Exception:
            pass
    results[os.path.basename(script)] = {"rc": rc, "out": buf.getvalue()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)
"""


HALVES = 2


def _half(script: Path) -> int:
    return EXAMPLES.index(script) % HALVES


@pytest.fixture(scope="module")
def example_results(tmp_path_factory):
    """``results(half)``: the driver's results for one half of the scripts, run on first use (once per worker)."""
    done: dict[int, dict] = {}

    def results(half: int) -> dict:
        if half not in done:
            scripts = [(str(p), ARGS.get(p.name, [])) for p in EXAMPLES if _half(p) == half]
            out = tmp_path_factory.mktemp(f"examples{half}")
            proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(scripts), str(out)],
                                  capture_output=True, text=True, timeout=1500)
            path = out / "results.json"
            res = json.loads(path.read_text()) if path.exists() else {}
            res["__driver__"] = {"rc": proc.returncode, "out": proc.stdout[-3000:] + proc.stderr[-3000:]}
            done[half] = res
        return done[half]

    return results


@pytest.mark.parametrize("script", [pytest.param(p, id=p.name, marks=pytest.mark.xdist_group(f"examples{_half(p)}"))
                                    for p in EXAMPLES])
def test_example_runs(script, example_results):
    results = example_results(_half(script))
    res = results.get(script.name)
    assert res is not None, "the examples' interpreter ended before this script ran: " + results["__driver__"]["out"]
    assert res["rc"] == 0, res["out"][-4000:]
    assert "max" in res["out"]  # each example prints the errors it checked
