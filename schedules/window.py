"""Window (convolution) schedules: the knobs, their choices, the feasibility checks and the default configs of the
window kernels, per target, as data and pure functions of the group, the binding and the capability record.

- TVM (CPU): :class:`WindowConfig`, :func:`window_space`, :func:`check_window_config`, :func:`default_window_config`
  (and :func:`legalize_window_config`, :func:`resolve_window_config`); rendered by :mod:`opgen.targets.tvm.window`.
- Triton (GPU): :class:`TritonWindowConfig`, :func:`triton_window_space`, :func:`check_triton_window`,
  :func:`default_triton_window_config`, :func:`dot_config`; rendered by :mod:`opgen.targets.triton.window`.

Two facts come from the targets, as a :class:`WindowRules` argument, so that schedules import no target: whether
and when the FFT algorithm applies (:mod:`opgen.targets.spectral` implements it) and the host's SIMD width (read
by :func:`opgen.targets.tvm.host.host_vector_bits`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Mapping

from opgen.ir import DType, promote
from opgen.ir.passes.window import WindowGroup

from .space import TargetKnob as Knob, TargetSpace as Space, config_from_mapping
from .window_static import StaticDim, StaticWindow, static_window


@dataclass(frozen=True)
class WindowRules:
    """What a target knows that a window schedule needs: the FFT variant's applicability (``fft_supported(group,
    binding=None) -> (ok, why)``) and preference (``prefer_fft(group, binding) -> bool``), and the host's SIMD
    width in bits (``host_vector_bits() -> int``, 0 when unknown; used when a capability record gives none)."""

    fft_supported: Callable[..., tuple[bool, str]]
    prefer_fft: Callable[[WindowGroup, Any], bool]
    host_vector_bits: Callable[[], int] = lambda: 0


# ============================================================================================== TVM (CPU)

VARIANTS = ("direct", "gemm", "dot", "cvec")
MAX_PATCH_ELEMS = 32768          # staged patch in a local (stack) buffer: 128 KiB of fp32


# ------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class WindowConfig:
    """Schedule knobs of the window kernels (JSON-serializable; see :func:`window_space`)."""

    variant: str = "direct"      # "direct" (staged patch per block) | "gemm" (padded workspace, channel tiles)
    vector: int = 8              # SIMD lanes along the output width
    co_tile: int = 1             # output channels per register tile
    rows_tile: int = 1           # output rows per register tile (2-D windows)
    width_vectors: int = 1       # vectors along the output width per register tile
    block_rows: int = 8          # direct: output rows per parallel block (a multiple of rows_tile)
    block_width: int = 64        # direct: output columns per staged patch (a multiple of the tile width)
    kh_block: int = 0            # 0: tap order; k: weight-stationary blocks of k kernel rows (row reuse)
    unroll_kh: bool = True       # tap order: unroll the kernel-height loop
    unroll_kw: bool = True       # unroll the kernel-width loop
    kw_outer: bool = False       # tap order: kw outer, kh inner (the tile's input rows slide through registers)
    fast_math: bool = True       # polynomial exp in float32 epilogues (silu, sigmoid, ...)
    batch_tile: int = 1          # dot: batch entries (data planes) per register tile

    @property
    def tile_width(self) -> int:
        return self.vector * self.width_vectors

    def to_json(self) -> dict:
        """A plain dict (:meth:`from_json` reads it back)."""
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "WindowConfig":
        """The config of a dict (or its JSON text); unknown knobs are an error naming them."""
        if isinstance(data, str):
            data = json.loads(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown window config knobs {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))


def as_window_config(config) -> WindowConfig | None:
    """A :class:`WindowConfig` from itself, its JSON dict or text, or None."""
    if config is None or isinstance(config, WindowConfig):
        return config
    if isinstance(config, (Mapping, str)):
        return WindowConfig.from_json(config)
    raise TypeError(f"expected a WindowConfig, a dict or None as the window config, got {type(config).__name__}")


# ---------------------------------------------------------------------------------------------- the space


def _vector_lanes(group: WindowGroup, caps, rules: WindowRules) -> int:
    bits = ((caps.vector_bits if caps is not None and getattr(caps, "vector_bits", 0) else rules.host_vector_bits())
            or 128)
    return max(1, bits // _acc_bits(group))


def _acc_bits(group: WindowGroup) -> int:
    return 64 if any(t.dtype == DType.f64 for t in group.op.tensors) else 32


def window_space(group: WindowGroup, binding=None, caps=None, *, rules: WindowRules) -> Space:
    """The knobs of the window kernels (a :class:`~opgen.schedules.space.TargetSpace`) and their constraints."""
    V = _vector_lanes(group, caps, rules)
    return Space(
        knobs=(
            Knob("variant", VARIANTS + (("fft",) if rules.fft_supported(group)[0] else ()),
                 "direct: staged patch per (channel, row block); gemm: padded workspace, output-channel x pixel "
                 "tiles reduced over C*KH*KW; dot: vectors along the flattened taps (few outputs, many taps); "
                 "cvec: vectors along the output channels (small images, weight gradients); fft (1-D depthwise, "
                 "stride 1): torch.fft transforms of size >= N+K-1 (the other knobs are ignored)"),
            Knob("vector", tuple(sorted({V, max(1, V // 2)})), "SIMD lanes along the output width"),
            Knob("co_tile", (1, 2, 3, 4, 6, 8), "output channels per register tile"),
            Knob("rows_tile", (1, 2, 3, 4, 5, 6, 7, 8), "output rows per register tile (2-D)"),
            Knob("width_vectors", (1, 2, 3, 4), "vectors along the output width per register tile"),
            Knob("block_rows", (8, 16, 28, 32, 56, 64), "direct: output rows per parallel block"),
            Knob("block_width", (32, 64, 128, 256, 512), "direct: output columns per staged patch"),
            Knob("kh_block", (0, 2, 3, 4, 5, 6, 7, 8), "0: tap order (each weight broadcast feeds the whole "
                 "register tile); k: blocks of k kernel rows in weight-stationary order (each input row vector is "
                 "loaded once and feeds every output row of the tile)"),
            Knob("unroll_kh", (True, False), "tap order: unroll the kernel-height loop"),
            Knob("unroll_kw", (True, False), "unroll the kernel-width loop"),
            Knob("kw_outer", (False, True), "tap order: kw outer and kh inner (input rows slide through "
                 "registers) instead of kh outer"),
            Knob("fast_math", (True, False), "polynomial exp in float32 epilogues"),
            Knob("batch_tile", (1, 2, 3, 4), "dot: batch entries (data planes) per register tile"),
        ),
        constraints=(
            "rows_tile == 1 for a 1-D window",
            "direct: block_rows is a multiple of rows_tile, block_width of vector * width_vectors "
            "(gemm ignores both: its parallel block is one register tile)",
            "co_tile * rows_tile * width_vectors <= 24 register vectors",
            "direct: (C/groups) * patch rows * patch columns <= 32768 elements (a local buffer)",
            "unroll_kw: KW <= 32; unroll_kh (tap order): KH <= 32",
            "dot (2-D, taps at dilation 1): the register tile is co_tile x batch_tile x rows_tile x width_vectors "
            "outputs (width_vectors counts output columns) <= 28 vector accumulators; block_width is the "
            "reduction elements (input channels x flattened taps) per pass",
            "cvec (2-D): the register tile is co_tile channel vectors x rows_tile x width_vectors output pixels "
            "(width_vectors counts pixels) <= 28 vector accumulators; block_width is the reduction elements "
            "(input channels x taps) per pass",
        ),
    )


def check_window_config(cfg: WindowConfig, group: WindowGroup, binding, *, rules: WindowRules) -> tuple[bool, str]:
    """Whether ``cfg`` is valid for ``group`` at ``binding`` ((False, reason) when not)."""
    if cfg.variant == "fft":
        return rules.fft_supported(group, binding)
    if cfg.variant not in VARIANTS:
        return False, f"variant must be one of {VARIANTS + ('fft',)}, got {cfg.variant!r}"
    for name in ("vector", "co_tile", "rows_tile", "width_vectors", "block_rows", "block_width"):
        if getattr(cfg, name) < 1:
            return False, f"{name} must be >= 1, got {getattr(cfg, name)}"
    if cfg.kh_block < 0:
        return False, f"kh_block must be >= 0, got {cfg.kh_block}"
    if cfg.batch_tile < 1:
        return False, f"batch_tile must be >= 1, got {cfg.batch_tile}"
    try:
        sh = static_window(group, binding)
    except ValueError as e:
        return False, str(e)
    if cfg.variant == "dot":
        return _check_dot(cfg, group, sh)
    if cfg.variant == "cvec":
        return _check_cvec(cfg, group, sh)
    if not sh.row.real and cfg.rows_tile != 1:
        return False, "rows_tile must be 1 for a 1-D window"
    if cfg.co_tile * cfg.rows_tile * cfg.width_vectors > 24:
        return False, "co_tile * rows_tile * width_vectors exceeds 24 register vectors"
    if cfg.variant == "direct":
        if cfg.block_rows % cfg.rows_tile or cfg.block_width % cfg.tile_width:
            return False, (f"block_rows {cfg.block_rows} must be a multiple of rows_tile {cfg.rows_tile} and "
                           f"block_width {cfg.block_width} of vector * width_vectors {cfg.tile_width}")
        rows = _patch_extent(_block_rows(cfg, sh), sh.row) if sh.row.real else 1
        elems = sh.Cg * rows * _patch_extent(cfg.block_width, sh.col)
        if elems > MAX_PATCH_ELEMS:
            return False, f"the staged patch has {elems} elements (> {MAX_PATCH_ELEMS}); use smaller blocks"
    if cfg.unroll_kw and sh.col.K > 32:
        return False, f"unroll_kw with a window width of {sh.col.K} (> 32)"
    if cfg.unroll_kh and not cfg.kh_block and sh.row.K > 32:
        return False, f"unroll_kh with a window height of {sh.row.K} (> 32)"
    return True, ""


DOT_MAX_ACC = 28                 # dot: vector accumulators per register tile (32 AVX-512 registers)


def dot_supported(group: WindowGroup, sh: StaticWindow) -> tuple[bool, str]:
    """Whether the ``dot`` variant applies: a 2-D window whose taps are contiguous (dilation 1 along both axes), so
    that the taps of one output flatten into one contiguous run of a padded workspace, and an output-channel axis."""
    if not sh.row.real:
        return False, "dot: 2-D windows only"
    if sh.row.dil != 1 or sh.col.dil != 1:
        return False, f"dot: the taps must be contiguous (window dilation 1), got {sh.row.dil} x {sh.col.dil}"
    ch = group.channels
    if ch.out_axis is None or ch.data_dim is None:
        return False, "dot: needs an output-channel axis and a data channel dim"
    return True, ""


def _check_dot(cfg: WindowConfig, group: WindowGroup, sh: StaticWindow) -> tuple[bool, str]:
    ok, why = dot_supported(group, sh)
    if not ok:
        return ok, why
    acc = cfg.co_tile * cfg.batch_tile * cfg.rows_tile * cfg.width_vectors
    if acc > DOT_MAX_ACC:
        return False, (f"dot: co_tile * batch_tile * rows_tile * width_vectors = {acc} vector accumulators "
                       f"(> {DOT_MAX_ACC})")
    return True, ""


def _prefer_dot(group: WindowGroup, sh: StaticWindow, binding) -> bool:
    """Many taps (>= 25) and few outputs: the flattened taps of one output (rows of the padded width) waste at most
    a third of the lanes on the columns between the taps. The weight gradient of a stride-1 convolution."""
    if not dot_supported(group, sh)[0] or sh.row.K * sh.col.K < 25:
        return False
    ow = int(binding.extents[sh.col.out_axis])
    return (ow - 1) * sh.col.stride * 2 <= sh.col.K


def _check_cvec(cfg: WindowConfig, group: WindowGroup, sh: StaticWindow) -> tuple[bool, str]:
    if not sh.row.real:
        return False, "cvec: 2-D windows only"
    ch = group.channels
    if ch.out_axis is None or ch.data_dim is None:
        return False, "cvec: needs an output-channel axis and a data channel dim"
    acc = cfg.co_tile * cfg.rows_tile * cfg.width_vectors
    if acc > DOT_MAX_ACC:
        return False, f"cvec: co_tile * rows_tile * width_vectors = {acc} vector accumulators (> {DOT_MAX_ACC})"
    if cfg.unroll_kw and sh.col.K > 32:
        return False, f"unroll_kw with a window width of {sh.col.K} (> 32)"
    if cfg.unroll_kh and sh.row.K > 32:
        return False, f"unroll_kh with a window height of {sh.row.K} (> 32)"
    return True, ""


def default_cvec_config(group: WindowGroup, binding, V: int, registers: int = 32) -> WindowConfig:
    """The channel-vectorized tile: one output row of up to 8 pixels (the width cut into equal tiles: 7 for 7, 14
    and 28 px), as many channel vectors as fit 28 accumulators (fewer when the channels are fewer); passes of
    about 4096 reduction elements (input channels x taps)."""
    sh = static_window(group, binding)
    oh, ow = int(binding.extents[sh.row.out_axis]), int(binding.extents[sh.col.out_axis])
    if ow <= 3 and oh > 1:                    # a weight gradient's 3x3 output: 3 rows x 3 columns
        rt, cw = min(3, oh), ow
    else:
        rt = 1
        cw = max(range(4, 9), key=lambda t: (ow / (-(-ow // t) * t), t)) if ow > 8 else ow
    nv = -(-sh.Fg // V)
    # accumulators + the tile's weight vectors + the broadcast within registers - 3 (more spills: AVX-512, 7 px,
    # 4 x 7 tile 23 ms against 16 ms for 3 x 7 on the 512-channel forward)
    ct = max(1, min(nv, (registers - 3) // (rt * cw + 1)))
    return WindowConfig("cvec", V, ct, rt, cw, 1, 4096, kh_block=0, unroll_kh=False,
                        unroll_kw=sh.col.K <= 8)


def default_dot_config(group: WindowGroup, binding, V: int) -> WindowConfig:
    """The dot tile for a window with few outputs and many taps (a weight gradient): up to 3 x 3 outputs, then as
    many output channels as fit 27 accumulators (at most 3 unless the outputs are fewer), batch entries for the
    rest (a 1x1 kernel's gradient: 3 channels x 3 batch entries x 1 x 1); passes of about 4096 reduction elements
    (input channels x flattened taps), so one pass's data planes stay in L2."""
    sh = static_window(group, binding)
    oh, ow = int(binding.extents[sh.row.out_axis]), int(binding.extents[sh.col.out_axis])
    rt, cw = min(3, oh), min(3, ow)
    ct = max(1, min(sh.Fg, 3, 27 // (rt * cw)))
    bt = max(1, min(3, 27 // (rt * cw * ct)))
    nb = math.prod(int(binding.extents[a]) for a, _ in group.batch)
    bt = max(1, min(bt, nb))
    return WindowConfig("dot", V, ct, rt, cw, 1, 4096, kh_block=0, unroll_kh=False, unroll_kw=False,
                        batch_tile=bt)


def _block_rows(cfg: WindowConfig, sh: StaticWindow) -> int:
    return cfg.block_rows if sh.row.real else 1


def _patch_extent(n_out: int, sp: StaticDim) -> int:
    """Input positions read by ``n_out`` consecutive outputs along ``sp``."""
    return (n_out - 1) * sp.stride + (sp.K - 1) * sp.dil + 1



def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_window_config(group: WindowGroup, binding, caps=None, *, rules: WindowRules) -> WindowConfig:
    """A heuristic config from the channel structure and the static sizes only (channels, kernel, strides), so
    that the untuned kernel of a convolution serves every batch size and every image size that fills its blocks
    (smaller images get blocks fitted to them, :func:`_fit_blocks`; tuned on AVX2).

    1-D (causal conv1d): the FFT variant where :func:`~opgen.targets.spectral.prefer_fft` says so (long depthwise
    windows), else direct, 4 vectors per tile, 512 outputs per staged block, the window unrolled (dense 1-D
    convolutions: gemm, channels x 2 vectors). A weight gradient (many taps, few outputs) with at least a vector of
    output channels, and a dense or grouped convolution with at least 8 input and a vector of output channels per
    group on an image up to 32 px wide: cvec (:func:`default_cvec_config`). Other many input channels per group
    (dense, grouped): gemm with a 6 (8 with 512-bit vectors) channels x 2 (3) rows x 1 vector tile in tap order (kw
    outer with 256-bit vectors). Depthwise
    with 256-bit vectors: direct with a 7-row x 1-vector tile in sliding tap order (kw outer), 56 x 64 output
    blocks. Otherwise (other few-channel groups, 512-bit vectors): direct with an 8-row x 1-vector tile in weight-
    stationary order with blocks of up to 7 kernel rows (the block's weights, the 8 accumulators and the input
    vector fill the 16 AVX2 registers), 64 x 64 output blocks (32 rows for kernels above 15)."""
    sh = static_window(group, binding)
    V = _vector_lanes(group, caps, rules)
    wide = V * _acc_bits(group) >= 512
    unroll_kw = sh.col.K <= 16
    if not sh.row.real:
        if sh.Cg >= 8 and sh.Fg >= 2:                  # a dense 1-D convolution: channels x 2 vectors
            return WindowConfig("gemm", V, min(8 if wide else 6, sh.Fg), 1, 2, 1, 2 * V, kh_block=0,
                                unroll_kh=True, unroll_kw=unroll_kw)
        cfg = WindowConfig("direct", V, 1, 1, 4, 1, _round_up(512, 4 * V), kh_block=0, unroll_kh=True,
                           unroll_kw=unroll_kw)
        if rules.prefer_fft(group, binding):           # a long depthwise window: transforms beat K taps
            return replace(cfg, variant="fft")
        return _shrink(cfg, group, binding, rules)
    small_taps = sh.row.K * sh.col.K <= 25
    ow = int(binding.extents[sh.col.out_axis])
    cvec = _check_cvec(WindowConfig("cvec", V, 1, 1, 1, unroll_kh=False, unroll_kw=False), group, sh)[0]
    if cvec and sh.Fg >= V and (_prefer_dot(group, sh, binding) or sh.row.K * sh.col.K >= 100):
        # the weight gradient of a convolution (taps = the N*OH*OW output pixels, outputs = the kernel taps): an
        # implicit GEMM over N*OH*OW vectorized along the output channels (:func:`default_cvec_config`). Measured
        # (AVX-512, one thread, B=8 3x3, CPU time): 64->64 56 px 60 ms with the gemm tile (16 lanes along a 3-wide
        # output), 18 ms with the dot variant, 14 ms cvec (oneDNN 18.5); 512->512 7 px 31 / 22 / 18 ms (oneDNN 24)
        return default_cvec_config(group, binding, V, 32 if wide else 16)
    if cvec and sh.Cg >= 8 and sh.Fg >= V and ow <= 32:
        # many channels on a small image (7-28 px): vectors along the output channels instead of a width that
        # fills 7/16 of a vector (B=8 3x3 512->512 7 px forward: 33 ms gemm, 16 ms cvec, oneDNN 13 ms)
        return default_cvec_config(group, binding, V, 32 if wide else 16)
    if sh.Cg >= 8 and sh.Fg >= 2:
        ct = min(8 if wide else 6, sh.Fg)
        rt = 3 if wide else 2
        # kw outer on AVX2: measured 10% faster on dense 3x3 64->64 56x56 (2.74 against 3.06 ms)
        return WindowConfig("gemm", V, ct, rt, 1, rt, V, kh_block=0, unroll_kh=small_taps, unroll_kw=unroll_kw,
                            kw_outer=not wide)
    if sh.Fg >= 8 and sh.row.K * sh.col.K >= 100:
        # few input channels, many output channels and a long window: the weight gradient of a convolution (taps
        # = the output pixels, a 3x3 output). gemm, 3 channels x 3 rows x 1 vector: 3.5 ms against 10.3 ms for
        # the direct tile on the 64->128 stride-2 56x56 gradient (best of 64 gemm tiles measured)
        # (the kernel-height loop is unrolled only up to 32 rows: the taps of an output above 32 px, the weight
        # gradient of a 33..56 px stride-1 layer, raised "unroll_kh with a window height of 56 (> 32)")
        return WindowConfig("gemm", V, min(3, sh.Fg), 3, 1, 28, _round_up(32, V), kh_block=0,
                            unroll_kh=sh.row.K <= 32, unroll_kw=False)
    if sh.Cg == 1 and sh.Fg == 1 and not wide and sh.row.K > 1:
        # depthwise on AVX2: 7 rows x 1 vector in sliding tap order (measured 3x3 .. 13x13: 15-20% over the
        # weight-stationary 8-row tile below, 31x31 the same)
        cfg = WindowConfig("direct", V, 1, 7, 1, 56, _round_up(64, V), kh_block=0, unroll_kh=sh.row.K <= 7,
                           unroll_kw=unroll_kw, kw_outer=True)
        return _shrink(cfg, group, binding, rules)
    ct = min(sh.Fg, 2) if sh.Cg > 1 or sh.Fg > 1 else 1
    rt = 8 if ct == 1 else 4
    regs = 32 if wide else 16
    kb = min(sh.row.K, regs - rt * ct - 1) if ct == 1 and sh.row.K > 1 else 0
    br = 32 if sh.row.K > 15 else 64
    cfg = WindowConfig("direct", V, ct, rt, 1, br, _round_up(64, V), kh_block=kb, unroll_kh=small_taps,
                       unroll_kw=unroll_kw)
    return _shrink(cfg, group, binding, rules)


def _fit_blocks(cfg: WindowConfig, group: WindowGroup, binding) -> WindowConfig:
    """A direct config whose blocks exceed the image: each block dim cut to the fewest tiles, a power of two, that
    cover the output (so at most four block sizes, i.e. kernels, per dim). Measured with 56 x 64 blocks against
    fitted ones, depthwise 7x7: C=384 14x14 0.50 -> 0.35 ms, C=768 7x7 0.42 -> 0.16 ms (the loops and the patch are
    sized by the static block, the work by the image)."""
    if cfg.variant != "direct":
        return cfg
    sh = static_window(group, binding)

    def fit(block: int, tile: int, n_out: int) -> int:
        tiles = 1
        while tiles * tile < min(block, n_out):
            tiles *= 2
        return min(block, tiles * tile)

    bw = fit(cfg.block_width, cfg.tile_width, int(binding.extents[sh.col.out_axis]))
    br = fit(cfg.block_rows, cfg.rows_tile, int(binding.extents[sh.row.out_axis])) if sh.row.real else cfg.block_rows
    return replace(cfg, block_rows=br, block_width=bw)


def _shrink(cfg: WindowConfig, group: WindowGroup, binding, rules: WindowRules) -> WindowConfig:
    """Fit the direct blocks to the image (:func:`_fit_blocks`), then halve them until the staged patch fits; when
    one register tile's patch is still too big (a large stride: 3x3 stride 16 reads 243 columns for 16 outputs),
    smaller tiles (:func:`_smaller_tiles`), and last the gemm variant, which stages nothing (always valid)."""
    cfg = _fit_blocks(cfg, group, binding)
    while not check_window_config(cfg, group, binding, rules=rules)[0]:
        if cfg.variant != "direct":
            break
        tw = cfg.tile_width
        if cfg.block_width > tw:
            cfg = replace(cfg, block_width=max(tw, _round_up(cfg.block_width // 2, tw)))
        elif cfg.block_rows > cfg.rows_tile:
            cfg = replace(cfg, block_rows=max(cfg.rows_tile, _round_up(cfg.block_rows // 2, cfg.rows_tile)))
        elif cfg.unroll_kw:
            cfg = replace(cfg, unroll_kw=False)
        else:
            break
    if cfg.variant == "direct" and not check_window_config(cfg, group, binding, rules=rules)[0]:
        cfg = _smaller_tiles(cfg, group, binding, rules)
    return cfg


def _smaller_tiles(cfg: WindowConfig, group: WindowGroup, binding, rules: WindowRules) -> WindowConfig:
    """A valid config for a direct ``cfg`` whose one-tile blocks still stage too big a patch: the rows of the tile
    halved, then one vector of half the lanes per tile, else the gemm variant with the same channel tile (its
    padded workspace has no size limit). Only reached by shapes whose patch does not fit otherwise (large strides
    with several input channels per group), so usual shapes keep their configs."""
    ok = lambda c: check_window_config(c, group, binding, rules=rules)[0]  # noqa: E731
    c = cfg
    while c.rows_tile > 1:
        rt = max(1, c.rows_tile // 2)
        c = replace(c, rows_tile=rt, block_rows=rt)
        if ok(c):
            return c
    for vector in (c.vector, max(1, _vector_lanes(group, None, rules) // 2)):
        c2 = replace(c, vector=vector, width_vectors=1, block_width=vector)
        if ok(c2):
            return c2
    sh = static_window(group, binding)
    g = replace(cfg, variant="gemm", width_vectors=1, block_rows=cfg.rows_tile, block_width=cfg.tile_width,
                kh_block=0, kw_outer=False, unroll_kh=cfg.unroll_kh and sh.row.K <= 32,
                unroll_kw=cfg.unroll_kw and sh.col.K <= 32)
    g = replace(g, block_width=g.tile_width)
    if ok(g):
        return g
    return replace(g, co_tile=1, rows_tile=1, block_rows=1, unroll_kh=False, unroll_kw=False)


def resolve_window_config(group: WindowGroup, binding, config=None, caps=None, *, rules: WindowRules) -> WindowConfig:
    """The config a call uses: ``config`` legalized, or the default."""
    cfg = as_window_config(config)
    if cfg is None:
        return default_window_config(group, binding, caps, rules=rules)
    return legalize_window_config(cfg, group, binding, rules=rules)


def legalize_window_config(cfg: WindowConfig, group: WindowGroup, binding, *, rules: WindowRules) -> WindowConfig:
    """``cfg`` if valid here, else the default config (ValueError naming the op when neither is)."""
    ok, why = check_window_config(cfg, group, binding, rules=rules)
    if ok:
        return cfg
    d = default_window_config(group, binding, rules=rules)
    ok2, why2 = check_window_config(d, group, binding, rules=rules)
    if not ok2:
        raise ValueError(f"op {group.op.name}: no valid window config ({why2})")
    return d


# ============================================================================================ Triton (GPU)

TRITON_VARIANTS = ("direct", "gemm", "im2win")
GEMM_LIKE = ("gemm", "im2win")      # the tl.dot variants: the same tile knobs, constraints and epilogue
H100_SHARED_MEMORY = 232448
DIRECT_ELEMS_PER_THREAD = 32      # fp32 accumulator elements per thread allowed in the direct tile
GEMM_ACC_PER_THREAD = 128         # fp32 accumulator elements per thread allowed in the gemm tile
GEMM_GATHER_PER_THREAD = 64       # gathered input elements per thread (plus their index arithmetic)
IM2WIN_MAX_BYTES = 2**31          # the largest im2win window tensor (bytes); also keeps its offsets in 32 bits

BLOCK_H = (1, 2, 4, 8, 16, 32)
BLOCK_W = (16, 32, 64, 128, 256, 512, 1024)
BLOCK_MN = (16, 32, 64, 128)
BLOCK_K = (16, 32, 64)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)

# ------------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TritonWindowConfig:
    """Schedule knobs of the window kernels (JSON-serializable through :meth:`to_dict`).

    ``direct`` uses ``block_h`` x ``block_w`` (1 x ``block_w`` for 1-D windows), ``gemm`` and ``im2win`` use
    ``block_m`` x ``block_n`` tiles reduced in ``block_k`` chunks; ``tf32`` lets their fp32 dots use tf32 tensor
    cores.
    """

    variant: str = "direct"
    block_h: int = 8
    block_w: int = 64
    block_m: int = 64
    block_n: int = 32
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2
    tf32: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TritonWindowConfig":
        """A config from a mapping (unknown keys are an error; missing ones take the defaults)."""
        return config_from_mapping(cls, d)


def as_triton_window_config(config: "TritonWindowConfig | Mapping[str, Any] | None") -> TritonWindowConfig | None:
    """``config`` as a :class:`TritonWindowConfig` (None stays None)."""
    if config is None or isinstance(config, TritonWindowConfig):
        return config
    if isinstance(config, Mapping):
        return TritonWindowConfig.from_dict(config)
    raise TypeError(f"expected a TritonWindowConfig, a dict or None, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class WindowShape:
    """The static numbers of a group at a binding (what the source depends on)."""

    two_d: bool
    KH: int
    KW: int
    SH: int
    SW: int
    DH: int
    DW: int
    OFF_H: int
    OFF_W: int
    FLIP_H: bool
    FLIP_W: bool
    Cg: int
    Fg: int
    G: int
    kind: str

    @property
    def taps(self) -> int:
        return self.KH * self.KW

    @property
    def reduction(self) -> int:
        return self.Cg * self.KH * self.KW


def window_shape(group: WindowGroup, binding) -> WindowShape:
    """The static numbers of ``group`` at ``binding`` (ValueError naming the op for unsupported forms)."""
    sh = static_window(group, binding)      # the same numbers as the TVM kernels
    r, c = sh.row, sh.col
    return WindowShape(r.real, r.K if r.real else 1, c.K, r.stride, c.stride, r.dil, c.dil, r.off if r.real else 0,
                       c.off, r.flip, c.flip, sh.Cg, sh.Fg, sh.G, sh.kind)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _in_dtype(group: WindowGroup) -> DType:
    op = group.op
    return promote(op.tensor(group.data.tensor).dtype, op.tensor(group.weight.tensor).dtype)


def _elem_bytes(group: WindowGroup) -> int:
    return 4 if _in_dtype(group) == DType.f32 else 2


# --------------------------------------------------------------------------------------- configs and space


def _smem_estimate(group: WindowGroup, cfg: TritonWindowConfig) -> int:
    """Shared-memory bytes of the gemm and im2win kernels: the pipelined operand tiles (an upper estimate)."""
    if cfg.variant not in GEMM_LIKE:
        return 0
    eb = _elem_bytes(group)
    return max(1, cfg.num_stages) * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * eb


def check_triton_window(group: WindowGroup, cfg: TritonWindowConfig | Mapping[str, Any], binding=None,
                        caps=None, *, rules: WindowRules) -> str | None:
    """Why ``cfg`` is invalid for ``group`` (at ``binding``'s static sizes when given), or None when feasible."""
    try:
        c = as_triton_window_config(cfg)
    except (TypeError, ValueError) as e:
        return str(e)
    if c.variant == "fft":
        ok, why = rules.fft_supported(group, binding)
        return None if ok else why
    if c.variant not in TRITON_VARIANTS:
        return f"variant={c.variant!r} not in {TRITON_VARIANTS + ('fft',)}"
    for name, choices in (("block_h", BLOCK_H), ("block_w", BLOCK_W), ("block_m", BLOCK_MN),
                          ("block_n", BLOCK_MN), ("block_k", BLOCK_K), ("num_warps", WARPS),
                          ("num_stages", STAGES), ("tf32", (False, True))):
        if getattr(c, name) not in choices:
            return f"{name}={getattr(c, name)!r} not in {choices}"
    if c.tf32 and _in_dtype(group) != DType.f32:
        return "tf32=True only applies to fp32 inputs"
    two_d = len(group.spatial) == 2
    threads = 32 * c.num_warps
    if c.variant == "direct":
        if not two_d and c.block_h != 1:
            return f"block_h={c.block_h} must be 1 for a 1-D window"
        per = c.block_h * c.block_w / threads
        if per > DIRECT_ELEMS_PER_THREAD:
            return (f"registers: the {c.block_h}x{c.block_w} tile is {per:.0f} accumulator elements per thread "
                    f"(> {DIRECT_ELEMS_PER_THREAD}) with {c.num_warps} warps")
    else:
        acc = c.block_m * c.block_n / threads
        if acc > GEMM_ACC_PER_THREAD:
            return (f"registers: the {c.block_m}x{c.block_n} accumulator is {acc:.0f} elements per thread "
                    f"(> {GEMM_ACC_PER_THREAD}) with {c.num_warps} warps")
        gat = c.block_m * c.block_k / threads
        if gat > GEMM_GATHER_PER_THREAD:
            what = "gathered" if c.variant == "gemm" else "window"
            return (f"registers: the {what} {c.block_m}x{c.block_k} input tile is {gat:.0f} elements per thread "
                    f"(> {GEMM_GATHER_PER_THREAD}) with {c.num_warps} warps")
        limit = int(getattr(caps, "shared_memory", 0) or 0) or H100_SHARED_MEMORY
        smem = _smem_estimate(group, c)
        if smem > limit:
            return f"shared memory: about {smem} bytes > {limit}"
    if binding is not None:
        try:
            ws = window_shape(group, binding)
        except ValueError as e:
            return str(e)
        if c.variant in GEMM_LIKE:
            if c.block_n > max(16, _pow2(ws.Fg)):
                return f"block_n={c.block_n} exceeds the padded output channels per group {max(16, _pow2(ws.Fg))}"
            if c.block_k > max(16, _pow2(ws.reduction)):
                return f"block_k={c.block_k} exceeds the padded reduction size {max(16, _pow2(ws.reduction))}"
        if c.variant == "im2win":
            return _window_bytes_error(group, binding)
    return None


# ------------------------------------------------------------------------------------ the im2win window tensor


def window_width(ws: WindowShape, ow: int) -> int:
    """``WP``: the padded input columns the ``ow`` outputs read (``(ow - 1) * SW + (KW - 1) * DW + 1``)."""
    return (ow - 1) * ws.SW + (ws.KW - 1) * ws.DW + 1 if ow > 0 else 0


def window_tensor_shape(group: WindowGroup, binding) -> tuple[int, int, int, int, int, int]:
    """The shape ``[NB, G, OH, WP, KH, Cg]`` of the im2win window tensor of ``group`` at ``binding``."""
    ws = window_shape(group, binding)
    v = _size_values(group, binding)
    return (v["NB"], ws.G, v.get("OH", 1), window_width(ws, v["OW"]), ws.KH, ws.Cg)


def window_tensor_bytes(group: WindowGroup, binding) -> int:
    """Bytes of the im2win window tensor (in the data's dtype) at ``binding``."""
    return math.prod(window_tensor_shape(group, binding)) * _data_bytes(group)


def _data_bytes(group: WindowGroup) -> int:
    return 4 if group.op.tensor(group.data.tensor).dtype == DType.f32 else 2


def _window_bytes_error(group: WindowGroup, binding) -> str | None:
    """Why the im2win window tensor is too large at ``binding`` (op, sizes, limit), or None."""
    n = window_tensor_bytes(group, binding)
    if n <= IM2WIN_MAX_BYTES:
        return None
    shape = window_tensor_shape(group, binding)
    return (f"triton target, op {group.op.name}: the im2win window tensor [NB, G, OH, WP, KH, Cg] = {list(shape)} "
            f"at sizes {_shape_text(binding)} would take {n} bytes, over the limit IM2WIN_MAX_BYTES = "
            f"{IM2WIN_MAX_BYTES}; use the gemm variant")


def default_triton_window_config(group: WindowGroup, binding, caps=None, *, rules: WindowRules) -> TritonWindowConfig:
    """A reasonable config without tuning, valid for every shape (image sizes only shrink the tiles).

    1-D: the FFT when :func:`~opgen.targets.spectral.prefer_fft` says so (long depthwise windows), gemm for dense
    windows with at least 8 input channels per group, else direct with up to 512 outputs per program. 2-D: gemm when
    a group has at least 8 input channels (64 pixels x up to 64 channels, ``block_k`` 32, 3 stages), else direct
    with a tile of up to 16 x 64 outputs.
    """
    ws = window_shape(group, binding)
    out_sizes = [int(binding.extents[s.out_axis]) for s in group.spatial]
    ow = out_sizes[-1]
    if ws.Cg >= 8 and (ws.two_d or ws.Fg >= 2):
        return dot_config(group, binding, "gemm")
    if not ws.two_d:
        if rules.prefer_fft(group, binding):
            return TritonWindowConfig("fft", block_h=1)
        bw = min(512, max(16, _pow2(ow)))
        warps = 4 if bw >= 256 else 2 if bw >= 64 else 1
        return TritonWindowConfig("direct", block_h=1, block_w=bw, num_warps=warps, num_stages=1)
    oh = out_sizes[0]
    bw = min(64, max(16, _pow2(ow)))
    bh = min(16 if ws.taps <= 49 else 8, _pow2(oh), max(1, 1024 // bw))
    warps = 4 if bh * bw >= 512 else 2 if bh * bw >= 128 else 1
    return TritonWindowConfig("direct", block_h=bh, block_w=bw, num_warps=warps, num_stages=1)


def dot_config(group: WindowGroup, binding, variant: str = "gemm") -> TritonWindowConfig:
    """The untuned config of a tl.dot variant ("gemm" or "im2win"; :func:`default_triton_window_config` uses it for
    gemm, the tuner may choose im2win): 64 pixels x up to 64 channels, ``block_k`` 32 (16 for tiny reductions),
    4 warps, 3 stages."""
    if variant not in GEMM_LIKE:
        raise ValueError(f"op {group.op.name}: {variant!r} is not a tl.dot window variant {GEMM_LIKE}")
    ws = window_shape(group, binding)
    pixels = math.prod(int(binding.extents[s.out_axis]) for s in group.spatial)
    bk = min(32, max(16, _pow2(ws.reduction)))      # 64 with 16-bit inputs: 254 registers on sm_90
    bn = min(64, max(16, _pow2(ws.Fg)))
    bm = min(64, max(16, _pow2(pixels)))
    return TritonWindowConfig(variant, block_m=bm, block_n=bn, block_k=bk, num_warps=4, num_stages=3)


@dataclass(frozen=True)
class WindowSpace:
    """The knob space of a window group: per-variant knobs (plain data) and the constraints of
    :func:`check_triton_window`."""

    name: str
    knobs: Mapping[str, Mapping[str, tuple]]      # variant -> knob -> choices
    default: TritonWindowConfig
    group: WindowGroup = field(repr=False, compare=False)
    binding: Any = field(repr=False, compare=False, default=None)
    caps: Any = field(repr=False, compare=False, default=None)
    rules: WindowRules | None = field(repr=False, compare=False, default=None)

    def infeasible(self, cfg: TritonWindowConfig | Mapping[str, Any]) -> str | None:
        return check_triton_window(self.group, cfg, self.binding, self.caps, rules=self.rules)

    def enumerate(self) -> Iterator[TritonWindowConfig]:
        """Every feasible config, variant by variant (knobs in preference order)."""
        for variant, knobs in self.knobs.items():
            names = list(knobs)

            def rec(i: int, cur: dict) -> Iterator[TritonWindowConfig]:
                if i == len(names):
                    cfg = TritonWindowConfig(variant=variant, **cur)
                    if self.infeasible(cfg) is None:
                        yield cfg
                    return
                for ch in knobs[names[i]]:
                    yield from rec(i + 1, {**cur, names[i]: ch})
            yield from rec(0, {})


def triton_window_space(group: WindowGroup, binding=None, caps=None, *, rules: WindowRules) -> WindowSpace:
    """The knobs of the window kernels: the variant, the tile sizes of each, warps, stages, tf32 (fp32 gemm and
    im2win)."""
    two_d = len(group.spatial) == 2
    f32 = _in_dtype(group) == DType.f32
    knobs: dict[str, dict[str, tuple]] = {
        "direct": {"block_h": BLOCK_H if two_d else (1,), "block_w": BLOCK_W, "num_warps": WARPS,
                   "num_stages": (1,)},
        "gemm": _gemm_knobs(f32),
        "im2win": _gemm_knobs(f32),
    }
    if rules.fft_supported(group, binding)[0]:
        knobs["fft"] = {}
    default = (default_triton_window_config(group, binding, caps, rules=rules) if binding is not None
               else TritonWindowConfig())
    return WindowSpace(f"triton/{group.op.name}/{group.out}/window", knobs, default, group, binding, caps, rules)


def _gemm_knobs(f32: bool) -> dict[str, tuple]:
    """The knobs of a tl.dot variant (gemm, im2win): tiles, warps, stages, tf32 for fp32 inputs."""
    return {"block_m": BLOCK_MN, "block_n": BLOCK_MN, "block_k": BLOCK_K, "num_warps": (2, 4, 8),
            "num_stages": STAGES, "tf32": (False, True) if f32 else (False,)}


def _size_values(group: WindowGroup, binding) -> dict[str, int]:
    ext = binding.extents
    shape = binding.shapes[group.data.tensor]
    sp = group.spatial
    vals = {"NB": math.prod(int(ext[a]) for a, _ in group.batch), "W": int(shape[sp[-1].data_dim]),
            "OW": int(ext[sp[-1].out_axis])}
    if len(sp) == 2:
        vals["H"] = int(shape[sp[0].data_dim])
        vals["OH"] = int(ext[sp[0].out_axis])
    return vals


def _shape_text(binding) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in binding.shapes.items())

