"""A warm first call: in a new process whose kernel is on disk, the op runs with tvm_ffi alone (``import tvm``
costs seconds), and the recorded host target is used only when it is well formed and was recorded on this CPU.

Three subprocesses share one temporary ``OPGEN_CACHE_DIR``: the first compiles (and records the host target), the
second loads without importing tvm, the third finds a record of another CPU's target under this CPU's
fingerprint, and must import tvm, notice, and load the right kernel (never compile or run another target's).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tvm")
pytest.importorskip("tvm_ffi")

from opgen.targets.tvm.compile import (HOST_TARGET_FILE, KernelCache, cpu_fingerprint,  # noqa: E402
                                       parse_host_target, tvm_versions)

_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    import opgen.ops as ops
    from opgen.runtime import default_session

    torch.manual_seed(0)
    x = torch.randn(2, 64, 256)
    w = torch.randn(64, 4)
    y = ops.causal_conv1d(x, w)
    tvm_imported = "tvm" in sys.modules
    ref = F.conv1d(F.pad(x, (3, 0)), w[:, None, :], groups=64)
    st = default_session().targets.get("tvm").cache.stats
    print(json.dumps({"tvm": tvm_imported, "ffi": "tvm_ffi" in sys.modules,
                      "err": float((y - ref).abs().max()), "loaded": st.loaded, "compiled": st.compiled}))
""")


def _run(cache: Path) -> dict:
    env = dict(os.environ, OPGEN_CACHE_DIR=str(cache), TVM_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fingerprint() -> str:
    fp = cpu_fingerprint(tvm_versions())
    if fp is None:
        pytest.skip("no /proc/cpuinfo: the host target is always computed by tvm here")
    return fp


def test_warm_first_call_without_tvm_and_untrusted_records(tmp_path):
    fp = _fingerprint()
    first = _run(tmp_path)
    assert first["compiled"] >= 1 and first["err"] < 1e-4, first
    record = tmp_path / "tvm" / HOST_TARGET_FILE
    good = record.read_bytes()
    target = parse_host_target(good, fp)
    assert target is not None and json.loads(target)["kind"] == "llvm", good

    warm = _run(tmp_path)
    assert warm == {"tvm": False, "ffi": True, "err": warm["err"], "loaded": 1, "compiled": 0}, warm
    assert warm["err"] < 1e-4

    # the record names another CPU under this CPU's fingerprint (a valid, wrong entry): its key finds no kernel,
    # tvm computes the real target, the right kernel is loaded (not compiled) and the record is repaired
    wrong = json.dumps({"schema": "opgen-host-target-v1", "fingerprint": fp,
                        "target": json.dumps({"kind": "llvm", "mcpu": "x86-64"})})
    record.write_text(wrong)
    fixed = _run(tmp_path)
    assert fixed["tvm"] and fixed["loaded"] == 1 and fixed["compiled"] == 0 and fixed["err"] < 1e-4, fixed
    assert parse_host_target(record.read_bytes(), fp) == target


@pytest.mark.parametrize("how", ["wrong fingerprint", "not json", "extra key", "no schema", "target not llvm",
                                 "target not json", "target too long", "target nested", "not a dict", "group-writable"])
def test_untrusted_host_target_record_is_ignored(tmp_path, how):
    fp = _fingerprint()
    target = json.dumps({"kind": "llvm", "mcpu": "x86-64"})
    rec = {"schema": "opgen-host-target-v1", "fingerprint": fp, "target": target}
    (tmp_path / "tvm").mkdir(mode=0o700)
    path = tmp_path / "tvm" / HOST_TARGET_FILE
    path.write_text(json.dumps(rec))
    assert KernelCache(tmp_path)._recorded_host_target() == target      # the untampered record is accepted
    bad = dict(rec)
    if how == "wrong fingerprint":
        bad["fingerprint"] = "0" * 64
    elif how == "extra key":
        bad["extra"] = 1
    elif how == "no schema":
        del bad["schema"]
    elif how == "target not llvm":
        bad["target"] = json.dumps({"kind": "c"})
    elif how == "target not json":
        bad["target"] = "llvm -mcpu=x86-64"
    elif how == "target too long":
        bad["target"] = json.dumps({"kind": "llvm", "mcpu": "x" * 2000})
    elif how == "target nested":
        bad["target"] = json.dumps({"kind": "llvm", "attrs": {"a": 1}})
    data = {"not json": "{", "not a dict": "[]"}.get(how, json.dumps(bad))
    path.write_text(data)
    if how == "group-writable":
        path.write_text(json.dumps(rec))
        os.chmod(path, 0o660)
    assert KernelCache(tmp_path)._recorded_host_target() is None
