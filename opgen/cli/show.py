"""``opgen list`` (the library ops) and ``opgen show`` (an op at a pipeline stage: IR, verified, fused, plan,
generated source)."""
from __future__ import annotations

import argparse
import sys

from .args import add_declared_args, parse_shape

STAGES = ("ir", "verified", "fused", "plan", "tvm", "triton")


def _cmd_list(args: argparse.Namespace) -> int:
    from opgen.library import LIBRARY

    width = max(len(e.name) for e in LIBRARY)
    for e in LIBRARY:
        print(f"{e.name.ljust(width)}  {e.family:<9}  {e.summary}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from opgen.library import get
    from .args import is_declared

    if is_declared(args.op):
        return _show_declared(args)
    if args.shape or args.dtype or args.static:
        print("opgen show: --shape, --dtype and --static apply to declared ops (package.module:attribute); library "
              f"op {args.op!r} is shown at its example's size", file=sys.stderr)
        return 2
    try:
        entry = get(args.op)
    except KeyError as exc:
        print(f"opgen show: {exc.args[0]}", file=sys.stderr)
        return 2
    op = entry.declare()
    if args.stage == "fused":
        print(_fused(op))
        return 0
    if args.stage in ("plan", "tvm", "triton") and entry.name == "attention":
        from opgen.attention_plan import attention_plan, attention_source

        print(attention_plan(op) if args.stage == "plan" else attention_source(op, args.stage))
        return 0
    if args.stage in ("plan", "tvm", "triton"):
        text = _lowered(entry, args.stage)
        print(text)
        return 0 if not text.startswith("no ") else 1
    print(op.pretty(verified=args.stage == "verified"))
    if args.stage == "verified":
        print(f"  fingerprint {op.fingerprint}")
    return 0


def _show_declared(args: argparse.Namespace) -> int:
    """``opgen show package.module:attribute``: a user-declared op at a stage; plan and sources at ``--shape``."""
    from opgen.ir import ArgumentError, bind
    from opgen.tune.declared import check_shape, input_shapes, locate
    from .args import declared_path

    declared_path()
    try:
        _, op, _, _ = locate(args.op, args.dtype, dict(args.static), who="op")
    except ArgumentError as exc:
        print(f"opgen show: {exc}", file=sys.stderr)
        return 2
    if args.stage == "fused":
        print(_fused(op))
        return 0
    if args.stage in ("ir", "verified"):
        print(op.pretty(verified=args.stage == "verified"))
        if args.stage == "verified":
            print(f"  fingerprint {op.fingerprint}")
        return 0
    names = ", ".join(d.name for d in op.dims)
    if args.shape is None:
        print(f"opgen show: --stage {args.stage} of a declared op needs --shape with its dims ({names}), e.g. "
              f"--shape " + ",".join(f"{d.name}=8" for d in op.dims), file=sys.stderr)
        return 2
    try:
        dims = check_shape(op, args.shape, who="--shape")
    except ArgumentError as exc:
        print(f"opgen show: {exc}", file=sys.stderr)
        return 2
    binding = bind(op, input_shapes(op, dims))
    text = _lowered_op(op, binding, ", ".join(f"{k}={v}" for k, v in dims.items()), args.stage)
    print(text)
    return 0 if not text.startswith("no ") else 1


def _fused(op) -> str:
    from opgen.ir.passes import classify, derive_scan_variants, fuse_scan

    lines = [f"op {op.name}: " + ", ".join(f"{k} {v.value}" for k, v in classify(op).items())]
    group = fuse_scan(op)
    if group is None:
        from opgen.ir import IRError
        from opgen.ir.passes.attention import fuse_attention
        from opgen.ir.passes.window import fuse_window

        try:
            lines.append(fuse_attention(op).describe())
            return "\n".join(lines)
        except IRError:
            pass
        window = fuse_window(op)
        if window is not None:
            lines.append(window.describe())
            return "\n".join(lines)
        lines.append("no fused kernel group yet for this op: it runs node by node on the reference backend")
    else:
        lines.append(group.describe())
        lines.append("variants: " + ", ".join(v.value for v in derive_scan_variants(group)))
    return "\n".join(lines)


def _lowered(entry, stage: str) -> str:
    """The plan (variants, default configs, spaces) or a backend's source at the example's quick size."""
    import torch

    from opgen.ir import bind
    from opgen.tune.library import _inputs

    if entry.tune_dims is None:
        return f"no fused kernel for {entry.name} yet: it runs on the reference backend (see --stage fused)"
    dims = entry.tune_dims("quick")
    op, inputs = _inputs(entry.tune_op or entry.name, dims, torch.float32, torch.Generator().manual_seed(0))
    binding = bind(op, {k: tuple(v.shape) for k, v in inputs.items()})
    return _lowered_op(op, binding, ", ".join(f"{k}={v}" for k, v in dims.items()), stage)


def _lowered_op(op, binding, shape: str, stage: str) -> str:
    """The plan or a backend's source of ``op`` at ``binding``'s sizes (``shape`` their text)."""
    from opgen.ir.passes import derive_scan_variants, fuse_scan

    group = fuse_scan(op)
    if group is None:
        return _window_lowered(op, binding, shape, stage)
    if stage == "tvm":
        from opgen.targets.tvm import TVMTarget

        return f"# tvm kernel of {op.name} at {shape} (default config)\n" + TVMTarget().source(op, binding).text
    from opgen.targets.triton.scan import default_config as tr_default
    from opgen.targets.triton.scan import render, space as tr_space

    tcfg = tr_default(group, binding)
    if stage == "triton":
        return f"# triton module of {op.name} ({tcfg['variant']}), sizes are launch arguments\n" + \
            render(group, tcfg["variant"]).source
    from opgen.targets.tvm.target import default_config as tvm_default, space as tvm_space

    lines = [f"plan of {op.name} at {shape}",
             "variants: " + ", ".join(v.value for v in derive_scan_variants(group)),
             f"tvm default config: {tvm_default(group, binding).to_json()}",
             "tvm knobs: " + "; ".join(f"{k.name} in {k.values}" for k in tvm_space(group).knobs),
             f"triton default config: {tcfg}"]
    ts = tr_space(group, binding)
    for v in ts.variants:
        lines.append(f"triton {v.variant.value} knobs: " + "; ".join(f"{k} in {c}" for k, c in v.knobs.items()))
    return "\n".join(lines)


def _window_lowered(op, binding, shape: str, stage: str) -> str:
    """Plan or source of a convolution (a window group) at the example's quick size."""
    from opgen.targets.spectral import prefer_fft, window_fft_supported
    from opgen.targets.tvm import TVMTarget
    from opgen.targets.tvm.window import default_window_config, window_group, window_space

    group = window_group(op)
    if group is None:
        return f"no fused kernel for {op.name}: it runs on the reference backend (see --stage fused)"
    target = TVMTarget()
    cfg = default_window_config(group, binding, target.caps())
    if stage == "triton":
        from opgen.targets.triton import window as tw

        why = tw.unsupported(group)
        if why is not None:
            return f"no triton kernel for {op.name}: {why}"
        tcfg = tw.default_config(group, binding)
        if tcfg.variant == "fft":
            return (f"# {op.name} at {shape}: the default triton variant is fft (torch.fft on the device, no Triton "
                    "module); the direct kernel the tuner compares it with:\n" + tw.render(group, binding).source)
        return (f"# triton module of {op.name} at {shape} ({tcfg.variant} config {tcfg.to_dict()}; batch and "
                "spatial sizes are launch arguments)\n" + tw.render(group, binding, tcfg.variant).source)
    if stage == "tvm":
        head = f"# tvm kernel of {op.name} at {shape} ({cfg.variant} config)\n"
        if cfg.variant == "fft":
            from dataclasses import replace

            head = (f"# {op.name} at {shape}: the default variant is fft (torch.fft, no TVM kernel); the direct kernel "
                    "the tuner compares it with:\n")
            cfg = replace(cfg, variant="direct")
        return head + target.source(op, binding, cfg).text
    fft_ok, why = window_fft_supported(group, binding)
    lines = [f"plan of {op.name} at {shape}", group.describe(),
             "tvm variants: direct, gemm" + (", fft" if fft_ok else f" (no fft: {why})"),
             f"tvm default config: {cfg.to_json()}" + (f" (cost model: fft {'wins' if prefer_fft(group, binding) else 'loses'})"
                                                        if fft_ok else ""),
             "tvm knobs: " + "; ".join(f"{k.name} in {k.values}" for k in window_space(group, binding).knobs)]
    from opgen.targets.triton import window as tw

    if tw.unsupported(group) is None:
        tsp = tw.space(group, binding)
        lines.append(f"triton variants: {', '.join(tsp.knobs)}")
        lines.append(f"triton default config: {tsp.default.to_dict()}")
        lines += [f"triton {v} knobs: " + "; ".join(f"{k} in {c}" for k, c in knobs.items())
                  for v, knobs in tsp.knobs.items() if knobs]
    return "\n".join(lines)


def add_parsers(sub) -> None:
    """Add ``list`` and ``show`` to the ``opgen`` subcommands."""
    sub.add_parser("list", help="list the library ops").set_defaults(func=_cmd_list)
    s = sub.add_parser("show", help="print an op at a pipeline stage")
    s.add_argument("op", help="a library op (opgen list), or a declared op as package.module:attribute naming an "
                   "@opgen.op declaration or a function returning an Op (importable from here or sys.path)")
    s.add_argument("--stage", choices=STAGES, default="ir",
                   help="ir: as declared; verified: with inferred extents and per-access bound proofs; "
                   "fused: node classes, the fused kernel group and its algorithm variants; plan: variants, default "
                   "configs and spaces; tvm / triton: generated source")
    s.add_argument("--shape", type=parse_shape, default=None,
                   help="a declared op's dims for --stage plan / tvm / triton, e.g. B=2,C=256,L=512")
    add_declared_args(s)
    s.set_defaults(func=_cmd_show)
