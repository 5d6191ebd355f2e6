"""The Triton window kernels on the reductions of generated backward convolutions, in Triton's interpreter.

On CUDA the session runs a backward op node by node, and every reduction node that is a window group runs on the
Triton window kernels: the flipped-window data gradient, the phases of a strided conv's data gradient
(``opgen.ir.passes.phases``), the zero-inserted gradient where the dilation is a multiple of the stride, the
re-laid-out weight of a grouped conv (``opgen.ir.passes.restage``), and the strided weight gradient (a window
whose "weight" is the output gradient). Run as a script with ``TRITON_INTERPRET=1`` (set before triton is
imported, hence a subprocess), this file evaluates each backward op node by node with the reference interpreter
and compares every node the Triton target supports, run on its kernel, with the reference result of that node
(fp32 kernels against the float64 interpreter, fresh random data each run, sizes that are not powers of two;
tolerance 1e-4 of max |ref|). It prints one ``OK`` / ``FAIL`` line per node and ``SKIP`` for nodes that are not
windows (they run in the interpreter on CUDA too).

Usage as a script: ``TRITON_INTERPRET=1 python test_window_backward_triton.py CACHE_DIR``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
TOL = 1e-4


def cases():
    """(label, forward op, inputs as float64 tensors)."""
    import torch

    from opgen.ir import DType
    from opgen.ops.conv import declare_conv2d, declare_depthwise_conv2d

    f32 = DType.f32
    r = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    return [
        ("dense stride 2", declare_conv2d(f32, f32, None, (2, 2), (1, 1, 1, 1), (1, 1), 1),
         {"x": r(2, 4, 9, 11), "weight": r(6, 4, 3, 3)}),
        ("groups 2 stride 2 dilation 2", declare_conv2d(f32, f32, None, (2, 2), (1, 2, 0, 1), (2, 2), 2),
         {"x": r(1, 4, 10, 9), "weight": r(6, 2, 3, 3)}),
        ("depthwise 5x5 stride 2", declare_depthwise_conv2d(f32, f32, None, (2, 2), (2, 1, 2, 0), (1, 1)),
         {"x": r(1, 3, 9, 11), "weight": r(3, 5, 5)}),
    ]


def _run(cache_dir: str) -> int:
    import torch

    from opgen.ir import Reduce, bind
    from opgen.ir.passes.split import node_op
    from opgen.runtime import _sub_binding
    from opgen.targets.reference import evaluate
    from opgen.targets.triton import TritonTarget
    from opgen.bridge import backward_op as _backward

    target = TritonTarget(cache_dir=cache_dir)
    bad = 0
    for label, op, ins in cases():
        shapes = {k: tuple(v.shape) for k, v in ins.items()}
        y = evaluate(op, ins, bind(op, shapes))
        env = {**ins, **{f"grad_{t.name}": torch.randn_like(y[t.name]) for t in op.outputs}}
        back = _backward(op, tuple(ins))
        b = bind(back, {t.name: tuple(env[t.name].shape) for t in back.inputs})
        for k, node in enumerate(back.nodes):
            sub = node_op(back, k)
            sb = _sub_binding(b, sub)
            want = evaluate(sub, {t.name: env[t.name] for t in sub.inputs}, sb)[node.out]
            if isinstance(node, Reduce) and target.supports(sub, "cpu"):
                got = target.run(sub, {t.name: env[t.name].float() for t in sub.inputs}, sb)[node.out]
                err = float((got.double() - want).abs().max()) / max(1.0, float(want.abs().max()))
                ok = err <= TOL
                bad += not ok
                print(f"{'OK' if ok else 'FAIL'} {label} {node.out} err {err:.2e}")
            else:
                print(f"SKIP {label} {node.out}")
            env[node.out] = want
    return 1 if bad else 0


def test_backward_window_nodes_match_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OPGEN_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(HERE), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("OK", "FAIL", "SKIP")]
    assert proc.returncode == 0 and not [ln for ln in lines if ln.startswith("FAIL")], proc.stdout + proc.stderr
    ran = [ln for ln in lines if ln.startswith("OK")]
    # every case's data gradient and the strided dense weight gradient run on the window kernels
    assert len(ran) >= 4, proc.stdout
    # (a strided data gradient runs as one window per phase, t0_p00 ..., or, with a dilation that is a multiple of
    # the stride, as one window over the zero-inserted gradient, t0)
    assert all(any(ln.startswith((f"OK {label} t0 ", f"OK {label} t0_p")) for ln in ran) for label, *_ in
               [("dense stride 2",), ("groups 2 stride 2 dilation 2",), ("depthwise 5x5 stride 2",)]), proc.stdout
    assert sum(ln.startswith("OK dense stride 2 t0_p") for ln in ran) == 4, proc.stdout


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1]))
