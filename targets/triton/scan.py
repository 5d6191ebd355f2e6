"""Rendering a fused scan group (:class:`opgen.ir.passes.ScanGroup`) to a Triton module.

A rendered module holds one ``@triton.jit`` kernel, the math helpers it uses, and a host-side ``launch``
function taking torch tensors (inputs, then preallocated outputs) and the op's integer dims. The text depends
only on the group and the variant, never on sizes or schedule knobs: sizes are runtime arguments, tile sizes
are ``tl.constexpr`` arguments computed by ``launch`` from the config, so one source serves every shape and
config (Triton compiles one binary per distinct constexpr set and caches it by the source text).

Variants (see :class:`opgen.ir.passes.ScanVariant`):

``sequential``
    Each program owns ``BLOCK`` lanes (the group's lane axes flattened row-major, the last fastest) times the
    whole state (every state axis padded to a power of two and masked), held in registers in the
    accumulation dtype (fp32; fp64 for fp64 inputs). It walks the steps serially (backwards for reversed
    scans): loads the coefficients (loop-invariant parts hoisted above the loop), updates
    ``h = a * h + b``, stores the state if it is an output, reduces the projection with ``tl.sum`` over the
    reduced state axes, applies the epilogue and stores it; the final-state tails are stored after the loop.
    The last state axis that the projection does not reduce may be split across programs (``STATE_TILE``).

``chunked-matmul``
    For decayed outer-product updates (GLA, Mamba-2 SSD): ``S_t = diag(exp(x_t)) S_{t-1} + k_t^T v_t`` and
    ``o_t = post_t * (q_t S_t)``. Each program owns one lane and a ``BV`` tile of the value axis and walks
    chunks of ``BT`` steps with the state ``[NK, BV]`` in registers. Per chunk: ``G = cumsum(x)``;
    ``o = (q * exp(G)) @ S`` (``tl.dot``); the intra-chunk scores
    ``A[t, s] = sum_k q[t,k] k[s,k] exp(G[t,k] - G[s,k])`` for ``s <= t``, formed exactly (every exponent
    is a difference of cumulative log-decays, so nothing overflows whatever the gate values; K is processed in
    slices of ``BKA`` so the ``[BT, BT, BKA]`` temporary stays in registers); ``o += A @ v`` (``tl.dot``);
    then ``S = exp(G_last) S + (k * exp(G_last - G))^T @ v`` (``tl.dot``). Dot operands are fp32 with an
    explicit ``input_precision`` (``"ieee"`` by default, ``"tf32"`` as a knob).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import sympy

from opgen.ir import Map, access_report, expr_str, index_str
from opgen.ir.passes import ScanGroup, ScanVariant, inline_maps
from opgen.ir.symbols import Axis
from opgen.schedules.scan import A_TILE_ELEMENTS, _axes, _free_state_axis, _pow2, _state_dtype, matmul_form
# the schedule (knobs, checks, default configs) under its old names: opgen.schedules.scan
from opgen.schedules.scan import (H100_SMS, REGISTER_ELEMENTS_PER_THREAD, MatmulForm, ScanSpace,  # noqa: F401
                                  VariantSpace, check_triton_scan as check,
                                  default_triton_scan_config as default_config, triton_scan_space as space, variants)

from .expr import (TL_DTYPE, TL_SIGNATURE, AxisVar, Namer, Section, TensorArg, ValueRenderer, helper_source,
                   render_index)

GENERATOR_VERSION = "triton-scan-1"
SUPPORTED_VARIANTS = (ScanVariant.SEQUENTIAL, ScanVariant.CHUNKED_MATMUL)


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class KernelSpec:
    """A rendered module and what its ``launch`` function and kernel expect."""

    source: str
    variant: ScanVariant
    kernel: str                                   # the @triton.jit function
    tensors: tuple[str, ...]                      # launch's tensor parameters: inputs, then written outputs
    tensor_params: tuple[str, ...]                # their Python parameter names
    outputs: tuple[str, ...]                      # the written outputs (a suffix of ``tensors``)
    dims: tuple[str, ...]                         # dim names; launch takes them as keywords ``dim_<name>``
    kernel_args: tuple[tuple[str, str, Any], ...] = field(default=())  # (arg name, kind, detail) in order
    constexprs: tuple[str, ...] = ()
    state_constexprs: tuple[tuple[str, str], ...] = ()   # (state axis name, its padded-size constexpr)


def _sym_names(op) -> dict:
    return {d: f"dim_{d.name}" for d in op.dims}


def _masked_accesses(op) -> set:
    return {acc for _, acc, st in access_report(op) if st.padded or st.guarded}


def _written_outputs(group: ScanGroup) -> list[str]:
    op = group.op
    outs = {t.name for t in op.outputs}
    names = []
    if group.store_state:
        names.append(group.scan.out)
    if group.projection is not None and group.projection.out in outs:
        names.append(group.projection.out)
    names += [m.out for m in group.epilogue if m.out in outs]
    names += [m.out for m in group.tails if m.out in outs]
    missing = outs - set(names)
    if missing:
        raise ValueError(f"op {op.name}: outputs {sorted(missing)} are not produced by the fused scan group")
    return [t.name for t in op.outputs if t.name in names]


def _pre_maps(group: ScanGroup) -> dict[str, Map]:
    op = group.op
    idx = op.nodes.index(next(n for n in op.nodes if n.out == group.scan.out))
    return {n.out: n for n in op.nodes[:idx] if isinstance(n, Map)}


def _tails(group: ScanGroup) -> list[Map]:
    pre = _pre_maps(group)
    return [Map(m.out, m.axes, inline_maps(m.value, pre)) for m in group.tails]


class _Common:
    """Names shared by both variants: pointers, dims, strides, tensor sizes."""

    def __init__(self, group: ScanGroup, variant: ScanVariant) -> None:
        self.group = group
        op = self.op = group.op
        self.namer = Namer()
        self.dim_names = _sym_names(op)
        for v in self.dim_names.values():
            self.namer.reserve(v)
        self.outputs = _written_outputs(group)
        self.tensor_names = [t.name for t in op.inputs] + self.outputs
        self.args: list[tuple[str, str, Any]] = []
        self.targs: dict[str, TensorArg] = {}
        for name in self.tensor_names:
            t = op.tensor(name)
            ptr = self.namer.fresh(f"{name}_ptr")
            strides = tuple(self.namer.fresh(f"stride_{name}_{k}") for k in range(t.rank))
            sizes = tuple(render_index(s, self._dimname) for s in t.shape)
            self.targs[name] = TensorArg(ptr, strides, sizes, t.dtype)
        for name in self.tensor_names:
            self.args.append((self.targs[name].ptr, "ptr", name))
        for d in op.dims:
            self.args.append((self.dim_names[d], "dim", d.name))
        for name in self.tensor_names:
            for k, s in enumerate(self.targs[name].strides):
                self.args.append((s, "stride", (name, k)))
        self.renderer = ValueRenderer(self.namer, self.targs, self.dim_names, _masked_accesses(op))
        self.kernel = self.namer.fresh(f"{op.name}_{variant.value.replace('-', '_')}_kernel")
        self.params = {}
        pnamer = Namer(reserved=set(self.dim_names.values()) | {"launch", "grid"})
        for name in self.tensor_names:
            self.params[name] = pnamer.fresh(name)

    def _dimname(self, s: sympy.Symbol) -> str:
        if s in self.dim_names:
            return self.dim_names[s]
        raise ValueError(f"symbol {s} in a tensor shape is not a dim")

    def ext(self, axis: Axis, mode: str = "triton") -> str:
        return render_index(self.op.extent(axis), self._dimname, mode)

    def store(self, tensor: str, idx: tuple, value: str, sec: Section, anchor: tuple[str, str] | None = None) -> None:
        """Store ``value`` to ``tensor[idx]``; ``anchor`` (zero offsets, mask) widens a scalar address to the
        value's block (a kernel without lane axes)."""
        t = self.targs[tensor]
        off = self.renderer.offset(tensor, idx, sec)
        syms: set = set()
        for ie in idx:
            syms |= sympy.sympify(ie).free_symbols
        masks = self.renderer.mask_of(syms, sec)
        if anchor is not None and not self.renderer.is_block(syms, sec):
            off = f"{off} + {anchor[0]}"
            masks.append(anchor[1])
        if not value.isidentifier():
            raise ValueError(f"internal error: storing a non-variable value {value!r}")
        cast = f"{value}.to({TL_DTYPE[t.dtype]})"
        mask = f", mask={' & '.join(masks)}" if masks else ""
        sec.emit(f"tl.store({t.ptr} + {off}, {cast}{mask})  # {tensor}[{', '.join(index_str(i) for i in idx)}]")

    def header(self, variant: ScanVariant) -> list[str]:
        g = self.group
        lines = [f'"""Generated by opgen ({GENERATOR_VERSION}): op {self.op.name}, variant {variant.value}.',
                 ""]
        lines += ["    " + ln if ln else "" for ln in g.describe().splitlines()]
        lines += ["", f"    op fingerprint {self.op.fingerprint}", '"""',
                  "import triton", "import triton.language as tl", ""]
        return lines

    def helpers(self) -> list[str]:
        text = helper_source(self.renderer.helpers)
        return ["", text.rstrip("\n"), ""] if text else []

    def signature_line(self, constexprs: list[str]) -> list[str]:
        out = []
        ptrs = [a for a, k, _ in self.args if k == "ptr"]
        dims = [a for a, k, _ in self.args if k == "dim"]
        strides = [a for a, k, _ in self.args if k == "stride"]
        out.append(f"def {self.kernel}(")
        out.append("    " + ", ".join(ptrs) + ",")
        if dims:
            out.append("    " + ", ".join(dims) + ",")
        for name in self.tensor_names:
            ss = [s for s in self.targs[name].strides]
            if ss:
                out.append("    " + ", ".join(ss) + ",")
        out.append("    " + ", ".join(f"{c}: tl.constexpr" for c in constexprs) + ",")
        out.append("):")
        assert len(strides) == sum(len(self.targs[n].strides) for n in self.tensor_names)
        return out

    def launch_call(self, grid: str, constexpr_values: list[tuple[str, str]]) -> list[str]:
        lines = [f"    {self.kernel}[{grid}]("]
        lines.append("        " + ", ".join(self.params[n] for n in self.tensor_names) + ",")
        if self.op.dims:
            lines.append("        " + ", ".join(self.dim_names[d] for d in self.op.dims) + ",")
        for n in self.tensor_names:
            p = self.params[n]
            if self.targs[n].strides:
                lines.append("        " + ", ".join(f"{p}.stride({k})" for k in range(len(self.targs[n].strides)))
                             + ",")
        lines.append("        " + ", ".join(f"{k}={v}" for k, v in constexpr_values) + ",")
        lines.append("        num_warps=num_warps, num_stages=num_stages,")
        lines.append("    )")
        return lines

    def launch_def(self, knobs: list[str], doc: str) -> list[str]:
        tparams = ", ".join(self.params[n] for n in self.tensor_names)
        dparams = ", ".join(self.dim_names[d] for d in self.op.dims)
        sig = f"def launch({tparams}, *, {dparams + ', ' if dparams else ''}{', '.join(knobs)}):"
        return [sig, f'    """{doc}"""',
                f"    tensors = ({tparams},)",
                "    IDX = tl.int64 if _needs_int64(tensors) else tl.int32"]

    def spec(self, source: str, variant: ScanVariant, constexprs: list[str],
             state_constexprs: tuple = ()) -> KernelSpec:
        return KernelSpec(source, variant, self.kernel, tuple(self.tensor_names),
                          tuple(self.params[n] for n in self.tensor_names), tuple(self.outputs),
                          tuple(d.name for d in self.op.dims), tuple(self.args), tuple(constexprs),
                          tuple(state_constexprs))


_NEEDS_INT64 = '''

def _needs_int64(tensors):
    """Whether some element offset (or the lane count) can pass 2**31 - 1: then index math runs in int64."""
    for x in tensors:
        if sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride())) >= 2**31 - 1 or x.numel() >= 2**31 - 1:
            return True
    return False
'''


# ------------------------------------------------------------------------------------------- sequential


def _render_sequential(group: ScanGroup) -> KernelSpec:
    variant = ScanVariant.SEQUENTIAL
    c = _Common(group, variant)
    op, namer, R = c.op, c.namer, 1 + len(group.state)
    state_dt = _state_dtype(group)
    split = _free_state_axis(group)
    ns = {a: namer.fresh(f"NS_{a.name}") for a in group.state}
    constexprs = ["BLOCK"] + [ns[a] for a in group.state] + ["IDX"]

    def expand(pos: int) -> str:
        if R == 1:
            return ""
        return "[" + ", ".join(":" if k == pos else "None" for k in range(R)) + "]"

    body: list[str] = []
    # lanes
    lane_exts = [c.ext(a) for a in group.lanes]
    n_lanes = " * ".join(lane_exts) if lane_exts else "1"
    body.append(f"# lanes: BLOCK consecutive positions of the row-major flattening of "
                f"({', '.join(map(str, group.lanes))})")
    body.append("lane = tl.program_id(0).to(IDX) * BLOCK + tl.arange(0, BLOCK).to(IDX)")
    body.append(f"lane_ok = (lane < {n_lanes}){expand(0)}")
    env: dict = {}
    rest = "lane"
    for k in reversed(range(len(group.lanes))):
        a = group.lanes[k]
        name = namer.fresh(a.name)
        if k == 0:
            body.append(f"{name} = {rest}{expand(0)}")
        else:
            body.append(f"{name} = ({rest} % {lane_exts[k]}){expand(0)}")
            if k > 1:
                nxt = namer.fresh("rest")
                body.append(f"{nxt} = {rest} // {lane_exts[k]}")
                rest = nxt
            else:
                rest = f"({rest} // {lane_exts[k]})"
        env[a] = AxisVar(name, "lane_ok")
    anchor = None
    if not group.lanes:
        body.append(f"lane_zero = (lane * 0){expand(0)}  # widens lane-free addresses to the block")
        anchor = ("lane_zero", "lane_ok")
    if group.state:
        body.append("# state axes, padded to powers of two (NS_*) and masked"
                    + (f"; {split} is split across grid axis 1" if split is not None else ""))
    for k, a in enumerate(group.state):
        name = namer.fresh(a.name)
        ok = namer.fresh(f"{a.name}_ok")
        if a == split:
            body.append(f"{name} = (tl.program_id(1).to(IDX) * {ns[a]} + tl.arange(0, {ns[a]}).to(IDX))"
                        f"{expand(k + 1)}")
        else:
            body.append(f"{name} = tl.arange(0, {ns[a]}).to(IDX){expand(k + 1)}")
        body.append(f"{ok} = {name} < {c.ext(a)}")
        env[a] = AxisVar(name, ok)
    shape = "[" + ", ".join(["BLOCK"] + [ns[a] for a in group.state]) + "]"

    pre = Section(env=dict(env))
    hname = namer.fresh(f"{group.scan.out}_state")
    varying = {group.step, group.scan.out}
    if group.projection is not None:
        varying.add(group.projection.out)
    varying |= {m.out for m in group.epilogue}
    step_var = namer.fresh(group.step.name)
    loop_env = dict(env)
    loop_env[group.step] = AxisVar(step_var, None, block=False)
    loop = Section(env=loop_env, hoist=pre, varying=frozenset(varying), registers={group.scan.out: hname})
    r = c.renderer
    scan = group.scan
    # initial state
    if scan.init is not None:
        init = r.value(scan.init, pre)
        state_mask = " & ".join(["lane_ok"] + [env[a].mask for a in group.state])
        pre.emit(f"{hname} = tl.where({state_mask}, tl.zeros({shape}, dtype={TL_DTYPE[state_dt]}) + {init}, 0.0)"
                 f".to({TL_DTYPE[state_dt]})  # initial state: {expr_str(scan.init)}")
    else:
        pre.emit(f"{hname} = tl.zeros({shape}, dtype={TL_DTYPE[state_dt]})")
    # loop body
    steps = c.ext(group.step)
    if group.reverse:
        loop.emit(f"{step_var} = {steps} - 1 - tl.cast(i, IDX)  # reversed scan")
    else:
        loop.emit(f"{step_var} = tl.cast(i, IDX)")
    a_code = r.value(scan.combine.a, loop, "a_t")
    b_code = r.value(scan.combine.b, loop, "b_t")
    loop.emit(f"{hname} = {a_code} * {hname} + {b_code}  # {scan.out} = a * {scan.out}[prev] + b")
    if group.store_state:
        c.store(scan.out, tuple(scan.axes), hname, loop, anchor)
    if group.projection is not None:
        p = group.projection
        val = r.value(p.value, loop, f"{p.out}_terms")
        red = [group.state.index(a) + 1 for a in p.raxes]
        masks = [env[a].mask for a in p.raxes]
        yname = namer.fresh(p.out)
        code = f"tl.where({' & '.join(masks)}, {val}, 0.0)" if masks else val
        for ax in sorted(red, reverse=True):
            code = f"tl.expand_dims(tl.sum({code}, axis={ax}), {ax})"
        loop.emit(f"{yname} = {code}  # {p.out}: sum over {', '.join(map(str, p.raxes))}")
        loop.registers[p.out] = yname
        if p.out in c.outputs:
            c.store(p.out, tuple(p.axes), yname, loop, anchor)
        for m in group.epilogue:
            v = r.value(m.value, loop, m.out)
            if not v.isidentifier():
                v = r._assign(m.out, v, loop)
            loop.registers[m.out] = v
            if m.out in c.outputs:
                c.store(m.out, tuple(m.axes), v, loop, anchor)
    # final-state tails
    tail = Section(env=dict(env), hoist=pre, varying=frozenset({group.scan.out}), registers={scan.out: hname})
    for m in _tails(group):
        v = r.value(m.value, tail, m.out)
        if m.out in c.outputs:
            if not v.isidentifier():
                v = r._assign(m.out, v, tail)
            c.store(m.out, tuple(m.axes), v, tail, anchor)

    lines = c.header(variant) + c.helpers() + ["", "@triton.jit"] + c.signature_line(constexprs)
    lines += ["    " + ln for ln in body]
    lines += pre.text(4)
    lines.append(f"    for i in range(0, {steps}):")
    lines += loop.text(8) or ["        pass"]
    if tail.lines:
        lines.append("    # final state")
        lines += tail.text(4)
    # launcher
    knobs = ["BLOCK", "STATE_TILE=0", "num_warps=4", "num_stages=2"]
    lines += ["", ""] + c.launch_def(knobs, f"Launch {c.kernel} on torch tensors; outputs are preallocated.")
    for a in group.state:
        e = c.ext(a, "python")
        if a == split:
            lines.append(f"    {ns[a]} = STATE_TILE if STATE_TILE else max(1, triton.next_power_of_2({e}))")
        else:
            lines.append(f"    {ns[a]} = max(1, triton.next_power_of_2({e}))")
    py_lanes = " * ".join(c.ext(a, "python") for a in group.lanes) or "1"
    grid1 = f"triton.cdiv({c.ext(split, 'python')}, {ns[split]})" if split is not None else "1"
    lines.append(f"    grid = (triton.cdiv({py_lanes}, BLOCK), {grid1})")
    lines += c.launch_call("grid", [("BLOCK", "BLOCK")] + [(ns[a], ns[a]) for a in group.state] + [("IDX", "IDX")])
    source = "\n".join(lines).rstrip() + "\n" + _NEEDS_INT64
    return c.spec(source, variant, constexprs, tuple((a.name, ns[a]) for a in group.state))


# ----------------------------------------------------------------------------------------- chunked-matmul


def _render_chunked_matmul(group: ScanGroup) -> KernelSpec:
    variant = ScanVariant.CHUNKED_MATMUL
    form = matmul_form(group)
    if form is None:
        raise ValueError(f"op {group.op.name}: the scan group has no chunked-matmul form")
    c = _Common(group, variant)
    op, namer, r = c.op, c.namer, c.renderer
    u, v = form.u, form.v
    acc = _state_dtype(group)
    ACC = TL_DTYPE[acc]
    constexprs = ["BT", "BV", "NK", "BKA", "IDX", "DOT_PRECISION"]
    scan = group.scan
    p = group.projection
    body: list[str] = []
    body.append(f"# one lane of ({', '.join(map(str, group.lanes))}) per program on grid axis 0, "
                f"a BV tile of {v} on grid axis 1")
    body.append("lane = tl.program_id(0).to(IDX)")
    lane_env: dict = {}
    lane_exts = [c.ext(a) for a in group.lanes]
    rest = "lane"
    for k in reversed(range(len(group.lanes))):
        a = group.lanes[k]
        name = namer.fresh(a.name)
        if k == 0:
            body.append(f"{name} = {rest}")
        else:
            body.append(f"{name} = {rest} % {lane_exts[k]}")
            nxt = namer.fresh("rest")
            body.append(f"{nxt} = {rest} // {lane_exts[k]}")
            rest = nxt
        lane_env[a] = AxisVar(name, None, block=False)
    v0 = namer.fresh(f"{v.name}0")
    body.append(f"{v0} = tl.program_id(1).to(IDX) * BV")
    # state layout [NK, BV]
    us, us_ok = namer.fresh(f"{u.name}_s"), namer.fresh(f"{u.name}_s_ok")
    vs, vs_ok = namer.fresh(f"{v.name}_s"), namer.fresh(f"{v.name}_s_ok")
    body.append(f"# state layout [NK, BV]: {u} (padded to NK) x {v} (tile)")
    body.append(f"{us} = tl.arange(0, NK).to(IDX)[:, None]")
    body.append(f"{us_ok} = {us} < {c.ext(u)}")
    body.append(f"{vs} = {v0} + tl.arange(0, BV).to(IDX)[None, :]")
    body.append(f"{vs_ok} = {vs} < {c.ext(v)}")
    # chunk layout [BT, NK] / [BT, BV]
    uc, uc_ok = namer.fresh(f"{u.name}_c"), namer.fresh(f"{u.name}_c_ok")
    vc, vc_ok = namer.fresh(f"{v.name}_c"), namer.fresh(f"{v.name}_c_ok")
    rows = namer.fresh("rows")
    body.append(f"# chunk layout: BT steps x {u} [BT, NK] or x {v} [BT, BV]")
    body.append(f"{rows} = tl.arange(0, BT).to(IDX)[:, None]")
    body.append(f"{uc} = tl.arange(0, NK).to(IDX)[None, :]")
    body.append(f"{uc_ok} = {uc} < {c.ext(u)}")
    body.append(f"{vc} = {v0} + tl.arange(0, BV).to(IDX)[None, :]")
    body.append(f"{vc_ok} = {vc} < {c.ext(v)}")
    body.append("causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]")

    s_env = {**lane_env, u: AxisVar(us, us_ok), v: AxisVar(vs, vs_ok)}
    pre = Section(env=s_env)
    S = namer.fresh(f"{scan.out}_state")
    if scan.init is not None:
        init = r.value(scan.init, pre)
        pre.emit(f"{S} = tl.where({us_ok} & {vs_ok}, tl.zeros([NK, BV], dtype={ACC}) + {init}, 0.0).to({ACC})"
                 f"  # initial state: {expr_str(scan.init)}")
    else:
        pre.emit(f"{S} = tl.zeros([NK, BV], dtype={ACC})")

    tvar = namer.fresh(group.step.name)
    varying = {group.step, u, v, scan.out, p.out} | {m.out for m in group.epilogue}
    c_env = {**lane_env, group.step: AxisVar(tvar, "row_ok"), u: AxisVar(uc, uc_ok), v: AxisVar(vc, vc_ok)}
    ch = Section(env=c_env, hoist=pre, varying=frozenset(varying), registers={scan.out: S})
    steps = c.ext(group.step)
    ch.emit(f"pos = chunk * BT + {rows}")
    ch.emit(f"row_ok = pos < {steps}")
    ch.emit(f"{tvar} = {steps} - 1 - pos  # reversed scan" if group.reverse else f"{tvar} = pos")
    uk = f"row_ok & {uc_ok}"
    scalar_decay = u not in _axes(form.log_decay)
    A = namer.fresh("A")
    X, G, GL = namer.fresh("x"), namer.fresh("G"), namer.fresh("G_last")
    Q, K, V = namer.fresh("qf"), namer.fresh("kf"), namer.fresh("vf")
    O = namer.fresh(p.out)
    if scalar_decay:
        # one decay per step (Mamba-2 SSD, retention): A = (q k^T) * exp(G_t - G_s), one tensor-core dot
        ch.emit(f"{X} = tl.where(row_ok, {r.value(form.log_decay, ch)}, 0.0)  # log decay: "
                f"{expr_str(form.log_decay)}")
        ch.emit(f"{G} = tl.cumsum({X}, axis=0)  # cumulative log decay inside the chunk [BT, 1]")
        ch.emit(f"{GL} = tl.sum({X}, axis=0)  # log decay of the whole chunk")
        ch.emit(f"{Q} = tl.where({uk}, {r.value(form.q_factor, ch)}, 0.0)  # {expr_str(form.q_factor)}")
        ch.emit(f"{K} = tl.where({uk}, {r.value(form.k_factor, ch)}, 0.0)  # {expr_str(form.k_factor)}")
        ch.emit(f"# intra-chunk scores A[t, s] = (qf[t] . kf[s]) exp(G[t] - G[s]) for s <= t")
        ch.emit(f"dG = tl.where(causal, {G} - tl.trans({G}), 0.0)")
        ch.emit(f"{A} = tl.dot({Q}.to({ACC}), tl.trans({K}).to({ACC}), input_precision=DOT_PRECISION, "
                f"out_dtype={ACC})")
        ch.emit(f"{A} = tl.where(causal, {A} * tl.exp(dG), 0.0)")
    else:
        # per-key decay (GLA): exact scores in slices of BKA keys (every exponent is G[t] - G[s] <= 0 for
        # decaying gates, so nothing overflows), then the dense parts as tensor-core dots
        ch.emit(f"# intra-chunk scores A[t, s] = sum_{u} qf[t] kf[s] exp(G[t] - G[s]) for s <= t, in {u} slices")
        ch.emit(f"{A} = tl.zeros([BT, BT], dtype={ACC})")
        ua, ua_ok = namer.fresh(f"{u.name}_a"), namer.fresh(f"{u.name}_a_ok")
        a_env = {**lane_env, group.step: AxisVar(tvar, "row_ok"), u: AxisVar(ua, ua_ok)}
        asec = Section(env=a_env, hoist=ch, varying=frozenset({u}), registers={scan.out: S})
        ch.lines.append(("for k0 in range(0, NK, BKA):", asec))
        ch.frozen = True
        asec.emit(f"{ua} = k0 + tl.arange(0, BKA).to(IDX)[None, :]")
        asec.emit(f"{ua_ok} = {ua} < {c.ext(u)}")
        ak = f"row_ok & {ua_ok}"
        Xa, Ga = namer.fresh("xa"), namer.fresh("Ga")
        asec.emit(f"{Xa} = tl.where({ak}, {r.value(form.log_decay, asec)}, 0.0)")
        asec.emit(f"{Ga} = tl.cumsum({Xa}, axis=0)")
        Qa, Ka = namer.fresh("qa"), namer.fresh("ka")
        asec.emit(f"{Qa} = tl.where({ak}, {r.value(form.q_factor, asec)}, 0.0)")
        asec.emit(f"{Ka} = tl.where({ak}, {r.value(form.k_factor, asec)}, 0.0)")
        asec.emit(f"dG = tl.where(causal[:, :, None], {Ga}[:, None, :] - {Ga}[None, :, :], 0.0)")
        asec.emit(f"{A} += tl.sum(tl.where(causal[:, :, None], {Qa}[:, None, :] * {Ka}[None, :, :] * tl.exp(dG), "
                  f"0.0), axis=2)")
        ch.frozen = False
        ch.emit(f"{X} = tl.where({uk}, {r.value(form.log_decay, ch)}, 0.0)  # log decay: "
                f"{expr_str(form.log_decay)}")
        ch.emit(f"{G} = tl.cumsum({X}, axis=0)  # cumulative log decay inside the chunk [BT, NK]")
        ch.emit(f"{GL} = tl.sum({X}, axis=0)  # log decay of the whole chunk [NK]")
        ch.emit(f"{Q} = tl.where({uk}, {r.value(form.q_factor, ch)}, 0.0)  # {expr_str(form.q_factor)}")
    ch.emit(f"# inter-chunk: the state entering the chunk, decayed to each row")
    ch.emit(f"{O} = tl.dot(({Q} * tl.exp({G})).to({ACC}), {S}, input_precision=DOT_PRECISION, "
            f"out_dtype={ACC})")
    ch.emit(f"{V} = tl.where(row_ok & {vc_ok}, {r.value(form.v_factor, ch)}, 0.0)  # {expr_str(form.v_factor)}")
    ch.emit(f"{O} += tl.dot({A}, {V}.to({ACC}), input_precision=DOT_PRECISION, out_dtype={ACC})")
    if form.post_factor is not None:
        ch.emit(f"{O} = {O} * {r.value(form.post_factor, ch)}  # {expr_str(form.post_factor)}")
    ch.registers[p.out] = O
    if p.out in c.outputs:
        c.store(p.out, tuple(p.axes), O, ch)
    for m in group.epilogue:
        val = r.value(m.value, ch, m.out)
        if not val.isidentifier():
            val = r._assign(m.out, val, ch)
        ch.registers[m.out] = val
        if m.out in c.outputs:
            c.store(m.out, tuple(m.axes), val, ch)
    ch.emit("# carry the state to the end of the chunk")
    if not scalar_decay:
        ch.emit(f"{K} = tl.where({uk}, {r.value(form.k_factor, ch)}, 0.0)  # {expr_str(form.k_factor)}")
    KD = namer.fresh("kd")
    ch.emit(f"{KD} = {K} * tl.exp({GL}[None, :] - {G})")
    ch.emit(f"{S} = {S} * tl.exp({GL})[:, None] + tl.dot(tl.trans({KD}).to({ACC}), {V}.to({ACC}), "
            f"input_precision=DOT_PRECISION, out_dtype={ACC})")
    tail = Section(env=dict(s_env), hoist=pre, varying=frozenset({scan.out}), registers={scan.out: S})
    for m in _tails(group):
        val = r.value(m.value, tail, m.out)
        if m.out in c.outputs:
            if not val.isidentifier():
                val = r._assign(m.out, val, tail)
            c.store(m.out, tuple(m.axes), val, tail)

    lines = c.header(variant) + c.helpers() + ["", "@triton.jit"] + c.signature_line(constexprs)
    lines += ["    " + ln for ln in body]
    lines += pre.text(4)
    lines.append(f"    for chunk in range(0, tl.cdiv({steps}, BT)):")
    lines += ch.text(8)
    if tail.lines:
        lines.append("    # final state")
        lines += tail.text(4)
    knobs = ["BT", "BV", "num_warps=4", "num_stages=2", 'dot_precision="ieee"']
    lines += ["", ""] + c.launch_def(knobs, f"Launch {c.kernel} on torch tensors; outputs are preallocated.")
    lines.append(f"    NK = max(16, triton.next_power_of_2({c.ext(u, 'python')}))")
    lines.append(f"    BKA = min(NK, max(1, {A_TILE_ELEMENTS} // (BT * BT)))")
    py_lanes = " * ".join(c.ext(a, "python") for a in group.lanes) or "1"
    lines.append(f"    grid = ({py_lanes}, triton.cdiv({c.ext(v, 'python')}, BV))")
    lines += c.launch_call("grid", [("BT", "BT"), ("BV", "BV"), ("NK", "NK"), ("BKA", "BKA"), ("IDX", "IDX"),
                                    ("DOT_PRECISION", "dot_precision")])
    source = "\n".join(lines).rstrip() + "\n" + _NEEDS_INT64
    return c.spec(source, variant, constexprs)


# -------------------------------------------------------------------------------------------- rendering


def render(group: ScanGroup, variant: ScanVariant | str = ScanVariant.SEQUENTIAL) -> KernelSpec:
    """The Triton module of ``group`` in ``variant`` (a pure function of both; cached)."""
    return _render(group, ScanVariant(variant))


@functools.lru_cache(maxsize=256)
def _render(group: ScanGroup, variant: ScanVariant) -> KernelSpec:
    if variant is ScanVariant.SEQUENTIAL:
        return _render_sequential(group)
    if variant is ScanVariant.CHUNKED_MATMUL:
        return _render_chunked_matmul(group)
    raise ValueError(f"the triton backend does not render the {variant.value} variant "
                     f"(supported: {', '.join(v.value for v in SUPPORTED_VARIANTS)})")


def launch_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a rendered module's ``launch`` for ``cfg``."""
    v = ScanVariant(cfg["variant"])
    if v is ScanVariant.SEQUENTIAL:
        return {"BLOCK": cfg["BLOCK"], "STATE_TILE": cfg.get("STATE_TILE", 0), "num_warps": cfg["num_warps"],
                "num_stages": cfg["num_stages"]}
    return {"BT": cfg["BT"], "BV": cfg["BV"], "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "dot_precision": cfg["dot_precision"]}


def signature(spec: KernelSpec, group: ScanGroup, binding, cfg: Mapping[str, Any],
              strides: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict, dict]:
    """(signature, constexprs) of the kernel for an ahead-of-time ``triton.compile`` at ``binding``'s sizes.

    Tensors are taken as contiguous unless ``strides`` says otherwise; as at run time, integer arguments equal
    to 1 are specialized to constants. Constexpr values are those ``launch`` would pass (``IDX`` is int32 here).
    """
    import triton.language as tl

    op = group.op
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    dims = {d.name: int(binding.dims[d]) for d in op.dims}

    def contiguous(shape):
        out, acc = [], 1
        for s in reversed(shape):
            out.append(acc)
            acc *= s
        return tuple(reversed(out))

    for name, kind, detail in spec.kernel_args:
        if kind == "ptr":
            sig[name] = TL_SIGNATURE[op.tensor(detail).dtype]
            continue
        val = dims[detail] if kind == "dim" else \
            (strides or {}).get(detail[0], contiguous(binding.shapes[detail[0]]))[detail[1]]
        if val == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i64" if abs(val) >= 2**31 else "i32"
    v = ScanVariant(cfg["variant"])
    if v is ScanVariant.SEQUENTIAL:
        split = _free_state_axis(group)
        consts["BLOCK"] = cfg["BLOCK"]
        names = dict(spec.state_constexprs)
        for a in group.state:
            consts[names[a.name]] = cfg["STATE_TILE"] if (a == split and cfg.get("STATE_TILE")) \
                else max(1, _pow2(binding.extents[a]))
    else:
        form = matmul_form(group)
        nk = max(16, _pow2(binding.extents[form.u]))
        consts.update(BT=cfg["BT"], BV=cfg["BV"], NK=nk, BKA=min(nk, max(1, A_TILE_ELEMENTS // (cfg["BT"] ** 2))),
                      DOT_PRECISION=cfg["dot_precision"])
    consts["IDX"] = tl.int32
    for c in spec.constexprs:
        sig[c] = "constexpr"
    return sig, consts
