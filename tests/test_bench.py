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
