"""Rendering a window group (:class:`opgen.ir.passes.window.WindowGroup`: a convolution plus its pointwise
epilogue) to a Triton module, its configs, and running it.

Variants (``TritonWindowConfig.variant``):

``direct``
    Depthwise and few-channels-per-group windows (depthwise conv2d 3x3 .. 31x31, causal conv1d). Each program
    owns one (batch, output channel) and a tile of outputs: ``[BLOCK_H, BLOCK_W]`` for 2-D windows,
    ``[BLOCK_W]`` for 1-D ones. It loops over the input channels of its group and the taps (``tl.static_range``
    for windows of at most 25 taps; otherwise a runtime loop over the kernel rows, each row unrolled when it
    has at most 9 taps, a runtime loop too when wider), reading the input with masked
    loads (the mask is the zero padding) into an fp32 accumulator.
``gemm`` (implicit GEMM)
    Dense and grouped convolutions. Each program owns a ``[BLOCK_M output pixels (one image, flattened) x
    BLOCK_N output channels (one group)]`` tile and reduces over ``Cg * KH * KW`` in ``BLOCK_K`` chunks: the
    ``[BLOCK_M, BLOCK_K]`` input tile is gathered with index arithmetic and masks, the ``[BLOCK_K, BLOCK_N]``
    weight tile read from the weight, and ``tl.dot`` accumulates in fp32 (fp32 inputs: ``input_precision``
    "ieee", or "tf32" with the ``tf32`` knob).
``im2win`` (Lu et al., "Im2win: An Efficient Convolution Paradigm on GPU", Euro-Par 2023)
    Dense and grouped convolutions, in two steps. :func:`window_tensor` (torch: pad, ``as_strided``,
    ``contiguous``) first materializes the window-ordered tensor, the zero padding included::

        win[nb, g, oh, wp, kh, c] = xpad[nb, g * Cg + c, oh * SH + kh * DH, wp]     shape [NB, G, OH, WP, KH, Cg]

    (``wp`` over the ``WP = (OW - 1) * SW + (KW - 1) * DW + 1`` padded columns the outputs read; 1-D windows are
    the case ``KH = OH = 1``). Then a tiled GEMM like ``gemm`` ([BLOCK_M pixels x BLOCK_N channels of one group],
    ``tl.dot`` into fp32, the same ``tf32`` knob and epilogue) reduces over ``K = KW * KH * Cg`` ordered
    ``(kw, kh, c)``: the A tile of pixel ``(oh, ow)`` and reduction index ``kk`` is
    ``win_row(oh, ow) + kw * DW * KH * Cg + (kk mod (KH * Cg))``. The layout is chosen for that address: with ``c``
    innermost, then ``kh``, the reduction operands of one ``kw`` (``KH * Cg`` values) are one contiguous run;
    with ``wp`` next, consecutive ``kw`` are the next runs, so with ``DW = 1`` the whole reduction of a pixel is
    one contiguous, affine run of ``KW * KH * Cg`` elements (the A address is ``a_row + kk``), and with
    ``DW > 1`` runs of ``KH * Cg`` separated by fixed gaps. The group sits outside ``oh`` and ``wp``, so a
    group's channels are contiguous too (a grouped conv reads no other group's values). The A loads are masked
    only by the M and K tails (the padding is in ``win``). The tensor costs about ``KH / SH`` times the
    input; :data:`IM2WIN_MAX_BYTES` bounds it (a ValueError naming the op and the sizes beyond).
``fft``
    1-D depthwise windows with stride 1 (long convolutions): :func:`opgen.targets.spectral.run_window_fft`
    (torch.fft; the other knobs are ignored).

The kernels apply the fused epilogue (bias, activation, gating, rendered by
:class:`~opgen.targets.triton.expr.ValueRenderer`) to the fp32 tile before the store, in the output's dtype.
Channel counts, window sizes, strides, dilations and offsets are baked into the source from the binding (one module
per such combination, as in :mod:`opgen.targets.tvm.window`; :func:`opgen.schedules.window_static.static_window`
provides them); batch and spatial sizes, tensor strides and the tile sizes are kernel arguments (tiles as
``tl.constexpr``). Tensors of 16-bit and 32-bit floats are supported; offsets are 32-bit (tensors of 2**31 elements
or more are rejected).

Importing this module imports neither triton nor torch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import sympy

from opgen.ir import DType
from opgen.ir.passes.window import WindowGroup, fuse_window
from opgen.schedules import window as _sched
from opgen.schedules.window import (BLOCK_H, BLOCK_K, BLOCK_MN, BLOCK_W, DIRECT_ELEMS_PER_THREAD,  # noqa: F401
                                    GEMM_ACC_PER_THREAD, GEMM_GATHER_PER_THREAD, GEMM_LIKE, H100_SHARED_MEMORY,
                                    IM2WIN_MAX_BYTES, STAGES, WARPS, TritonWindowConfig, WindowRules, WindowShape,
                                    WindowSpace, _shape_text, _size_values, _window_bytes_error, dot_config,
                                    window_shape, window_tensor_bytes, window_tensor_shape, window_width)
from opgen.schedules.window import TRITON_VARIANTS as VARIANTS, as_triton_window_config as as_config  # noqa: F401

from .expr import TL_DTYPE, TL_SIGNATURE, AxisVar, Namer, Section, TensorArg, ValueRenderer, helper_source

GENERATOR_VERSION = "triton-window-1"
SUPPORTED_DTYPES = (DType.f16, DType.bf16, DType.f32)
STATIC_TAPS = 25                  # windows with at most this many taps are fully unrolled (tl.static_range)
STATIC_ROW = 9                    # larger windows: runtime loop over kernel rows, a row of at most 9 taps unrolled
_INT32_LIMIT = 2**31 - 1


# ------------------------------------------------------------------------------------ structure and support


@functools.lru_cache(maxsize=512)
def window_group(op) -> WindowGroup | None:
    """The op's window group when these kernels can render it, else None."""
    group = fuse_window(op)
    if group is None:
        return None
    return group if unsupported(group) is None else None


def unsupported(group: WindowGroup) -> str | None:
    """Why the Triton window kernels cannot run ``group`` (sizes aside), or None."""
    op = group.op
    if len(group.spatial) not in (1, 2):
        return f"op {op.name}: {len(group.spatial)}-D windows are not supported (1-D and 2-D are)"
    ch = group.channels
    if ch.out_axis is None or ch.data_dim is None:
        return f"op {op.name}: a window without an output-channel axis reading a data channel is not supported"
    for t in op.inputs + op.outputs:
        if t.dtype not in SUPPORTED_DTYPES:
            return (f"op {op.name}: tensor {t.name} is {t.dtype.value}; the triton window kernels take "
                    f"fp16, bf16 and fp32")
    if group.epilogue is not None:
        try:
            _render_epilogue(group, _direct_env(group, two_d=len(group.spatial) == 2), Namer(_RESERVED))
        except (ValueError, KeyError, NotImplementedError) as e:
            return f"op {op.name}: cannot render the epilogue: {e}"
    return None


# ------------------------------------------------------------------------------------- the schedule (data)
# The knobs, checks and default configs live in :mod:`opgen.schedules.window`; these bind them to the FFT rule of
# :mod:`opgen.targets.spectral` (imported when first asked: it imports torch).


def _fft_ok(group: WindowGroup, binding=None) -> tuple[bool, str]:
    from opgen.targets.spectral import window_fft_supported

    return window_fft_supported(group, binding)


def _prefer_fft(group: WindowGroup, binding) -> bool:
    from opgen.targets.spectral import prefer_fft

    return prefer_fft(group, binding)


RULES = WindowRules(_fft_ok, _prefer_fft)


def check(group: WindowGroup, cfg: TritonWindowConfig | Mapping[str, Any], binding=None,
          caps=None) -> str | None:
    """Why ``cfg`` is invalid for ``group`` (at ``binding``'s static sizes when given), or None when feasible."""
    return _sched.check_triton_window(group, cfg, binding, caps, rules=RULES)


def default_config(group: WindowGroup, binding, caps=None) -> TritonWindowConfig:
    """A reasonable config without tuning (:func:`opgen.schedules.window.default_triton_window_config`)."""
    return _sched.default_triton_window_config(group, binding, caps, rules=RULES)


def space(group: WindowGroup, binding=None, caps=None) -> WindowSpace:
    """The knobs of the window kernels (:func:`opgen.schedules.window.triton_window_space`)."""
    return _sched.triton_window_space(group, binding, caps, rules=RULES)



def launch_options(cfg: TritonWindowConfig) -> dict[str, int]:
    """``num_warps`` / ``num_stages`` for the kernel launch."""
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# -------------------------------------------------------------------------------------------------- render


@dataclass(frozen=True)
class WindowModule:
    """A rendered window module: source text, the kernel name and its parameters in order.

    ``params`` are ``(name, kind, ref)``: kind "ptr" (ref: tensor name), "stride" (ref: (tensor, dim)),
    "size" (ref: "NB", "H", "W", "OH", "OW", "WP", ``("batch", axis name)`` or ``("dim", dim name)``), "win"
    (the im2win window tensor; ref: the data tensor, whose dtype it has).
    """

    source: str
    kernel: str
    variant: str
    params: tuple[tuple[str, str, Any], ...]
    constexprs: tuple[str, ...]
    shape: WindowShape


_RESERVED = ("pid", "r", "tw", "th", "n_tw", "n_th", "co", "grp", "pb", "oh", "ow", "oh_ok", "ow_ok", "acc",
             "ci", "kh", "kw", "kh_w", "kw_w", "ih", "iw", "ih_ok", "ld_ok", "wv", "xv", "x_chan", "x_base",
             "w_base", "val", "out_ok", "m", "m_ok", "cn", "co_ok", "k0", "kk", "k_ok", "kt", "a", "b", "a_ok",
             "n_pm", "pm", "pn", "NB", "H", "W", "OH", "OW", "BLOCK_H", "BLOCK_W", "BLOCK_M", "BLOCK_N",
             "BLOCK_K", "DOT_PRECISION", "window_direct", "window_gemm", "window_im2win", "WIN", "WP", "a_row",
             "kr")


def _direct_env(group: WindowGroup, two_d: bool) -> dict:
    env = {a: AxisVar(f"i_{a.name}", None, False) for a, _ in group.batch}
    env[group.channels.out_axis] = AxisVar("co", None, False)
    sp = group.spatial
    if two_d:
        env[sp[0].out_axis] = AxisVar("oh", "oh_ok")
    env[sp[-1].out_axis] = AxisVar("ow", "ow_ok")
    return env


def _gemm_env(group: WindowGroup, two_d: bool) -> dict:
    env = {a: AxisVar(f"i_{a.name}", None, False) for a, _ in group.batch}
    env[group.channels.out_axis] = AxisVar("co", "co_ok")
    sp = group.spatial
    if two_d:
        env[sp[0].out_axis] = AxisVar("oh", "m_ok")
    env[sp[-1].out_axis] = AxisVar("ow", "m_ok")
    return env


def _lin(var: str, scale: int, off: str | int = 0) -> str:
    """``var * scale + off`` without unit factors and zero terms."""
    t = var if scale == 1 else f"{var} * {scale}"
    if isinstance(off, int):
        return t if off == 0 else f"{t} + {off}" if off > 0 else f"{t} - {-off}"
    return f"{t} + {off}"


def _pname(t: str) -> str:
    return f"p_{t}"


def _sname(t: str, k: int) -> str:
    return f"s_{t}_{k}"


def _epilogue_dims(group: WindowGroup) -> list:
    """Dims an epilogue expression refers to (passed as ``dim_<name>`` arguments)."""
    if group.epilogue is None:
        return []
    from opgen.ir.symbols import Dim

    out: set = set()
    for n in group.epilogue.walk():
        syms = set()
        if n.arg is not None and hasattr(n.arg, "free_symbols"):
            syms |= n.arg.free_symbols
        if hasattr(n.arg, "index"):
            for i in n.arg.index:
                syms |= sympy.sympify(i).free_symbols
        out |= {s for s in syms if isinstance(s, Dim)}
    return sorted(out, key=lambda d: d.name)


def _render_epilogue(group: WindowGroup, env: dict, namer: Namer) -> tuple[list[str], str, set]:
    """(lines, value code, helpers) of the epilogue over the fp32 register tile ``acc``."""
    op = group.op
    if group.epilogue is None:
        return [], "acc", set()
    tensors = {t.name: TensorArg(_pname(t.name), tuple(_sname(t.name, k) for k in range(len(t.shape))),
                                 tuple("1" for _ in t.shape), t.dtype) for t in op.inputs}
    dims = {d: f"dim_{d.name}" for d in op.dims}
    vr = ValueRenderer(namer, tensors, dims, ())
    sec = Section(env=env, registers={group.reduce.out: "acc"})
    code = vr.value(group.epilogue, sec, hint="val")
    return sec.text(0), code, set(vr.helpers)


def render(group: WindowGroup, binding, variant: str = "direct") -> WindowModule:
    """The Triton module of ``group`` at ``binding``'s static sizes (channels, window, strides, offsets) for
    ``variant`` ("direct", "gemm" or "im2win")."""
    if variant not in VARIANTS:
        raise ValueError(f"op {group.op.name}: no Triton kernel for window variant {variant!r} (expected one of "
                         f"{VARIANTS})")
    why = unsupported(group)
    if why is not None:
        raise ValueError(why)
    ws = window_shape(group, binding)
    return _render(group, ws, variant)


@functools.lru_cache(maxsize=256)
def _render(group: WindowGroup, ws: WindowShape, variant: str) -> WindowModule:
    return _Renderer(group, ws, variant).render()


class _Renderer:
    def __init__(self, group: WindowGroup, ws: WindowShape, variant: str) -> None:
        self.g, self.ws, self.variant = group, ws, variant
        self.op = group.op
        self.namer = Namer(_RESERVED)
        self.params: list[tuple[str, str, Any]] = []
        self.data_t = self.op.tensor(group.data.tensor)
        self.weight_t = self.op.tensor(group.weight.tensor)
        self.out_t = self.op.tensor(group.out)
        for a, _ in group.batch:
            self.namer.reserve(f"i_{a.name}")

    # parameters -----------------------------------------------------------------------------------------
    def _collect_params(self) -> None:
        op, g, ws = self.op, self.g, self.ws
        extra = [t for t in op.inputs if t.name not in (g.data.tensor, g.weight.tensor)]
        tensors = [self.data_t, self.weight_t] + extra + [self.out_t]
        for t in tensors:
            self.params.append((_pname(t.name), "ptr", t.name))
        self.params.append(("NB", "size", "NB"))
        if len(g.batch) > 1:
            for a, _ in g.batch[1:]:
                self.params.append((f"nb_{a.name}", "size", ("batch", a.name)))
        if ws.two_d:
            self.params += [("H", "size", "H")]
        self.params += [("W", "size", "W")]
        if ws.two_d:
            self.params += [("OH", "size", "OH")]
        self.params += [("OW", "size", "OW")]
        for t in tensors:
            for k in range(len(t.shape)):
                self.params.append((_sname(t.name, k), "stride", (t.name, k)))
        for d in _epilogue_dims(g):
            self.params.append((f"dim_{d.name}", "size", ("dim", d.name)))
        if self.variant == "im2win":
            self.params += [("WIN", "win", g.data.tensor), ("WP", "size", "WP")]

    # shared pieces ----------------------------------------------------------------------------------------
    def _batch_lines(self) -> list[str]:
        """``i_<axis>`` of every batch axis from the flattened batch index ``pb`` (the first axis slowest)."""
        bs = [a for a, _ in self.g.batch]
        lines = []
        rest = "pb"
        for k in range(len(bs) - 1, -1, -1):
            a = bs[k]
            if k == 0:
                lines.append(f"i_{a.name} = {rest}")
            else:
                lines.append(f"i_{a.name} = {rest} % nb_{a.name}")
                lines.append(f"pb_{k} = {rest} // nb_{a.name}")
                rest = f"pb_{k}"
        return lines

    def _data_base(self) -> str:
        """The data pointer of the program's batch entry (batch dims only)."""
        x = self.g.data.tensor
        terms = [f"i_{a.name} * {_sname(x, k)}" for a, k in self.g.batch]
        return " + ".join([_pname(x)] + terms)

    def _spatial_dims(self) -> tuple[int | None, int]:
        sp = self.g.spatial
        return (sp[0].data_dim if self.ws.two_d else None), sp[-1].data_dim

    def _weight_offset(self, co: str, ci: str, kh: str, kw: str) -> str:
        g, ws = self.g, self.ws
        w = g.weight.tensor
        m = {g.channels.out_axis: co}
        if g.channels.in_axis is not None:
            m[g.channels.in_axis] = ci
        sp = g.spatial
        if ws.two_d:
            m[sp[0].win_axis] = f"({ws.KH - 1} - {kh})" if ws.FLIP_H else kh
        m[sp[-1].win_axis] = f"({ws.KW - 1} - {kw})" if ws.FLIP_W else kw
        terms = []
        for k, a in enumerate(g.weight.index):
            v = m.get(a)
            if v is None:
                raise ValueError(f"op {self.op.name}: weight axis {a} has no role in the window")
            if v != "0":
                terms.append(f"{v} * {_sname(w, k)}")
        return " + ".join(terms) if terms else "0"

    def _out_offset(self, env: dict) -> str:
        o = self.g.out
        return " + ".join(f"{env[a].code} * {_sname(o, k)}" for k, a in enumerate(self.g.axes))

    def _chan(self, ci: str) -> str:
        Cg = self.ws.Cg
        return "grp" if Cg == 1 else f"(grp * {Cg} + {ci})"

    def _header(self, helpers: set) -> list[str]:
        g, ws = self.g, self.ws
        desc = "x".join(str(k) for k in ((ws.KH, ws.KW) if ws.two_d else (ws.KW,)))
        lines = [f"# generated by opgen.targets.triton.window ({GENERATOR_VERSION}), variant {self.variant}",
                 f"# op {self.op.name}: {g.out} = window {desc}, stride ({ws.SH}, {ws.SW}), dilation ({ws.DH}, "
                 f"{ws.DW}), offset ({ws.OFF_H}, {ws.OFF_W}), {ws.G} groups of {ws.Cg} in -> {ws.Fg} out",
                 "import triton",
                 "import triton.language as tl",
                 ""]
        if helpers:
            lines += ["", helper_source(helpers), ""]
        return lines

    def _signature(self, name: str, constexprs: list[str]) -> list[str]:
        names = [p[0] for p in self.params] + [f"{c}: tl.constexpr" for c in constexprs]
        out = ["", "@triton.jit", f"def {name}("]
        line = "    "
        for k, n in enumerate(names):
            piece = n + (", " if k < len(names) - 1 else "")
            if len(line) + len(piece) > 110:
                out.append(line.rstrip())
                line = "    "
            line += piece
        out.append(line.rstrip() + "):")
        return out

    def render(self) -> WindowModule:
        self._collect_params()
        if self.variant == "direct":
            return self._direct()
        if self.variant == "im2win":
            return self._im2win()
        return self._gemm()

    # direct -------------------------------------------------------------------------------------------------
    def _direct(self) -> WindowModule:
        g, ws = self.g, self.ws
        two_d = ws.two_d
        env = _direct_env(g, two_d)
        epi, val, helpers = _render_epilogue(g, env, self.namer)
        x = g.data.tensor
        hd, wd = self._spatial_dims()
        cout = ws.G * ws.Fg
        b: list[str] = []
        w = b.append
        w("pid = tl.program_id(0)")
        w("n_tw = tl.cdiv(OW, BLOCK_W)")
        w("tw = pid % n_tw")
        w("r = pid // n_tw")
        if two_d:
            w("n_th = tl.cdiv(OH, BLOCK_H)")
            w("th = r % n_th")
            w("r = r // n_th")
        w(f"co = r % {cout}")
        w(f"pb = r // {cout}")
        b += self._batch_lines()
        w(f"grp = co // {ws.Fg}" if ws.Fg > 1 else "grp = co")
        if two_d:
            w("oh = th * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]")
            w("ow = tw * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]")
            w("oh_ok = oh < OH")
            w("ow_ok = ow < OW")
            w("acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)")
        else:
            w("ow = tw * BLOCK_W + tl.arange(0, BLOCK_W)")
            w("ow_ok = ow < OW")
            w("acc = tl.zeros([BLOCK_W], dtype=tl.float32)")
        w(f"x_base = {self._data_base()}")
        body: list[str] = []
        d = 0
        cloop = ws.Cg > 1
        if cloop:
            body.append(f"for ci in range({ws.Cg}):")
            d += 1
        cd = g.channels.data_dim
        body.append("    " * d + f"x_chan = x_base + {self._chan('ci')} * {_sname(x, cd)}")
        static = ws.taps <= STATIC_TAPS
        if two_d:
            kh_loop = f"tl.static_range({ws.KH})" if static else f"range({ws.KH})"
            body.append("    " * d + f"for kh in {kh_loop}:")
            d += 1
            body.append("    " * d + f"ih = {_lin('oh', ws.SH, _lin('kh', ws.DH, ws.OFF_H))}")
            body.append("    " * d + "ih_ok = (ih >= 0) & (ih < H)")
        kw_loop = f"tl.static_range({ws.KW})" if (static or ws.KW <= STATIC_ROW) else f"range({ws.KW})"
        body.append("    " * d + f"for kw in {kw_loop}:")
        d += 1
        body.append("    " * d + f"iw = {_lin('ow', ws.SW, _lin('kw', ws.DW, ws.OFF_W))}")
        if two_d:
            body.append("    " * d + "ld_ok = ih_ok & (iw >= 0) & (iw < W)")
            xoff = f"ih * {_sname(x, hd)} + iw * {_sname(x, wd)}"
        else:
            body.append("    " * d + "ld_ok = (iw >= 0) & (iw < W)")
            xoff = f"iw * {_sname(x, wd)}"
        woff = self._weight_offset("co", "ci" if cloop else "0", "kh" if two_d else "0", "kw")
        body.append("    " * d + f"wv = tl.load({_pname(g.weight.tensor)} + {woff}).to(tl.float32)")
        body.append("    " * d + f"xv = tl.load(x_chan + {xoff}, mask=ld_ok, other=0.0).to(tl.float32)")
        body.append("    " * d + "acc += xv * wv")
        b += body
        b += epi
        out_dt = TL_DTYPE[self.out_t.dtype]
        mask = "oh_ok & ow_ok" if two_d else "ow_ok"
        w(f"tl.store({_pname(g.out)} + {self._out_offset(env)}, ({val}).to({out_dt}), mask={mask})")
        constexprs = ["BLOCK_H", "BLOCK_W"] if two_d else ["BLOCK_W"]
        lines = self._header(helpers) + self._signature("window_direct", constexprs)
        doc = (f'    """{"[BLOCK_H, BLOCK_W]" if two_d else "[BLOCK_W]"} outputs of one (batch, channel) per program; '
               f'{"static" if static else "runtime"} loop over the {ws.taps} taps."""')
        lines.append(doc)
        lines += ["    " + ln if ln else "" for ln in b]
        return WindowModule("\n".join(lines) + "\n", "window_direct", "direct", tuple(self.params),
                            tuple(constexprs), ws)

    # gemm and im2win: the shared tile, weight tile, dot and epilogue -----------------------------------------
    def _dot_tile_lines(self) -> list[str]:
        """The program's output tile: pixels ``m`` (``oh``, ``ow``, ``m_ok``), channels ``co`` (``co_ok``) of group
        ``grp``, batch entry ``pb`` (and the ``i_<axis>``), and the zero fp32 accumulator."""
        ws = self.ws
        b: list[str] = []
        w = b.append
        w("pid = tl.program_id(0)")
        pixels = "OH * OW" if ws.two_d else "OW"
        w(f"n_pm = tl.cdiv({pixels}, BLOCK_M)")
        w("pm = pid % n_pm")
        w("r = pid // n_pm")
        w(f"pn = r % tl.cdiv({ws.Fg}, BLOCK_N)")
        w(f"r = r // tl.cdiv({ws.Fg}, BLOCK_N)")
        w(f"grp = r % {ws.G}")
        w(f"pb = r // {ws.G}")
        b += self._batch_lines()
        w("m = pm * BLOCK_M + tl.arange(0, BLOCK_M)")
        w(f"m_ok = (m < {pixels})[:, None]")
        if ws.two_d:
            w("oh = (m // OW)[:, None]")
            w("ow = (m % OW)[:, None]")
        else:
            w("ow = m[:, None]")
        w("cn = pn * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")
        w(f"co_ok = cn < {ws.Fg}")
        w(f"co = grp * {ws.Fg} + cn")
        return b

    def _weight_tile_line(self) -> str:
        """The ``[BLOCK_K, BLOCK_N]`` weight tile ``b`` of reduction entries ``kk`` (``ci``, ``kh``, ``kw``)."""
        g, ws = self.g, self.ws
        wt = g.weight.tensor
        # the weight offset: a [1, BLOCK_N] channel row plus a [BLOCK_K, 1] reduction column
        k_terms = self._weight_k_offset(ws.two_d, ws.Cg > 1)
        ch_k = next(k for k, a in enumerate(g.weight.index) if a == g.channels.out_axis)
        return (f"b = tl.load({_pname(wt)} + co * {_sname(wt, ch_k)} + ({k_terms})[:, None], "
                f"mask=k_ok[:, None] & co_ok, other=0.0)")

    def _dot_line(self) -> tuple[str, bool]:
        """(the ``tl.dot`` accumulation of ``a`` and ``b``, whether it is an fp32 dot with ``DOT_PRECISION``)."""
        dt_x, dt_w = self.data_t.dtype, self.weight_t.dtype
        a_v, b_v = "a", "b"
        if dt_x != dt_w:
            a_v, b_v = "a.to(tl.float32)", "b.to(tl.float32)"
        fp32_dot = dt_x != dt_w or dt_x == DType.f32
        prec = ", input_precision=DOT_PRECISION" if fp32_dot else ""
        return f"acc = tl.dot({a_v}, {b_v}, acc{prec})", fp32_dot

    def _dot_module(self, body: list[str], epi: tuple[list[str], str, set], env: dict, fp32_dot: bool,
                    kernel: str, doc: str) -> WindowModule:
        """The module of a tl.dot kernel: ``body``, then the fused epilogue and the masked store of the tile."""
        lines_epi, val, helpers = epi
        b = body + lines_epi
        out_dt = TL_DTYPE[self.out_t.dtype]
        b.append(f"tl.store({_pname(self.g.out)} + {self._out_offset(env)}, ({val}).to({out_dt}), "
                 f"mask=m_ok & co_ok)")
        constexprs = ["BLOCK_M", "BLOCK_N", "BLOCK_K"] + (["DOT_PRECISION"] if fp32_dot else [])
        lines = self._header(helpers) + self._signature(kernel, constexprs)
        lines.append(f'    """{doc}"""')
        lines += ["    " + ln if ln else "" for ln in b]
        return WindowModule("\n".join(lines) + "\n", kernel, self.variant, tuple(self.params), tuple(constexprs),
                            self.ws)

    # gemm ---------------------------------------------------------------------------------------------------
    def _gemm(self) -> WindowModule:
        g, ws = self.g, self.ws
        two_d = ws.two_d
        env = _gemm_env(g, two_d)
        epi = _render_epilogue(g, env, self.namer)
        x = g.data.tensor
        hd, wd = self._spatial_dims()
        cd = g.channels.data_dim
        taps = ws.taps
        b = self._dot_tile_lines()
        w = b.append
        w(f"x_base = {self._data_base()}")
        w("acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)")
        w(f"for k0 in range(0, {ws.reduction}, BLOCK_K):")
        ind = "    "
        w(ind + "kk = k0 + tl.arange(0, BLOCK_K)")
        w(ind + f"k_ok = kk < {ws.reduction}")
        w(ind + (f"ci = kk // {taps}" if ws.Cg > 1 else "ci = kk * 0"))
        if two_d:
            w(ind + f"kt = kk % {taps}" if ws.Cg > 1 else ind + "kt = kk")
            w(ind + f"kh = kt // {ws.KW}")
            w(ind + f"kw = kt % {ws.KW}")
            w(ind + f"ih = {_lin('oh', ws.SH)} + ({_lin('kh', ws.DH, ws.OFF_H)})[None, :]")
            w(ind + f"iw = {_lin('ow', ws.SW)} + ({_lin('kw', ws.DW, ws.OFF_W)})[None, :]")
            w(ind + "a_ok = m_ok & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)")
            xoff = f"ih * {_sname(x, hd)} + iw * {_sname(x, wd)}"
        else:
            w(ind + (f"kw = kk % {taps}" if ws.Cg > 1 else "kw = kk"))
            w(ind + f"iw = {_lin('ow', ws.SW)} + ({_lin('kw', ws.DW, ws.OFF_W)})[None, :]")
            w(ind + "a_ok = m_ok & k_ok[None, :] & (iw >= 0) & (iw < W)")
            xoff = f"iw * {_sname(x, wd)}"
        if ws.Cg > 1:
            chan = f"((grp * {ws.Cg} + ci) * {_sname(x, cd)})[None, :]"
        else:
            chan = f"grp * {_sname(x, cd)}"
        w(ind + f"a = tl.load(x_base + {chan} + {xoff}, mask=a_ok, other=0.0)")
        w(ind + self._weight_tile_line())
        dot, fp32_dot = self._dot_line()
        w(ind + dot)
        doc = (f"Implicit GEMM: [BLOCK_M pixels x BLOCK_N channels] per program, reduced over {ws.Cg}*{taps} in "
               f"BLOCK_K chunks.")
        return self._dot_module(b, epi, env, fp32_dot, "window_gemm", doc)

    # im2win -------------------------------------------------------------------------------------------------
    def _im2win(self) -> WindowModule:
        """GEMM over the window tensor ``WIN`` ([NB, G, OH, WP, KH, Cg], contiguous): the A tile of a pixel is
        the contiguous run ``a_row + kk`` (plus a fixed gap per ``kw`` when ``DW > 1``), masked only by the
        M and K tails."""
        g, ws = self.g, self.ws
        env = _gemm_env(g, ws.two_d)
        epi = _render_epilogue(g, env, self.namer)
        run = ws.KH * ws.Cg                        # one kw's contiguous run: (kh, c)
        b = self._dot_tile_lines()
        w = b.append
        plane = "pb" if ws.G == 1 else f"(pb * {ws.G} + grp)"
        row = f"({plane} * OH + oh)" if ws.two_d else plane
        w(f"a_row = WIN + {row} * WP * {run} + {_lin('ow', ws.SW * run)}")
        w("acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)")
        w(f"for k0 in range(0, {ws.reduction}, BLOCK_K):")
        ind = "    "
        w(ind + "kk = k0 + tl.arange(0, BLOCK_K)")
        w(ind + f"k_ok = kk < {ws.reduction}")
        b += [ind + ln for ln in self._im2win_k_lines(run)]
        gap = (ws.DW - 1) * run
        a_off = "kk" if gap == 0 or ws.KW == 1 else f"(kk + kw * {gap})"
        w(ind + f"a = tl.load(a_row + {a_off}[None, :], mask=m_ok & k_ok[None, :], other=0.0)")
        w(ind + self._weight_tile_line())
        dot, fp32_dot = self._dot_line()
        w(ind + dot)
        doc = (f"im2win GEMM: [BLOCK_M pixels x BLOCK_N channels] per program; K = {ws.KW}*{ws.KH}*{ws.Cg} "
               f"(kw, kh, c) runs of WIN.")
        return self._dot_module(b, epi, env, fp32_dot, "window_im2win", doc)

    def _im2win_k_lines(self, run: int) -> list[str]:
        """``kw``, ``kh``, ``ci`` of reduction entries ``kk`` ordered (kw, kh, c), as the weight offset needs."""
        ws = self.ws
        lines = [f"kw = kk // {run}" if ws.KW > 1 else "kw = kk * 0"]
        kr = "kk" if ws.KW == 1 else "kr"
        if ws.KW > 1:
            lines.append(f"kr = kk % {run}")
        if ws.two_d:
            lines.append(f"kh = {kr} // {ws.Cg}" if ws.Cg > 1 else f"kh = {kr}")
        if ws.Cg > 1:
            lines.append(f"ci = {kr} % {ws.Cg}")
        return lines

    def _weight_k_offset(self, two_d: bool, cloop: bool) -> str:
        """The weight offset of reduction entries ``kk`` (ci, kh, kw; the window flipped where it is)."""
        g, ws = self.g, self.ws
        wt = g.weight.tensor
        m = {}
        if g.channels.in_axis is not None:
            m[g.channels.in_axis] = "ci" if cloop else None
        sp = g.spatial
        if two_d:
            m[sp[0].win_axis] = f"({ws.KH - 1} - kh)" if ws.FLIP_H else "kh"
        m[sp[-1].win_axis] = f"({ws.KW - 1} - kw)" if ws.FLIP_W else "kw"
        terms = []
        for k, a in enumerate(g.weight.index):
            if a == g.channels.out_axis:
                continue
            if a not in m:
                raise ValueError(f"op {self.op.name}: weight axis {a} has no role in the window")
            if m[a] is not None:
                terms.append(f"{m[a]} * {_sname(wt, k)}")
        return " + ".join(terms) if terms else "kk * 0"


# ------------------------------------------------------------------------------------------------- running


def resolve_config(group: WindowGroup, binding, config=None, caps=None) -> TritonWindowConfig:
    """``config`` (checked; ValueError naming the op when invalid) or the default config."""
    cfg = as_config(config)
    if cfg is None:
        return default_config(group, binding, caps)
    why = check(group, cfg, binding, caps)
    if why is not None:
        raise ValueError(f"triton target, op {group.op.name}: invalid window config {cfg.to_dict()}: {why}")
    return cfg



def _check_sizes(group: WindowGroup, binding, mod: WindowModule, cfg: TritonWindowConfig) -> int:
    """The number of programs; ValueError naming the op and the sizes when they break the kernel's assumptions
    (32-bit offsets, the CUDA grid limit, the im2win window tensor's byte limit)."""
    for name, shp in binding.shapes.items():
        n = math.prod(int(s) for s in shp)
        if n > _INT32_LIMIT:
            raise ValueError(f"triton target, op {group.op.name}: tensor {name} of shape {tuple(shp)} has {n} "
                             f"elements; the window kernels use 32-bit offsets (at most {_INT32_LIMIT})")
    v = _size_values(group, binding)
    ws = mod.shape
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    if mod.variant == "direct":
        progs = cdiv(v["OW"], cfg.block_w) * (cdiv(v["OH"], cfg.block_h) if ws.two_d else 1) * ws.G * ws.Fg * v["NB"]
    else:
        pix = v["OW"] * (v["OH"] if ws.two_d else 1)
        progs = cdiv(pix, cfg.block_m) * cdiv(ws.Fg, cfg.block_n) * ws.G * v["NB"]
    if progs > _INT32_LIMIT:
        raise ValueError(f"triton target, op {group.op.name}: {progs} programs at sizes {_shape_text(binding)} "
                         f"exceed the grid limit {_INT32_LIMIT}; use larger tiles")
    if mod.variant == "im2win":
        why = _window_bytes_error(group, binding)
        if why is not None:
            raise ValueError(why)
    return progs



def kernel_args(group: WindowGroup, mod: WindowModule, binding, tensors: Mapping[str, Any],
                window: Any = None) -> list:
    """The kernel's positional arguments (tensors by name; sizes from ``binding``; strides from the tensors;
    ``window``: the im2win window tensor, which only that variant takes)."""
    vals = _size_values(group, binding)
    vals["WP"] = window_width(mod.shape, vals["OW"])
    dims = {d.name: int(v) for d, v in binding.dims.items()}
    out = []
    for name, kind, ref in mod.params:
        if kind == "ptr":
            out.append(tensors[ref])
        elif kind == "win":
            if window is None:
                raise ValueError(f"triton target, op {group.op.name}: the im2win kernel needs its window tensor")
            out.append(window)
        elif kind == "stride":
            t, k = ref
            out.append(int(tensors[t].stride(k)))
        elif isinstance(ref, tuple) and ref[0] == "batch":
            out.append(int(binding.extents[next(a for a, _ in group.batch if a.name == ref[1])]))
        elif isinstance(ref, tuple) and ref[0] == "dim":
            out.append(dims[ref[1]])
        else:
            out.append(vals[ref])
    return out


def constexpr_values(mod: WindowModule, cfg: TritonWindowConfig) -> dict[str, Any]:
    """The ``tl.constexpr`` arguments of ``mod`` under ``cfg``."""
    vals = {"BLOCK_H": cfg.block_h, "BLOCK_W": cfg.block_w, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k, "DOT_PRECISION": "tf32" if cfg.tf32 else "ieee"}
    return {c: vals[c] for c in mod.constexprs}


def run(group: WindowGroup, inputs: Mapping[str, Any], binding, config=None, cache_dir=None, caps=None) -> dict:
    """The op's outputs (``{name: fresh tensor}``) by the window kernel of ``config`` (the default when None)."""
    import torch

    from opgen.ir.dtypes import to_torch

    from .compile import load_module

    op = group.op
    missing = [t.name for t in op.inputs if t.name not in inputs]
    if missing:
        raise ValueError(f"triton target, op {op.name}: missing inputs {missing}")
    cfg = resolve_config(group, binding, config, caps)
    if cfg.variant == "fft":
        from opgen.targets.spectral import run_window_fft

        return run_window_fft(group, inputs, binding)
    mod = render(group, binding, cfg.variant)
    progs = _check_sizes(group, binding, mod, cfg)
    device = inputs[group.data.tensor].device
    tensors = {}
    for t in op.inputs:
        v = inputs[t.name]
        if v.dtype != to_torch(t.dtype):
            v = v.to(to_torch(t.dtype))
        tensors[t.name] = v
    out = torch.empty(binding.shapes[group.out], dtype=to_torch(op.tensor(group.out).dtype), device=device)
    tensors[group.out] = out
    if progs == 0 or out.numel() == 0:
        if out.numel():
            out.zero_()
        return {group.out: out}
    window = window_tensor(group, binding, tensors[group.data.tensor]) if mod.variant == "im2win" else None
    m = load_module(mod.source, cache_dir)
    kernel = getattr(m, mod.kernel)
    kernel[(progs,)](*kernel_args(group, mod, binding, tensors, window), **constexpr_values(mod, cfg),
                     **launch_options(cfg))
    return {group.out: out}


def window_tensor(group: WindowGroup, binding, x):
    """The im2win window tensor of data ``x`` (torch): ``win[nb, g, oh, wp, kh, c] = xpad[nb, g * Cg + c,
    oh * SH + kh * DH, wp]``, contiguous, of shape :func:`window_tensor_shape` (ValueError beyond
    :data:`IM2WIN_MAX_BYTES`). ``xpad`` is ``x`` with its batch dims flattened, zero-padded (or cropped) to the
    rows and columns the outputs read."""
    import torch.nn.functional as F

    why = _window_bytes_error(group, binding)
    if why is not None:
        raise ValueError(why)
    ws = window_shape(group, binding)
    nb, G, oh, wp, kh, cg = window_tensor_shape(group, binding)
    xc = _nchw(group, x)                                   # [NB, C, H, W] (H = 1 for 1-D windows)
    H, W = xc.shape[-2:]
    hp = (oh - 1) * ws.SH + (kh - 1) * ws.DH + 1 if oh > 0 else 0
    xp = F.pad(xc, (-ws.OFF_W, ws.OFF_W + wp - W, -ws.OFF_H, ws.OFF_H + hp - H)).contiguous()
    sn, sc, sh, sw = xp.stride()
    view = xp.as_strided((nb, G, oh, wp, kh, cg), (sn, cg * sc, ws.SH * sh, sw, ws.DH * sh, sc))
    return view.contiguous()


def _nchw(group: WindowGroup, x):
    """``x`` as [NB, C, H, W]: batch dims first (flattened, the first slowest), then channel and spatial dims."""
    sp = group.spatial
    order = [k for _, k in group.batch] + [group.channels.data_dim] + [s.data_dim for s in sp]
    if len(order) != x.dim():
        raise ValueError(f"triton target, op {group.op.name}: the im2win variant needs data dims batch, channel "
                         f"and spatial only, got a {x.dim()}-D tensor")
    xc = x.permute(order)
    nb = math.prod(xc.shape[:len(group.batch)])
    xc = xc.reshape(nb, *xc.shape[len(group.batch):])
    return xc if len(sp) == 2 else xc.unsqueeze(2)


@functools.lru_cache(maxsize=1)
def aot_signature(group: WindowGroup, mod: WindowModule, binding=None) -> dict[str, str]:
    """The ``triton.compile`` signature of the kernel: pointer types from the op's dtypes, 32-bit ints."""
    sig = {}
    for name, kind, ref in mod.params:
        sig[name] = TL_SIGNATURE[group.op.tensor(ref).dtype] if kind in ("ptr", "win") else "i32"
    for c in mod.constexprs:
        sig[c] = "constexpr"
    return sig


__all__ = ["GENERATOR_VERSION", "IM2WIN_MAX_BYTES", "TritonWindowConfig", "VARIANTS", "WindowModule", "WindowShape",
           "WindowSpace", "aot_signature", "as_config", "check", "constexpr_values", "default_config", "dot_config",
           "kernel_args", "launch_options", "render", "resolve_config", "run", "space", "unsupported",
           "window_group", "window_shape", "window_tensor", "window_tensor_bytes", "window_tensor_shape",
           "window_width"]
