"""The registered ops ``torch.ops.opgen.*`` (and their ``*_backward`` ops) called directly check their own
arguments: bad ranks, integer tensors, mismatched shapes, bad list lengths, zero or negative stride / dilation,
negative padding raise :class:`opgen.ArgumentError` naming the op and the argument (not ``KeyError``, unpacking
errors, or a silently wrong result); and the public functions take only real bools / ints for their flags."""
from __future__ import annotations

import re

import pytest
import torch

import opgen
import opgen.ops as ops

O = torch.ops.opgen


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _raises(fn, op: str, arg: str, *texts: str) -> str:
    with pytest.raises(opgen.ArgumentError, match=rf"(?s)^torch\.ops\.opgen\.{op}: .*argument '{re.escape(arg)}'") as ei:
        fn()
    assert isinstance(ei.value, ValueError)
    for t in texts:
        assert t in str(ei.value), f"{t!r} not in {str(ei.value)!r}"
    return str(ei.value)


def test_argument_error_is_a_value_error_and_an_opgen_error():
    assert issubclass(opgen.ArgumentError, ValueError) and issubclass(opgen.ArgumentError, opgen.OpgenError)


# ----------------------------------------------------------------------------------------------------- scans

def test_linear_scan_direct():
    a, b = _t(2, 7, 3), _t(2, 7, 3)
    _raises(lambda: O.linear_scan(_t(7, 3), _t(7, 3), None, False), "linear_scan", "a", "3-D", "(7, 3)")
    _raises(lambda: O.linear_scan(a.int(), b.int(), None, False), "linear_scan", "a", "floating", "int32")
    _raises(lambda: O.linear_scan(a, _t(2, 7, 4), None, False), "linear_scan", "b", "(2, 7, 4)", "= 3")
    _raises(lambda: O.linear_scan(a, b, _t(2, 4), False), "linear_scan", "initial", "(2, 4)")
    _raises(lambda: O.linear_scan_backward(a, b, None, _t(2, 7, 4), False), "linear_scan_backward", "grad_h",
            "(2, 7, 4)")
    _raises(lambda: O.linear_scan_backward(a, b.double().int(), None, a, False), "linear_scan_backward", "b")


def test_selective_scan_direct():
    u, delta, A, B, C = _t(2, 4, 7), _t(2, 4, 7), _t(4, 3), _t(2, 3, 7), _t(2, 3, 7)
    _raises(lambda: O.selective_scan(u, delta, A, _t(2, 3, 7, 1, 1), C, None, None, None, False),
            "selective_scan", "B", "5-D")
    _raises(lambda: O.selective_scan(u, delta, A, B, _t(2, 1, 3, 7, 2), None, None, None, False),
            "selective_scan", "C", "5-D")
    _raises(lambda: O.selective_scan(u, _t(2, 4, 5), A, B, C, None, None, None, False), "selective_scan", "delta",
            "(2, 4, 5)")
    _raises(lambda: O.selective_scan(u, delta, A, _t(2, 3, 3, 7), C, None, None, None, False), "selective_scan",
            "B", "groups")
    _raises(lambda: O.selective_scan(u, delta, A.long(), B, C, None, None, None, False), "selective_scan", "A",
            "int64")
    _raises(lambda: O.selective_scan(u, delta, A, B, C, _t(5), None, None, False), "selective_scan", "D", "(5,)")
    _raises(lambda: O.selective_scan_backward(u, delta, A, B, C, None, None, None, _t(2, 4, 7), _t(2, 4, 2),
                                              False), "selective_scan_backward", "grad_last_state", "(2, 4, 3)")


def test_chunk_gla_direct():
    q, v = _t(1, 5, 2, 4), _t(1, 5, 2, 3)
    _raises(lambda: O.chunk_gla(_t(1, 5, 4), q, v, q, None, 1.0), "chunk_gla", "q", "4-D")
    _raises(lambda: O.chunk_gla(q, q, _t(1, 6, 2, 3), q, None, 1.0), "chunk_gla", "v", "(1, 6, 2, 3)")
    _raises(lambda: O.chunk_gla(q, q, v, q, _t(1, 2, 4, 4), 1.0), "chunk_gla", "initial_state", "(1, 2, 4, 4)")
    _raises(lambda: O.chunk_gla(q, q.int(), v, q, None, 1.0), "chunk_gla", "k", "int32")
    _raises(lambda: O.chunk_gla(q, q, v, q, None, float("nan")), "chunk_gla", "scale", "nan")
    _raises(lambda: O.chunk_gla_backward(q, q, v, q, None, _t(1, 5, 2, 4), _t(1, 2, 4, 3), 1.0),
            "chunk_gla_backward", "grad_o", "(1, 5, 2, 3)")


# ----------------------------------------------------------------------------------------------------- convs

def test_conv2d_direct():
    x, w = _t(1, 3, 9, 9), _t(4, 3, 3, 3)
    ok = dict(stride=[1, 1], padding=[0, 0, 0, 0], dilation=[1, 1], groups=1)

    def call(x=x, w=w, bias=None, **kw):
        a = {**ok, **kw}
        return O.conv2d(x, w, bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    _raises(lambda: call(dilation=[0, 0]), "conv2d", "dilation", ">= 1", "[0, 0]")
    _raises(lambda: call(stride=[-1, 1]), "conv2d", "stride", ">= 1")
    _raises(lambda: call(stride=[1]), "conv2d", "stride", "list of 2")
    _raises(lambda: call(padding=[0, 0]), "conv2d", "padding", "list of 4")
    _raises(lambda: call(padding=[-1, 0, 0, 0]), "conv2d", "padding", ">= 0")
    _raises(lambda: call(groups=0), "conv2d", "groups", ">= 1")
    _raises(lambda: call(groups=2), "conv2d", "groups", "divide")
    _raises(lambda: call(x=x.long(), w=w.long()), "conv2d", "x", "int64")
    _raises(lambda: call(x=_t(3, 9, 9)), "conv2d", "x", "4-D")
    _raises(lambda: call(w=_t(4, 2, 3, 3)), "conv2d", "weight", "(4, 2, 3, 3)")
    _raises(lambda: call(bias=_t(5)), "conv2d", "bias", "(5,)")
    _raises(lambda: call(x=_t(1, 3, 2, 9)), "conv2d", "weight", "kernel height")
    g = _t(1, 4, 7, 7)
    _raises(lambda: O.conv2d_backward(x, w, None, g, [1, 1], [0, 0, 0, 0], [0, 1], 1, [True, True, False]),
            "conv2d_backward", "dilation")
    _raises(lambda: O.conv2d_backward(x, w, None, _t(1, 4, 6, 7), [1, 1], [0, 0, 0, 0], [1, 1], 1,
                                      [True, True, False]), "conv2d_backward", "grad_out", "(1, 4, 7, 7)")
    _raises(lambda: O.conv2d_backward(x, w, None, g, [1, 1], [0, 0, 0, 0], [1, 1], 1, [True]), "conv2d_backward",
            "mask", "3 bools")


def test_causal_conv1d_direct():
    x, w = _t(2, 3, 7), _t(3, 4)
    _raises(lambda: O.causal_conv1d(x.long(), w.long(), None, False), "causal_conv1d", "x", "int64")
    _raises(lambda: O.causal_conv1d(x, _t(4, 4), None, False), "causal_conv1d", "weight", "(4, 4)")
    _raises(lambda: O.causal_conv1d(x, _t(3, 0), None, False), "causal_conv1d", "weight", ">= 1")
    _raises(lambda: O.causal_conv1d(x, w, _t(2), False), "causal_conv1d", "bias", "(2,)")
    _raises(lambda: O.causal_conv1d(_t(3, 7), w, None, False), "causal_conv1d", "x", "3-D")
    _raises(lambda: O.causal_conv1d_backward(x, w, None, _t(2, 3, 6), False, [True, True, True]),
            "causal_conv1d_backward", "grad_out", "(2, 3, 7)")


def test_long_conv_direct():
    u, k = _t(2, 3, 7), _t(3, 5)
    _raises(lambda: O.long_conv(u, _t(4, 5)), "long_conv", "k", "(4, 5)")
    _raises(lambda: O.long_conv(_t(2, 3, 7, 1), k), "long_conv", "u", "3-D")
    _raises(lambda: O.long_conv(u, _t(3, 9)), "long_conv", "k", "exceeds")
    _raises(lambda: O.long_conv(u.int(), k.int()), "long_conv", "u", "int32")
    _raises(lambda: O.long_conv_backward(u, k, _t(2, 3, 7), [True]), "long_conv_backward", "mask", "2 bools")


def test_attention_direct():
    from opgen.ops.attention_op import prepare_mods

    spec, caps, _ = prepare_mods("test", None, None, torch.float32, torch.float32)
    q, k = _t(1, 2, 5, 4), _t(1, 2, 6, 4)
    _raises(lambda: O.attention(_t(1, 2, 5), k, k, list(caps), spec, 0.5, False), "attention", "q", "4-D")
    _raises(lambda: O.attention(q.int(), k, k, list(caps), spec, 0.5, False), "attention", "q", "int32")
    _raises(lambda: O.attention(q, _t(1, 2, 6, 3), k, list(caps), spec, 0.5, False), "attention", "k", "head dim")
    _raises(lambda: O.attention(q, _t(1, 0, 6, 4), _t(1, 0, 6, 4), list(caps), spec, 0.5, True), "attention", "k",
            "0 heads")
    out, lse = _t(1, 2, 5, 4), _t(1, 2, 5)
    _raises(lambda: O.attention_backward(q, k, k, list(caps), out, lse, _t(1, 2, 5, 3), spec, 0.5, False),
            "attention_backward", "dout", "(1, 2, 5, 4)")


# ---------------------------------------------------------------------- strict bool / int / float arguments

@pytest.mark.parametrize("bad", ["no", 1, 0, None, torch.tensor(True)], ids=repr)
def test_flags_must_be_bools(bad):
    a, b = _t(2, 9), _t(2, 9)
    u, A, B = _t(1, 2, 5), _t(2, 3), _t(1, 3, 5)
    q, v = _t(1, 4, 2, 3), _t(1, 4, 2, 2)
    cases = [
        ("linear_scan", "reverse", lambda: ops.linear_scan(a, b, reverse=bad)),
        ("selective_scan", "delta_softplus", lambda: ops.selective_scan(u, u, A, B, B, delta_softplus=bad)),
        ("selective_scan", "return_last_state", lambda: ops.selective_scan(u, u, A, B, B, return_last_state=bad)),
        ("chunk_gla", "output_final_state", lambda: ops.chunk_gla(q, q, v, q, output_final_state=bad)),
        ("attention", "enable_gqa", lambda: ops.attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                                                          enable_gqa=bad)),
    ]
    for op, arg, fn in cases:
        with pytest.raises(opgen.ArgumentError, match=rf"^opgen\.ops\.{op}: argument '{arg}' expected a bool"):
            fn()


@pytest.mark.parametrize("bad", [1.0, True, "1", 2.5], ids=repr)
def test_ints_must_be_ints(bad):
    x, w = _t(1, 2, 6, 6), _t(2, 1, 3, 3)
    for arg, kw in (("stride", {"stride": bad}), ("dilation", {"dilation": bad}), ("groups", {"groups": bad}),
                    ("padding", {"padding": bad}), ("stride", {"stride": (1, bad)})):
        with pytest.raises(opgen.ArgumentError, match=rf"^opgen\.ops\.conv2d: argument '{arg}' expected an int"):
            ops.conv2d(x, w, **kw)
    with pytest.raises(opgen.ArgumentError, match=r"^opgen\.ops\.linear_scan: argument 'dim' expected an int"):
        ops.linear_scan(_t(2, 5), _t(2, 5), dim=bad)


@pytest.mark.parametrize("bad", [True, "0.5", float("inf"), torch.tensor(0.5)], ids=repr)
def test_scales_must_be_finite_floats(bad):
    q, v = _t(1, 4, 2, 3), _t(1, 4, 2, 2)
    with pytest.raises(opgen.ArgumentError, match=r"^opgen\.ops\.chunk_gla: argument 'scale' expected a finite"):
        ops.chunk_gla(q, q, v, q, scale=bad)
    with pytest.raises(opgen.ArgumentError, match=r"^opgen\.ops\.attention: argument 'scale' expected a finite"):
        ops.attention(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4), scale=bad)
