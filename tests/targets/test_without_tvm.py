"""opgen without TVM (a GPU machine with torch and triton only): ``import opgen, opgen.ops`` imports neither tvm nor
tvm_ffi (nor optuna), every library op and a declared op run on CPU tensors in the reference interpreter against
independent torch formulations, with one FallbackWarning saying why; ``TVMTarget.available()`` reports a missing
apache-tvm without importing it."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from opgen.targets.base import Caps, TargetRegistry
from opgen.targets.reference import ReferenceTarget
from opgen.targets.tvm import TVMTarget
from opgen.targets.tvm.target import _tvm_installed

WITHOUT_TVM = r'''
import importlib
import sys

BLOCKED = ("tvm", "tvm_ffi")


class Hide:
    """A meta path finder without tvm and tvm_ffi: ``import tvm`` raises ModuleNotFoundError and
    ``importlib.util.find_spec("tvm")`` is None, as on a machine without apache-tvm (a finder that raises from
    ``find_spec`` instead breaks torch, which probes ``find_spec("tvm")`` when torch._dynamo loads)."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
importlib.invalidate_caches()
try:
    import tvm  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("tvm is still importable")

import warnings

import torch
import torch.nn.functional as F

import opgen
import opgen.ops
from opgen import Float
from opgen.ir.errors import FallbackWarning

assert not any(m.split(".")[0] in BLOCKED + ("optuna",) for m in sys.modules), "imported at import time"
from opgen.runtime import default_session

assert default_session().targets.get("tvm").available()[0] is False

torch.manual_seed(0)
close = dict(rtol=1e-4, atol=1e-5)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")

    # linear_scan
    a, b = torch.rand(2, 3, 17) * 0.9 + 0.05, torch.randn(2, 3, 17)
    h, ref = opgen.ops.linear_scan(a, b), []
    state = torch.zeros(2, 3)
    for t in range(17):
        state = a[..., t] * state + b[..., t]
        ref.append(state)
    torch.testing.assert_close(h, torch.stack(ref, -1), **close)

    # selective_scan, forward and backward
    def ss_loop(u, delta, A, B, C, D):
        x, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
        for t in range(u.shape[2]):
            x = torch.exp(delta[:, :, t, None] * A) * x + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
            ys.append((x * C[:, None, :, t]).sum(-1))
        return torch.stack(ys, 2) + u * D[:, None]

    Bt, Dm, N, L = 2, 4, 3, 11
    leaves = [torch.randn(Bt, Dm, L), torch.rand(Bt, Dm, L) * 0.5, -torch.rand(Dm, N) - 0.1,
              torch.randn(Bt, N, L), torch.randn(Bt, N, L), torch.randn(Dm)]
    mine = [x.clone().requires_grad_(True) for x in leaves]
    theirs = [x.clone().requires_grad_(True) for x in leaves]
    y = opgen.ops.selective_scan(*mine)
    y_ref = ss_loop(*theirs)
    torch.testing.assert_close(y, y_ref, **close)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for name, p, q in zip("u delta A B C D".split(), mine, theirs):
        torch.testing.assert_close(p.grad, q.grad, **close, msg=lambda m, name=name: f"grad {name}: {m}")

    # conv2d (strided, padded, grouped) and causal_conv1d
    x, w, bias = torch.randn(2, 4, 9, 8), torch.randn(6, 2, 3, 3), torch.randn(6)
    torch.testing.assert_close(opgen.ops.conv2d(x, w, bias, stride=2, padding=1, groups=2),
                               F.conv2d(x, w, bias, stride=2, padding=1, groups=2), **close)
    x, w, bias = torch.randn(2, 5, 13), torch.randn(5, 4), torch.randn(5)
    ref = F.conv1d(F.pad(x, (3, 0)), w[:, None], bias, groups=5)
    torch.testing.assert_close(opgen.ops.causal_conv1d(x, w, bias, activation="silu"), F.silu(ref), **close)

    # attention with a mask (sliding window, causal)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 3)

    i = torch.arange(9)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= 3)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(opgen.ops.attention(q, k, v, mask_mod=window), ref, **close)

    # a small declared op
    @opgen.op
    def leaky_ema(x: Float["B L"], g: Float["B L"]):
        b, t = opgen.axes("b t")
        return opgen.scan(t, a=opgen.sigmoid(g[b, t]), b=x[b, t], axes=(b, t))

    x, g = torch.randn(3, 10), torch.randn(3, 10)
    state, ref = torch.zeros(3), []
    for t in range(10):
        state = torch.sigmoid(g[:, t]) * state + x[:, t]
        ref.append(state)
    torch.testing.assert_close(leaky_ema(x, g), torch.stack(ref, 1), **close)

fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
assert len(fallbacks) == 1, [str(w.message) for w in caught]
print("WARNING", fallbacks[0].message)
print("WHERE", fallbacks[0].filename)
left = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not left, left
print("ok")
'''


def test_library_and_declared_ops_run_on_cpu_without_tvm(tmp_path):
    script = tmp_path / "without_tvm.py"
    script.write_text(textwrap.dedent(WITHOUT_TVM))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "OPGEN_BACKEND")}
    env["OPGEN_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"{r.stdout}\n{r.stderr[-4000:]}"
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert lines["WARNING"] == ("opgen: no compiled CPU target: apache-tvm is not installed (pip install "
                                "apache-tvm); CPU calls run on the reference interpreter (slow)")
    assert lines["WHERE"] == str(script)      # it names the user's call, not opgen's or torch's code


@pytest.mark.parametrize("how", ["none", "raises"])
def test_tvm_target_unavailable_when_find_spec_finds_no_tvm(monkeypatch, how):
    """``find_spec`` gives None (the module is not installed), or an import hook raises ModuleNotFoundError."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] not in ("tvm", "tvm_ffi"):
            return real(name, *args, **kwargs)
        if how == "raises":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    for module in ("tvm", "tvm_ffi"):     # (a module already imported counts as installed)
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    _tvm_installed.cache_clear()
    try:
        assert TVMTarget().available() == (False, "apache-tvm is not installed (pip install apache-tvm)")
        registry = TargetRegistry((TVMTarget(), ReferenceTarget()))
        assert registry.no_compiled_target("cpu") == "apache-tvm is not installed (pip install apache-tvm)"
    finally:
        _tvm_installed.cache_clear()


class _Stub:
    def __init__(self, name, ok, why="", kinds=None, caps_kind="cuda"):
        self.name, self._ok, self._why, self._caps_kind = name, ok, why, caps_kind
        if kinds is not None:
            self.device_kinds = kinds

    def available(self):
        return self._ok, self._why

    def caps(self):
        return Caps(device_kind=self._caps_kind)


def test_no_compiled_target_names_the_targets_of_the_device():
    cpu_gone = _Stub("cpu_t", False, "cpu_t is not installed", kinds=("cpu",))
    gpu = _Stub("gpu_t", True)                               # no device_kinds: its caps say cuda
    reg = TargetRegistry((cpu_gone, gpu, ReferenceTarget()))
    assert reg.no_compiled_target("cpu") == "cpu_t is not installed"
    assert reg.no_compiled_target("cuda") == ""
    gpu_gone = _Stub("gpu_t", False, "no CUDA device")       # unavailable, devices unknown: named when no other is
    reg = TargetRegistry((cpu_gone, gpu_gone, ReferenceTarget()))
    assert reg.no_compiled_target("cpu") == "cpu_t is not installed"
    assert reg.no_compiled_target("cuda") == "no CUDA device"
    two = TargetRegistry((cpu_gone, _Stub("other", False, "broken", kinds=("cpu",)), ReferenceTarget()))
    assert two.no_compiled_target("cpu") == "cpu_t: cpu_t is not installed; other: broken"
    assert TargetRegistry((ReferenceTarget(),)).no_compiled_target("cpu") == "no registered target compiles for cpu"
