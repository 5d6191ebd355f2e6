"""The im2win variant of the Triton window kernels (``opgen.targets.triton.window``, variant ``im2win``) without a GPU.

* Interpreter numerics: this file, run as a script with ``TRITON_INTERPRET=1`` (set before triton is imported,
  hence a subprocess), runs every case of :func:`cases` through ``TritonTarget.run`` with im2win configs and
  compares with ``torch.nn.functional.conv2d`` / ``conv1d`` in float64 on the same data (fresh random data each
  run; the seed is printed, on failure too). The data tensor is a strided view into a NaN-filled buffer, so a read
  outside the input (which the interpreter does not detect) shows up as NaN. Tolerances (max abs error over
  max |ref|): fp32 1e-4, bf16 2e-2. bf16 dots are widened to fp32 in the interpreter (triton#11584, the patch of
  ``test_window_triton.py``).
* In-process: ``check`` refuses infeasible im2win configs with a reason, ``space`` offers im2win configs, the
  default config is unchanged (im2win is a tuner option), the window tensor's byte limit raises a clear error,
  and the im2win config of :func:`~opgen.targets.triton.window.dot_config` compiles for sm_90 without register
  spills and within the H100 shared memory (skipped without the toolchain).

Usage as a script: ``TRITON_INTERPRET=1 python test_window_im2win_triton.py CACHE_DIR [CASE ...]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opgen.ir import DType, OpBuilder, bind, dims, silu
from opgen.ir.symbols import make_axes
from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_long_conv
from opgen.targets.triton import window as TW

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from test_window_triton import _nan_view, declare_gated_conv, interpreter_lines, run_cases  # noqa: E402

H100_SMEM = 232448
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
IR = {F32: DType.f32, BF16: DType.bf16}
TOL = {F32: 1e-4, BF16: 2e-2}

I16 = {"variant": "im2win", "block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 4, "num_stages": 1}
I32K = {"variant": "im2win", "block_m": 32, "block_n": 16, "block_k": 32, "num_warps": 4, "num_stages": 2}
DOT = "dot"        # TW.dot_config(group, binding, "im2win"): the untuned im2win config


def declare_conv_bias_silu(dt: DType = DType.f32):
    """``out = silu(conv3x3(x, w, stride 2, padding 1) + bias)`` (NCHW; a bias + activation epilogue)."""
    N, H, W, C, Fd = dims("N H W C F")
    with OpBuilder("conv_bias_silu") as bld:
        x = bld.input("x", (N, C, H, W), dt)
        w = bld.input("w", (Fd, C, 3, 3), dt)
        bias = bld.input("bias", (Fd,), dt)
        n, co, oh, ow, ci, kh, kw = make_axes("n co oh ow ci kh kw")
        acc = bld.reduce((ci, kh, kw), x.pad(0, 0, 1, 1)[n, ci, oh * 2 + kh - 1, ow * 2 + kw - 1] * w[co, ci, kh, kw],
                         axes=(n, co, oh, ow), name="acc")
        return bld.build({"out": bld.map(silu(acc[n, co, oh, ow] + bias[co]), (n, co, oh, ow), name="out",
                                         dtype=dt)})


def cases():
    """name -> dict(kind, sizes, dtype, configs); a config ``DOT`` is the untuned im2win config."""
    c2 = lambda **k: {"kind": "conv2d", "bias": False, "stride": (1, 1), "dil": (1, 1), "groups": 1,  # noqa: E731
                      "dtype": F32, "configs": [I16], **k}
    return {
        "dense3_pad1": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(1, 1, 1, 1), configs=[I16, DOT]),
        "dense3_s2_d2": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(2, 2, 1, 1), stride=(2, 2), dil=(2, 2),
                           bias=True, configs=[I16, I32K]),
        "grouped2_s2": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(1, 1, 1, 1), stride=(2, 2), groups=2, bias=True,
                          configs=[I16, DOT]),
        "conv1x1": c2(N=2, C=5, F=3, H=5, W=7, K=(1, 1), pad=(0, 0, 0, 0)),
        "asym_2x3_crop": c2(N=1, C=3, F=4, H=6, W=9, K=(2, 3), pad=(0, 1, 2, 0), stride=(1, 2)),
        "N1_H1": c2(N=1, C=4, F=5, H=1, W=11, K=(3, 3), pad=(1, 1, 1, 1)),
        "bias_silu": {"kind": "bias_silu", "N": 2, "C": 3, "F": 5, "H": 7, "W": 9, "dtype": F32, "configs": [I16]},
        "gated_silu": {"kind": "gated", "N": 1, "C": 3, "F": 4, "H": 5, "W": 7, "dtype": F32, "configs": [I16]},
        "grouped2_s2_bf16": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(1, 1, 1, 1), stride=(2, 2), groups=2,
                               bias=True, dtype=BF16, configs=[I16]),
        "causal_w4_1d": {"kind": "causal", "B": 2, "D": 3, "L": 13, "configs": [I16], "dtype": F32},
        "long_conv_flipped_1d": {"kind": "long", "B": 1, "H": 2, "L": 10, "Lk": 4, "configs": [I16], "dtype": F32},
    }


def build(c, gen):
    """(op, inputs, float64 reference) of case ``c``."""
    dt = c["dtype"]
    ir = IR[dt]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dt)

    if c["kind"] == "conv2d":
        N, C, Fo, H, W, (KH, KW), G = c["N"], c["C"], c["F"], c["H"], c["W"], c["K"], c["groups"]
        pt, pb, pl, pr = c["pad"]
        x, w = rnd(N, C, H, W), rnd(Fo, C // G, KH, KW)
        b = rnd(Fo) if c["bias"] else None
        op = declare_conv2d(ir, ir, ir if b is not None else None, c["stride"], c["pad"], c["dil"], G)
        ins = {"x": x, "weight": w} | ({"bias": b} if b is not None else {})
        xp = F.pad(x.to(F64), (pl, pr, pt, pb))
        ref = F.conv2d(xp, w.to(F64), None if b is None else b.to(F64), c["stride"], 0, c["dil"], G)
        return op, ins, ref
    if c["kind"] in ("bias_silu", "gated"):
        N, C, Fo, H, W = c["N"], c["C"], c["F"], c["H"], c["W"]
        x, w = rnd(N, C, H, W), rnd(Fo, C, 3, 3)
        if c["kind"] == "gated":
            gate = rnd(N, Fo, H, W)
            ref = F.silu(F.conv2d(x.to(F64), w.to(F64), padding=1)) * gate.to(F64)
            return declare_gated_conv(ir), {"x": x, "w": w, "gate": gate}, ref
        bias = rnd(Fo)
        ref = F.silu(F.conv2d(x.to(F64), w.to(F64), bias.to(F64), stride=2, padding=1))
        return declare_conv_bias_silu(ir), {"x": x, "w": w, "bias": bias}, ref
    if c["kind"] == "causal":
        B, D, L = c["B"], c["D"], c["L"]
        x, w = rnd(B, D, L), rnd(D, 4)
        ref = F.conv1d(x.to(F64), w.to(F64).unsqueeze(1), padding=3, groups=D)[..., :L]
        return declare_causal_conv1d(ir, ir), {"x": x, "weight": w}, ref
    B, H, L, Lk = c["B"], c["H"], c["L"], c["Lk"]
    u, k = rnd(B, H, L), rnd(H, Lk)
    ref = F.conv1d(u.to(F64), k.to(F64).flip(-1).unsqueeze(1), padding=Lk - 1, groups=H)[..., :L]
    return declare_long_conv(ir, ir), {"u": u, "k": k}, ref


def run_case(name, c, cache_dir, seed):
    """Run one case with each of its configs; yields (label, summary), raises AssertionError on a mismatch."""
    from opgen.targets.triton import TritonTarget

    gen = torch.Generator().manual_seed(seed)
    op, ins, ref = build(c, gen)
    group = TW.window_group(op)
    ins = dict(ins)
    ins[group.data.tensor] = _nan_view(ins[group.data.tensor])
    binding = bind(op, {k: tuple(v.shape) for k, v in ins.items()})
    target = TritonTarget(cache_dir=cache_dir)
    out_name = op.outputs[0].name
    for cfg in c["configs"]:
        used = TW.dot_config(group, binding, "im2win") if cfg == DOT else TW.as_config(cfg)
        assert used.variant == "im2win" and TW.check(group, used, binding) is None, TW.check(group, used, binding)
        got = target.run(op, ins, binding, used.to_dict())[out_name]
        assert got.dtype == c["dtype"] and got.shape == ref.shape, f"{got.dtype} {tuple(got.shape)}"
        assert not torch.isnan(got).any(), f"{used.to_dict()}: NaN in the output (a read outside the input?)"
        err = ((got.to(F64) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= TOL[c["dtype"]], f"{used.to_dict()}: relative error {err:.2e} > {TOL[c['dtype']]}"
        yield f"im2win ({used.block_m}, {used.block_n}, {used.block_k})", f"err {err:.1e}"


def main(argv):
    return run_cases(argv, cases(), run_case, lambda c: True)


# ------------------------------------------------------------------------------------ in-process tests


def test_interpreter_matches_torch(tmp_path):
    interpreter_lines(HERE, tmp_path, cases())


def _g(op, **shapes):
    g = TW.window_group(op)
    assert g is not None, op.name
    return g, bind(op, shapes)


def _dense(dt=DType.f32, **kw):
    return _g(declare_conv2d(dt, dt, dt, (2, 2), (1, 1, 1, 1), (1, 1), 1), **(kw or dict(x=(2, 4, 9, 11),
              weight=(6, 4, 3, 3), bias=(6,))))


def test_check_refuses_infeasible_configs_with_a_reason():
    g, b = _dense()
    assert TW.check(g, I16, b) is None and TW.check(g, I16) is None
    bad = {
        "registers": ({"variant": "im2win", "block_m": 128, "block_n": 128, "num_warps": 2}, "registers"),
        "window tile": ({"variant": "im2win", "block_m": 128, "block_n": 16, "block_k": 64, "num_warps": 2},
                        "window 128x64 input tile"),
        "smem": ({"variant": "im2win", "block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 4,
                  "num_warps": 8}, "shared memory"),
        "block_n": ({"variant": "im2win", "block_n": 64}, "block_n=64 exceeds"),
        "block": ({"variant": "im2win", "block_m": 48}, "block_m"),
    }
    for what, (cfg, word) in bad.items():
        why = TW.check(g, cfg, b)
        assert why is not None and word in why, (what, why)
    gb, bb = _dense(DType.bf16)
    assert "tf32" in TW.check(gb, {**I16, "tf32": True}, bb)
    g1, b1 = _g(declare_conv2d(), x=(1, 4, 5, 7), weight=(6, 4, 1, 1))       # a reduction of 4
    assert "block_k=32 exceeds the padded reduction size 16" in TW.check(g1, {**I16, "block_k": 32}, b1)
    with pytest.raises(ValueError, match="invalid window config.*block_n=64 exceeds"):
        TW.resolve_config(g, b, {"variant": "im2win", "block_n": 64})


def test_space_offers_im2win_and_the_default_is_unchanged():
    g, b = _g(declare_conv2d(DType.f32, DType.f32, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), x=(2, 32, 14, 14),
              weight=(64, 32, 3, 3))
    sp = TW.space(g, b)
    assert "im2win" in sp.knobs and "im2win" in TW.VARIANTS and sp.knobs["im2win"]["tf32"] == (False, True)
    ims = [c for c in sp.enumerate() if c.variant == "im2win"]
    assert len(ims) > 50 and all(TW.check(g, c, b) is None for c in ims)
    assert {c.tf32 for c in ims} == {False, True}
    assert TW.default_config(g, b).variant == "gemm"              # im2win is a tuner option, not the default
    dot = TW.dot_config(g, b, "im2win")
    assert dot.to_dict() == {**TW.default_config(g, b).to_dict(), "variant": "im2win"}
    assert TW.check(g, dot, b) is None


def test_render_im2win_source():
    g, b = _dense()
    m = TW.render(g, b, "im2win")
    compile(m.source, "<im2win>", "exec")
    src = m.source
    assert m.kernel == "window_im2win" and "def window_im2win(" in src and "tl.dot(" in src
    assert "a = tl.load(a_row + kk[None, :], mask=m_ok & k_ok[None, :], other=0.0)" in src   # affine, tails only
    assert "make_block_ptr" not in src and max(len(ln) for ln in src.splitlines()) <= 160
    assert [p[0] for p in m.params][-2:] == ["WIN", "WP"]
    assert TW.aot_signature(g, m)["WIN"] == "*fp32"
    gd, bd = _g(declare_conv2d(DType.f32, DType.f32, None, (1, 1), (2, 2, 2, 2), (2, 2), 1), x=(1, 4, 9, 11),
                weight=(6, 4, 3, 3))
    assert "a_row + (kk + kw * 12)[None, :]" in TW.render(gd, bd, "im2win").source       # DW=2: a gap per kw
    g1, b1 = _g(declare_causal_conv1d(), x=(2, 5, 13), weight=(5, 4))
    compile(TW.render(g1, b1, "im2win").source, "<im2win-1d>", "exec")


def test_window_tensor_layout_and_byte_limit():
    g, b = _dense()
    assert TW.window_tensor_shape(g, b) == (2, 1, 5, 13, 3, 4)     # [NB, G, OH, WP, KH, Cg]
    x = torch.randn(2, 4, 9, 11)
    win = TW.window_tensor(g, b, x)
    xp = F.pad(x, (1, 1, 1, 1))
    assert win.is_contiguous() and tuple(win.shape) == (2, 1, 5, 13, 3, 4)
    for n, oh, wp, kh, c in ((0, 0, 0, 0, 0), (1, 4, 12, 2, 3), (1, 2, 5, 1, 2)):
        assert win[n, 0, oh, wp, kh, c] == xp[n, c, oh * 2 + kh, wp]
    gb, bb = _g(declare_conv2d(DType.f32, DType.f32, None, (1, 1), (3, 3, 3, 3), (1, 1), 1),
                x=(64, 128, 224, 224), weight=(64, 128, 7, 7))
    why = TW.check(gb, {**I16, "block_n": 64}, bb)
    assert why is not None and "conv2d" in why and "IM2WIN_MAX_BYTES" in why and "[64, 1, 224, 230, 7, 128]" in why
    assert TW.window_tensor_bytes(gb, bb) > TW.IM2WIN_MAX_BYTES
    assert TW.check(gb, {**I16, "variant": "gemm", "block_n": 64}, bb) is None        # gemm needs no window tensor
    meta = {"x": torch.empty(64, 128, 224, 224, device="meta"), "weight": torch.empty(64, 128, 7, 7, device="meta")}
    with pytest.raises(ValueError, match=r"op conv2d: the im2win window tensor .* over the limit IM2WIN_MAX_BYTES"):
        TW.run(gb, meta, bb, {**I16, "block_n": 64})
    with pytest.raises(ValueError, match="IM2WIN_MAX_BYTES"):
        TW.window_tensor(gb, bb, meta["x"])


# ---------------------------------------------------------------------------------------------- AOT sm_90


def _aot_cases():
    f, b = DType.f32, DType.bf16
    return [
        ("dense-f32", declare_conv2d(f, f, f, (1, 1), (1, 1, 1, 1), (1, 1), 1),
         dict(x=(32, 128, 56, 56), weight=(256, 128, 3, 3), bias=(256,))),
        ("grouped-s2-bf16", declare_conv2d(b, b, None, (2, 2), (1, 1, 1, 1), (1, 1), 32),
         dict(x=(4, 512, 28, 28), weight=(512, 16, 3, 3))),
        ("gated-bf16", declare_gated_conv(b), dict(x=(8, 64, 28, 28), w=(64, 64, 3, 3), gate=(8, 64, 28, 28))),
    ]


@pytest.mark.parametrize("name,op,shapes", _aot_cases(), ids=[c[0] for c in _aot_cases()])
def test_aot_sm90_im2win_config(name, op, shapes, aot_ready, tmp_path):
    from opgen.targets.triton.compile import AotUnavailable, aot_compile

    g, b = _g(op, **shapes)
    cfg = TW.dot_config(g, b, "im2win")
    assert TW.check(g, cfg, b) is None
    m = TW.render(g, b, "im2win")
    try:
        r = aot_compile(m.source, m.kernel, TW.aot_signature(g, m), TW.constexpr_values(m, cfg), tmp_path,
                        cfg.num_warps, cfg.num_stages)
    except AotUnavailable as e:
        pytest.skip(str(e))
    print(f"AOT {name} {cfg.to_dict()}: {r.registers} registers, {r.stack} bytes of stack, {r.shared} bytes shared")
    assert r.shared <= H100_SMEM, f"{name} {cfg}: {r.shared} bytes of shared memory"
    if r.stack is None:
        pytest.skip("cuobjdump is unavailable: cannot read register/spill usage")
    assert r.stack == 0, f"{name} {cfg}: register spills ({r.stack} bytes of stack, {r.registers} registers)"
    assert r.ptx_has_mma or g.op.tensor(g.data.tensor).dtype == DType.f32, f"{name}: no tensor-core dot"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
