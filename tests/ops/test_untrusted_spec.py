"""The attention ``spec`` is data from outside: a crafted one must raise a clear error and never run code.

Before the fix, a capture dim name from the spec was pasted into generated TVMScript (``n_{name} = T.int32()``)
and a name like ``x = __import__('os').system('touch F') or '''...`` created ``F`` (issue 14, defect 1). Each test
here plants such a payload in one place a name can hide (capture dims, load tensor names, axis and dim names in
index text, an exported ``.pt2``) and asserts an :class:`ArgumentError` and that the sentinel file is not there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import opgen
import opgen.ops  # noqa: F401  (registers torch.ops.opgen.attention)
from opgen.ops.attention_op import parse_spec, prepare_mods
from opgen.ir import ArgumentError, IRError
from opgen.ir.expr import Access
from opgen.ir.symbols import Axis, Dim


def _payload(sentinel: Path) -> str:
    return f"x = __import__('os').system('touch {sentinel}') or '''\n    if 0:\n        f((0"


def _case():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    bias = torch.randn(5)
    spec, caps, _ = prepare_mods("test", lambda s, b, h, qi, ki: s + bias[qi], None, q.dtype, k.dtype)
    return q, k, v, list(caps), json.loads(spec)


def _call(q, k, v, caps, obj) -> None:
    torch.ops.opgen.attention(q, k, v, caps, json.dumps(obj), 1.0, False)


def test_a_malicious_capture_dim_name_is_rejected(tmp_path):
    sentinel = tmp_path / "pwned"
    q, k, v, caps, obj = _case()
    obj["captures"][0]["dims"] = [_payload(sentinel)]
    with pytest.raises(ArgumentError, match=r"argument 'spec' is malformed: captures\[0\]\.dims must be"):
        _call(q, k, v, caps, obj)
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["capture0_x", "L1", "n_L1", "capture1_0"])
def test_a_capture_dim_name_other_than_the_tracers_is_rejected(name):
    """Identifiers too: a valid but foreign name could collide with the renderers' own (``n_L1``)."""
    q, k, v, caps, obj = _case()
    obj["captures"][0]["dims"] = [name]
    with pytest.raises(ArgumentError, match="captures"):
        _call(q, k, v, caps, obj)


def test_a_malicious_tensor_name_in_a_load_is_rejected(tmp_path):
    sentinel = tmp_path / "pwned"
    q, k, v, caps, obj = _case()
    node = next(n for n in obj["score"]["nodes"] if n["op"] == "load" and n["arg"]["tensor"] == "capture0")
    node["arg"]["tensor"] = _payload(sentinel)
    with pytest.raises(ArgumentError, match="argument 'spec' is malformed.*tensor name"):
        _call(q, k, v, caps, obj)
    node["arg"]["tensor"] = "capture7"                      # an identifier, but no such capture
    with pytest.raises(ArgumentError, match="a load of 'capture7'"):
        _call(q, k, v, caps, obj)
    assert not sentinel.exists()


@pytest.mark.parametrize("leaf", [
    "Axis('i) or __import__(\"os\").system(\"touch {s}\") #', integer=True, nonnegative=True)",
    "Dim('L\\nimport os', integer=True, positive=True)",
    "Symbol('i')",                                            # a plain symbol the renderers have no name for
    "Dim('E', integer=True, positive=True)",                 # a real dim of the op, but not one a mod can read
    "Add(Axis('i', integer=True, nonnegative=True), Axis('e', integer=True, nonnegative=True))",
])
def test_a_foreign_index_leaf_is_rejected(tmp_path, leaf):
    sentinel = tmp_path / "pwned"
    q, k, v, caps, obj = _case()
    node = next(n for n in obj["score"]["nodes"] if n["op"] == "load" and n["arg"]["tensor"] == "capture0")
    node["arg"]["index"] = [leaf.format(s=sentinel)]
    with pytest.raises(ArgumentError, match="argument 'spec' is malformed"):
        _call(q, k, v, caps, obj)
    assert not sentinel.exists()


def test_the_raw_score_is_read_only_at_its_own_index():
    q, k, v, caps, obj = _case()
    node = next(n for n in obj["score"]["nodes"] if n["op"] == "load" and n["arg"]["tensor"] == "score")
    node["arg"]["index"] = node["arg"]["index"][::-1]
    with pytest.raises(ArgumentError, match="a load of score"):
        _call(q, k, v, caps, obj)


def test_deep_nesting_and_huge_specs_are_clear_errors():
    q, k, v, caps, _ = _case()
    with pytest.raises(ArgumentError, match="nested too deeply"):
        torch.ops.opgen.attention(q, k, v, caps, "[" * 200_000 + "]" * 200_000, 1.0, False)
    with pytest.raises(ArgumentError, match="at most"):
        parse_spec(" " * ((1 << 20) + 1))


def test_ir_names_are_identifiers_wherever_they_are_made(tmp_path):
    """The chokepoint behind every renderer: dims, axes, tensors and ops only carry ASCII identifiers."""
    bad = _payload(tmp_path / "pwned")
    for make in (Dim, Axis, lambda n: Access(n, ())):
        with pytest.raises(IRError, match="not allowed: expected an ASCII identifier"):
            make(bad)
        with pytest.raises(IRError):
            make("ünïcode")
        with pytest.raises(IRError):
            make("lambda")
    with pytest.raises(IRError, match="op name"):
        opgen.ir.OpBuilder("a\"\"\"b")
    assert Dim("capture0_1").name == "capture0_1"


class _Biased(torch.nn.Module):
    """Attention with a captured bias table: its exported graph holds the spec string of the traced mod."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.randn(5))

    def forward(self, q, k, v):
        spec, caps, _ = prepare_mods("t", lambda s, b, h, qi, ki: s + self.bias[qi], None, q.dtype, k.dtype)
        return torch.ops.opgen.attention(q, k, v, list(caps), spec, 1.0, False)[0]


LOAD = textwrap.dedent("""
    import sys, torch
    import opgen
    import opgen.ops.attention_op  # registers the op (issue 14 makes `import opgen` do it too)
    from opgen.ir import ArgumentError
    m = torch.export.load(sys.argv[1]).module()
    q = torch.randn(1, 2, 5, 8)
    try:
        m(q, q, q)
    except ArgumentError as exc:
        print("REJECTED", exc)
    else:
        print("RAN")
""")


def _edit_specs(src: Path, dst: Path, edit) -> int:
    """Copy the .pt2 archive ``src`` to ``dst`` with ``edit`` applied to every attention spec string in it."""
    count = 0

    def walk(x):
        nonlocal count
        if isinstance(x, str) and "opgen.attention_spec" in x:
            count += 1
            return json.dumps(edit(json.loads(x)))
        if isinstance(x, list):
            return [walk(y) for y in x]
        if isinstance(x, dict):
            return {k: walk(y) for k, y in x.items()}
        return x

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(".json") and b"opgen.attention_spec" in data:
                data = json.dumps(walk(json.loads(data))).encode()
            zout.writestr(info, data)
    return count


def test_an_edited_exported_program_cannot_run_code(tmp_path):
    sentinel = tmp_path / "pwned"
    env = {**os.environ, "OPGEN_CACHE_DIR": str(tmp_path / "cache")}
    good, evil = tmp_path / "m.pt2", tmp_path / "evil.pt2"
    q = torch.randn(1, 2, 5, 8)
    torch.export.save(torch.export.export(_Biased(), (q, q, q)), good)

    def plant(obj):
        obj["captures"][0]["dims"] = [_payload(sentinel)]
        return obj
    assert _edit_specs(good, evil, plant) >= 1
    out = subprocess.run([sys.executable, "-c", LOAD, str(evil)], env=env, timeout=240, capture_output=True,
                         text=True)
    assert "REJECTED" in out.stdout and "argument 'spec' is malformed" in out.stdout, out.stdout + out.stderr
    assert not sentinel.exists()
