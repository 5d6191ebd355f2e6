"""Mods written for FlexAttention work unchanged: opgen.ops.attention against torch's own flex_attention.

flex_attention runs eagerly on CPU here (tiny shapes); fp64 so differences are pure rounding (tol 1e-10).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import opgen
from opgen import masks, scores

flex = pytest.importorskip("torch.nn.attention.flex_attention")

L = 36  # 6x6 tokens for the 2-D masks; not a power of two


def _mods():
    heads = 3
    bias_table = torch.randn(heads, 2 * L - 1, dtype=torch.float64)
    doc_ids = torch.sort(torch.randint(0, 3, (2, L)), dim=1).values
    return {
        "causal": (None, masks.causal),
        "sliding_window": (None, masks.sliding_window(7)),
        "neighborhood_1d_dilated": (None, masks.neighborhood_1d(5, 2, length=L)),
        "neighborhood_2d": (None, masks.neighborhood_2d(6, 6, 3, dilation=(1, 2))),
        "swin_shifted": (None, masks.swin_window(6, 6, 3, shift=1)),
        "prefix_lm": (None, lambda b, h, q, kv: (kv <= q) | (kv < 5)),
        "dilated_window": (None, lambda b, h, q, kv: (torch.abs(q - kv) <= 4) & ((q - kv) % 2 == 0)),
        "document": (None, lambda b, h, q, kv: doc_ids[b, q] == doc_ids[b, kv]),
        "alibi_causal": (scores.alibi(scores.alibi_slopes(heads).double()), masks.causal),
        "softcap": (scores.softcap(2.0), None),
        "relative_bias": (lambda s, b, h, q, kv: s + bias_table[h, q - kv + L - 1], None),
        "where_score": (lambda s, b, h, q, kv: torch.where(q >= kv, s * 2.0, s - 1.0), masks.sliding_window(9)),
    }


@pytest.mark.parametrize("name", list(_mods()))
def test_matches_torch_flex_attention(name):
    score_mod, mask_mod = _mods()[name]
    q, k, v = (torch.randn(2, 3, L, 8, dtype=torch.float64) for _ in range(3))
    block_mask = flex.create_block_mask(mask_mod, 2, 3, L, L, device="cpu") if mask_mod is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if isinstance(mask_mod, masks.neighborhood_1d):
        mask_mod = masks.neighborhood_1d(5, 2)  # inside opgen the length comes from the traced index
    out = opgen.ops.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


# semantics against independent formulations, on the reference interpreter (kernels: tests/targets)
pytestmark = pytest.mark.usefixtures("reference_backend")
