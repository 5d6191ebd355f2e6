"""``import opgen`` registers every ``torch.ops.opgen.*`` op: an exported ``.pt2`` that uses them loads in a process
that imported nothing else from opgen (in either order with torch)."""
from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

OPS = ("linear_scan", "selective_scan", "chunk_gla", "conv2d", "causal_conv1d", "long_conv", "attention")


def _python(code: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    assert r.returncode == 0, f"subprocess failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


def test_import_opgen_registers_every_op_in_either_order(tmp_path):
    names = [n for op in OPS for n in (op, op + "_backward")]
    check = f"print(sorted(n for n in {names!r} if not hasattr(torch.ops.opgen, n)))"
    assert _python(f"import opgen, torch\n{check}", tmp_path).strip() == "[]"
    assert _python(f"import torch, opgen\n{check}", tmp_path).strip() == "[]"


class _Doubled(torch.nn.Module):
    def forward(self, a, b):
        return torch.ops.opgen.linear_scan(a, b, None, False) * 2


def test_exported_program_loads_after_import_opgen_only(tmp_path):
    """Exported here (this process has every op), loaded in a fresh process that imports only opgen."""
    import opgen.ops  # noqa: F401

    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, 13, 3, generator=g) * 0.9, torch.randn(2, 13, 3, generator=g)
    torch.export.save(torch.export.export(_Doubled(), (a, b)), tmp_path / "m.pt2")
    torch.save({"a": a, "b": b, "seed": seed}, tmp_path / "inputs.pt")
    out = _python("""
        import torch, opgen
        ins = torch.load("inputs.pt")
        got = torch.export.load("m.pt2").module()(ins["a"], ins["b"])
        a, b = ins["a"].double(), ins["b"].double()
        h, ref = torch.zeros_like(b[:, 0]), []
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            ref.append(h)
        ref = torch.stack(ref, 1) * 2
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {ins['seed']}: {m}")
        print("ok")
        """, tmp_path)
    assert out.strip().endswith("ok")


def test_attention_op_marks_prepare_mods_as_torch_does():
    """opgen.ops.attention_op marks ``prepare_mods`` constant for dynamo without importing torch._dynamo at import
    time; the mark must be exactly what ``torch._dynamo.assume_constant_result`` sets."""
    import torch._dynamo

    import opgen.ops.attention_op as ao

    def f():
        return 0

    assert vars(torch._dynamo.assume_constant_result(f)) == {"_dynamo_marked_constant": True}
    assert ao.prepare_mods._dynamo_marked_constant is True
