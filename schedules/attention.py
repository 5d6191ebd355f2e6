"""Attention schedules: the knobs, their choices, the feasibility checks and the default configs of the attention
kernels, per target, as data and pure functions of the attention group, the sizes and the capability record.

- TVM (CPU), forward: :class:`AttentionConfig`, :func:`attention_space`, :func:`check_attention_config`,
  :func:`default_attention_config`; backward: :class:`AttentionBackwardConfig`, :func:`default_backward_config`,
  :func:`as_backward_config`. Rendered by :mod:`opgen.targets.tvm.attention` and
  :mod:`opgen.targets.tvm.attention_backward`.
- Triton (GPU), forward, backward and decode: :class:`TritonAttentionConfig`, :class:`AttentionShape`,
  :func:`triton_attention_space`, :func:`check_triton_attention`, :func:`default_triton_attention_config`,
  :func:`use_decode`. Rendered by :mod:`opgen.targets.triton.attention`.

The host's SIMD width (read by :func:`opgen.targets.tvm.host.host_vector_bits`) comes in as a
``host_vector_bits`` argument where a capability record gives none, so that schedules import no target.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

from opgen.ir import DType
from opgen.ir.passes.attention import AttentionGroup

from .space import TargetKnob as Knob, TargetSpace as Space, config_from_mapping


def _no_host_bits() -> int:
    return 0


# ============================================================================================== TVM (CPU)

# ------------------------------------------------------------------------------------------------- forward


@dataclass(frozen=True)
class AttentionConfig:
    """Schedule knobs of the forward kernel (JSON-serializable).

    ``block_m`` / ``block_n`` are the query / key tile sizes and must be those of the tile table. ``vector`` is
    the SIMD width in elements (8 for float32 on AVX2, 16 on AVX-512); ``block_m`` must be a multiple of it.
    The two products are register-blocked: ``qk_rows`` keys x ``qk_vectors`` query vectors for the scores,
    ``pv_rows`` queries x ``pv_vectors`` value vectors for the accumulator (their product plus the operands
    should fit the 16 (AVX2) or 32 (AVX-512) vector registers).
    """

    block_m: int = 64
    block_n: int = 64
    vector: int = 8
    qk_rows: int = 6
    qk_vectors: int = 2
    pv_rows: int = 4
    pv_vectors: int = 2
    fast_math: bool = True     # polynomial exp for float32

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "AttentionConfig":
        known = set(AttentionConfig.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown attention config knobs {sorted(unknown)}; known: {sorted(known)}")
        return AttentionConfig(**data)


def as_attention_config(config: "AttentionConfig | Mapping[str, Any]") -> AttentionConfig:
    """An :class:`AttentionConfig` from itself or its JSON dict."""
    if isinstance(config, AttentionConfig):
        return config
    if isinstance(config, Mapping):
        return AttentionConfig.from_json(config)
    raise TypeError(f"expected an AttentionConfig or its dict, got {type(config).__name__}")


def check_attention_config(cfg: AttentionConfig, dtype: DType = DType.f32) -> str | None:
    """Why ``cfg`` cannot be rendered (None when it can)."""
    for name in ("block_m", "block_n", "vector", "qk_rows", "qk_vectors", "pv_rows", "pv_vectors"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{name} must be a positive int, got {v!r}"
    if cfg.vector & (cfg.vector - 1):
        return f"vector must be a power of two, got {cfg.vector}"
    if cfg.block_m % cfg.vector:
        return f"block_m={cfg.block_m} must be a multiple of vector={cfg.vector}"
    if cfg.block_m > 512 or cfg.block_n > 512:
        return "block_m and block_n must be <= 512 (tiles live in local buffers)"
    if cfg.qk_rows * cfg.qk_vectors > 32 or cfg.pv_rows * cfg.pv_vectors > 32:
        return "a register block may hold at most 32 vectors"
    return None


def attention_space(group: AttentionGroup, caps=None, *, host_vector_bits: Callable[[], int] = _no_host_bits) -> Space:
    """The knobs of the forward kernel for ``group`` (values before size-dependent constraints)."""
    V = _host_lanes(caps, DType.f32, host_vector_bits)
    return Space(
        knobs=(
            Knob("block_m", (16, 32, 48, 64, 96, 128), "query rows per tile (= the tile table's block_m)"),
            Knob("block_n", (16, 32, 48, 64, 96, 128), "keys per tile (= the tile table's block_n)"),
            Knob("vector", tuple(sorted({max(1, V // 2), V})), "SIMD lanes (float32: 8 on AVX2, 16 on AVX-512)"),
            Knob("qk_rows", (1, 2, 3, 4, 5, 6, 8), "keys per register block of the score product"),
            Knob("qk_vectors", (1, 2, 3, 4), "query vectors per register block of the score product"),
            Knob("pv_rows", (1, 2, 3, 4, 5, 6, 8), "queries per register block of the value product"),
            Knob("pv_vectors", (1, 2, 3, 4), "value vectors per register block of the value product"),
            Knob("fast_math", (True, False), "polynomial exp for float32"),
        ),
        constraints=(
            "block_m and block_n equal the tile table's tile sizes",
            "block_m % vector == 0",
            "qk_rows * qk_vectors + qk_vectors + 1 <= vector registers (16 AVX2, 32 AVX-512)",
            "pv_rows * pv_vectors + pv_vectors + 1 <= vector registers",
            "float64 runs with vector // 2 lanes",
        ),
    )


def _host_lanes(caps, dtype: DType, host_vector_bits: Callable[[], int]) -> int:
    bits = caps.vector_bits if caps is not None and caps.vector_bits else 0
    if not bits:
        bits = host_vector_bits() or 128
    return max(1, bits // (64 if dtype == DType.f64 else 32))


def default_attention_config(group: AttentionGroup, sizes: Mapping[str, int] | None = None, caps=None,
                             dtype: DType = DType.f32, *,
                             host_vector_bits: Callable[[], int] = _no_host_bits) -> AttentionConfig:
    """A measured default: 64 x 64 tiles, 6 x 2 score blocks and 4 x 2 value blocks on AVX2 (16 registers),
    twice the vectors per block with 32 registers (AVX-512). ``sizes`` (``L``, ``S``, ...) may shrink the
    tiles for short sequences."""
    V = _host_lanes(caps, dtype, host_vector_bits)
    wide = (caps.vector_bits if caps is not None and caps.vector_bits
            else _host_lanes(None, DType.f32, host_vector_bits) * 32) >= 512
    bm = bn = 64
    if sizes:
        L, S = sizes.get("L"), sizes.get("S")
        if L is not None and L <= 32:
            bm = max(V, 32 if L > 16 else 16)
        if S is not None and S <= 32:
            bn = 32 if S > 16 else 16
    bm = max(bm, V) // V * V
    return AttentionConfig(block_m=bm, block_n=bn, vector=V, qk_rows=6, qk_vectors=4 if wide else 2,
                           pv_rows=6 if wide else 4, pv_vectors=4 if wide else 2)


# ------------------------------------------------------------------------------------------------ backward


@dataclass(frozen=True)
class AttentionBackwardConfig:
    """Schedule knobs of the backward kernels (JSON round-trip: ``to_json`` / ``from_json``).

    ``block_m`` / ``block_n`` must be those of the tile tables. ``vector`` 0 means the host SIMD width for the
    dtype (8 float32 lanes with AVX2, 16 with AVX-512). ``dq_mode`` ``"auto"`` picks ``"fused"`` when
    ``B * HKV`` covers the TVM threads, else ``"separate"``.
    """

    block_m: int = 64
    block_n: int = 64
    vector: int = 0
    reg_rows: int = 4
    reg_vectors: int = 2
    dq_mode: str = "auto"
    fast_math: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "reg_rows", "reg_vectors"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AttentionBackwardConfig: {name} must be a positive int, got {v!r}")
        if isinstance(self.vector, bool) or not isinstance(self.vector, int) or self.vector < 0:
            raise ValueError(f"AttentionBackwardConfig: vector must be an int >= 0, got {self.vector!r}")
        if self.dq_mode not in ("auto", "fused", "separate"):
            raise ValueError(f"AttentionBackwardConfig: dq_mode must be 'auto', 'fused' or 'separate', "
                             f"got {self.dq_mode!r}")
        if self.vector and self.block_n % self.vector:
            raise ValueError(f"AttentionBackwardConfig: block_n={self.block_n} must be a multiple of "
                             f"vector={self.vector}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AttentionBackwardConfig":
        return config_from_mapping(cls, data)


def host_vector_lanes(dtype: DType, *, host_vector_bits: Callable[[], int] = _no_host_bits) -> int:
    """SIMD lanes of ``dtype`` on the host whose SIMD width ``host_vector_bits()`` returns (4 float32 lanes when
    unknown)."""
    bits = host_vector_bits() or 128
    return max(1, bits // dtype.bits)


def _lanes_for(block_n: int, dtype: DType, host_vector_bits: Callable[[], int]) -> int:
    lanes = host_vector_lanes(dtype, host_vector_bits=host_vector_bits)
    while lanes > 1 and block_n % lanes:
        lanes //= 2
    return lanes


def default_backward_config(group: AttentionGroup | None = None, *, block_m: int = 64, block_n: int = 64,
                            dtype: DType = DType.f32,
                            host_vector_bits: Callable[[], int] = _no_host_bits) -> AttentionBackwardConfig:
    """The default schedule: 64 x 64 tiles, the host SIMD width, register tiles of 4 rows x 2 vectors (16 vector
    registers, AVX2) or 4 rows x 4 vectors (32, AVX-512), dq mode by threads. Measured on AVX2 (L=2048 causal,
    fp32): 4 x 2, 6 x 2, 2 x 4 and block_m 32 / 128 within noise of each other; 3 x 4 (spilling) 2x slower."""
    lanes = _lanes_for(block_n, dtype, host_vector_bits)
    vectors = 4 if host_vector_bits() >= 512 else 2
    return AttentionBackwardConfig(block_m=block_m, block_n=block_n, vector=lanes, reg_vectors=vectors)


def backward_block_m(length: int, default: int = 64) -> int:
    """The default backward query tile for ``length`` queries: the length itself when it is between 17 and
    ``default - 1`` (Swin's 49-token windows: one tile with no padding rows; measured 1.10x faster fwd+bwd than
    64-row tiles at 49 tokens, and 1.05x faster than 56-row tiles), else ``default``. Rows need not be a multiple
    of anything (the register tiles have a remainder block)."""
    return int(length) if 16 < length < default else default


def as_backward_config(config: Any, dtype: DType = DType.f32, *,
                       host_vector_bits: Callable[[], int] = _no_host_bits) -> AttentionBackwardConfig:
    """An :class:`AttentionBackwardConfig` from itself, its JSON dict, None (the default) or any other object
    with ``block_m`` / ``block_n`` attributes (a forward config: its tile sizes and ``fast_math`` are kept, the
    other knobs default). ``vector`` 0 is resolved to the host width for ``dtype``."""
    if config is None:
        cfg = default_backward_config(dtype=dtype, host_vector_bits=host_vector_bits)
    elif isinstance(config, AttentionBackwardConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = AttentionBackwardConfig.from_json(config)
    else:
        try:
            bm, bn = int(config.block_m), int(config.block_n)
        except (AttributeError, TypeError, ValueError):
            raise TypeError(f"attention backward: config must be an AttentionBackwardConfig, its dict or an "
                            f"object with block_m and block_n, got {type(config).__name__}") from None
        cfg = default_backward_config(block_m=bm, block_n=bn, dtype=dtype, host_vector_bits=host_vector_bits)
        if isinstance(getattr(config, "fast_math", None), bool):
            cfg = replace(cfg, fast_math=config.fast_math)
    if cfg.vector == 0:
        cfg = replace(cfg, vector=_lanes_for(cfg.block_n, dtype, host_vector_bits))
    return cfg


# ============================================================================================ Triton (GPU)

H100_SHARED_MEMORY = 232448       # bytes per block (sm_90 opt-in maximum)
H100_SMS = 132
MAX_HEAD_DIM = 256
DECODE_MAX_LEN = 16               # queries per head up to which the decode path is preferred
KINDS = ("forward", "backward", "decode")


# ------------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TritonAttentionConfig:
    """Schedule knobs of the attention kernels (JSON-serializable through :meth:`to_dict`).

    ``block_m`` query rows and ``block_n`` keys per tile (the tile tables must be built with the same sizes),
    ``num_warps`` / ``num_stages`` per kernel launch, ``splits`` key-tile splits of the decode path (1 otherwise),
    ``dot_precision`` the ``input_precision`` of fp32 dots (ignored for fp16/bf16).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 1
    dot_precision: str = "ieee"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TritonAttentionConfig":
        """A config from a mapping (unknown keys are an error; missing ones take the defaults)."""
        return config_from_mapping(cls, d)


def as_triton_attention_config(config: "TritonAttentionConfig | Mapping[str, Any] | None"
                               ) -> TritonAttentionConfig | None:
    """``config`` as a :class:`TritonAttentionConfig` (None stays None)."""
    if config is None or isinstance(config, TritonAttentionConfig):
        return config
    return TritonAttentionConfig.from_dict(config)


@dataclass(frozen=True)
class AttentionShape:
    """The sizes a schedule depends on: q ``[batch, heads, q_len, head_dim]``, k ``[batch, kv_heads, kv_len,
    head_dim]``, v ``[batch, kv_heads, kv_len, value_dim]``; ``dtype`` is q's (and k's) dtype."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    dtype: DType

    @classmethod
    def of(cls, group: AttentionGroup, shapes: Mapping[str, Sequence[int]]) -> "AttentionShape":
        """From tensor shapes by name (``binding.shapes`` or ``{name: tensor.shape}``)."""
        q, k, v = (tuple(int(x) for x in shapes[n]) for n in (group.q, group.k, group.v))
        return cls(q[0], q[1], k[1], q[2], k[2], q[3], v[3], group.op.tensor(group.q).dtype)

    @property
    def group_size(self) -> int:
        return self.heads // max(1, self.kv_heads)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_dim(d: int) -> int:
    """The tile width of a head dim: the next power of two, at least 16 (the minimum ``tl.dot`` size)."""
    return max(16, _pow2(d))


def _elem_bytes(dtype: DType) -> int:
    return 4 if dtype == DType.f32 else 2


def _smem_limit(caps) -> int:
    s = int(getattr(caps, "shared_memory", 0) or 0) if caps is not None else 0
    return s if s > 0 else H100_SHARED_MEMORY


def _sms(caps) -> int:
    if caps is not None and getattr(caps, "device_kind", "") == "cuda" and getattr(caps, "cores", 0):
        return int(caps.cores)
    return H100_SMS


# (block_m, block_n, num_warps, num_stages) by padded head dim: the largest spill-free choices of sm_90 AOT compiles
# (triton 3.9; the score mod a soft-cap, so tanh and its derivative are live too). 16-bit at head dims 64 and 128
# are kept honest by test_aot_sm90_default_config; 256 and fp32 (tf32x3 dots, which triple the operand registers)
# were checked once by hand. fp32 "ieee" dots run on FMA units and spill in the backward at these sizes.
_FWD_16 = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
_FWD_32 = {64: (64, 32, 4, 3), 128: (64, 32, 8, 3), 256: (32, 32, 8, 2)}
_BWD_16 = {64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 1)}
_BWD_32 = {64: (32, 32, 8, 2), 128: (16, 16, 4, 2), 256: (16, 16, 8, 1)}
_DEC_16 = {64: (16, 64, 4, 3), 128: (16, 64, 8, 3), 256: (16, 32, 8, 2)}
_DEC_32 = {64: (16, 64, 4, 3), 128: (16, 32, 4, 3), 256: (16, 32, 8, 2)}


def _table(kind: str, dtype: DType) -> dict:
    wide = dtype == DType.f32
    return {"forward": _FWD_32 if wide else _FWD_16, "backward": _BWD_32 if wide else _BWD_16,
            "decode": _DEC_32 if wide else _DEC_16}[kind]


def default_triton_attention_config(group: AttentionGroup, shape: AttentionShape, caps=None,
                                    kind: str = "forward") -> TritonAttentionConfig:
    """A reasonable config for ``kind`` ("forward", "backward" or "decode") at ``shape`` without tuning.

    Tiles come from a table by padded head dim and dtype (seeded from FlexAttention's H100 table and checked by
    AOT compiles), shrunk to the problem (at least 16) and to the shared memory of ``caps`` (a
    :class:`~opgen.targets.base.Caps`; the H100 limit when None). The decode split count aims at two programs
    per SM without splitting below two key tiles per program.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attention kernel kind {kind!r} (expected one of {KINDS})")
    d = max(padded_dim(shape.head_dim), padded_dim(shape.value_dim))
    key = 64 if d <= 64 else 128 if d <= 128 else 256
    bm, bn, warps, stages = _table(kind, shape.dtype)[key]
    bm = max(16, min(bm, _pow2(shape.q_len)))
    bn = max(16, min(bn, _pow2(shape.kv_len)))
    cfg = TritonAttentionConfig(bm, bn, warps, stages, 1, "tf32x3" if shape.dtype == DType.f32 else "ieee")
    limit = _smem_limit(caps)
    while _smem_estimate(cfg, shape, kind) > limit and cfg.num_stages > 1:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while _smem_estimate(cfg, shape, kind) > limit and max(cfg.block_m, cfg.block_n) > 16:
        cfg = replace(cfg, block_n=max(16, cfg.block_n // 2)) if cfg.block_n >= cfg.block_m \
            else replace(cfg, block_m=max(16, cfg.block_m // 2))
    if kind == "decode":
        programs = -(-shape.q_len // cfg.block_m) * shape.batch * shape.heads
        tiles = -(-shape.kv_len // cfg.block_n)
        want = max(1, -(-2 * _sms(caps) // max(1, programs)))
        splits = 1
        while splits < want and splits * 2 <= max(1, tiles // 2) and splits < 64:
            splits *= 2
        cfg = replace(cfg, splits=splits)
    return cfg


BLOCKS = (16, 32, 64, 128, 256)
WARPS = (1, 2, 4, 8)
STAGES = (1, 2, 3, 4)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
PRECISIONS = ("ieee", "tf32x3", "tf32")
REGISTER_ELEMENTS_PER_THREAD = 192    # live fp32 tile elements per thread we allow (of 255 registers)


def _smem_estimate(cfg: TritonAttentionConfig, shape: AttentionShape, kind: str) -> int:
    """Rough shared-memory bytes of the main kernel of ``kind``: pipelined key/value (or query/dout) tiles plus
    the operand tiles staged for the dots; 1.5x for fp32 (tf32 operand splitting). An upper estimate, checked
    against sm_90 AOT compiles."""
    eb = _elem_bytes(shape.dtype)
    be, bev = padded_dim(shape.head_dim), padded_dim(shape.value_dim)
    bm, bn, st = cfg.block_m, cfg.block_n, max(1, cfg.num_stages)
    if kind == "backward":
        # dkdv keeps its k, v tiles and streams q, dout tiles; dq the other way round; plus the ds / p staging
        tile = max(bm, bn) * (be + bev) * eb
        est = (st + 1.5) * tile + 2 * bm * bn * eb
    else:
        est = st * bn * (be + bev) * eb + bm * be * eb + bm * bn * eb
    return int(est * (1.5 if shape.dtype == DType.f32 else 1.0))


def _register_estimate(cfg: TritonAttentionConfig, shape: AttentionShape, kind: str) -> float:
    """Live fp32-equivalent tile elements per thread of the main kernel of ``kind`` (1.5x for fp32 inputs)."""
    be, bev = padded_dim(shape.head_dim), padded_dim(shape.value_dim)
    bm, bn = cfg.block_m, cfg.block_n
    half = _elem_bytes(shape.dtype) / 4
    if kind == "backward":
        # dkdv: fp32 dk, dv accumulators, the k, v tiles, and the [BN, BM] score, p, dp and ds tiles
        dkdv = bn * (be + bev) * (1 + half) + 4 * bm * bn
        dq = bm * be + bm * (be + bev) * half + 4 * bm * bn
        live = max(dkdv, dq)
    else:
        live = bm * bev + 2 * bm * bn + bm * be * half
    return live / (32 * cfg.num_warps) * (1.5 if shape.dtype == DType.f32 else 1.0)


def check_triton_attention(group: AttentionGroup, cfg: TritonAttentionConfig | Mapping[str, Any],
                           shape: AttentionShape | None = None, kind: str = "forward", caps=None) -> str | None:
    """Why ``cfg`` is invalid for ``kind`` (at ``shape``'s sizes when given), or None when it is feasible."""
    try:
        c = as_triton_attention_config(cfg)
    except (TypeError, ValueError) as e:
        return str(e)
    if kind not in KINDS:
        return f"unknown kind {kind!r}"
    for name, choices in (("block_m", BLOCKS), ("block_n", BLOCKS), ("num_warps", WARPS), ("num_stages", STAGES),
                          ("splits", SPLITS), ("dot_precision", PRECISIONS)):
        if getattr(c, name) not in choices:
            return f"{name}={getattr(c, name)!r} not in {choices}"
    if kind != "decode" and c.splits != 1:
        return f"splits={c.splits} is only meaningful for the decode kernels"
    if shape is None:
        return None
    why = unsupported_shape(shape)
    if why is not None:
        return why
    if shape.dtype != DType.f32 and c.dot_precision != "ieee":
        return f"dot_precision={c.dot_precision!r} only applies to fp32 inputs (use 'ieee')"
    if c.block_m > max(16, _pow2(shape.q_len)):
        return f"block_m={c.block_m} exceeds the padded query length {max(16, _pow2(shape.q_len))}"
    if c.block_n > max(16, _pow2(shape.kv_len)):
        return f"block_n={c.block_n} exceeds the padded key length {max(16, _pow2(shape.kv_len))}"
    if kind == "decode" and c.splits > max(1, -(-shape.kv_len // c.block_n)):
        return f"splits={c.splits} exceeds the {-(-shape.kv_len // c.block_n)} key tiles"
    smem = _smem_estimate(c, shape, kind)
    if smem > _smem_limit(caps):
        return f"shared memory: about {smem} bytes > {_smem_limit(caps)}"
    regs = _register_estimate(c, shape, kind)
    if regs > REGISTER_ELEMENTS_PER_THREAD:
        return (f"registers: about {regs:.0f} live tile elements per thread (> {REGISTER_ELEMENTS_PER_THREAD}) "
                f"with {c.num_warps} warps")
    return None


@dataclass(frozen=True)
class AttentionSpace:
    """The knob space of one direction of an attention group at one shape: plain data plus constraints."""

    name: str
    kind: str
    knobs: Mapping[str, tuple]
    default: TritonAttentionConfig
    group: AttentionGroup = field(repr=False, compare=False)
    shape: AttentionShape | None = field(repr=False, compare=False, default=None)
    caps: Any = field(repr=False, compare=False, default=None)

    def infeasible(self, cfg: TritonAttentionConfig | Mapping[str, Any]) -> str | None:
        return check_triton_attention(self.group, cfg, self.shape, self.kind, self.caps)

    def enumerate(self) -> Iterator[TritonAttentionConfig]:
        """Every feasible config (knobs in preference order)."""
        names = list(self.knobs)

        def rec(i: int, cur: dict) -> Iterator[TritonAttentionConfig]:
            if i == len(names):
                cfg = TritonAttentionConfig(**cur)
                if self.infeasible(cfg) is None:
                    yield cfg
                return
            for ch in self.knobs[names[i]]:
                yield from rec(i + 1, {**cur, names[i]: ch})
        yield from rec(0, {})


def triton_attention_space(group: AttentionGroup, shape: AttentionShape, caps=None,
                           kind: str = "forward") -> AttentionSpace:
    """The knobs of ``kind`` at ``shape``: block sizes, warps, stages; splits for decode; the dot precision for
    fp32 inputs."""
    default = default_triton_attention_config(group, shape, caps, kind)
    knobs: dict[str, tuple] = {"block_m": (16,) if kind == "decode" else (16, 32, 64, 128),
                               "block_n": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4),
                               "splits": SPLITS if kind == "decode" else (1,),
                               "dot_precision": PRECISIONS if shape.dtype == DType.f32 else ("ieee",)}
    return AttentionSpace(f"triton/{group.op.name}/{group.out}/{kind}", kind, knobs, default, group, shape, caps)


def unsupported_shape(shape: AttentionShape) -> str | None:
    """Why the kernels cannot run at ``shape`` (head dims), or None."""
    for name, d in (("head dim E", shape.head_dim), ("value head dim EV", shape.value_dim)):
        if d < 1 or d > MAX_HEAD_DIM:
            return f"{name} = {d} is not supported (1 to {MAX_HEAD_DIM}; padded to a power of two >= 16)"
    if shape.kv_heads < 1 or shape.heads % shape.kv_heads:
        return f"{shape.kv_heads} kv heads do not divide {shape.heads} query heads"
    return None


def use_decode(shape: AttentionShape) -> bool:
    """Whether the split-key decode path should run ``shape``: short queries over at least 4 key tiles of 64."""
    return shape.q_len <= DECODE_MAX_LEN and shape.kv_len >= 256
