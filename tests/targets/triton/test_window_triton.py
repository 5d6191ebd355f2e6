"""Triton window kernels (``opgen.targets.triton.window``: convolutions) without a GPU.

* Interpreter numerics: this file, run as a script with ``TRITON_INTERPRET=1`` (set before triton is imported,
  hence a subprocess), runs every case of :func:`cases` through ``TritonTarget.run`` and compares with an
  independent reference, ``torch.nn.functional.conv2d`` / ``conv1d`` in float64 on the same data (fresh random
  data each run; the seed is printed). It prints one ``OK``/``FAIL`` line per (case, config). The data tensor is
  a strided view into a NaN-filled buffer, so an unmasked out-of-bounds read (which the interpreter does not
  detect) shows up as NaN. Tolerances (max abs error over max |ref|): fp32 1e-4, bf16 2e-2. bf16 ``tl.dot`` is
  wrong in the interpreter (triton#11584), so the script widens bf16 dot operands to fp32 there (a test-only
  patch of the interpreter's ``create_dot``; the GPU path is unchanged).
* In-process: default configs are valid for many shapes, ``check`` rejects bad configs with a reason, the
  rendered source is readable and uses no block pointers, and the default config of each variant compiles for
  sm_90 (fp32 and bf16) within the H100 shared memory and without register spills (skipped without the
  toolchain).

Usage as a script: ``TRITON_INTERPRET=1 python test_window_triton.py CACHE_DIR [CASE ...]``.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opgen.ir import DType, OpBuilder, bind, dims, silu
from opgen.ir.symbols import make_axes
from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_depthwise_conv2d, declare_long_conv
from opgen.targets.triton import window as TW

HERE = Path(__file__).resolve()
H100_SMEM = 232448
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
IR = {F32: DType.f32, BF16: DType.bf16}
TOL = {F32: 1e-4, BF16: 2e-2}


# ------------------------------------------------------------------------------------------------- ops


def declare_gated_conv(dt: DType = DType.f32):
    """``out = silu(conv3x3(x, w, padding 1)) * gate`` (NCHW; a gated epilogue reading a second tensor)."""
    N, H, W, C, Fd = dims("N H W C F")
    with OpBuilder("gated_conv") as bld:
        x = bld.input("x", (N, C, H, W), dt)
        w = bld.input("w", (Fd, C, 3, 3), dt)
        gate = bld.input("gate", (N, Fd, H, W), dt)
        n, co, oh, ow, ci, kh, kw = make_axes("n co oh ow ci kh kw")
        acc = bld.reduce((ci, kh, kw), x.pad(0, 0, 1, 1)[n, ci, oh + kh - 1, ow + kw - 1] * w[co, ci, kh, kw],
                         axes=(n, co, oh, ow), name="acc")
        return bld.build({"out": bld.map(silu(acc[n, co, oh, ow]) * gate[n, co, oh, ow], (n, co, oh, ow),
                                         name="out", dtype=dt)})


def _nan_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a strided view into a NaN-filled buffer (2 extra entries around each of the last two dims)."""
    shape = list(x.shape)
    big = torch.full(shape[:-2] + [shape[-2] + 4, shape[-1] + 4] if x.dim() >= 2 else [shape[0] + 4],
                     float("nan"), dtype=x.dtype)
    v = big[..., 2:2 + shape[-2], 2:2 + shape[-1]] if x.dim() >= 2 else big[2:2 + shape[0]]
    v.copy_(x)
    return v


GEMM16 = {"variant": "gemm", "block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 4, "num_stages": 1}
DIRECT = {"variant": "direct", "block_h": 4, "block_w": 16, "num_warps": 1, "num_stages": 1}
DIRECT1 = {"variant": "direct", "block_h": 1, "block_w": 16, "num_warps": 1, "num_stages": 1}


def cases():
    """name -> dict(kind, sizes, dtype, configs); a config None means the target's default config."""
    c2 = lambda **k: {"kind": "conv2d", "bias": False, "stride": (1, 1), "dil": (1, 1), "groups": 1,  # noqa: E731
                      "dtype": F32, "configs": [None], **k}
    return {
        "dw3": c2(N=2, C=3, F=3, H=9, W=11, K=(3, 3), pad=(1, 1), groups=3, bias=True, configs=[None, DIRECT]),
        "dw7": c2(N=2, C=3, F=3, H=9, W=11, K=(7, 7), pad=(3, 3), groups=3),
        "dw3_stride2_dil2": c2(N=2, C=3, F=3, H=9, W=11, K=(3, 3), pad=(2, 1), stride=(2, 2), dil=(2, 2),
                               groups=3, bias=True),
        "dense3_g1": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(1, 1), stride=(2, 2), bias=True,
                        configs=[None, GEMM16]),
        "dense3_g2": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(1, 1), stride=(2, 2), groups=2, bias=True,
                        configs=[None, GEMM16]),
        "conv1x1": c2(N=2, C=4, F=5, H=5, W=7, K=(1, 1), pad=(0, 0), configs=[GEMM16, DIRECT]),
        "dw3_N1_H1": c2(N=1, C=3, F=3, H=1, W=11, K=(3, 3), pad=(1, 1), groups=3, bias=True),
        "dw3_bf16": c2(N=2, C=3, F=3, H=9, W=11, K=(3, 3), pad=(1, 1), groups=3, bias=True, dtype=BF16),
        "dense3_g2_bf16": c2(N=2, C=4, F=6, H=9, W=11, K=(3, 3), pad=(1, 1), stride=(2, 2), groups=2, bias=True,
                             dtype=BF16, configs=[GEMM16]),
        "gated_silu": {"kind": "gated", "N": 2, "C": 3, "F": 4, "H": 9, "W": 11, "dtype": F32,
                       "configs": [None, GEMM16]},
        "causal_w4_bias_silu": {"kind": "causal", "B": 2, "D": 5, "L": 13, "Wd": 4, "bias": True, "silu": True,
                                "dtype": F32, "configs": [None, {"variant": "fft"}]},
        "causal_w4_L1": {"kind": "causal", "B": 1, "D": 5, "L": 1, "Wd": 4, "bias": False, "silu": False,
                         "dtype": F32, "configs": [None]},
        "causal_w4_bf16": {"kind": "causal", "B": 2, "D": 5, "L": 13, "Wd": 4, "bias": True, "silu": True,
                           "dtype": BF16, "configs": [DIRECT1]},
        "long_conv_flipped": {"kind": "long", "B": 1, "H": 2, "L": 10, "Lk": 4, "dtype": F32,
                              "configs": [DIRECT1, GEMM16]},
    }


def build(c, gen):
    """(op, inputs, float64 reference) of case ``c``."""
    dt = c["dtype"]
    ir = IR[dt]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dt)

    if c["kind"] == "conv2d":
        N, C, Fo, H, W, (KH, KW) = c["N"], c["C"], c["F"], c["H"], c["W"], c["K"]
        ph, pw = c["pad"]
        G = c["groups"]
        x, w = rnd(N, C, H, W), rnd(Fo, C // G, KH, KW)
        b = rnd(Fo) if c["bias"] else None
        pads = (ph, ph, pw, pw)
        if G == C == Fo:
            op = declare_depthwise_conv2d(ir, ir, ir if b is not None else None, c["stride"], pads, c["dil"])
            ins = {"x": x, "weight": w.reshape(Fo, KH, KW)}
        else:
            op = declare_conv2d(ir, ir, ir if b is not None else None, c["stride"], pads, c["dil"], G)
            ins = {"x": x, "weight": w}
        if b is not None:
            ins["bias"] = b
        ref = F.conv2d(x.to(F64), w.to(F64), None if b is None else b.to(F64), c["stride"], (ph, pw), c["dil"], G)
        return op, ins, ref
    if c["kind"] == "gated":
        N, C, Fo, H, W = c["N"], c["C"], c["F"], c["H"], c["W"]
        x, w, gate = rnd(N, C, H, W), rnd(Fo, C, 3, 3), rnd(N, Fo, H, W)
        ref = F.silu(F.conv2d(x.to(F64), w.to(F64), padding=1)) * gate.to(F64)
        return declare_gated_conv(ir), {"x": x, "w": w, "gate": gate}, ref
    if c["kind"] == "causal":
        B, D, L, Wd = c["B"], c["D"], c["L"], c["Wd"]
        x, w = rnd(B, D, L), rnd(D, Wd)
        b = rnd(D) if c["bias"] else None
        op = declare_causal_conv1d(ir, ir, ir if b is not None else None, "silu" if c["silu"] else None)
        ref = F.conv1d(x.to(F64), w.to(F64).unsqueeze(1), None if b is None else b.to(F64), padding=Wd - 1,
                       groups=D)[..., :L]
        if c["silu"]:
            ref = F.silu(ref)
        ins = {"x": x, "weight": w} | ({"bias": b} if b is not None else {})
        return op, ins, ref
    B, H, L, Lk = c["B"], c["H"], c["L"], c["Lk"]
    u, k = rnd(B, H, L), rnd(H, Lk)
    ref = F.conv1d(u.to(F64), k.to(F64).flip(-1).unsqueeze(1), padding=Lk - 1, groups=H)[..., :L]
    return declare_long_conv(ir, ir), {"u": u, "k": k}, ref


def run_case(name, c, cache_dir, seed):
    """Run one case with each of its configs; yields (label, summary), raises AssertionError on a mismatch."""
    from opgen.targets.triton import TritonTarget

    gen = torch.Generator().manual_seed(seed)
    op, ins, ref = build(c, gen)
    data = TW.window_group(op).data.tensor
    ins = dict(ins)
    ins[data] = _nan_view(ins[data])
    binding = bind(op, {k: tuple(v.shape) for k, v in ins.items()})
    target = TritonTarget(cache_dir=cache_dir)
    assert target.supports(op, "cpu"), f"{name}: the target does not support the op"
    out_name = op.outputs[0].name
    for cfg in c["configs"]:
        used = TW.as_config(cfg) if cfg is not None else TW.default_config(TW.window_group(op), binding)
        got = target.run(op, ins, binding, cfg)[out_name]
        assert got.dtype == c["dtype"] and got.shape == ref.shape, f"{got.dtype} {tuple(got.shape)}"
        assert not torch.isnan(got).any(), f"{used.variant}: NaN in the output (an unmasked read?)"
        err = ((got.to(F64) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= TOL[c["dtype"]], f"{used.to_dict()}: relative error {err:.2e} > {TOL[c['dtype']]}"
        yield f"{used.variant} {_knobs(used) if cfg is not None else 'default'}", f"err {err:.1e}"


def _knobs(cfg) -> str:
    keys = {"direct": ("block_h", "block_w", "num_warps"), "gemm": ("block_m", "block_n", "block_k", "num_warps"),
            "fft": ()}[cfg.variant]
    return "(" + ", ".join(f"{k}={getattr(cfg, k)}" for k in keys) + ")"


def patch_interpreter_bf16_dot() -> bool:
    """Widen bf16 ``tl.dot`` operands to fp32 in Triton's interpreter (it multiplies the uint16 bit patterns,
    triton#11584). Test-only; returns whether the patch was applied."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or not hasattr(interp, "TensorHandle"):
        return False
    orig = builder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return orig(self, widen(a), widen(b), d, *args, **kwargs)

    builder.create_dot = create_dot
    return True


def run_cases(argv, cases: dict, run_case, needs_bf16_dot) -> int:
    """The script side of an interpreter test file: every case of ``cases`` (or those named in ``argv[2:]``)
    through ``run_case(name, case, cache_dir, seed)``, printing OK / FAIL / SKIP lines; returns the failures.
    ``needs_bf16_dot(case)``: the case is skipped when the interpreter's bf16 dot cannot be patched."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    cache_dir, only = argv[1], set(argv[2:])
    patched = patch_interpreter_bf16_dot()
    seed = random.randrange(2**31)
    print(f"seed {seed}, bf16 dot patch {'applied' if patched else 'NOT applied'}", flush=True)
    failures = 0
    for name, c in cases.items():
        if only and name not in only:
            continue
        if c["dtype"] == BF16 and not patched and needs_bf16_dot(c):
            print(f"SKIP {name}: bf16 dots are wrong in this interpreter", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            for label, summary in run_case(name, c, cache_dir, seed):
                print(f"OK {name} {label}: {summary} ({time.perf_counter() - t0:.2f}s)", flush=True)
                t0 = time.perf_counter()
        except Exception as e:  # noqa: BLE001 (report every case)
            import traceback

            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e} (seed {seed})", flush=True)
            traceback.print_exc(file=sys.stdout)
    print(f"{failures} failures (seed {seed})")
    return failures


def interpreter_lines(script: Path, tmp_path, cases: dict) -> list[str]:
    """Run ``script`` under TRITON_INTERPRET=1 and check that every case passed each of its configs (or was
    skipped); returns the OK / SKIP lines."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("OK ", "FAIL ", "SKIP "))]
    assert lines and all(ln.startswith(("OK ", "SKIP ")) for ln in lines), out[-8000:]
    for name, c in cases.items():
        n = sum(ln.startswith(f"OK {name} ") for ln in lines)
        skipped = any(ln.startswith(f"SKIP {name}:") for ln in lines)
        assert skipped or n == len(c["configs"]), (name, n, out[-4000:])
    return lines


def main(argv):
    return run_cases(argv, cases(), run_case,
                     lambda c: any(x and x.get("variant") == "gemm" for x in c["configs"]))


# ------------------------------------------------------------------------------------ in-process tests


def test_interpreter_matches_torch(tmp_path):
    lines = interpreter_lines(HERE, tmp_path, cases())
    assert sum(" gemm " in ln for ln in lines) >= 6 and sum(" direct " in ln for ln in lines) >= 9


def _g(op, **shapes):
    g = TW.window_group(op)
    assert g is not None, op.name
    return g, bind(op, shapes)


def _examples():
    f, b = DType.f32, DType.bf16
    return [
        _g(declare_depthwise_conv2d(padding=(1, 1, 1, 1)), x=(2, 3, 9, 11), weight=(3, 3, 3)),
        _g(declare_depthwise_conv2d(b, b, b, padding=(15, 15, 15, 15)), x=(8, 256, 56, 56), weight=(256, 31, 31),
           bias=(256,)),
        _g(declare_depthwise_conv2d(padding=(3, 3, 3, 3)), x=(1, 1, 1, 1), weight=(1, 7, 7)),
        _g(declare_conv2d(f, f, f, (2, 2), (1, 1, 1, 1), (1, 1), 1), x=(2, 4, 9, 11), weight=(6, 4, 3, 3),
           bias=(6,)),
        _g(declare_conv2d(b, b, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), x=(32, 256, 56, 56),
           weight=(256, 256, 3, 3)),
        _g(declare_conv2d(f, f, None, (1, 1), (1, 1, 1, 1), (1, 1), 32), x=(4, 512, 28, 28),
           weight=(512, 16, 3, 3)),
        _g(declare_conv2d(), x=(1, 64, 7, 7), weight=(128, 64, 1, 1)),
        _g(declare_causal_conv1d(bias=f, activation="silu"), x=(2, 5, 13), weight=(5, 4), bias=(5,)),
        _g(declare_causal_conv1d(b, b, b, "silu"), x=(4, 4096, 8192), weight=(4096, 4), bias=(4096,)),
        _g(declare_long_conv(), u=(2, 8, 4096), k=(8, 4096)),
        _g(declare_long_conv(), u=(2, 8, 64), k=(8, 8)),
    ]


def test_default_configs_valid_for_many_shapes():
    for g, b in _examples():
        cfg = TW.default_config(g, b)
        assert TW.check(g, cfg, b) is None, (g.op.name, cfg, TW.check(g, cfg, b))
        assert TW.check(g, cfg.to_dict()) is None
        assert TW.TritonWindowConfig.from_dict(cfg.to_dict()) == cfg
        if cfg.variant != "fft":
            TW.render(g, b, cfg.variant)
    by = {(g.op.name, b.shapes[g.data.tensor]): TW.default_config(g, b).variant for g, b in _examples()}
    assert by[("conv2d", (32, 256, 56, 56))] == "gemm" and by[("depthwise_conv2d", (8, 256, 56, 56))] == "direct"
    assert by[("causal_conv1d", (2, 5, 13))] == "direct" and by[("long_conv", (2, 8, 4096))] == "fft"


def test_space_enumerates_feasible_configs_and_check_rejects():
    g, b = _examples()[3]
    sp = TW.space(g, b)
    assert set(sp.knobs) == {"direct", "gemm", "im2win"} and sp.infeasible(sp.default) is None
    some = list(sp.enumerate())
    assert some and all(TW.check(g, c, b) is None for c in some)
    assert {c.variant for c in some} == {"direct", "gemm", "im2win"}
    bad = {
        "variant": ({"variant": "winograd"}, "variant"),
        "unknown knob": ({"block_q": 16}, "unknown knobs"),
        "block": ({"variant": "gemm", "block_m": 48}, "block_m"),
        "registers": ({"variant": "gemm", "block_m": 128, "block_n": 128, "num_warps": 2}, "registers"),
        "smem": ({"variant": "gemm", "block_m": 128, "block_n": 128, "block_k": 64, "num_stages": 4,
                  "num_warps": 8}, "shared memory"),
        "direct tile": ({"variant": "direct", "block_h": 32, "block_w": 1024, "num_warps": 1}, "registers"),
        "block_n": ({"variant": "gemm", "block_n": 64}, "block_n"),
        "fft 2-D": ({"variant": "fft"}, "1-D"),
    }
    for what, (cfg, word) in bad.items():
        why = TW.check(g, cfg, b)
        assert why is not None and word in why, (what, why)
    gb, bb = _examples()[1]                          # bf16
    assert "tf32" in TW.check(gb, {"variant": "gemm", "tf32": True})
    g1, b1 = _examples()[7]                          # 1-D
    assert "block_h" in TW.check(g1, {"variant": "direct", "block_h": 4}, b1)
    assert TW.check(g1, {"variant": "fft"}, b1) is None and "fft" in TW.space(g1, b1).knobs


def test_render_is_readable_and_uses_no_block_pointers():
    for g, b in _examples()[:8]:
        for variant in TW.VARIANTS:
            m = TW.render(g, b, variant)
            compile(m.source, "<window>", "exec")
            assert "make_block_ptr" not in m.source and "tl.advance" not in m.source
            assert "boundary_check" not in m.source and f"def {m.kernel}(" in m.source
            assert "import triton.language as tl" in m.source and "tl.float32" in m.source
            assert max(len(ln) for ln in m.source.splitlines()) <= 160
            if variant == "gemm":
                assert "tl.dot(" in m.source
    g, b = _examples()[0]
    assert "tl.static_range(3)" in TW.render(g, b, "direct").source
    g, b = _examples()[1]
    src = TW.render(g, b, "direct").source
    assert "for kh in range(31)" in src and "tl.store(" in src and ".to(tl.bfloat16)" in src
    g, b = _examples()[7]
    assert "_silu(" in TW.render(g, b, "direct").source


def test_import_does_not_import_triton_or_torch():
    code = ("import sys, opgen.targets.triton.window as w; assert 'triton' not in sys.modules; "
            "assert 'torch' not in sys.modules; print(w.GENERATOR_VERSION)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == TW.GENERATOR_VERSION


def test_unsupported_forms_and_sizes_are_reported():
    op = declare_conv2d(DType.f64, DType.f64)
    assert TW.window_group(op) is None and "fp16, bf16 and fp32" in TW.unsupported(TW.fuse_window(op))
    g, b = _g(declare_depthwise_conv2d(padding=(1, 1, 1, 1)), x=(1, 3, 9, 11), weight=(3, 3, 3))
    with pytest.raises(ValueError, match="invalid window config"):
        TW.resolve_config(g, b, {"variant": "gemm", "block_m": 7})
    big = bind(g.op, {"x": (1 << 12, 3, 1 << 10, 1 << 10), "weight": (3, 3, 3)})
    m = TW.render(g, big, "direct")
    with pytest.raises(ValueError, match="depthwise_conv2d.*32-bit offsets"):
        TW._check_sizes(g, big, m, TW.default_config(g, big))


# ---------------------------------------------------------------------------------------------- AOT sm_90


def _aot_cases():
    f, b = DType.f32, DType.bf16
    out = []
    for dt in (f, b):
        out.append((f"direct-dw7-{dt.value}", declare_depthwise_conv2d(dt, dt, dt, padding=(3, 3, 3, 3)),
                    dict(x=(8, 256, 56, 56), weight=(256, 7, 7), bias=(256,))))
        out.append((f"direct-dw31-{dt.value}", declare_depthwise_conv2d(dt, dt, None, padding=(15, 15, 15, 15)),
                    dict(x=(8, 128, 56, 56), weight=(128, 31, 31))))
        out.append((f"direct-causal-{dt.value}", declare_causal_conv1d(dt, dt, dt, "silu"),
                    dict(x=(4, 2048, 4096), weight=(2048, 4), bias=(2048,))))
        out.append((f"gemm-dense-{dt.value}", declare_conv2d(dt, dt, dt, (1, 1), (1, 1, 1, 1), (1, 1), 1),
                    dict(x=(32, 128, 56, 56), weight=(256, 128, 3, 3), bias=(256,))))
        out.append((f"gemm-grouped-{dt.value}", declare_conv2d(dt, dt, None, (2, 2), (1, 1, 1, 1), (1, 1), 32),
                    dict(x=(4, 512, 28, 28), weight=(512, 16, 3, 3))))
        out.append((f"gemm-gated-{dt.value}", declare_gated_conv(dt),
                    dict(x=(8, 64, 28, 28), w=(64, 64, 3, 3), gate=(8, 64, 28, 28))))
    return out


@pytest.mark.parametrize("name,op,shapes", _aot_cases(), ids=[c[0] for c in _aot_cases()])
def test_aot_sm90_default_config(name, op, shapes, aot_ready, tmp_path):
    from opgen.targets.triton.compile import AotUnavailable, aot_compile

    g, b = _g(op, **shapes)
    cfg = TW.default_config(g, b)
    assert cfg.variant == name.split("-")[0], (name, cfg)
    m = TW.render(g, b, cfg.variant)
    try:
        r = aot_compile(m.source, m.kernel, TW.aot_signature(g, m), TW.constexpr_values(m, cfg), tmp_path,
                        cfg.num_warps, cfg.num_stages)
    except AotUnavailable as e:
        pytest.skip(str(e))
    assert r.shared <= H100_SMEM, f"{name} {cfg}: {r.shared} bytes of shared memory"
    if r.stack is None:
        pytest.skip("cuobjdump is unavailable: cannot read register/spill usage")
    assert r.stack == 0, f"{name} {cfg}: register spills ({r.stack} bytes of stack, {r.registers} registers)"
    if cfg.variant == "gemm":
        assert r.ptx_has_mma or g.op.tensor(g.data.tensor).dtype == DType.f32, f"{name}: no tensor-core dot"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
