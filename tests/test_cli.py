"""The command line: show every op at each stage, and a one-op demo whose table reports a small error."""
from __future__ import annotations

import re

import pytest

from opgen.cli import main
from opgen.library import LIBRARY


@pytest.mark.parametrize("stage", ["ir", "verified"])
@pytest.mark.parametrize("name", [e.name for e in LIBRARY])
def test_show(name, stage, capsys):
    assert main(["show", name, "--stage", stage]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"op {name}(")
    assert ("fingerprint" in out) == (stage == "verified")


def test_show_unknown_op(capsys):
    assert main(["show", "nope"]) == 2
    assert "no library op 'nope'" in capsys.readouterr().err


def test_demo_one_op(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OPGEN_CACHE_DIR", str(tmp_path))          # the demo tunes: keep it out of the user's cache
    assert main(["demo", "--op", "causal_conv1d", "--repeats", "1", "--no-progress", "--trials", "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("causal_conv1d"))
    err = float(re.findall(r"\d\.\de[+-]\d\d", row)[-1])
    assert err < 1e-4
    assert "variant=" in row                        # the window space was tuned first (2 trials)


@pytest.mark.parametrize("name,marker", [("long_conv", "tvm variants: direct, gemm, fft"),
                                         ("conv2d", "no fft: the FFT variant takes 1-D windows")])
def test_show_plan_and_source_of_convolutions(name, marker, capsys):
    pytest.importorskip("tvm")
    assert main(["show", name, "--stage", "plan"]) == 0
    out = capsys.readouterr().out
    assert marker in out and "tvm default config" in out
    assert main(["show", name, "--stage", "tvm"]) == 0
    assert "@T.prim_func" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["fused", "plan", "tvm", "triton"])
@pytest.mark.parametrize("name", ["linear_scan", "selective_scan", "chunk_gla"])
def test_show_lowered_stages_of_scans(name, stage, capsys):
    pytest.importorskip("tvm")
    assert main(["show", name, "--stage", stage]) == 0
    out = capsys.readouterr().out
    marker = {"fused": "scan group", "plan": "tvm default config", "tvm": "@T.prim_func", "triton": "@triton.jit"}
    assert marker[stage] in out


def test_show_triton_stage_of_a_convolution(capsys):
    assert main(["show", "conv2d", "--stage", "triton"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# triton module of depthwise_conv2d") and "@triton.jit" in out and "tl.load(" in out
    assert "make_block_ptr" not in out
    assert main(["show", "conv2d", "--stage", "plan"]) == 0
    assert "triton default config" in capsys.readouterr().out


def test_show_attention_plan_prints_tile_classes(capsys):
    assert main(["show", "attention", "--stage", "plan"]) == 0
    out = capsys.readouterr().out
    # the library example's mask is a causal 256-key sliding window: at L=4096 with 64 x 64 tiles each query
    # tile visits at most 5 key tiles (4 full + 1 partial diagonal, plus a partial far edge)
    assert "full 186, partial 124, empty 3786" in out
    assert "key-tile loop bounds for query tile t: [Max(0, t - 4), t + 1)" in out
    for label in ("causal", "neighborhood_2d 64x64 kernel 7", "swin_window 64x64 window 8 shift 4"):
        assert label in out
    assert main(["show", "conv2d", "--stage", "fused"]) == 0
    assert "window group" in capsys.readouterr().out
