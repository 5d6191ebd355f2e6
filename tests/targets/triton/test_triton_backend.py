"""The Triton backend without a GPU: rendering, loading, configs, the interpreter and an sm_90 AOT compile.

* Interpreter numerics run in a subprocess (``interp_check.py``) because ``TRITON_INTERPRET=1`` must be set
  before triton is imported; it compares every case with the reference backend.
* The AOT tier compiles every variant's default config for ``GPUTarget("cuda", 90, 32)`` and asserts shared
  memory within the H100 limit and no register spills (``cuobjdump -res-usage`` STACK == 0).
* ``golden_selective_scan.py.txt`` snapshots the generated source of selective_scan's default config;
  regenerate it with ``OPGEN_UPDATE_GOLDEN=1``.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy

from opgen.ir import DType, bind
from opgen.ir.passes import ScanVariant, fuse_scan
from opgen.ir.symbols import Axis, Dim
from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan
from opgen.targets.base import Target
from opgen.targets.triton import TritonTarget, default_config, matmul_form, render, space, variants
from opgen.targets.triton.expr import render_index
from opgen.targets.triton.scan import check, signature

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_selective_scan.py.txt"
H100_SMEM = 232448


def _selective_full():
    return declare_selective_scan(D=DType.f32, z=DType.f32, delta_bias=DType.f32, delta_softplus=True,
                                  last_state=True)


def _ss_shapes(Bt=2, D=1536, L=2048, N=16):
    return dict(u=(Bt, D, L), delta=(Bt, D, L), A=(D, N), B=(Bt, N, L), C=(Bt, N, L), D=(D,), z=(Bt, D, L),
                delta_bias=(D,))


def _gla_shapes(Bt=2, T=2048, H=8, K=128, V=128, initial=True):
    out = dict(q=(Bt, T, H, K), k=(Bt, T, H, K), v=(Bt, T, H, V), g=(Bt, T, H, K))
    if initial:
        out["initial_state"] = (Bt, H, K, V)
    return out


# ------------------------------------------------------------------------------------------ import hygiene


def test_import_does_not_import_triton():
    code = ("import sys, opgen.targets.triton as t; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(t.TritonTarget().name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "triton"


def test_target_protocol_and_availability(monkeypatch, tmp_path):
    t = TritonTarget(cache_dir=tmp_path)
    assert isinstance(t, Target) and t.name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    ok, why = t.available()
    if torch.cuda.is_available():
        assert ok
    else:
        assert not ok and "CUDA" in why and "TRITON_INTERPRET" in why
        assert not t.supports(_selective_full(), "cpu")
    assert t.supports(_selective_full(), "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert t.available() == (True, "")
    assert t.supports(_selective_full(), "cpu")


def test_unsupported_ops_are_not_supported(tmp_path):
    """Scans, attention and fp32/fp16/bf16 windows run; an fp64 convolution does not (no fp64 window kernels)."""
    from opgen.ir import DType
    from opgen.ops.conv import declare_causal_conv1d

    target = TritonTarget(cache_dir=tmp_path)
    assert target.supports(declare_causal_conv1d(), "cuda")
    assert not target.supports(declare_causal_conv1d(DType.f64, DType.f64), "cuda")


# ------------------------------------------------------------------------------------------- index printing


def test_render_index_floor_and_mod_follow_python():
    t, L = Axis("t"), Dim("L")
    names = {t: "t", L: "L"}.__getitem__
    for e in (sympy.floor((2 * t - L) / 3), sympy.Mod(t - L, 3), sympy.ceiling((t - L) / 4),
              sympy.Piecewise((t, sympy.Lt(t, 3)), (L - t, True)), sympy.Max(t - L, -2) * 2 + sympy.Abs(t - 5)):
        py = render_index(e, names, "python")
        tri = render_index(e, names)
        for tv in range(0, 12):
            for lv in (1, 7, 11):
                want = int(e.subs({t: tv, L: lv}))
                assert eval(py, {"t": tv, "L": lv}) == want, (py, tv, lv)  # noqa: S307 (our own text)
                assert _eval_c_semantics(tri, tv, lv) == want, (tri, tv, lv)


def _eval_c_semantics(text: str, tv: int, lv: int) -> int:
    """Evaluate rendered kernel text with Triton's integer semantics (// and % truncate like C)."""

    class I:  # noqa: E742 (a tiny C-semantics int)
        def __init__(self, v):
            self.v = int(v)

        def _o(self, o):
            return o.v if isinstance(o, I) else int(o)

        def __add__(self, o): return I(self.v + self._o(o))
        __radd__ = __add__
        def __sub__(self, o): return I(self.v - self._o(o))
        def __rsub__(self, o): return I(self._o(o) - self.v)
        def __mul__(self, o): return I(self.v * self._o(o))
        __rmul__ = __mul__
        def __neg__(self): return I(-self.v)

        def __floordiv__(self, o):
            b = self._o(o)
            q = abs(self.v) // abs(b)
            return I(q if (self.v >= 0) == (b > 0) else -q)

        def __mod__(self, o):
            b = self._o(o)
            return I(self.v - (self // b).v * b)

        def __lt__(self, o): return self.v < self._o(o)
        def __le__(self, o): return self.v <= self._o(o)
        def __gt__(self, o): return self.v > self._o(o)
        def __ge__(self, o): return self.v >= self._o(o)
        def __eq__(self, o): return self.v == self._o(o)  # noqa: E301
        def __ne__(self, o): return self.v != self._o(o)
        __hash__ = None

    class TL:
        @staticmethod
        def where(c, a, b):
            return a if c else b

        @staticmethod
        def maximum(a, b):
            return I(max(I(a).v if not isinstance(a, I) else a.v, I(b).v if not isinstance(b, I) else b.v))

        @staticmethod
        def minimum(a, b):
            return I(min(I(a).v if not isinstance(a, I) else a.v, I(b).v if not isinstance(b, I) else b.v))

        @staticmethod
        def abs(a):
            return I(abs(a.v if isinstance(a, I) else a))

    r = eval(text, {"tl": TL, "t": I(tv), "L": I(lv)})  # noqa: S307 (our own text)
    return r.v if isinstance(r, I) else int(r)


# ---------------------------------------------------------------------------------------- rendering, configs


def test_variants_derived_per_op():
    assert variants(fuse_scan(_selective_full())) == (ScanVariant.SEQUENTIAL,)
    assert variants(fuse_scan(declare_linear_scan())) == (ScanVariant.SEQUENTIAL,)
    gla = fuse_scan(declare_chunk_gla(final_state=True))
    assert variants(gla) == (ScanVariant.CHUNKED_MATMUL, ScanVariant.SEQUENTIAL)
    form = matmul_form(gla)
    assert (str(form.u), str(form.v)) == ("kk", "vv")


def test_source_is_independent_of_sizes_and_valid_python():
    g = fuse_scan(_selective_full())
    a = render(g, ScanVariant.SEQUENTIAL)
    assert a is render(g, "sequential")
    compile(a.source, "<gen>", "exec")
    assert "make_block_ptr" not in a.source and "libdevice." not in a.source and "tl.extra" not in a.source
    for v in variants(fuse_scan(declare_chunk_gla(initial_state=DType.f32, final_state=True))):
        src = render(fuse_scan(declare_chunk_gla(initial_state=DType.f32, final_state=True)), v).source
        compile(src, "<gen>", "exec")
        assert "make_block_ptr" not in src and "input_precision=DOT_PRECISION" in src or v.value == "sequential"


def test_default_configs_are_feasible_and_in_space():
    cases = [(_selective_full(), _ss_shapes()), (_selective_full(), _ss_shapes(1, 4, 7, 3)),
             (declare_linear_scan(reverse=True), dict(a=(3, 100, 5), b=(3, 100, 5))),
             (declare_chunk_gla(final_state=True), _gla_shapes(initial=False)),
             (declare_chunk_gla(final_state=True), _gla_shapes(1, 5, 1, 3, 2, initial=False))]
    for op, shapes in cases:
        g = fuse_scan(op)
        b = bind(op, shapes)
        sp = space(g, b)
        assert sp.default is not None and sp.infeasible(sp.default) is None, (op.name, sp.default)
        for v in variants(g):
            cfg = default_config(g, b, variant=v)
            assert check(g, cfg) is None and check(g, cfg, b) is None, (op.name, cfg, check(g, cfg, b))
            assert set(cfg) - {"variant"} == set(sp.knobs(v))
    g = fuse_scan(_selective_full())
    b = bind(_selective_full(), _ss_shapes())
    assert check(g, {"variant": "sequential", "BLOCK": 256, "STATE_TILE": 0, "num_warps": 1, "num_stages": 2},
                 b).startswith("registers")
    assert "not available" in check(g, {"variant": "chunked-matmul"})
    feasible = list(space(g, b).enumerate())
    assert feasible and all(check(g, c, b) is None for c in feasible)


# -------------------------------------------------------------------------------------------------- loading


def test_compile_cache_writes_atomically_and_reuses_modules(tmp_path):
    from opgen.targets.triton import compile as tc

    src = render(fuse_scan(declare_linear_scan()), "sequential").source
    p = tc.write_source(src, tmp_path)
    assert p.parent == tmp_path / "triton" and p.name == f"{tc.source_hash(src)}.py" and p.read_text() == src
    assert [x.name for x in p.parent.iterdir()] == [p.name]   # no temporary left behind
    assert tc.write_source(src, tmp_path) == p
    m1 = tc.load_module(src, tmp_path)
    m2 = tc.load_module(src, tmp_path / "elsewhere")
    assert m1 is m2 and callable(m1.launch)
    assert sys.modules[m1.__name__] is m1


# ----------------------------------------------------------------------------------------------- golden


def test_golden_selective_scan_source():
    op = _selective_full()
    g = fuse_scan(op)
    cfg = default_config(g, bind(op, _ss_shapes()))
    src = render(g, cfg["variant"]).source
    text = f"# default config at B=2, D=1536, L=2048, N=16: {cfg}\n" + src
    if os.environ.get("OPGEN_UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        if os.environ.get("OPGEN_UPDATE_GOLDEN") != "1":
            pytest.fail(f"{GOLDEN} is missing; run with OPGEN_UPDATE_GOLDEN=1 to create it")
        GOLDEN.write_text(text)
        return
    assert text == GOLDEN.read_text(), (f"{GOLDEN.name} differs from the generated source "
                                        f"(rerun with OPGEN_UPDATE_GOLDEN=1 if the change is intended)")


# ------------------------------------------------------------------------------------------- interpreter


def test_interpreter_matches_reference(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, str(HERE / "interp_check.py"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("OK ", "FAIL "))]
    assert len(lines) >= 17 and all(ln.startswith("OK ") for ln in lines), out[-6000:]
    assert "0 failures" in r.stdout
    for needle in ("linear_scan_reverse_initial", "selective_scan_full", "selective_scan_grouped_B_shared_C",
                   "chunk_gla_chunked chunked-matmul", "chunk_gla_sequential", "ssd_like_reverse_scalar_decay",
                   "index_math_padded_floor_mod"):
        assert any(needle in ln for ln in lines), needle


# -------------------------------------------------------------------------------------- AOT for sm_90


def _custom_ops():
    spec = importlib.util.spec_from_file_location("opgen_triton_test_custom_ops", HERE / "custom_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _aot_cases():
    bf = DType.bf16
    custom = _custom_ops()
    return [
        ("ssd_like_reverse", custom.declare_ssd_like(),
         dict(x=(2, 2048, 8, 64), dt=(2, 2048, 8), A=(8,), Bm=(2, 2048, 128), Cm=(2, 2048, 128), z=(2, 2048, 8, 64))),
        ("gla_reverse_fp64", custom.declare_gla_reverse(DType.f64),
         dict(q=(2, 512, 4, 64), k=(2, 512, 4, 64), v=(2, 512, 4, 64), g=(2, 512, 4, 64), s0=(2, 4, 64, 64))),
        ("linear_scan", declare_linear_scan(), dict(a=(8, 2048, 1024), b=(8, 2048, 1024))),
        ("linear_scan_reverse_initial", declare_linear_scan(reverse=True, initial=DType.f32),
         dict(a=(8, 2048, 1024), b=(8, 2048, 1024), initial=(8, 1024))),
        ("selective_scan_fp32", _selective_full(), _ss_shapes()),
        ("selective_scan_bf16", declare_selective_scan(bf, bf, DType.f32, bf, bf, D=DType.f32, z=bf,
                                                       delta_bias=DType.f32, delta_softplus=True, last_state=True),
         _ss_shapes()),
        ("selective_scan_N64", _selective_full(), _ss_shapes(N=64)),
        ("chunk_gla_fp32_K128", declare_chunk_gla(scale=0.125, initial_state=DType.f32, final_state=True),
         _gla_shapes()),
        ("chunk_gla_bf16_K64", declare_chunk_gla(bf, bf, bf, bf, scale=0.125, final_state=True),
         _gla_shapes(K=64, V=64, initial=False)),
    ]


def _aot_params():
    out = []
    for name, op, shapes in _aot_cases():
        for v in variants(fuse_scan(op)):
            out.append(pytest.param(name, v.value, id=f"{name}-{v.value}"))
    return out


@pytest.mark.parametrize("case,variant", _aot_params())
def test_aot_sm90_default_config(case, variant, aot_ready, tmp_path):
    from opgen.targets.triton.compile import AotUnavailable, aot_compile

    name, op, shapes = next(c for c in _aot_cases() if c[0] == case)
    g = fuse_scan(op)
    b = bind(op, shapes)
    cfg = default_config(g, b, variant=variant)
    spec = render(g, variant)
    sig, consts = signature(spec, g, b, cfg)
    try:
        r = aot_compile(spec.source, spec.kernel, sig, consts, tmp_path, cfg["num_warps"], cfg["num_stages"])
    except AotUnavailable as e:
        pytest.skip(str(e))
    assert r.shared <= H100_SMEM, f"{case} {cfg}: {r.shared} bytes of shared memory"
    if r.stack is None:
        pytest.skip("cuobjdump is unavailable: cannot read register/spill usage")
    assert r.stack == 0, f"{case} {cfg}: register spills ({r.stack} bytes of stack, {r.registers} registers)"
    if variant == "chunked-matmul":
        assert r.ptx_has_mma, "the chunk dots should use tensor cores"
