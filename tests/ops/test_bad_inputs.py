"""Argument validation of the public ops.

Contract: bad arguments raise opgen.ArgumentError (a ValueError) whose message starts with
"opgen.ops.<opname>:", names the argument in quotes ("argument 'A'") and says what was
expected and what came (the offending shape / dtype / value appears in the message).
Unsupported constructs inside mask_mod / score_mod raise opgen.TraceError (an ArgumentError)
naming 'mask_mod' / 'score_mod'.
"""

import re

import pytest
import torch

import opgen
import opgen.ops as ops


# --------------------------------------------------------------------------- helpers


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _match(op, *args):
    """Regex: message starts with 'opgen.ops.<op>:' and names one of `args` in quotes."""
    names = "|".join(re.escape(a) for a in args)
    return r"(?s)^" + re.escape(f"opgen.ops.{op}:") + r".*argument '(" + names + r")'"


def _shape_strings(shape):
    shape = tuple(shape)
    inner = ", ".join(str(s) for s in shape)
    forms = {f"({inner})", f"[{inner}]", "x".join(str(s) for s in shape), " x ".join(str(s) for s in shape)}
    if len(shape) == 1:
        forms.add(f"({shape[0]},)")
    return forms


def _mentions_shape(msg, *shapes):
    return any(form in msg for shape in shapes for form in _shape_strings(shape))


def _raises(fn, op, args, shapes=(), texts=()):
    with pytest.raises(opgen.ArgumentError, match=_match(op, *args)) as ei:
        fn()
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    if shapes:
        assert _mentions_shape(msg, *shapes), f"message does not show the offending shape {shapes}: {msg!r}"
    if texts:
        assert any(t in msg for t in texts), f"message does not mention any of {texts}: {msg!r}"
    return msg


def test_error_hierarchy():
    assert issubclass(opgen.ArgumentError, ValueError)
    assert issubclass(opgen.TraceError, opgen.ArgumentError)
    # and the ops really raise it (not a bare ValueError/RuntimeError)
    with pytest.raises(opgen.ArgumentError):
        ops.long_conv(_t(1, 2, 5), _t(2, 9))


# ------------------------------------------------------------------- scans


def test_selective_scan_A_wrong_rank():
    u, delta = _t(2, 3, 7), _t(2, 3, 7)
    A = _t(3, 4, 2)
    B, C = _t(2, 4, 7), _t(2, 4, 7)
    _raises(lambda: ops.selective_scan(u, delta, A, B, C), "selective_scan", ["A"], shapes=[(3, 4, 2)])


def test_selective_scan_delta_length_mismatch():
    u, delta = _t(2, 3, 7), _t(2, 3, 5)
    A, B, C = _t(3, 4), _t(2, 4, 7), _t(2, 4, 7)
    _raises(lambda: ops.selective_scan(u, delta, A, B, C), "selective_scan", ["delta"], shapes=[(2, 3, 5)])


def test_selective_scan_groups_do_not_divide_dim():
    u, delta = _t(2, 5, 7), _t(2, 5, 7)
    A = _t(5, 4)
    B, C = _t(2, 2, 4, 7), _t(2, 2, 4, 7)  # G = 2 does not divide dim = 5
    _raises(lambda: ops.selective_scan(u, delta, A, B, C), "selective_scan", ["B"], shapes=[(2, 2, 4, 7)])


def test_selective_scan_integer_dtype():
    u = torch.randint(0, 5, (2, 3, 7))
    delta, A, B, C = _t(2, 3, 7), _t(3, 4), _t(2, 4, 7), _t(2, 4, 7)
    _raises(lambda: ops.selective_scan(u, delta, A, B, C), "selective_scan", ["u"], texts=["int64"])


def test_selective_scan_D_wrong_shape():
    u, delta = _t(2, 3, 7), _t(2, 3, 7)
    A, B, C = _t(3, 4), _t(2, 4, 7), _t(2, 4, 7)
    _raises(lambda: ops.selective_scan(u, delta, A, B, C, D=_t(4)), "selective_scan", ["D"], shapes=[(4,)])


def test_linear_scan_shape_mismatch():
    a, b = _t(3, 5, 7), _t(3, 5, 6)
    _raises(lambda: ops.linear_scan(a, b), "linear_scan", ["b"], shapes=[(3, 5, 6)])


def test_linear_scan_non_tensor_argument():
    b = _t(2, 3)
    _raises(lambda: ops.linear_scan([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], b), "linear_scan", ["a"], texts=["list"])


def test_linear_scan_bad_initial_shape():
    a, b = _t(3, 5, 7), _t(3, 5, 7)
    _raises(lambda: ops.linear_scan(a, b, dim=1, initial=_t(3, 5)), "linear_scan", ["initial"], shapes=[(3, 5)])


def test_linear_scan_dim_out_of_range():
    a, b = _t(3, 5, 7), _t(3, 5, 7)
    _raises(lambda: ops.linear_scan(a, b, dim=3), "linear_scan", ["dim"], texts=["3"])


def test_chunk_gla_v_length_mismatch():
    q, k, g = _t(1, 7, 2, 8), _t(1, 7, 2, 8), _t(1, 7, 2, 8)
    v = _t(1, 5, 2, 8)
    _raises(lambda: ops.chunk_gla(q, k, v, g), "chunk_gla", ["v"], shapes=[(1, 5, 2, 8)])


def test_chunk_gla_integer_gate():
    q, k, v = _t(1, 7, 2, 8), _t(1, 7, 2, 8), _t(1, 7, 2, 4)
    g = torch.zeros(1, 7, 2, 8, dtype=torch.int32)
    _raises(lambda: ops.chunk_gla(q, k, v, g), "chunk_gla", ["g"], texts=["int32"])


# ------------------------------------------------------------------- convs


def test_conv2d_channel_mismatch():
    x = _t(1, 4, 9, 9)
    w = _t(5, 3, 3, 3)
    _raises(lambda: ops.conv2d(x, w), "conv2d", ["weight", "x"], shapes=[(5, 3, 3, 3), (1, 4, 9, 9)])


def test_conv2d_groups_do_not_divide_channels():
    x = _t(1, 6, 9, 9)
    w = _t(4, 6 // 4, 3, 3)  # 6 channels, groups=4
    _raises(lambda: ops.conv2d(x, w, groups=4), "conv2d", ["groups"], texts=["4"])


def test_conv2d_groups_do_not_divide_out_channels():
    x = _t(1, 6, 9, 9)
    w = _t(5, 2, 3, 3)  # groups=3 divides 6 input channels but not 5 output channels
    _raises(lambda: ops.conv2d(x, w, groups=3), "conv2d", ["groups", "weight"], texts=["5"])


def test_conv2d_kernel_larger_than_padded_input():
    x = _t(1, 2, 5, 13)
    w = _t(3, 2, 7, 3)
    _raises(lambda: ops.conv2d(x, w, padding=0), "conv2d", ["weight", "x", "padding"], shapes=[(3, 2, 7, 3), (1, 2, 5, 13)])


def test_conv2d_negative_padding():
    x, w = _t(1, 2, 9, 9), _t(3, 2, 3, 3)
    _raises(lambda: ops.conv2d(x, w, padding=-1), "conv2d", ["padding"], texts=["-1"])


def test_conv2d_integer_input():
    x = torch.randint(0, 3, (1, 2, 9, 9), dtype=torch.int32)
    w = _t(3, 2, 3, 3)
    _raises(lambda: ops.conv2d(x, w), "conv2d", ["x"], texts=["int32"])


def test_conv2d_same_padding_with_stride():
    x, w = _t(1, 2, 9, 9), _t(3, 2, 3, 3)
    _raises(lambda: ops.conv2d(x, w, stride=2, padding="same"), "conv2d", ["padding", "stride"], texts=["same"])


def test_causal_conv1d_weight_channel_mismatch():
    x = _t(2, 5, 13)
    w = _t(4, 3)
    _raises(lambda: ops.causal_conv1d(x, w), "causal_conv1d", ["weight"], shapes=[(4, 3)])


def test_causal_conv1d_non_tensor_x():
    w = _t(2, 3)
    _raises(lambda: ops.causal_conv1d([[[1.0, 2.0, 3.0]] * 2], w), "causal_conv1d", ["x"], texts=["list"])


def test_causal_conv1d_bad_activation():
    x, w = _t(2, 5, 13), _t(5, 3)
    _raises(lambda: ops.causal_conv1d(x, w, activation="relu"), "causal_conv1d", ["activation"], texts=["relu"])


def test_long_conv_kernel_longer_than_input():
    u, k = _t(2, 3, 7), _t(3, 9)
    _raises(lambda: ops.long_conv(u, k), "long_conv", ["k", "u"], shapes=[(3, 9)])


def test_long_conv_head_mismatch():
    u, k = _t(2, 3, 7), _t(4, 5)
    _raises(lambda: ops.long_conv(u, k), "long_conv", ["k"], shapes=[(4, 5)])


# --------------------------------------------------------------- attention


def test_attention_head_dim_mismatch():
    q, k, v = _t(1, 2, 7, 8), _t(1, 2, 7, 5), _t(1, 2, 7, 8)
    _raises(lambda: ops.attention(q, k, v), "attention", ["k", "q"], shapes=[(1, 2, 7, 5)])


def test_attention_kv_length_mismatch():
    q, k, v = _t(1, 2, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 6, 8)
    _raises(lambda: ops.attention(q, k, v), "attention", ["v", "k"], shapes=[(1, 2, 6, 8)])


def test_attention_gqa_ratio_does_not_divide():
    q, k, v = _t(1, 3, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8)
    _raises(lambda: ops.attention(q, k, v, enable_gqa=True), "attention", ["k", "q", "enable_gqa"], shapes=[(1, 3, 7, 8), (1, 2, 7, 8)])


def test_attention_heads_differ_without_gqa():
    q, k, v = _t(1, 4, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8)
    _raises(lambda: ops.attention(q, k, v), "attention", ["k", "enable_gqa"], shapes=[(1, 2, 7, 8)])


def test_attention_wrong_rank_and_dtype():
    q, k, v = _t(2, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8)
    _raises(lambda: ops.attention(q, k, v), "attention", ["q"], shapes=[(2, 7, 8)])
    q = torch.ones(1, 2, 7, 8, dtype=torch.int64)
    _raises(lambda: ops.attention(q, k, v), "attention", ["q"], texts=["int64"])


def test_attention_mask_mod_python_if_is_trace_error():
    def mask_mod(b, h, q_idx, kv_idx):
        if q_idx >= kv_idx:  # data-dependent python control flow
            return True
        return False

    q, k, v = _t(1, 2, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8)
    with pytest.raises(opgen.TraceError, match=r"(?s)" + re.escape("opgen.ops.attention") + r".*mask_mod") as ei:
        ops.attention(q, k, v, mask_mod=mask_mod)
    assert isinstance(ei.value, opgen.ArgumentError)


def test_attention_mask_mod_unsupported_torch_function_falls_back_with_a_warning():
    def mask_mod(b, h, q_idx, kv_idx):
        return torch.sort(kv_idx, dim=-1).values <= q_idx

    q, k, v = _t(1, 2, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8)
    with pytest.warns(opgen.ir.errors.FallbackWarning, match=r"(?s)opgen\.ops\.attention.*mask_mod.*function sort"
                      r".*dense eager"):
        out = ops.attention(q, k, v, mask_mod=mask_mod)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_score_mod_python_if_is_trace_error():
    def score_mod(score, b, h, q_idx, kv_idx):
        if score > 0:
            return score
        return score * 2

    q, k, v = _t(1, 2, 7, 8), _t(1, 2, 7, 8), _t(1, 2, 7, 8)
    with pytest.raises(opgen.TraceError, match=r"(?s)" + re.escape("opgen.ops.attention") + r".*score_mod"):
        ops.attention(q, k, v, score_mod=score_mod)
