"""Tuning a library scan on the TVM backend end to end, then the call-time lookup of the best config."""
from __future__ import annotations

import pytest
import torch

from opgen.cli import main

pytest.importorskip("tvm")


def test_tune_cli_then_lookup(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPGEN_CACHE_DIR", str(tmp_path))
    rc = main(["tune", "linear_scan", "--shape", "C=24,L=37", "--trials", "4", "--no-progress", "--timeout", "120",
               "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "linear_scan" in out and "vs torch" in out and "best" in out
    assert (tmp_path / "report" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "linear_scan" in md and "history.png" in md

    from opgen.config import Config
    from opgen.ops.scan import declare_linear_scan
    from opgen.runtime import make_session
    from opgen.tune.library import LibraryProblem

    problem = LibraryProblem("linear_scan", {"C": 24, "L": 37}, "tvm", cache_dir=str(tmp_path))
    session = make_session(Config(cache_dir=tmp_path))
    target = session.targets.get("tvm")
    cfg = session.tuned_config(declare_linear_scan(), problem.binding, target)
    assert cfg is not None and problem.space().infeasible(cfg.to_json()) is None
    # an untuned shape has no config: the default is used
    other = LibraryProblem("linear_scan", {"C": 3000, "L": 5}, "tvm", cache_dir=str(tmp_path))
    assert session.tuned_config(declare_linear_scan(), other.binding, target) is None
    a, b = problem.inputs["a"].reshape(24, 37), problem.inputs["b"].reshape(24, 37)
    h = session.run(declare_linear_scan(), {"a": a[:, :, None], "b": b[:, :, None]})["h"]
    ref = problem.reference()["h"]
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


def test_bad_shape_is_reported(capsys):
    assert main(["tune", "selective_scan", "--shape", "B=2,D=8"]) == 2
    assert "needs B, D, N, L" in capsys.readouterr().err
    assert main(["tune", "conv2d", "--shape", "N=1"]) == 2
    assert "needs N, C, F, H, W, K" in capsys.readouterr().err
    assert main(["tune", "conv2d", "--shape", "N=1,C=4,F=4,H=5,W=5,K=3,P=1"]) == 2
    assert "unknown --shape dims ['P']" in capsys.readouterr().err
    assert main(["tune", "conv3d", "--shape", "N=1"]) == 2
    assert "no tuning problem 'conv3d'; tunable: linear_scan" in capsys.readouterr().err


def test_tune_a_dense_conv2d_then_the_op_uses_it(tmp_path, monkeypatch, capsys):
    """A strided dense conv2d (opgen.ops.conv2d(x, w, stride=S, padding=K // 2)) tunes over the TVM window
    kernels; the op call then runs the stored best config and matches F.conv2d."""
    import torch.nn.functional as F

    from opgen.config import Config
    from opgen.runtime import make_session
    from opgen.tune.library import LibraryProblem

    monkeypatch.setenv("OPGEN_CACHE_DIR", str(tmp_path))
    shape = {"N": 1, "C": 8, "F": 12, "H": 9, "W": 11, "K": 3, "S": 2}
    rc = main(["tune", "conv2d", "--shape", ",".join(f"{k}={v}" for k, v in shape.items()), "--measured", "2",
               "--no-progress", "--timeout", "120"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "F.conv2d (oneDNN)" in out and "vs torch" in out
    problem = LibraryProblem("conv2d", shape, "tvm", cache_dir=str(tmp_path))
    session = make_session(Config(cache_dir=tmp_path))
    cfg = session.tuned_config(problem.op, problem.binding, session.targets.get("tvm"))
    assert cfg is not None and problem.space().infeasible(cfg.to_json()) is None
    x, w = problem.inputs["x"], problem.inputs["weight"]
    y = session.run(problem.op, {"x": x, "weight": w})["out"]
    ref = F.conv2d(x.double(), w.double(), stride=2, padding=1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_attention_problem_space_checks_and_call_time_lookup(tmp_path):
    """The attention kernel's knobs form a tuning space with constraints; configs build and match the reference;
    nothing is looked up before anything was tuned."""
    pytest.importorskip("tvm")
    from opgen.targets.tvm.attention import AttentionConfig
    from opgen.tune.library import LibraryProblem, lookup_config

    problem = LibraryProblem("attention", {"B": 1, "H": 2, "L": 45, "D": 16}, "tvm", cache_dir=str(tmp_path))
    space = problem.space()
    assert {"block_m", "block_n", "qk_rows", "pv_rows"} <= {k.name for k in space.knobs}
    assert space.infeasible(space.default) is None
    bad = dict(space.default, block_m=space.default["vector"] * 2 + 1)
    assert space.infeasible(bad) is not None, "a block_m that is not a multiple of the vector must be rejected"
    out = problem.build(dict(space.default, block_m=16, block_n=16))()
    torch.testing.assert_close(out["out"], problem.reference()["out"], rtol=2e-5, atol=2e-5)
    assert lookup_config(problem.op, problem.binding, problem.target, cache_dir=str(tmp_path)) is None
    assert isinstance(problem._to_config(space.default), AttentionConfig)


@pytest.mark.parametrize("groups,k", [(1, 3), (8, 7)], ids=["dense3x3", "depthwise7x7"])
def test_triton_window_space_lists_feasible_configs_default_first(groups, k):
    """The Triton window kernels' tuning space (built without a GPU): the default first, every listed config
    passes the kernel's own check, the converter gives the dict the target runs, and both variants appear for a
    dense conv (gemm and direct)."""
    import json

    from opgen.ops.conv import conv2d_inputs, conv2d_op_for
    from opgen.runtime import default_session
    from opgen.targets.triton import TritonTarget
    from opgen.targets.triton.window import check, default_config, window_group
    from opgen.tune.library import _space

    x, w = torch.randn(1, 8, 13, 11), torch.randn(8, 8 // groups, k, k)
    op = conv2d_op_for(x, w, None, (1, 1), (k // 2,) * 4, (1, 1), groups)
    ww = conv2d_inputs(op, {"x": x, "weight": w, "bias": None}, {"groups": groups})["weight"]
    b = default_session().binding(op, {"x": tuple(x.shape), "weight": tuple(ww.shape)}, {}, "test")
    space, convert = _space(TritonTarget(), op, b)
    choices = space.knobs[0].choices
    group = window_group(op)
    assert json.loads(choices[0]) == default_config(group, b).to_dict() == convert(space.default)
    assert len(choices) == len(set(choices)) > 10
    assert all(check(group, convert({"config": c}), b) is None for c in choices)
    variants = {json.loads(c)["variant"] for c in choices}
    assert "direct" in variants and variants <= {"direct", "gemm", "im2win"}  # no fft for 2-D windows
    assert "gemm" in variants or groups > 1


def test_measured_budget_is_for_in_process_tuning(capsys):
    assert main(["tune", "linear_scan", "--shape", "C=8,L=16", "--measured", "3", "--workers", "2"]) == 2
    assert "--measured budgets in-process tuning" in capsys.readouterr().err


def test_a_1d_window_space_has_no_shape_impossible_rows_tile():
    """``rows_tile`` > 1 is infeasible for every 1-D window: the tuner's space no longer offers it."""
    import random

    from opgen.ir import bind
    from opgen.targets.tvm import TVMTarget
    from opgen.tune.library import _inputs, _space

    dims = {"B": 1, "D": random.choice([8, 16]), "L": random.choice([64, 100]), "W": 4}
    op, inputs = _inputs("causal_conv1d", dims, torch.float32, torch.Generator().manual_seed(0))
    space, _ = _space(TVMTarget(), op, bind(op, {k: tuple(v.shape) for k, v in inputs.items()}))
    knobs = {k.name: k.choices for k in space.knobs}
    assert knobs["rows_tile"] == (1,) and space.default["rows_tile"] == 1 and space.infeasible(space.default) is None


def test_a_stored_config_outside_the_knob_space_is_never_used(tmp_path, monkeypatch):
    """Stored data is input: a config that does not fit the knob space (tampered store, older space) warns once and
    the call runs with the default config (a float 16.0 for an int knob made every call fail before issue 14)."""
    pytest.importorskip("tvm")
    import warnings

    from opgen.ir.errors import FallbackWarning
    from opgen.tune.library import LibraryProblem, lookup_config

    problem = LibraryProblem("linear_scan", {"C": 3, "L": 37}, "tvm", cache_dir=str(tmp_path))
    space = problem.space()
    knob = next(k for k in space.knobs if all(type(c) is int for c in k.choices))
    for bad in (dict(space.default, **{knob.name: float(knob.choices[0])}),
                dict(space.default, **{knob.name: max(knob.choices) + 1}), {"unknown": 1}):
        monkeypatch.setattr("opgen.tune.lookup.best_config", lambda *a, _bad=bad, **k: dict(_bad))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert lookup_config(problem.op, problem.binding, problem.target, cache_dir=str(tmp_path)) is None
        msgs = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
        assert len(msgs) == 1 and "does not fit its knob space" in msgs[0] and "default config" in msgs[0], msgs


@pytest.mark.parametrize("q_len,kv_len,kind", [(100, 100, "forward"), (1, 300, "decode")])
def test_triton_attention_space_is_the_kernels_own(q_len, kv_len, kind):
    """The Triton attention kernels' tuning space (built without a GPU; it was the scan space, an AttributeError):
    the kernel's knobs for the path the target runs at that shape (decode: key splits), its default first and
    feasible, every knob choice listed, and the converter gives the dict the target runs."""
    from opgen.ops.attention_ir import declare_attention
    from opgen.runtime import default_session
    from opgen.targets.triton import TritonTarget
    from opgen.targets.triton.attention_call import attention_group, default_config
    from opgen.tune.library import _space

    op = declare_attention()
    shapes = {"q": (1, 2, q_len, 32), "k": (1, 2, kv_len, 32), "v": (1, 2, kv_len, 32)}
    b = default_session().binding(op, shapes, {}, "test")
    target = TritonTarget()
    space, convert = _space(target, op, b)
    assert space.name == f"triton/attention/{kind}"
    assert convert(space.default) == default_config(attention_group(op), b, target.caps())
    assert space.infeasible(space.default) is None
    knobs = {k.name: k.choices for k in space.knobs}
    assert set(knobs) == {"block_m", "block_n", "num_warps", "num_stages", "splits", "dot_precision"}
    assert (max(knobs["splits"]) > 1) == (kind == "decode")
