"""``python -m opgen.gpucheck`` (issue 20): the prepared GPU check.

* ``--interpret --quick`` end to end in a subprocess (Triton's CPU interpreter at tiny sizes): both report files
  exist, every case has a status, none is wrong or crashed, and every skipped case says why (no GPU for timing
  and tuning, or a documented interpreter gap with its measured error).
* Without CUDA and without ``--interpret`` the command exits 2 with one line.
* ``@pytest.mark.gpu``: the full check on a GPU (skipped without CUDA).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from opgen.gpucheck.cases import BF16_DOT_GAP
from opgen.gpucheck.report import STATUSES


def _run(args: list[str], timeout: float, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)       # --interpret must set it itself
    return subprocess.run([sys.executable, "-m", "opgen.gpucheck", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _load(out) -> dict:
    assert (out / "gpucheck.md").is_file() and (out / "gpucheck.json").is_file()
    return json.loads((out / "gpucheck.json").read_text())


def test_interpret_quick_end_to_end(tmp_path):
    r = _run(["--out", str(tmp_path), "--quick", "--interpret"], timeout=300, interpret=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    data = _load(tmp_path)
    assert data["mode"] == "interpret" and data["quick"] is True
    results = data["results"]
    sections = {x["section"] for x in results}
    assert sections == {"correctness", "timing", "tuning"}
    families = {x["metrics"]["family"] for x in results if x["section"] == "correctness"}
    assert families == {"scan", "attention", "window", "backward"}
    for x in results:
        assert x["status"] in STATUSES, x
        assert x["status"] not in ("wrong", "crashed"), x
        if x["status"] == "skipped":
            assert x["message"].startswith(BF16_DOT_GAP) or x["message"] == "no GPU (interpreter run)", x
            if x["section"] == "correctness":
                assert "measured:" in x["message"] and x["metrics"]["dtype"] == "bf16", x
    ran = [x for x in results if x["section"] == "correctness" and x["status"] == "ok"]
    assert len(ran) >= 15
    for variant in ("sequential", "chunked-matmul", "direct", "gemm", "im2win", "fft", "decode", "backward"):
        assert any(variant in x["name"] for x in ran), variant
    md = (tmp_path / "gpucheck.md").read_text()
    assert "## correctness" in md and "## timing" in md and "| status |" in md


def test_cli_has_the_subcommand():
    from opgen.cli import build_parser

    args = build_parser().parse_args(["gpucheck", "--out", "x", "--quick", "--interpret"])
    assert args.command == "gpucheck" and args.quick and args.interpret and args.out == "x"


def test_without_cuda_exits_2_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    r = _run(["--out", str(tmp_path)], timeout=120, interpret=False)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1 and "no CUDA device" in lines[0], r.stderr
    assert not (tmp_path / "gpucheck.json").exists()


def test_estimate_fits_the_gpu_budget():
    from opgen.gpucheck import BUDGET_S, estimate_gpu_seconds

    assert estimate_gpu_seconds(True) < estimate_gpu_seconds(False) <= 8 * 60
    assert BUDGET_S[False] < 8 * 60 and BUDGET_S[True] < 4 * 60


@pytest.mark.gpu
def test_full_check_on_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    r = _run(["--out", str(tmp_path)], timeout=900, interpret=False)
    data = _load(tmp_path)
    bad = [x for x in data["results"] if x["status"] in ("wrong", "crashed")]
    assert r.returncode == (1 if bad else 0)
    assert not bad, json.dumps(bad, indent=1)[:6000]
    assert data["peaks"].get("device")
