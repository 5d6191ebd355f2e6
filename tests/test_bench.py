"""The benchmark harness: interleaved medians, errors against opgen's output, ratios, JSON record."""
from __future__ import annotations

import json
import time

import torch

from opgen.bench import Impl, format_results, measure, write_json


def test_measure_reports_medians_errors_and_ratios(tmp_path):
    x = torch.randn(1000)

    def slow():
        time.sleep(0.004)
        return x * 2

    res = measure("toy", "n=1000", [Impl("opgen", lambda: x * 2), Impl("slow", slow), Impl("wrong", lambda: x * 3)],
                  repeats=3, floor_bytes=4000)
    assert res.ms["slow"] >= 4.0 and res.ratio("slow") > 1.0
    assert res.max_err["slow"] == 0.0 and res.max_err["wrong"] > 0.0
    assert res.floor_ms is not None and res.floor_ms > 0
    table = format_results([res])
    assert "slow" in table and "memory floor" in table and "x" in table
    path = tmp_path / "b.json"
    write_json([res], str(path))
    data = json.loads(path.read_text())
    assert data["results"][0]["case"] == "n=1000" and "torch" in data["environment"]


def test_declared_call_overhead_case_measures_the_op_its_kernel_and_torch():
    from opgen.bench.declared import _declarations, call_overhead

    _, ema = _declarations()
    res = call_overhead(ema, repeats=2)
    assert set(res.ms) == {"opgen", "its prepared kernel alone", "torch x.cumsum(1)"}
    assert res.ms["opgen"] > res.ms["its prepared kernel alone"] > 0
    assert "us above the kernel" in res.notes["opgen"]
