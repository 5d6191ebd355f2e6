"""``opgen bench training``: the torch formulations the blocks are measured against compute what they claim, the
suite verifies opgen against them (outputs and every gradient) before timing, and a case opgen cannot run, or runs
wrong, is reported as such instead of crashing the suite."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from opgen.bench import protocol, training
from opgen.bench.baselines import ss_loop_plain
from opgen.bench.blocks import Mamba2Block, SwinBlock, ssd_chunked
from opgen.bench.training import (KINK_TOL, TOL, Pair, TrainingResult, format_training, gla_chunked, run_pair,
                                  ss_loop_unbind)


@pytest.fixture
def fast(monkeypatch):
    """No warm-up beyond one call (the protocol's 0.3 s per implementation is for real measurements)."""
    monkeypatch.setattr(protocol, "WARMUP_S", 0.0)
    monkeypatch.setattr(protocol, "WARMUP_CALLS", (1, 1))


# ------------------------------------------------------------------------------ the torch formulations themselves


def _gla_recurrence(q, k, v, g, scale):
    b, t, h, kd = q.shape
    s, out = q.new_zeros(b, h, kd, v.shape[-1]), []
    for i in range(t):
        s = s * g[:, i].exp()[..., None] + k[:, i, :, :, None] * v[:, i, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, s))
    return torch.stack(out, 1)


def test_chunked_torch_formulations_equal_their_recurrences():
    torch.manual_seed(0)
    b, t, h, k, p = 2, 48, 3, 5, 4
    q, kk, v = torch.randn(b, t, h, k, dtype=torch.float64), torch.randn(b, t, h, k, dtype=torch.float64), \
        torch.randn(b, t, h, p, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(b, t, h, k, dtype=torch.float64)) / 4
    torch.testing.assert_close(gla_chunked(q, kk, v, g, 0.7, chunk=16), _gla_recurrence(q, kk, v, g, 0.7))
    # SSD: one decay per head (dt * A), x * dt as the values, B as keys and C as queries, scale 1
    dt = F.softplus(torch.randn(b, t, h, dtype=torch.float64))
    a = -torch.rand(h, dtype=torch.float64) * 2
    x = torch.randn(b, t, h, p, dtype=torch.float64)
    ssd = ssd_chunked(x * dt[..., None], dt * a, kk, q, chunk=16)
    ref = _gla_recurrence(q, kk, x * dt[..., None], (dt * a)[..., None].expand(b, t, h, k), 1.0)
    torch.testing.assert_close(ssd, ref)


def test_selective_scan_loops_agree():
    torch.manual_seed(0)
    b, d, n, length = 2, 6, 3, 17
    args = (torch.randn(b, d, length), torch.rand(b, d, length), -torch.rand(d, n), torch.randn(b, n, length),
            torch.randn(b, n, length), torch.randn(d))
    torch.testing.assert_close(ss_loop_unbind(*args), ss_loop_plain(*args))


def test_swin_score_mod_reads_the_same_bias_as_the_gathered_table():
    """The opgen block's score_mod (index arithmetic on window-local indices, shift mask of window b % nW) adds
    exactly the float mask the SDPA block builds from the relative-position index."""
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, 14, window=7, shift=3, impl="torch")
    n, nw = 49, 4
    mod = blk._score_mod(blk.bias_table.detach())
    bias = blk.bias_table.detach()[blk.rel_index.reshape(-1)].reshape(n, n, 2).permute(2, 0, 1)
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for b in (0, 1, 2, 3, 5):
        for h in (0, 1):
            got = mod(torch.zeros(n, n), torch.tensor(b), torch.tensor(h), qi, ki)
            torch.testing.assert_close(got, bias[h] + blk.shift_mask[b % nw])


def test_mamba2_block_has_eight_heads_at_the_issue_size():
    blk = Mamba2Block(256, 64, 64)
    assert blk.nheads == 8 and blk.d_state == 64 and blk.headdim == 64


# ------------------------------------------------------------------------------------- statuses, not crashes


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 3


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("no backward for this yet")


def _toy(ours, n: int = 6, kinks: bool = False) -> Pair:
    x = torch.randn(n)
    lo, lt = [("x", x.clone().requires_grad_())], [("x", x.clone().requires_grad_())]
    return Pair("toy", f"n={n}", "torch", lambda: ours(lo[0][1]), lambda: lt[0][1] * 2, lo, lt, torch.ones(n), kinks)


class _OneKink(torch.autograd.Function):
    """x * 2 whose gradient differs from torch's in one element (a ReLU whose mask flipped at one point)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        g = g * 2
        g[0] = 0
        return g


def _raise(x):
    raise NotImplementedError("opgen cannot run this part yet")


@pytest.mark.parametrize("ours, fwd, bwd", [
    (lambda x: x * 2, "ok", "ok"),
    (_raise, "unsupported: NotImplementedError: opgen cannot run this part yet",
     "unsupported: NotImplementedError: opgen cannot run this part yet"),
    (_NoBackward.apply, "ok", "unsupported: NotImplementedError: no backward for this yet"),
    (lambda x: x * 3, "wrong: output rel err", "wrong: output rel err"),
    (_WrongGrad.apply, "ok", "wrong: grad rel err x 5.0e-01"),
])
def test_a_case_reports_its_status(fast, ours, fwd, bwd):
    res = run_pair(_toy(ours), repeats=2)
    assert [r.step for r in res] == ["fwd", "fwd+bwd"]
    for r, want in zip(res, (fwd, bwd)):
        assert r.status.startswith(want), r.status
        assert r.notes["status"] == r.status
        assert r.ms[r.baseline] > 0                                      # the baseline is always timed
        assert (r.ms["opgen"] > 0) if r.status == "ok" else math.isnan(r.ms["opgen"])
    assert res[1].peak_mib.get("torch") is not None or not _linux()
    table = format_training(res)
    assert fwd.split(":")[0] in table and bwd.split(":")[0] in table and "toy" in table


@pytest.mark.parametrize("kinks, status", [(True, "ok"), (False, "wrong: grad rel err x 1.0e+00")])
def test_a_block_with_relu_kinks_passes_one_flipped_gradient_element(fast, kinks, status):
    """One element of 100000 differs by O(1): within KINK_TOL in relative L2 (3e-3), so it passes for a block
    declared with kinks (and the check says so), and fails the max-norm check of a smooth one."""
    res = run_pair(_toy(_OneKink.apply, n=100_000, kinks=kinks), repeats=1)
    assert res[0].status == "ok" and res[1].status.startswith(status), res[1].status
    if kinks:
        assert res[1].grad_err == pytest.approx(1.0) and res[1].grad_l2 <= KINK_TOL
        assert "ReLU kinks" in res[1].notes["check"] and "kinks: L2" in format_training(res)


def test_a_case_that_raises_while_timed_is_reported_and_the_suite_goes_on(monkeypatch):
    pairs = [_toy(lambda x: x * 2), _toy(lambda x: x * 2, n=7)]
    monkeypatch.setattr(training, "_pairs", lambda part, quick: iter(pairs))
    calls = []

    def flaky(pair, repeats):
        calls.append(pair.case)
        if len(calls) == 1:
            raise RuntimeError("kernel build failed")
        return [TrainingResult("toy", pair.case, {"opgen": 1.0, "torch": 2.0}, {}, step="fwd", baseline="torch")]

    monkeypatch.setattr(training, "run_pair", flaky)
    res = training.training_cases(1, quick=True, parts=["ops"])
    assert [r.status for r in res] == ["unsupported: RuntimeError: kernel build failed (while timing)"] * 2 + ["ok"]
    assert "kernel build failed" in format_training(res)


def _linux() -> bool:
    import sys

    return sys.platform.startswith("linux")


def test_cli_exits_1_when_a_case_is_wrong_and_training_is_opt_in(fast, monkeypatch, capsys):
    from opgen.bench import cases
    from opgen.cli import main

    assert "training" in cases.SUITES and all(f"training.{p}" in cases.SUITES for p in training.PARTS)
    assert cases.OPT_IN == {"training"} | {f"training.{p}" for p in training.PARTS}
    monkeypatch.setitem(cases.SUITES, "training.toy", lambda repeats, quick: run_pair(_toy(lambda x: x * 3), repeats))
    assert main(["bench", "--suite", "training.toy", "--repeats", "1"]) == 1
    out = capsys.readouterr()
    assert "wrong: output rel err" in out.out and "different result" in out.err
    assert main(["bench", "training.none"]) == 2


# ------------------------------------------------------------------------------------------ the quick suite


def test_quick_training_suite_verifies_every_block_against_torch(fast):
    """Every part at tiny sizes: opgen's blocks and ops agree with the torch ones (same weights, same inputs) in
    the output and in every gradient (input and each parameter) within TOL, or the case says why it cannot run."""
    results = training.training_cases(1, quick=True)
    assert all(isinstance(r, TrainingResult) for r in results)
    ops = {r.op for r in results}
    assert ops == {"selective_scan", "chunk_gla", "mamba1 block", "mamba2 block", "convnext block",
                   "resnet basic block", "swin block"}
    assert len(results) == 2 * 7
    for r in results:
        assert r.status == "ok" or r.status.startswith("unsupported: "), (r.op, r.case, r.status)
        if r.status == "ok":
            assert r.out_err is not None and r.out_err <= TOL, (r.op, r.out_err)
            assert r.ms["opgen"] > 0
            if r.step == "fwd+bwd":
                assert r.grad_err is not None and (r.grad_err <= TOL or r.grad_l2 <= KINK_TOL), \
                    (r.op, r.worst_grad, r.grad_err, r.grad_l2)
                assert r.peak_mib.get("opgen") is not None or not _linux()
    table = format_training(results)
    assert "mamba1 block" in table and "swin block" in table and f"tolerance {TOL:g}" in table


def test_blocks_deep_copy_runs_the_other_implementation():
    blk = SwinBlock(8, 2, 7, impl="torch")
    other = copy.deepcopy(blk)
    other.impl = "opgen"
    assert other.opgen and not blk.opgen
    with pytest.raises(ValueError):
        SwinBlock(8, 2, 7, impl="cuda")
