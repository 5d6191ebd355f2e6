"""The TVM target runs attention ops end to end: fusion, tile plan from the mask predicate (memoized) or from
captured tensors (data-dependent), forward and flash backward; checked against dense torch formulations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")

import opgen  # noqa: E402
from opgen import masks  # noqa: E402
from opgen.ir import DType  # noqa: E402
from opgen.ops.attention import declare_attention, trace  # noqa: E402
from opgen.runtime import default_session  # noqa: E402
from opgen.targets.tiles import tile_plan  # noqa: E402
from opgen.targets.tvm.attention_call import attention_group  # noqa: E402

TOL64 = 1e-10


def _dense(q, k, v, keep, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _op(mask_mod, dtype=DType.f64, scale=0.3):
    t = trace("test", None, mask_mod, dtype)
    caps = tuple((DType.i64, d) for d in t.capture_dims)
    return declare_attention(dtype, dtype, dtype, scale, False, t.score, t.mask, caps), t


def test_sliding_window_runs_on_tvm_with_a_memoized_static_plan():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v = (torch.randn(2, 3, 77, 16, dtype=torch.float64, generator=g) for _ in range(3))
    op, _ = _op(masks.sliding_window(40))
    sess = default_session()
    assert sess.target_for(op, "cpu").name == "tvm"
    res = sess.run(op, {"q": q, "k": k, "v": v})
    i, j = torch.arange(77)[:, None], torch.arange(77)[None]
    keep = (i - j >= 0) & (i - j < 40)
    torch.testing.assert_close(res["out"], _dense(q, k, v, keep, 0.3), rtol=TOL64, atol=TOL64)
    group = attention_group(op)
    p1 = tile_plan(group, {"q": q, "k": k}, {}, 16, 16)
    p2 = tile_plan(group, {"q": q, "k": k}, {}, 16, 16)
    assert p1 is p2, "a static mask's tile plan must be computed once per shape"
    c = p1.table.counts()
    assert c["empty"] > 0 and c["full"] > 0 and c["partial"] > 0


def test_document_mask_builds_its_table_at_run_time_and_backward_matches_autograd():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    L = 70
    doc = torch.cumsum(torch.rand(L, generator=g) < 0.08, 0)
    q, k, v = (torch.randn(1, 2, L, 8, dtype=torch.float64, generator=g) for _ in range(3))
    mask = lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki)  # noqa: E731
    op, t = _op(mask)
    group = attention_group(op)
    assert group is not None and group.data_dependent_mask
    inputs = {"q": q, "k": k, "v": v, "capture0": t.captures[0]}
    sess = default_session()
    res = sess.run(op, inputs)
    keep = (doc[:, None] == doc[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(res["out"], _dense(q, k, v, keep, 0.3), rtol=TOL64, atol=TOL64)
    plan = tile_plan(group, inputs, {}, 16, 16)
    assert plan.table.counts()["empty"] > 0
    dout = torch.randn_like(res["out"])
    grads = sess.attention_backward(op, inputs, res["out"], res["lse"], dout)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _dense(*leaves, keep, 0.3).backward(dout)
    for name, leaf in zip("qkv", leaves):
        torch.testing.assert_close(grads[name], leaf.grad, rtol=1e-9, atol=1e-9)


def test_user_function_float32_neighborhood_matches_sdpa():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    side_h, side_w = 9, 11
    n = side_h * side_w
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for _ in range(3))
    m = masks.neighborhood_2d(side_h, side_w, 3)
    out = opgen.ops.attention(q, k, v, mask_mod=m)
    keep = m(0, 0, torch.arange(n)[:, None], torch.arange(n)[None])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
