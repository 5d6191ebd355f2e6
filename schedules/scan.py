"""Scan schedules: the knobs, their choices, the feasibility checks and the default configs of the scan kernels,
per target, as data and pure functions of the scan group, the binding and the capability record.

- TVM (CPU), the sequential scan kernel: :class:`ScanConfig`, :func:`scan_space`, :func:`check_scan_config`,
  :func:`default_scan_config`, :func:`legalize_scan_config`; the time-vector variant's applicability
  (:func:`time_vector_supported`). Rendered by :mod:`opgen.targets.tvm.scan`.
- Triton (GPU), sequential and chunked-matmul: the chunked-matmul form of a group (:func:`matmul_form`),
  :func:`variants`, :class:`ScanSpace` (:func:`triton_scan_space`), :func:`check_triton_scan`,
  :func:`default_triton_scan_config`. Rendered by :mod:`opgen.targets.triton.scan`.

The host's SIMD width (read by :func:`opgen.targets.tvm.host.host_vector_bits`) comes in as an argument when a
capability record gives none, so that schedules import no target.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping

import sympy

from opgen.ir import SUM, Access, DType, Expr, ExprOp, accum_dtype, log, promote
from opgen.ir.expr import free_symbols, loads
from opgen.ir.passes import ScanGroup, ScanVariant, derive_scan_variants
from opgen.ir.symbols import Axis

from .space import TargetKnob as Knob, TargetSpace as Space


def _compute_dtype(d: DType) -> DType:
    """The dtype a value of IR dtype ``d`` is computed in (floats widen to their accumulation dtype)."""
    return accum_dtype(d) if d.is_float else d


# ============================================================================================== TVM (CPU)


@dataclass(frozen=True)
class ScanConfig:
    """Schedule knobs of the sequential scan kernel (JSON-serializable; see :func:`scan_space`)."""

    lanes_vector: int = 1             # 1: one lane per iteration; 4/8/16: vectorize over lanes of vector_axis
    vector_axis: str | None = None    # the lane axis (by name) that is vectorized when lanes_vector > 1
    time_tile: int = 16               # steps staged per tile in vector mode
    static_state: bool = False        # bake the state extents (bound values) into the kernel
    unroll_state: bool = False        # unroll the state loops (needs static_state)
    fast_math: bool = True            # polynomial exp/log for float32 (exact T.exp for float64 always)
    interleave: bool = False          # lanes_vector > 1: the V lanes as independent unrolled scalar chains with
                                      # direct loads (no staged tiles); hides the recurrence's FMA latency
    time_vector: int = 0              # W > 0: blocks of W steps of one lane as a vector, scanned in registers
                                      # (see scan_time_vector; exclusive with lanes_vector > 1)

    def to_json(self) -> dict:
        return asdict(self)


#: the vector widths (steps per block) the knob may take
TIME_VECTOR_WIDTHS = (4, 8, 16)


def _step_position(index: tuple, step) -> tuple[int, bool]:
    """(position of the step axis in ``index`` or -1, whether it appears once as ``step + constant``)."""
    pos = [k for k, i in enumerate(index) if step in sympy.sympify(i).free_symbols]
    if len(pos) != 1:
        return (-1, not pos)
    k = pos[0]
    rest = sympy.expand(sympy.sympify(index[k]) - step)
    return k, rest.is_Integer


def _padded_dim(acc: Access, j: int) -> bool:
    if acc.pad is None:
        return False
    lo, hi = acc.pad[j]
    return sympy.sympify(lo) != 0 or sympy.sympify(hi) != 0


def padded_steps(group: ScanGroup) -> tuple[set, int, int]:
    """(the padded step-dependent loads, how many steps at the start and at the end of the sequence may read
    outside their tensor): the blocks stay inside (unmasked vector loads), the scalar steps at the edges mask."""
    masked, lo, hi = set(), 0, 0
    for e in (group.scan.combine.a, group.scan.combine.b):
        for acc in loads(e):
            k, _ = _step_position(tuple(acc.index), group.step)
            if k < 0 or not _padded_dim(acc, k):
                continue
            masked.add(acc)
            off = int(sympy.expand(sympy.sympify(acc.index[k]) - group.step))
            lo, hi = max(lo, -off), max(hi, off)
    return masked, lo, hi


def time_vector_supported(group: ScanGroup, unit: Callable[[object], bool]) -> tuple[bool, str]:
    """Whether the time-vector variant renders ``group``; ``unit(size)`` says whether a tensor dim is a
    static 1 (so an index after the step in that dim keeps the step contiguous)."""
    if group.state:
        return False, "the state has axes (the time-vector variant keeps one scalar state per lane)"
    if group.projection is not None or group.epilogue or group.tails:
        return False, "the scan has a projection, an epilogue or a final-state output"
    op, step = group.op, group.step
    accesses: list[Access] = []
    for e in (group.scan.combine.a, group.scan.combine.b):
        accesses += list(loads(e))
    outs = [(group.scan.out, group.scan.axes)] if group.store_state else []
    for acc in accesses:
        k, _ = _step_position(tuple(acc.index), step)
        if any(_padded_dim(acc, j) for j in range(len(acc.index)) if j != k):
            return False, f"the load of {acc.tensor} is padded along a dim other than the step's"
    items = [(a.tensor, tuple(a.index)) for a in accesses] + [(n, tuple(ax)) for n, ax in outs]
    for name, index in items:
        k, ok = _step_position(index, step)
        if k < 0:
            if ok:
                continue                  # does not depend on the step: loaded once per step as a broadcast
            return False, f"the step appears in more than one index of {name}"
        if not ok:
            return False, f"the step index of {name} is not step + constant"
        shape = op.tensor(name).shape
        if not all(unit(s) for s in shape[k + 1:]):
            return False, f"{name} is not contiguous along the step (dims after it are not 1)"
    return True, ""


def scan_space(group: ScanGroup) -> Space:
    """The knobs of the sequential scan kernel for ``group`` (values before shape-dependent constraints)."""
    lanes = tuple(str(a) for a in group.lanes)
    return Space(
        knobs=(
            Knob("lanes_vector", (1, 4, 8, 16), "lanes computed at once in T.vectorized loops (1: scalar)"),
            Knob("vector_axis", (None,) + lanes, "the lane axis that is vectorized"),
            Knob("time_tile", (4, 8, 16, 32), "steps staged per transposed tile in vector mode"),
            Knob("static_state", (False, True), "bake the bound state extents into the kernel"),
            Knob("unroll_state", (False, True), "unroll the state loops"),
            Knob("fast_math", (True, False), "polynomial exp/log for float32"),
            Knob("interleave", (False, True), "the lanes_vector lanes as independent unrolled scalar chains with "
                 "direct loads instead of vectorized staged tiles"),
            Knob("time_vector", (0,) + TIME_VECTOR_WIDTHS, "W > 0: blocks of W steps of one lane as a vector, "
                 "scanned in registers (first-order scans contiguous in time)"),
        ),
        constraints=(
            "interleave requires lanes_vector > 1",
            "lanes_vector > 1 requires vector_axis to be a lane axis",
            "lanes_vector > 1 requires extent(vector_axis) % lanes_vector == 0 (else the call runs lanes_vector=1)",
            "lanes_vector * prod(state extents) <= 4096 (state kept in a local buffer)",
            "unroll_state requires static_state and prod(state extents) <= 64",
            "time_vector > 0 requires lanes_vector == 1, a scalar state per lane, no projection, epilogue or "
            "final state, and step accesses contiguous and unpadded",
        ),
    )


def as_scan_config(config) -> ScanConfig | None:
    """A :class:`ScanConfig` from itself, its JSON dict (``to_json()``), or None."""
    if config is None or isinstance(config, ScanConfig):
        return config
    if isinstance(config, Mapping):
        known = set(ScanConfig.__dataclass_fields__)
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown scan config knobs {sorted(unknown)}; known: {sorted(known)}")
        return ScanConfig(**config)
    raise TypeError(f"expected a ScanConfig, a dict or None as the tvm config, got {type(config).__name__}")


def _state_elems(group: ScanGroup, binding) -> int:
    return math.prod(binding.extents[a] for a in group.state) if group.state else 1


def check_scan_config(cfg: ScanConfig, group: ScanGroup, binding) -> tuple[bool, str]:
    """Whether ``cfg`` is valid for ``group`` at ``binding`` ((False, reason) when not)."""
    lanes = {str(a): a for a in group.lanes}
    if cfg.lanes_vector not in (1, 2, 4, 8, 16, 32):
        return False, f"lanes_vector must be a power of two <= 32, got {cfg.lanes_vector}"
    if cfg.lanes_vector > 1:
        if cfg.vector_axis not in lanes:
            return False, f"vector_axis {cfg.vector_axis!r} is not a lane axis {sorted(lanes)}"
        e = binding.extents[lanes[cfg.vector_axis]]
        if e % cfg.lanes_vector:
            return False, f"extent {e} of {cfg.vector_axis} is not a multiple of lanes_vector={cfg.lanes_vector}"
        if cfg.lanes_vector * _state_elems(group, binding) > 4096:
            return False, "lanes_vector * state size exceeds 4096 elements"
    if cfg.time_tile < 1:
        return False, "time_tile must be >= 1"
    if cfg.interleave and cfg.lanes_vector == 1:
        return False, "interleave requires lanes_vector > 1"
    if cfg.unroll_state and (not cfg.static_state or _state_elems(group, binding) > 64):
        return False, "unroll_state requires static_state and at most 64 state elements"
    if cfg.time_vector:
        if cfg.time_vector not in TIME_VECTOR_WIDTHS:
            return False, f"time_vector must be 0 or one of {TIME_VECTOR_WIDTHS}, got {cfg.time_vector}"
        if cfg.lanes_vector > 1:
            return False, "time_vector requires lanes_vector == 1"
        ok, why = time_vector_supported(group, lambda s: _static_one(s, binding))
        if not ok:
            return False, f"time_vector: {why}"
    return True, ""


def _static_one(size, binding) -> bool:
    """Whether a tensor dim (an int, a Dim or an expression of dims) is 1 at ``binding``."""
    try:
        return int(sympy.sympify(size).subs(binding.dims)) == 1
    except (TypeError, ValueError):
        return False


def _compute_bits(group: ScanGroup) -> int:
    return 64 if any(t.dtype == DType.f64 for t in group.op.tensors) else 32


def default_scan_config(group: ScanGroup, binding, caps=None, *,
                        host_vector_bits: Callable[[], int] = lambda: 0) -> ScanConfig:
    """A heuristic config: vectorize over the lane axis whose extent the SIMD width divides (preferring axes
    that are contiguous in memory, then long ones), with the state baked in when it is small."""
    vbits = (caps.vector_bits if caps is not None and caps.vector_bits else host_vector_bits()) or 128
    V = max(1, vbits // _compute_bits(group))
    n_state = _state_elems(group, binding)
    static = n_state <= 4096         # chunk_gla K=V=64: 1.56 vs 1.94 ms with a dynamically sized state
    cfg = ScanConfig(lanes_vector=1, static_state=static, unroll_state=static and n_state <= 16)
    tv = replace(cfg, static_state=False, unroll_state=False,
                 time_vector=max([w for w in TIME_VECTOR_WIDTHS if w <= 2 * V], default=0))
    if V > 1 and tv.time_vector and check_scan_config(tv, group, binding)[0]:
        # a first-order scan contiguous in time: blocks of 2 vectors of steps scanned in registers (linear_scan
        # 1024 x 2048 fp32: 1.15 ms against 1.32 ms for 4 interleaved scalar chains; 8 steps 1.33 ms)
        return tv
    if V == 1 or V * n_state > 4096:
        return cfg
    contiguous = _contiguity(group)
    cands = [a for a in group.lanes if binding.extents[a] % V == 0]
    if not cands:
        return cfg
    best = max(cands, key=lambda a: (contiguous.get(a, 0), binding.extents[a]))
    if not contiguous.get(best) and n_state == 1 and not _has_transcendental(group):
        # a memory-bound first-order recurrence over strided lanes: staging tiles does not pay (3.1-3.5 ms for
        # 1024 x 2048 fp32, scalar 3.0 ms); 4 interleaved chains in blocks of 16 steps hide the FMA latency
        # (2.2 ms; a copy of the same bytes 2.0 ms)
        inter = [a for a in group.lanes if binding.extents[a] % 4 == 0]
        if not inter:
            return cfg
        lane = max(inter, key=lambda a: binding.extents[a])
        return replace(cfg, lanes_vector=4, vector_axis=str(lane), time_tile=16, interleave=True)
    return replace(cfg, lanes_vector=V, vector_axis=str(best), time_tile=16)


_TRANSCENDENTAL = frozenset({"exp", "log", "sqrt", "sigmoid", "softplus", "silu", "tanh", "pow", "/"})


def _has_transcendental(group: ScanGroup) -> bool:
    exprs = [group.scan.combine.a, group.scan.combine.b]
    if group.projection is not None:
        exprs.append(group.projection.value)
    exprs += [m.value for m in group.epilogue]
    return any(n.op.value in _TRANSCENDENTAL for e in exprs for n in e.walk())


def _contiguity(group: ScanGroup) -> dict[Axis, int]:
    """How many accesses of the group have each axis as their last (stride-1) index."""
    out: dict[Axis, int] = {}
    from opgen.ir.expr import loads

    exprs = [group.scan.combine.a, group.scan.combine.b]
    if group.projection is not None:
        exprs.append(group.projection.value)
    exprs += [m.value for m in group.epilogue]
    for e in exprs:
        for acc in loads(e):
            if acc.index and isinstance(acc.index[-1], Axis):
                out[acc.index[-1]] = out.get(acc.index[-1], 0) + 1
    return out


def legalize_scan_config(cfg: ScanConfig, group: ScanGroup, binding) -> ScanConfig:
    """``cfg`` if valid here, else the nearest valid config (vectorization dropped, then unrolling)."""
    ok, _ = check_scan_config(cfg, group, binding)
    if ok:
        return cfg
    cfg = replace(cfg, lanes_vector=1, interleave=False, time_vector=0)
    if not check_scan_config(cfg, group, binding)[0]:
        cfg = replace(cfg, unroll_state=False)
    ok, why = check_scan_config(cfg, group, binding)
    if not ok:
        raise ValueError(f"invalid scan config {cfg}: {why}")
    return cfg


# --------------------------------------------------------------------------------------------------- target


# ============================================================================================ Triton (GPU)

H100_SMS = 132
REGISTER_ELEMENTS_PER_THREAD = 64      # live fp32 state elements per thread we allow (of 255 registers)
A_TILE_ELEMENTS = 4096                 # size of the [BT, BT, BKA] intra-chunk temporary (per-key decay)


def _state_dtype(group: ScanGroup) -> DType:
    c = group.scan.combine
    return _compute_dtype(promote(c.a.dtype, c.b.dtype))


def _mul(fs: list[Expr]) -> Expr | None:
    return functools.reduce(operator.mul, fs) if fs else None


def _factors(e: Expr) -> list[Expr]:
    return _factors(e.lhs) + _factors(e.rhs) if e.op is ExprOp.MUL else [e]


def _axes(e: Expr) -> set:
    return free_symbols(e)


def _reads(e: Expr, tensor: str) -> bool:
    return any(n.op is ExprOp.LOAD and n.arg.tensor == tensor for n in e.walk())


def _free_state_axis(group: ScanGroup) -> Axis | None:
    """The state axis that may be split across programs: the last one the projection does not reduce."""
    reduced = set(group.projection.raxes) if group.projection is not None else set()
    free = [a for a in group.state if a not in reduced]
    return free[-1] if free else None


@dataclass(frozen=True)
class MatmulForm:
    """The decayed outer-product structure of a scan group (see the module docstring)."""

    u: Axis                  # the state axis the projection reduces (keys)
    v: Axis                  # the other state axis (values)
    log_decay: Expr          # x with a = exp(x); depends on lanes, step and possibly u
    k_factor: Expr           # the factors of b on the u side (and those on neither side)
    v_factor: Expr           # the factors of b on the v side
    q_factor: Expr           # the projection factors depending on u (without the state read)
    post_factor: Expr | None  # the projection factors not depending on u


def _unwrap_widening(e: Expr) -> Expr:
    while e.op is ExprOp.CAST and e.dtype.is_float and e.operand.dtype.is_float \
            and _compute_dtype(e.operand.dtype).bits <= e.dtype.bits:
        e = e.operand
    return e


def matmul_form(group: ScanGroup) -> MatmulForm | None:
    """The chunked-matmul decomposition of ``group``, or None when it does not have that structure."""
    if ScanVariant.CHUNKED_MATMUL not in derive_scan_variants(group) or group.store_state:
        return None
    u, v = group.state
    p = group.projection
    if p is None or tuple(p.raxes) != (u,) or p.monoid != SUM or p.predicate is not None:
        return None
    a = _unwrap_widening(group.scan.combine.a)
    if v in _axes(a):
        return None
    x = a.operand if a.op is ExprOp.EXP else log(a)
    kf, vf = [], []
    for f in _factors(group.scan.combine.b):
        ax = _axes(f)
        if v in ax:
            if u in ax:
                return None
            vf.append(f)
        else:
            kf.append(f)
    qf, post, state_reads = [], [], 0
    for f in _factors(p.value):
        if f.op is ExprOp.LOAD and f.arg.tensor == group.scan.out:
            state_reads += 1
            continue
        if _reads(f, group.scan.out):
            return None
        ax = _axes(f)
        if u in ax:
            if v in ax:
                return None
            qf.append(f)
        else:
            post.append(f)
    if state_reads != 1 or not vf:
        return None
    one = Expr(ExprOp.CONST, DType.f32, (), 1.0)
    return MatmulForm(u, v, x, _mul(kf) if kf else one, _mul(vf), _mul(qf) if qf else one, _mul(post))


def variants(group: ScanGroup) -> tuple[ScanVariant, ...]:
    """The variants this backend can render for ``group``, in preference order."""
    out = []
    for v in derive_scan_variants(group):
        if v is ScanVariant.SEQUENTIAL or (v is ScanVariant.CHUNKED_MATMUL and matmul_form(group) is not None):
            out.append(v)
    return tuple(out)


# ------------------------------------------------------------------------------------- configs and spaces


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _sizes(group: ScanGroup, binding) -> dict:
    ext = {a: int(binding.extents[a]) for a in group.lanes + group.state + (group.step,)}
    lanes = math.prod(ext[a] for a in group.lanes) if group.lanes else 1
    return {"ext": ext, "lanes": lanes, "steps": ext[group.step]}


def _elem_bytes(group: ScanGroup) -> int:
    return 8 if _state_dtype(group) == DType.f64 else 4


def _seq_state_elems(group: ScanGroup, binding, cfg: Mapping[str, Any]) -> int:
    """Elements of the padded state tile of one program (BLOCK lanes x the state, the split axis tiled)."""
    split = _free_state_axis(group)
    n = cfg["BLOCK"]
    for a in group.state:
        e = _pow2(binding.extents[a])
        n *= cfg["STATE_TILE"] if (a == split and cfg.get("STATE_TILE")) else e
    return n


def check_triton_scan(group: ScanGroup, cfg: Mapping[str, Any], binding=None) -> str | None:
    """Why ``cfg`` is invalid for ``group`` (at ``binding``'s sizes when given), or None when it is feasible."""
    try:
        variant = ScanVariant(cfg["variant"])
    except (KeyError, ValueError):
        return f"unknown variant {cfg.get('variant')!r}"
    if variant not in variants(group):
        return f"variant {variant.value} is not available for this scan group"
    sp = _space_for(group, variant)
    for k, choices in sp.knobs.items():
        if k not in cfg:
            return f"missing knob {k}"
        if cfg[k] not in choices:
            return f"{k}={cfg[k]!r} not in {choices}"
    extra = set(cfg) - set(sp.knobs) - {"variant"}
    if extra:
        return f"unknown knobs {sorted(extra)}"
    warps = cfg["num_warps"]
    eb = _elem_bytes(group) // 4
    if variant is ScanVariant.SEQUENTIAL:
        split = _free_state_axis(group)
        if cfg["STATE_TILE"] and split is None:
            return "STATE_TILE needs a state axis that the projection does not reduce"
        if binding is None:
            return None
        elems = _seq_state_elems(group, binding, cfg)
        if elems * eb > REGISTER_ELEMENTS_PER_THREAD * 32 * warps:
            return (f"registers: BLOCK x state = {elems} elements over {32 * warps} threads is more than "
                    f"{REGISTER_ELEMENTS_PER_THREAD} per thread")
        if elems < 32 * warps // 2 and warps > 1:
            return f"only {elems} state elements for {warps} warps: most threads would idle"
        if split is not None and cfg["STATE_TILE"] and cfg["STATE_TILE"] > _pow2(binding.extents[split]):
            return f"STATE_TILE={cfg['STATE_TILE']} exceeds the padded extent of {split}"
        return None
    # chunked-matmul
    form = matmul_form(group)
    if _state_dtype(group) == DType.f64 and cfg["dot_precision"] != "ieee":
        return "fp64 dots need dot_precision='ieee'"
    if binding is None:
        return None
    nk = max(16, _pow2(binding.extents[form.u]))
    bt, bv = cfg["BT"], cfg["BV"]
    if bv > max(16, _pow2(binding.extents[form.v])):
        return f"BV={bv} exceeds the padded extent of {form.v}"
    if bt > max(16, _pow2(binding.extents[group.step])):
        return f"BT={bt} exceeds the padded number of steps"
    live = _chunk_live(nk, bt, bv, form.u not in _axes(form.log_decay))
    if live * eb > 2 * REGISTER_ELEMENTS_PER_THREAD * 32 * warps:
        return (f"registers: state {nk}x{bv} plus chunk tiles (about {live} elements) over {32 * warps} threads "
                f"is more than {2 * REGISTER_ELEMENTS_PER_THREAD} per thread")
    return None


@dataclass(frozen=True)
class VariantSpace:
    """The knobs of one variant (name -> choices in preference order)."""

    variant: ScanVariant
    knobs: Mapping[str, tuple]


@functools.lru_cache(maxsize=None)
def _space_for(group: ScanGroup, variant: ScanVariant) -> VariantSpace:
    if variant is ScanVariant.SEQUENTIAL:
        tiles = (0, 4, 8, 16, 32, 64, 128) if _free_state_axis(group) is not None else (0,)
        return VariantSpace(variant, {"BLOCK": (1, 2, 4, 8, 16, 32, 64, 128, 256), "STATE_TILE": tiles,
                                      "num_warps": (1, 2, 4, 8), "num_stages": (1, 2, 3)})
    return VariantSpace(variant, {"BT": (16, 32, 64), "BV": (16, 32, 64, 128), "num_warps": (1, 2, 4, 8),
                                  "num_stages": (1, 2, 3), "dot_precision": ("tf32x3", "tf32", "ieee")})


@dataclass(frozen=True)
class ScanSpace:
    """The schedule space of one scan group on this backend: a ``variant`` knob and per-variant knobs.

    Plain data plus :meth:`infeasible` (constraints checked before compiling, at ``binding``'s sizes when the
    space was made with one) and :meth:`enumerate`; configs are JSON-serializable dicts.
    """

    name: str
    group: ScanGroup = field(repr=False, compare=False)
    binding: Any = field(repr=False, compare=False)
    variants: tuple[VariantSpace, ...]
    default: Mapping[str, Any] | None

    def knobs(self, variant: ScanVariant | str) -> Mapping[str, tuple]:
        v = ScanVariant(variant)
        for vs in self.variants:
            if vs.variant is v:
                return vs.knobs
        raise KeyError(f"variant {v.value} is not in this space")

    def infeasible(self, cfg: Mapping[str, Any]) -> str | None:
        return check_triton_scan(self.group, cfg, self.binding)

    def enumerate(self) -> Iterator[dict[str, Any]]:
        for vs in self.variants:
            names = list(vs.knobs)

            def rec(i: int, cur: dict) -> Iterator[dict]:
                if i == len(names):
                    cfg = {"variant": vs.variant.value, **cur}
                    if self.infeasible(cfg) is None:
                        yield cfg
                    return
                for ch in vs.knobs[names[i]]:
                    cur[names[i]] = ch
                    yield from rec(i + 1, cur)
                cur.pop(names[i], None)
            yield from rec(0, {})


def triton_scan_space(group: ScanGroup, binding=None) -> ScanSpace:
    """The schedule space of ``group`` (constraints use ``binding``'s sizes when given)."""
    vs = tuple(_space_for(group, v) for v in variants(group))
    default = default_triton_scan_config(group, binding) if binding is not None else None
    return ScanSpace(f"triton/{group.op.name}/{group.scan.out}", group, binding, vs, default)


def default_triton_scan_config(group: ScanGroup, binding, caps=None,
                               variant: ScanVariant | str | None = None) -> dict:
    """A reasonable config for ``group`` at ``binding``'s sizes (no tuning): a plain dict.

    ``variant`` forces a variant; by default chunked-matmul is used when available, the sequence has at least
    64 steps and the padded key axis is at most 128 (larger key tiles spill in the chunk kernel), else
    sequential.
    """
    sms = getattr(caps, "cores", 0) or H100_SMS
    avail = variants(group)
    sz = _sizes(group, binding)
    if variant is None:
        form = matmul_form(group) if ScanVariant.CHUNKED_MATMUL in avail else None
        big_keys = form is not None and _pow2(binding.extents[form.u]) > 128
        variant = ScanVariant.CHUNKED_MATMUL if (form is not None and sz["steps"] >= 64 and not big_keys) \
            else ScanVariant.SEQUENTIAL
    variant = ScanVariant(variant)
    if variant not in avail:
        raise ValueError(f"variant {variant.value} is not available for op {group.op.name} "
                         f"(available: {', '.join(v.value for v in avail)})")
    eb = _elem_bytes(group) // 4
    if variant is ScanVariant.SEQUENTIAL:
        split = _free_state_axis(group)
        state = math.prod(_pow2(binding.extents[a]) for a in group.state) if group.state else 1
        tile = 0
        if split is not None:
            full = _pow2(binding.extents[split])
            # split the free state axis when one lane's state is large (GLA-like): at most 64 wide tiles
            if state > 1024 and full > 64:
                tile = 64
                state = state // full * tile
        block = max(1, min(128, 512 // max(1, state * eb)))
        floor = max(1, 32 // state)          # at least one warp's worth of state per program when possible
        tiles1 = 1 if not tile else -(-binding.extents[split] // tile)
        while block > floor and -(-sz["lanes"] // block) * tiles1 < 2 * sms:
            block //= 2
        block = max(1, min(block, _pow2(sz["lanes"])))
        elems = block * state
        warps = 1
        while warps < 8 and elems * eb > 4 * 32 * warps:
            warps *= 2
        return {"variant": variant.value, "BLOCK": block, "STATE_TILE": tile, "num_warps": warps,
                "num_stages": 2}
    form = matmul_form(group)
    nk = max(16, _pow2(binding.extents[form.u]))
    nv = max(16, _pow2(binding.extents[form.v]))
    scalar = form.u not in _axes(form.log_decay)
    bt = 16
    if _state_dtype(group) == DType.f64:
        prec = "ieee"
    elif all(t.dtype in (DType.f32, DType.f64) for t in group.op.inputs if t.dtype.is_float) and nk <= 128:
        prec = "tf32x3"   # about fp32 accuracy on tensor cores (three tf32 products)
    else:
        prec = "tf32"
    # (BV, num_warps) by padded key size: the largest spill-free choices of sm_90 AOT compiles (BT=16, triton
    # 3.9; test_aot_sm90_default_config keeps them honest). BT is a tuning knob (16/32/64).
    if prec == "tf32x3":
        bv, warps = (32, 8) if nk <= 64 or scalar else (32, 4)
    elif prec == "tf32":
        bv, warps = ((64, 8) if scalar else (64, 4)) if nk <= 64 else (64, 8) if nk <= 128 else (16, 8)
    else:
        bv, warps = (32, 4) if nk <= 64 and not scalar else (16, 8)
    bv = min(bv, nv)
    return {"variant": variant.value, "BT": bt, "BV": bv, "num_warps": warps, "num_stages": 2,
            "dot_precision": prec}


def _chunk_live(nk: int, bt: int, bv: int, scalar_decay: bool) -> int:
    """A rough count of the fp32 elements live in one chunked-matmul program (state, chunk tiles, scores)."""
    bka = min(nk, max(1, A_TILE_ELEMENTS // (bt * bt)))
    return nk * bv + 3 * bt * nk + 2 * bt * bv + bt * bt + (0 if scalar_decay else bt * bt * bka)
