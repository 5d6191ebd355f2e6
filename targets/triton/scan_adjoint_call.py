"""The host side of the Triton fused scan backward (:mod:`.scan_adjoint` renders the kernel): the default config,
the slot maps of cross sums scattered into groups, the ahead-of-time signature, and :func:`adjoint_call`, which
allocates the outputs, the partials and the workspaces, launches the kernel and sums the partials (the contract of
:func:`opgen.targets.tvm.scan_adjoint.adjoint_call`)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import sympy

from opgen.ir import promote
from opgen.ir.passes.scan_adjoint import ScanAdjointGroup, finish_partial

from .expr import TL_SIGNATURE, compute_dtype, render_index
from .scan_adjoint import AdjointKernel, render

#: workspace elements per program the default chunk length aims at (fp32: 128 KiB, in L2)
WORKSPACE_ELEMENTS = 32768


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ------------------------------------------------------------------------------------------------- configs


def _tile_sizes(group: ScanAdjointGroup, binding) -> tuple[int, int, list[int]]:
    """(padded state elements, block lane count, padded state sizes) at ``binding``."""
    ns = [_pow2(int(binding.extents[a])) for a in group.state]
    block_lanes = group.split or group.lanes
    nblock = math.prod(int(binding.extents[a]) for a in block_lanes)
    return math.prod(ns), nblock, ns


def default_config(group: ScanAdjointGroup, binding) -> dict:
    """``{BLOCK, CH, num_warps, num_stages, UNROLL}``: about 256 tile elements per program (16 lanes of Mamba's
    N=16 state, 2 warps: many small programs, each step's cross-lane sums within one or two warps), ``CH`` steps per
    chunk so the workspace is about :data:`WORKSPACE_ELEMENTS` per program, one step per loop iteration (``UNROLL``
    2 spills at this tile: see :func:`opgen.targets.triton.scan_adjoint.render`; which is faster is for a GPU to
    say)."""
    sp, nblock, _ = _tile_sizes(group, binding)
    block = max(1, min(_pow2(nblock), 256 // sp if sp <= 256 else 1))
    tile = block * sp
    warps = max(1, min(8, tile // 128))
    ch = max(8, min(64, 1 << max(0, (WORKSPACE_ELEMENTS // tile).bit_length() - 1)))
    return {"BLOCK": block, "CH": ch, "num_warps": warps, "num_stages": 1, "UNROLL": 1}


def _scatter_plan(kern: AdjointKernel, group: ScanAdjointGroup, binding, block: int) -> list[tuple]:
    """Per scattered cross reduction (in ``kern.scattered`` order): ``(slot, slots, first, groups, exts)``: the slot
    of each block lane among its block's groups (int32 numpy, row-major block lanes), the slots per block (a power of
    two), each block's first group (flat over the scattered axes), the group count and the scattered extents."""
    import numpy as np

    ext = binding.extents
    block_lanes = group.split or group.lanes
    exts = [int(ext[a]) for a in block_lanes]
    flat = np.arange(math.prod(exts), dtype=np.int64)
    values, rest = {}, flat
    for a, e in zip(reversed(block_lanes), reversed(exts)):
        values[a], rest = rest % e, rest // e
    env = {f"_lane{k}": values[a] for k, a in enumerate(block_lanes)}
    names = {a: f"_lane{k}" for k, a in enumerate(block_lanes)}

    def name(x):
        return names[x] if x in names else str(int(binding.dims[x]))
    red = {x.node.out: x for x in group.reductions}
    out = []
    for rout, _, _ in kern.scattered:
        scat = red[rout].scatter
        sexts = [int(ext[a]) for a, _ in scat]
        gid = np.zeros_like(flat)
        for (a, ex), e in zip(scat, sexts):
            v = eval(render_index(sympy.sympify(ex), name, "python"), {"__builtins__": {}}, env)  # noqa: S307
            gid = gid * e + np.broadcast_to(np.asarray(v, dtype=np.int64), flat.shape)
        nb = -(-len(flat) // block)
        pad = np.concatenate([gid, np.full(nb * block - len(flat), -1, dtype=np.int64)]).reshape(nb, block)
        first = np.where(pad >= 0, pad, np.iinfo(np.int64).max).min(1)
        last = pad.max(1)
        slot = (gid - np.repeat(first, block)[:len(flat)]).astype(np.int32)
        out.append((slot, _pow2(int((last - first).max()) + 1), first, math.prod(sexts), sexts))
    return out


def _constexprs(kern: AdjointKernel, group: ScanAdjointGroup, binding, cfg: Mapping[str, Any], idx,
                plan=None) -> dict:
    _, _, ns = _tile_sizes(group, binding)
    out = {"BLOCK": int(cfg["BLOCK"]), "CH": int(cfg["CH"]), "IDX": idx}
    for (_, name), v in zip(kern.state_constexprs, ns):
        out[name] = v
    plan = _scatter_plan(kern, group, binding, int(cfg["BLOCK"])) if plan is None else plan
    for (_, cname, _), (_, slots, *_) in zip(kern.scattered, plan):
        out[cname] = slots
    return out


def aot_signature(kern: AdjointKernel, group: ScanAdjointGroup, binding, cfg: Mapping[str, Any]) -> tuple[dict, dict]:
    """(signature, constexprs) for an ahead-of-time ``triton.compile`` at ``binding`` (contiguous tensors; ints
    equal to 1 specialized as at run time; int32 indices)."""
    import triton.language as tl

    op = group.op
    dims = {d.name: int(binding.dims[d]) for d in op.dims}
    shapes = _shapes(kern, group, binding, cfg)
    sdt = compute_dtype(promote(group.forward.combine.a.dtype, group.forward.combine.b.dtype))
    names = {t.name for t in op.tensors}
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    for name, kind, detail in kern.kernel_args:
        if kind == "ptr":
            sig[name] = TL_SIGNATURE[op.tensor(detail).dtype] if detail in names else (
                "*i32" if isinstance(detail, tuple) else TL_SIGNATURE[sdt])
            continue
        val = dims[detail] if kind == "dim" else _contiguous(shapes[detail[0]])[detail[1]]
        if val == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i64" if abs(val) >= 2**31 else "i32"
    consts.update(_constexprs(kern, group, binding, cfg, tl.int32))
    for c in kern.constexprs:
        sig[c] = "constexpr"
    return sig, consts


def _contiguous(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def _shapes(kern: AdjointKernel, group: ScanAdjointGroup, binding, cfg, plan=None) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor argument but the workspaces at ``binding``."""
    ext = binding.extents
    out = {n: tuple(binding.shapes[n]) for n in kern.tensors if n in binding.shapes}
    sp, nblock, _ = _tile_sizes(group, binding)
    plan = _scatter_plan(kern, group, binding, int(cfg["BLOCK"])) if plan is None else plan
    slots = {rout: pl[1] for (rout, _, _), pl in zip(kern.scattered, plan)}
    for p, rout, axes in kern.partials:
        shape = tuple(int(ext[a]) for a in axes)
        red = next(x for x in group.reductions if x.node.out == rout)
        lead = (-(-nblock // int(cfg["BLOCK"])),) + ((slots[rout],) if rout in slots else ())
        out[p] = (lead + shape) if red.kind == "cross" else shape
    return out


# ------------------------------------------------------------------------------------------------- running


def adjoint_call(group: ScanAdjointGroup, binding, cache_dir, config: Mapping[str, Any] | None = None):
    """A callable ``tensors -> {output: tensor}`` running the group's kernel at ``binding`` (tensors on a CUDA
    device, or CPU tensors under ``TRITON_INTERPRET=1``); ``config`` defaults to :func:`default_config`."""
    import torch

    from opgen.ir.dtypes import to_torch

    from .compile import load_module

    op = group.op
    cfg = dict(config) if config is not None else default_config(group, binding)
    kern = render(group, int(cfg.get("UNROLL", 1)))
    mod = load_module(kern.source, cache_dir)
    fn = getattr(mod, kern.kernel)
    ext = binding.extents
    sp, nblock, _ = _tile_sizes(group, binding)
    block, ch = int(cfg["BLOCK"]), int(cfg["CH"])
    n_blk = -(-nblock // block)
    outer = [a for a in group.lanes if a not in (group.split or group.lanes)]
    programs = n_blk * math.prod(int(ext[a]) for a in outer)
    chunks = -(-int(ext[group.step]) // ch)
    plan = _scatter_plan(kern, group, binding, block)
    shapes = _shapes(kern, group, binding, cfg, plan)
    sdt = to_torch(compute_dtype(promote(group.forward.combine.a.dtype, group.forward.combine.b.dtype)))
    red = {x.node.out: x for x in group.reductions}
    part_of = {p: (out, axes) for p, out, axes in kern.partials}
    by_name = {t.name: t for t in op.tensors}
    dims = [int(binding.dims[d]) for d in op.dims]
    ws_elems, ck_elems = programs * (ch + 1) * block * sp, programs * chunks * block * sp
    big = max([ws_elems, ck_elems] + [math.prod(s) for s in shapes.values()]) >= 2**31 - 1
    consts32 = _constexprs(kern, group, binding, cfg, None, plan)
    scat = {rout: pl for (rout, _, _), pl in zip(kern.scattered, plan)}
    on_device: dict = {}

    def call(tensors: Mapping) -> dict:
        import triton.language as tl

        device = next(iter(tensors.values())).device if tensors else torch.device("cuda")
        if device not in on_device:          # the slot maps and first groups of scattered sums, once per device
            on_device[device] = [(torch.from_numpy(pl[0]).to(device), torch.from_numpy(pl[2]).to(device))
                                 for pl in plan]
        maps = on_device[device]
        ptrs, outs, parts = [], {}, {}
        for name in kern.tensors:
            if name in group.reads:
                x = tensors[name]
                want = to_torch(by_name[name].dtype)
                ptrs.append(x if x.dtype == want else x.to(want))
            elif name in kern.direct:
                x = outs[name] = torch.empty(shapes[name], dtype=to_torch(by_name[name].dtype), device=device)
                ptrs.append(x)
            elif name in part_of:
                x = parts[name] = torch.empty(shapes[name], dtype=sdt, device=device)
                ptrs.append(x)
            elif name == "ws":
                ptrs.append(torch.empty(ws_elems, dtype=sdt, device=device))
            else:
                ptrs.append(torch.empty(ck_elems, dtype=sdt, device=device))
        strided = [x for x, name in zip(ptrs, kern.tensors) if name not in ("ws", "ckp")]
        idx64 = big or any(sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride())) >= 2**31 - 1 for x in strided)
        strides = [st for x in strided for st in x.stride()]
        consts = {**consts32, "IDX": tl.int64 if idx64 else tl.int32}
        fn[(programs,)](*ptrs, *[m[0] for m in maps], *dims, *strides, **consts, num_warps=int(cfg["num_warps"]),
                        num_stages=int(cfg["num_stages"]))
        for name, x in parts.items():
            out, axes = part_of[name]
            rr = red[out]
            if rr.kind == "cross" and out in scat:
                # [blocks, slots, rest...] -> [groups, rest...]: slot s of block k is group first[k] + s (unused
                # slots hold zeros; clamped into range)
                _, slots, _, groups, sexts = scat[out]
                first = maps[[o for o, _, _ in kern.scattered].index(out)][1]
                idx = (first[:, None] + torch.arange(slots, device=device)[None, :]).clamp_(max=groups - 1)
                y = torch.zeros((groups,) + tuple(x.shape[2:]), dtype=x.dtype, device=device)
                x = y.index_add_(0, idx.reshape(-1), x.reshape((-1,) + tuple(x.shape[2:])))
                x = x.reshape(tuple(sexts) + tuple(x.shape[1:]))
                axes = tuple(a for a, _ in rr.scatter) + tuple(axes)
                x = x.unsqueeze(0)                # the group sums are done: finish as a one-split cross sum
            outs[out] = finish_partial(rr, x, axes).to(to_torch(by_name[out].dtype)).contiguous()
        return outs

    return call
