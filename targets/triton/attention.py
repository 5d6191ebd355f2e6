"""Flash attention kernels in Triton, generated from a fused :class:`~opgen.ir.passes.attention.AttentionGroup`.

One module of ``@triton.jit`` functions is rendered per group (a pure function of the group; sizes, tile sizes and
the dot precision are runtime or ``tl.constexpr`` arguments, so one source serves every shape and config):

``_score_mod`` / ``_visible`` / ``_score_bwd``
    the group's score mod, mask, and (for the backward) the score mod with its derivative with respect to the raw
    score (:func:`opgen.ir.passes.diff.derivative`; common subexpressions shared), rendered as straight-line code
    by :class:`.expr.ValueRenderer` and inlined by Triton into every kernel. Captured tensors (ALiBi slopes,
    document ids, ...) are pointer arguments.
``attn_fwd``
    grid ``(query tiles, B*HQ)``. Each program walks the key tiles listed for its query tile in the row tile
    table (``count / index / masked``), computes ``q k^T`` with ``tl.dot``, applies the score mod, applies the
    mask only on tiles marked partial (and the key bounds on the last tile), runs the online softmax in fp32
    base 2 and accumulates ``p v`` with ``tl.dot``. It writes ``out`` (q's dtype; 0 for a fully masked row) and
    ``lse`` (fp32, natural log; ``-inf`` for a fully masked row). GQA reads kv head ``h // G``.
``attn_bwd_preprocess`` / ``attn_bwd_dkdv`` / ``attn_bwd_dq``
    the flash backward with recomputation: ``delta = rowsum(dout * out)``; per key tile (grid ``(key tiles,
    B*HKV)``) the query tiles of the column table of each of the ``G`` query heads sharing the kv head
    (``p = exp(s - lse)``, ``dv += p^T dout``, ``ds = p (dp - delta) dscore``, ``dk += ds^T q``, no atomics); per
    query tile the key tiles of the row table (``dq += ds k``). Nothing of size ``L x S`` is stored. Captured
    tensors the group wants gradients of (:attr:`AttentionGroup.grad_captures`: learnable ALiBi slopes, a Swin
    bias table) get them from ``_capture_grads``, called by the dk/dv kernel: ``p (dp - delta) * d score_mod /
    d load`` per load, ``tl.atomic_add``-ed into an fp32 gradient buffer at the load's index (bounds-masked; an
    index of only b and h adds the tile's sum once).
``attn_decode_split`` / ``attn_decode_combine``
    FlashDecoding for short queries: the listed key tiles of a query tile are split across ``splits`` programs,
    each writes a partial ``(max, sum, acc)`` in fp32; the combine kernel merges them.

Head dims up to 256 are padded to the next power of two (at least 16) with masked loads; inputs are fp16,
bf16 or fp32 (q and k of one dtype), accumulation is fp32. fp32 dots use ``input_precision`` from the config
(the default configs pick ``"tf32x3"``: tensor cores at about fp32 accuracy; ``"ieee"`` dots run on FMA units and
spill in the backward). Configs are data (:class:`TritonAttentionConfig`), with heuristic defaults per
direction (:func:`default_config`) and a knob space with resource constraints (:func:`space`, :func:`check`).

The entry points :func:`run_forward`, :func:`run_backward` and :func:`run_decode` take torch tensors on a CUDA
device (CPU tensors under ``TRITON_INTERPRET=1``). :func:`aot_kernels` lists every kernel of a direction with its
``triton.compile`` signature for the ahead-of-time sm_90 check. Importing this module imports neither torch nor
triton.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import sympy

from opgen.ir import DType, Expr, ExprOp, access_report, expr_str, load
from opgen.ir.passes.attention import AttentionGroup
from opgen.ir.passes.diff import derivative
from opgen.ir.symbols import Dim
from opgen.schedules.attention import (BLOCKS, DECODE_MAX_LEN, H100_SHARED_MEMORY, H100_SMS, KINDS,  # noqa: F401
                                       MAX_HEAD_DIM, PRECISIONS, REGISTER_ELEMENTS_PER_THREAD, SPLITS, STAGES, WARPS,
                                       AttentionShape, AttentionSpace, TritonAttentionConfig, _pow2, padded_dim,
                                       unsupported_shape, use_decode)
# the schedule (knobs, checks, default configs) under its old names: opgen.schedules.attention
from opgen.schedules.attention import (as_triton_attention_config as as_config,  # noqa: F401
                                       check_triton_attention as check,
                                       default_triton_attention_config as default_config,
                                       triton_attention_space as space)

from .attention_kernels import (CAPGRAD_T as _CAPGRAD_T, DSC_MASK_T as _DSC_MASK_T, KERNELS as _KERNELS,
                                SCORE_DSC_T as _SCORE_DSC_T, SCORE_T as _SCORE_T)
from .expr import AxisVar, Namer, Section, TensorArg, ValueRenderer, helper_source

GENERATOR_VERSION = "triton-attention-1"
MAX_GRID_Y = 65535                # CUDA limit of grid dims 1 and 2 (batch x heads runs on dim 1)
SUPPORTED_DTYPES = (DType.f16, DType.bf16, DType.f32)


# ------------------------------------------------------------------------------------------- support checks
# (the configs, their checks, spaces and defaults, and the shape checks: opgen.schedules.attention)


def unsupported(group: AttentionGroup) -> str | None:
    """Why this backend cannot render ``group`` (dtypes, GQA form), or None."""
    op = group.op
    dq, dk, dv = (op.tensor(n).dtype for n in (group.q, group.k, group.v))
    for name, d in (("q", dq), ("k", dk), ("v", dv)):
        if d not in SUPPORTED_DTYPES:
            return f"argument '{name}' has dtype {d.value}; the triton attention kernels support fp16, bf16, fp32"
    if dq != dk:
        return f"q ({dq.value}) and k ({dk.value}) must have the same dtype for tl.dot"
    if op.tensor(group.out).dtype not in SUPPORTED_DTYPES:
        return f"output dtype {op.tensor(group.out).dtype.value} is not supported"
    if _gqa_form(group) is None:
        return f"kv head {group.kv_head} is neither h nor h // G"
    for c in group.captures:
        if op.tensor(c).dtype == DType.f64:
            return f"captured tensor {c} is fp64 (not supported by the triton attention kernels)"
    return None


def _gqa_form(group: AttentionGroup) -> str | None:
    """"plain" when the kv head is h, "grouped" when it is floor(h / G) for a dim G, else None."""
    kv = sympy.sympify(group.kv_head)
    if kv == group.h:
        return "plain"
    if isinstance(kv, sympy.floor):
        num, den = sympy.fraction(sympy.together(kv.args[0]))
        if num == group.h and isinstance(den, Dim):
            return "grouped"
    return None


# ----------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class AttentionModule:
    """A rendered module and the context arguments its kernels take after the fixed ones."""

    source: str
    captures: tuple[str, ...]            # captured tensor names, in argument order
    capture_ranks: tuple[int, ...]
    dims: tuple[str, ...]                # dim names (``dim_<name>`` arguments) the mods and captures need
    has_dscore: bool                     # whether ds is multiplied by d(score_mod)/d(score)
    kernels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)   # kernel -> parameter names
    capture_grads: tuple[str, ...] = ()  # captured tensors whose gradients the dk/dv kernel adds up


def _ctx_names(captures: Sequence[str], ranks: Sequence[int], dims: Sequence[str]) -> list[str]:
    out = [f"{c}_ptr" for c in captures]
    out += [f"dim_{d}" for d in dims]
    for c, r in zip(captures, ranks):
        out += [f"s_{c}_{k}" for k in range(r)]
    return out


_HELPER_PARAMS = ("qk", "off_b", "off_h", "qi", "kj", "qi_ok", "kj_ok")


def _render_helper(group: AttentionGroup, name: str, exprs: Sequence[tuple[Expr | None, str]], ctx: list[str],
                   dims: Mapping, doc: str) -> tuple[str, set[str]]:
    """A ``@triton.jit`` helper ``name(qk, off_b, off_h, qi, kj, qi_ok, kj_ok, *ctx)`` returning each ``(expr,
    kind)`` as a tile (a tuple when there are several; common subexpressions are computed once). ``kind`` is
    "score" (an fp32 tile like qk; None is 0) or "mask" (a bool tile, and-ed with the key bounds; None is all)."""
    op = group.op
    namer = Namer(reserved=set(_HELPER_PARAMS) | set(ctx))
    targs = {}
    for c in group.captures:
        t = op.tensor(c)
        targs[c] = TensorArg(f"{c}_ptr", tuple(f"s_{c}_{k}" for k in range(t.rank)),
                             tuple(_size_code(s) for s in t.shape), t.dtype)
    masked = {acc for _, acc, st in access_report(op) if st.padded or st.guarded}
    r = ValueRenderer(namer, targs, {d: f"dim_{d.name}" for d in dims}, masked)
    env = {group.b: AxisVar("off_b", None, block=False), group.h: AxisVar("off_h", None, block=False),
           group.i: AxisVar("qi", "qi_ok"), group.j: AxisVar("kj", "kj_ok")}
    sec = Section(env=env, registers={group.raw_score: "qk"})
    results = []
    for expr, kind in exprs:
        if expr is None:
            code, deps = ("0.0" if kind == "score" else "True"), frozenset()
        else:
            code, deps = r.value(expr, sec, "val"), r.deps(expr)
        if kind == "score":
            results.append(code if group.raw_score in deps else f"tl.zeros_like(qk) + {code}")
        elif deps & {group.i, group.j}:
            results.append(f"({code}) & kj_ok")
        else:
            results.append(f"tl.where({code}, kj_ok, False)")
    lines = ["@triton.jit", f"def {name}({', '.join(_HELPER_PARAMS + tuple(ctx))}):", f'    """{doc}"""']
    lines += sec.text(4)
    lines.append(f"    return {', '.join(results)}")
    return "\n".join(lines) + "\n", set(r.helpers)


def _size_code(s) -> str:
    s = sympy.sympify(s)
    if isinstance(s, Dim):
        return f"dim_{s.name}"
    if s.is_Integer:
        return str(int(s))
    raise ValueError(f"captured tensor size {s} is not a plain dim")


def _needed_dims(group: AttentionGroup, exprs: Sequence[Expr | None]) -> tuple[str, ...]:
    from opgen.ir.expr import free_symbols

    out: set[str] = set()
    for e in exprs:
        if e is not None:
            out |= {s.name for s in free_symbols(e) if isinstance(s, Dim)}
    for c in group.captures:
        for s in group.op.tensor(c).shape:
            out |= {x.name for x in sympy.sympify(s).free_symbols if isinstance(x, Dim)}
    return tuple(sorted(out))


def dscore_expr(group: AttentionGroup) -> tuple[Expr | None, bool]:
    """(d score / d raw score, whether it is needed): None with False when the mod is the identity (derivative 1),
    None with True when the score does not depend on the raw score (derivative 0)."""
    raw = load(group.raw_score, (group.b, group.h, group.i, group.j), group.score.dtype)
    d = derivative(group.score, raw)
    if d is not None and d.op is ExprOp.CONST and float(d.arg) == 1.0:
        return None, False
    return d, True


def render(group: AttentionGroup) -> AttentionModule:
    """The Triton module of ``group`` (pure and cached); ValueError when :func:`unsupported` says so."""
    return _render(group)


@functools.lru_cache(maxsize=128)
def _render(group: AttentionGroup) -> AttentionModule:
    why = unsupported(group)
    if why is not None:
        raise ValueError(f"triton attention, op {group.op.name}: {why}")
    dexpr, has_dscore = dscore_expr(group)
    score = group.score if group.has_score_mod else None
    dims = _needed_dims(group, [score, group.mask, dexpr])
    caps = tuple(group.captures)
    ranks = tuple(group.op.tensor(c).rank for c in caps)
    ctx = _ctx_names(caps, ranks, dims)
    dim_syms = {Dim(d): d for d in dims}
    helpers: set[str] = set()
    if score is None:
        score_text = ("@triton.jit\ndef _score_mod(" + ", ".join(_HELPER_PARAMS + tuple(ctx)) + "):\n"
                      '    """score mod: none (the raw score)."""\n    return qk\n')
    else:
        score_text, h = _render_helper(group, "_score_mod", [(group.score, "score")], ctx, dim_syms,
                                       f"score mod: {expr_str(group.score)}")
        helpers |= h
    shown = expr_str(group.mask) if group.mask is not None else "all"
    mask_text, h = _render_helper(group, "_visible", [(group.mask, "mask")], ctx, dim_syms,
                                  f"visible keys (and key bounds): {shown}")
    helpers |= h
    texts = [score_text, mask_text]
    if has_dscore:
        shown = expr_str(dexpr) if dexpr is not None else "0"
        text, h = _render_helper(group, "_score_bwd", [(group.score, "score"), (dexpr, "score")], ctx, dim_syms,
                                 f"(score mod, its derivative d score_mod / d score = {shown})")
        helpers |= h
        texts.append(text)
    cx = "".join(", " + n for n in ctx)
    body = _KERNELS
    for marker, indent in (("__SCORE_BWD12__", 12), ("__SCORE_BWD8__", 8)):
        body = body.replace(marker + "\n", _indent(_SCORE_DSC_T if has_dscore else _SCORE_T, indent))
    for marker, indent in (("__DSC_MASK16__", 16), ("__DSC_MASK12__", 12)):
        body = body.replace(marker + "\n", _indent(_DSC_MASK_T, indent) if has_dscore else "")
    body = body.replace("__DSC_MUL__", " * dsc" if has_dscore else "")
    cgrads, dcap = (), ""
    cleaves = capture_leaves(group)
    if cleaves:
        cgrads = tuple(dict.fromkeys(n for n, _, _ in cleaves))
        dnames = _dcap_names(group, cgrads)
        dcap = "".join(", " + n for n in dnames)
        text, h = _render_capture_grads(group, cleaves, ctx, dnames, dim_syms)
        helpers |= h
        texts.append(text)
    body = body.replace("__CAPGRAD12__\n", _indent(_CAPGRAD_T, 12) if cleaves else "")
    body = body.replace("__DCAPP__", dcap).replace("__DCAP__", dcap)
    body = body.replace("__CTXP__", cx).replace("__CTX__", cx)
    parts = [_header(group), helper_source(helpers)] + texts + [body]
    text = "\n\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"
    kernels = _kernel_params(text)
    return AttentionModule(text, caps, ranks, dims, has_dscore, kernels, cgrads)


def capture_leaves(group: AttentionGroup) -> list[tuple[str, Expr, Expr]]:
    """``(captured tensor, load, d score / d load)`` for each load in the score of the captured tensors the group
    wants gradients of (:attr:`AttentionGroup.grad_captures`), whose derivative is not identically 0."""
    out = []
    for name in group.grad_captures:
        for leaf in group.capture_leaves(name):
            d = derivative(group.score, leaf)
            if d is not None:
                out.append((name, leaf, d))
    return out


def _dcap_names(group: AttentionGroup, cgrads: Sequence[str]) -> list[str]:
    out = []
    for c in cgrads:
        out.append(f"d{c}_ptr")
        out += [f"s_d{c}_{k}" for k in range(group.op.tensor(c).rank)]
    return out


def _render_capture_grads(group: AttentionGroup, cleaves, ctx: list[str], dnames: list[str],
                          dims: Mapping) -> tuple[str, set[str]]:
    """A ``@triton.jit`` helper ``_capture_grads(qk, off_b, off_h, qi, kj, qi_ok, kj_ok, dsm, *ctx, *dcap)`` that
    adds ``dsm * d score / d load`` into the gradient buffer of each load's captured tensor at the load's index
    (atomically: every program of the dk/dv kernel adds into the same table). The tile is ``[keys, queries]``
    (the dk/dv orientation); out-of-range pairs and indices outside the tensor add nothing; an index that depends
    on neither the query nor the key (ALiBi's ``slopes[h]``) adds the tile's sum once."""
    op = group.op
    namer = Namer(reserved=set(_HELPER_PARAMS) | {"dsm"} | set(ctx) | set(dnames))
    targs = {}
    for c in group.captures:
        t = op.tensor(c)
        targs[c] = TensorArg(f"{c}_ptr", tuple(f"s_{c}_{k}" for k in range(t.rank)),
                             tuple(_size_code(s) for s in t.shape), t.dtype)
        targs[f"d{c}"] = TensorArg(f"d{c}_ptr", tuple(f"s_d{c}_{k}" for k in range(t.rank)),
                                   tuple(_size_code(s) for s in t.shape), DType.f32)
    masked = {acc for _, acc, st in access_report(op) if st.padded or st.guarded}
    r = ValueRenderer(namer, targs, {d: f"dim_{d.name}" for d in dims}, masked)
    env = {group.b: AxisVar("off_b", None, block=False), group.h: AxisVar("off_h", None, block=False),
           group.i: AxisVar("qi", "qi_ok"), group.j: AxisVar("kj", "kj_ok")}
    sec = Section(env=env, registers={group.raw_score: "qk"})
    sec.emit("ok = qi_ok & kj_ok")
    for name, leaf, d in cleaves:
        t = targs[f"d{name}"]
        dcode = r.value(d, sec, "dcap")
        contrib = namer.fresh("contrib")
        sec.emit(f"{contrib} = tl.where(ok, dsm * ({dcode}), 0.0)")
        index = leaf.arg.index
        syms: set = set()
        for ie in index:
            syms |= sympy.sympify(ie).free_symbols
        codes = [r.index(ie, sec) for ie in index]
        vector, scalar = [], []
        for k, ic in enumerate(codes):
            if not (ic.isidentifier() or ic.lstrip("-").isdigit()):
                ic = codes[k] = r._assign("ix", ic, sec)
            terms = [f"({ic} >= 0)", f"({ic} < {t.sizes[k]})"]
            (vector if r.is_block(sympy.sympify(index[k]).free_symbols, sec) else scalar).extend(terms)
        off = r.offset(f"d{name}", index, sec, codes)
        if not (syms & {group.i, group.j}):   # one position per program: the tile's sum, one add
            total = f"tl.sum(tl.sum({contrib}, 1), 0)"
            inb = " & ".join(scalar)
            sec.emit(f"tl.atomic_add({t.ptr} + {off}, {total}" + (f", mask={inb})" if inb else ")"))
        else:
            mask = r.combine_masks(["ok"] + vector, scalar)
            sec.emit(f"tl.atomic_add({t.ptr} + {off} + (qi * 0 + kj * 0), {contrib}, mask={mask})")
    params = _HELPER_PARAMS + ("dsm",) + tuple(ctx) + tuple(dnames)
    lines = ["@triton.jit", f"def _capture_grads({', '.join(params)}):", '    """capture gradients: '
             + "; ".join(f"d {n}[{', '.join(map(str, leaf.arg.index))}] += dsm * ({expr_str(d)})"
                         for n, leaf, d in cleaves) + '"""']
    lines += sec.text(4)
    return "\n".join(lines) + "\n", set(r.helpers)


def _header(group: AttentionGroup) -> str:
    lines = [f'"""Generated by opgen ({GENERATOR_VERSION}): attention kernels of op {group.op.name}.', ""]
    lines += ["    " + ln for ln in group.describe().splitlines()]
    lines += ["", f"    op fingerprint {group.op.fingerprint}", '"""', "import triton", "import triton.language as tl"]
    return "\n".join(lines)


def _kernel_params(text: str) -> dict[str, tuple[str, ...]]:
    """Parameter names of each ``attn_*`` kernel in ``text`` (parsed back, so launch order cannot drift)."""
    import ast

    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("attn_"):
            out[node.name] = tuple(a.arg for a in node.args.args)
    return out


def _indent(text: str, n: int) -> str:
    return "".join(" " * n + ln + "\n" for ln in text.splitlines())


# The kernel templates (_KERNELS and the score-mod lines) are text in attention_kernels.py.


# ----------------------------------------------------------------------------------------- tile tables


@dataclass(frozen=True)
class _Table:
    count: Any
    index: Any
    masked: Any


def _as_table(table, what: str) -> _Table:
    if isinstance(table, Mapping):
        parts = (table.get("count"), table.get("index"), table.get("masked"))
    elif isinstance(table, (tuple, list)):
        if len(table) != 3:
            raise ValueError(f"triton attention: argument '{what}' must be (count, index, masked), got {len(table)} "
                             f"items")
        parts = tuple(table)
    else:
        parts = (getattr(table, "count", None), getattr(table, "index", None), getattr(table, "masked", None))
    if any(p is None for p in parts):
        raise ValueError(f"triton attention: argument '{what}' must be (count, index, masked) int32 tensors or an "
                         f"object with those attributes, got {type(table).__name__}")
    return _Table(*parts)


def _check_table(table, what: str, B: int, H: int, n_tiles: int, other_tiles: int, device) -> _Table:
    """Validate a tile table and broadcast it to ``[B, H, n_tiles(, W)]`` (stride 0 on broadcast dims)."""
    import torch

    t = _as_table(table, what)
    for name in ("count", "index", "masked"):
        x = getattr(t, name)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            raise ValueError(f"triton attention: argument '{what}.{name}' must be an int32 tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.device != device:
            raise ValueError(f"triton attention: argument '{what}.{name}' is on {x.device}, the inputs on {device}")
    c, i, m = t.count, t.index, t.masked
    if c.dim() != 3 or c.shape[0] not in (1, B) or c.shape[1] not in (1, H) or c.shape[2] != n_tiles:
        raise ValueError(f"triton attention: argument '{what}.count' has shape {tuple(c.shape)}, expected "
                         f"[1 or {B}, 1 or {H}, {n_tiles}] (the tables must be built with the config's block sizes)")
    if i.dim() != 4 or tuple(i.shape[:3]) != tuple(c.shape) or i.shape[3] > max(1, other_tiles):
        raise ValueError(f"triton attention: argument '{what}.index' has shape {tuple(i.shape)}, expected "
                         f"[{', '.join(map(str, c.shape))}, W <= {other_tiles}]")
    if tuple(m.shape) != tuple(i.shape):
        raise ValueError(f"triton attention: argument '{what}.masked' has shape {tuple(m.shape)}, expected "
                         f"{tuple(i.shape)} (that of '{what}.index')")
    if i.shape[3] == 0:   # nothing listed anywhere: give the kernel a readable (never read) entry
        i = torch.zeros(*c.shape, 1, dtype=torch.int32, device=device)
        m = torch.zeros_like(i)
    return _Table(c.expand(B, H, n_tiles), i.expand(B, H, n_tiles, i.shape[3]),
                  m.expand(B, H, n_tiles, m.shape[3]))


# ----------------------------------------------------------------------------------------- launching


_TORCH_SIG = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64", "int32": "*i32",
              "int64": "*i64", "bool": "*i1", "int8": "*i8", "uint8": "*u8", "int16": "*i16"}


@dataclass
class _Call:
    """One kernel launch: name, grid, argument values by parameter name, constexprs and launch options."""

    kernel: str
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    def ordered(self, params: Sequence[str]) -> list:
        missing = [p for p in params if p not in self.args and p not in self.constexprs]
        if missing:
            raise RuntimeError(f"internal error: kernel {self.kernel} arguments {missing} are not set")
        return [self.args[p] for p in params if p not in self.constexprs]

    def signature(self, params: Sequence[str]) -> tuple[dict[str, str], dict[str, Any]]:
        """(signature, constexprs) for ``triton.compile``; ints equal to 1 are specialized as at run time."""
        sig: dict[str, str] = {}
        consts: dict[str, Any] = {}
        for p in params:
            if p in self.constexprs:
                sig[p] = "constexpr"
                consts[p] = self.constexprs[p]
                continue
            v = self.args[p]
            if isinstance(v, bool):
                raise RuntimeError(f"internal error: boolean kernel argument {p}")
            if isinstance(v, int):
                if v == 1:
                    sig[p], consts[p] = "constexpr", 1
                else:
                    sig[p] = "i64" if abs(v) >= 2**31 else "i32"
            elif isinstance(v, float):
                sig[p] = "fp32"
            else:
                sig[p] = _TORCH_SIG[str(v.dtype).replace("torch.", "")]
        return sig, consts


def _strides(prefix: str, x, rank: int) -> dict[str, int]:
    return {f"{prefix}_{k}": int(x.stride(k)) for k in range(rank)}


def _dim_values(group: AttentionGroup, shapes: Mapping[str, Sequence[int]], names: Sequence[str]) -> dict[str, int]:
    """Values of the dims in ``names`` read off the input shapes (every needed dim is a plain dim of some input)."""
    op = group.op
    known: dict[str, int] = {}
    for t in op.inputs:
        if t.name not in shapes:
            continue
        for s, v in zip(t.shape, shapes[t.name]):
            s = sympy.sympify(s)
            if isinstance(s, Dim):
                if s.name in known and known[s.name] != int(v):
                    raise ValueError(f"triton attention, op {op.name}: dim {s.name} is {known[s.name]} and "
                                     f"{int(v)} in different inputs")
                known[s.name] = int(v)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"triton attention, op {op.name}: cannot determine dims {missing} from the input shapes")
    return {n: known[n] for n in names}


def _ctx_args(mod: AttentionModule, group: AttentionGroup, inputs: Mapping) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c, r in zip(mod.captures, mod.capture_ranks):
        x = inputs[c]
        if x.dim() != r:
            raise ValueError(f"triton attention, op {group.op.name}: captured tensor {c} has rank {x.dim()}, "
                             f"expected {r}")
        out[f"{c}_ptr"] = x
        out.update(_strides(f"s_{c}", x, r))
    vals = _dim_values(group, {n: tuple(inputs[n].shape) for n in inputs}, mod.dims)
    out.update({f"dim_{d}": v for d, v in vals.items()})
    return out


def _precision(cfg: TritonAttentionConfig, shape: AttentionShape) -> str:
    return cfg.dot_precision if shape.dtype == DType.f32 else "ieee"


def _common(group: AttentionGroup, inputs: Mapping, what: str) -> tuple[AttentionShape, Any, Any, Any]:
    """Validate the q, k, v inputs; (shape, q, k, v)."""
    import torch

    from .compile import interpreter_enabled

    op = group.op
    missing = [n for n in (group.q, group.k, group.v, *group.captures) if n not in inputs]
    if missing:
        raise ValueError(f"triton attention {what}, op {op.name}: missing inputs {missing}")
    q, k, v = inputs[group.q], inputs[group.k], inputs[group.v]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"triton attention {what}, op {op.name}: argument '{name}' must be a 4-D tensor")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"triton attention {what}, op {op.name}: argument '{name}' has dtype {x.dtype}; "
                             f"supported: float16, bfloat16, float32")
    if q.dtype != k.dtype:
        raise ValueError(f"triton attention {what}, op {op.name}: q ({q.dtype}) and k ({k.dtype}) must share a "
                         f"dtype")
    dev = q.device
    for name, x in [("k", k), ("v", v)] + [(c, inputs[c]) for c in group.captures]:
        if x.device != dev:
            raise ValueError(f"triton attention {what}, op {op.name}: argument '{name}' is on {x.device}, q on {dev}")
    if dev.type not in ("cuda", "meta") and not interpreter_enabled():
        raise ValueError(f"triton attention {what}, op {op.name}: tensors must be on a CUDA device (got {dev}); "
                         f"set TRITON_INTERPRET=1 before importing triton to run on CPU in the interpreter")
    shape = AttentionShape.of(group, {n: tuple(inputs[n].shape) for n in (group.q, group.k, group.v)})
    if (k.shape[0], v.shape[0]) != (q.shape[0], q.shape[0]) or tuple(v.shape[1:3]) != tuple(k.shape[1:3]) \
            or k.shape[3] != q.shape[3]:
        raise ValueError(f"triton attention {what}, op {op.name}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit [B, HQ, L, E], [B, HKV, S, E], [B, HKV, S, EV]")
    why = unsupported_shape(shape)
    if why is not None:
        raise ValueError(f"triton attention {what}, op {op.name}: {why}")
    if shape.batch * shape.heads > MAX_GRID_Y:
        raise ValueError(f"triton attention {what}, op {op.name}: batch x heads = {shape.batch * shape.heads} "
                         f"exceeds the CUDA grid limit {MAX_GRID_Y}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        span = sum((n - 1) * abs(st) for n, st in zip(x.shape[2:], x.stride()[2:]))
        if span >= 2**31:
            raise ValueError(f"triton attention {what}, op {op.name}: argument '{name}' spans {span} elements per "
                             f"head (strides {tuple(x.stride())}); offsets within a head must fit in int32")
    if _gqa_form(group) == "plain" and shape.heads != shape.kv_heads:
        raise ValueError(f"triton attention {what}, op {op.name}: q has {shape.heads} heads and k {shape.kv_heads}, "
                         f"but the op is not declared with GQA")
    return shape, q, k, v


def _resolve(group: AttentionGroup, shape: AttentionShape, config, kind: str, caps) -> TritonAttentionConfig:
    """The config to run: ``config`` (validated against the knob choices, not the resource estimates) or the
    default."""
    try:
        cfg = as_config(config) or default_config(group, shape, caps, kind)
    except (TypeError, ValueError) as e:
        raise ValueError(f"triton attention {kind}, op {group.op.name}: invalid config {config!r}: {e}") from None
    why = check(group, cfg, None, kind)
    if why is not None:
        raise ValueError(f"triton attention {kind}, op {group.op.name}: invalid config {cfg.to_dict()}: {why}")
    return cfg


def _module(group: AttentionGroup, cache_dir):
    from .compile import _default_cache_dir, load_module

    if cache_dir is None:
        cache_dir = _default_cache_dir()
    return load_module(render(group).source, cache_dir)


def _launch(mod, amod: AttentionModule, call: _Call) -> None:
    fn = getattr(mod, call.kernel)
    params = amod.kernels[call.kernel]
    fn[call.grid](*call.ordered(params), **call.constexprs, num_warps=call.num_warps, num_stages=call.num_stages)


def _tile_consts(cfg: TritonAttentionConfig, shape: AttentionShape) -> dict[str, Any]:
    return {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_E": padded_dim(shape.head_dim),
            "BLOCK_EV": padded_dim(shape.value_dim), "PRECISION": _precision(cfg, shape)}


def _table_args(t: _Table) -> dict[str, Any]:
    out = {"Cnt": t.count, "Idx": t.index, "Msk": t.masked}
    out.update(_strides("s_c", t.count, 3))
    out.update(_strides("s_i", t.index, 4))
    out.update(_strides("s_m", t.masked, 4))
    return out


def _qkv_args(shape: AttentionShape, q, k, v, group: AttentionGroup) -> dict[str, Any]:
    out = {"Q": q, "K": k, "V": v, "HQ": shape.heads, "LQ": shape.q_len, "LK": shape.kv_len,
           "DE": shape.head_dim, "DV": shape.value_dim, "GQA": shape.group_size, "sm_scale": float(group.scale)}
    out.update(_strides("s_q", q, 4))
    out.update(_strides("s_k", k, 4))
    out.update(_strides("s_v", v, 4))
    return out


def forward_calls(group: AttentionGroup, inputs: Mapping, rows, cfg: TritonAttentionConfig,
                  out=None, lse=None) -> tuple[list[_Call], dict]:
    """The launches of the forward (without running them) and the output tensors they write."""
    import torch

    mod = render(group)
    shape, q, k, v = _common(group, inputs, "forward")
    B, H, L = shape.batch, shape.heads, shape.q_len
    nq, nk = -(-L // cfg.block_m), -(-shape.kv_len // cfg.block_n)
    table = _check_table(rows, "rows", B, H, nq, nk, q.device)
    out_dtype = _torch_dtype(group.op.tensor(group.out).dtype)
    if out is None:
        out = torch.empty(B, H, L, shape.value_dim, dtype=out_dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    args = {**_qkv_args(shape, q, k, v, group), **_table_args(table), **_ctx_args(mod, group, inputs),
            "Out": out, "Lse": lse, **_strides("s_o", out, 4), **_strides("s_l", lse, 3)}
    call = _Call("attn_fwd", (nq, B * H), args, _tile_consts(cfg, shape), cfg.num_warps, cfg.num_stages)
    return [call], {"out": out, "lse": lse}


def decode_calls(group: AttentionGroup, inputs: Mapping, rows, cfg: TritonAttentionConfig) -> tuple[list[_Call], dict]:
    """The launches of the split-key decode path and the output tensors they write."""
    import torch

    mod = render(group)
    shape, q, k, v = _common(group, inputs, "decode")
    B, H, L, EV = shape.batch, shape.heads, shape.q_len, shape.value_dim
    nq, nk = -(-L // cfg.block_m), -(-shape.kv_len // cfg.block_n)
    table = _check_table(rows, "rows", B, H, nq, nk, q.device)
    sp = cfg.splits
    dev = q.device
    pm = torch.empty(sp, B * H, L, dtype=torch.float32, device=dev)
    pl = torch.empty(sp, B * H, L, dtype=torch.float32, device=dev)
    pacc = torch.empty(sp, B * H, L, EV, dtype=torch.float32, device=dev)
    out = torch.empty(B, H, L, EV, dtype=_torch_dtype(group.op.tensor(group.out).dtype), device=dev)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    consts = _tile_consts(cfg, shape)
    a1 = {**_qkv_args(shape, q, k, v, group), **_table_args(table), **_ctx_args(mod, group, inputs),
          "Pm": pm, "Pl": pl, "Pacc": pacc, "BH": B * H, "SPLITS": sp}
    a2 = {"Pm": pm, "Pl": pl, "Pacc": pacc, "Out": out, "Lse": lse, "HQ": H, "LQ": L, "DV": EV, "BH": B * H,
          "SPLITS": sp, **_strides("s_o", out, 4), **_strides("s_l", lse, 3)}
    c2 = {"BLOCK_M": cfg.block_m, "BLOCK_EV": consts["BLOCK_EV"]}
    return [_Call("attn_decode_split", (sp, nq, B * H), a1, consts, cfg.num_warps, cfg.num_stages),
            _Call("attn_decode_combine", (nq, B * H), a2, c2, 4 if cfg.block_m * consts["BLOCK_EV"] >= 4096 else 2,
                  1)], {"out": out, "lse": lse}


def backward_calls(group: AttentionGroup, inputs: Mapping, out, lse, dout, rows, cols,
                   cfg: TritonAttentionConfig) -> tuple[list[_Call], dict]:
    """The launches of the flash backward (delta, dk/dv, dq) and the gradient tensors they write."""
    import torch

    mod = render(group)
    shape, q, k, v = _common(group, inputs, "backward")
    B, H, HK, L, S = shape.batch, shape.heads, shape.kv_heads, shape.q_len, shape.kv_len
    E, EV = shape.head_dim, shape.value_dim
    for name, x, want in (("out", out, (B, H, L, EV)), ("dout", dout, (B, H, L, EV)), ("lse", lse, (B, H, L))):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
            raise ValueError(f"triton attention backward, op {group.op.name}: argument '{name}' must have shape "
                             f"{list(want)}, got {tuple(getattr(x, 'shape', ()))}")
        if x.device != q.device:
            raise ValueError(f"triton attention backward, op {group.op.name}: argument '{name}' is on {x.device}, "
                             f"q on {q.device}")
    if lse.dtype != torch.float32:
        raise ValueError(f"triton attention backward, op {group.op.name}: argument 'lse' must be float32, got "
                         f"{lse.dtype}")
    if dout.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton attention backward, op {group.op.name}: argument 'dout' has dtype {dout.dtype}")
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)     # p^T dout and v dout^T are dots with v's element type
    nq, nk = -(-L // cfg.block_m), -(-S // cfg.block_n)
    rtab = _check_table(rows, "rows", B, H, nq, nk, q.device)
    ctab = _check_table(cols, "cols", B, H, nk, nq, q.device)
    dev = q.device
    delta = torch.empty(B * H, L, dtype=torch.float32, device=dev)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    consts = _tile_consts(cfg, shape)
    ctx = _ctx_args(mod, group, inputs)
    base = {**_qkv_args(shape, q, k, v, group), **ctx, "DOut": dout, "Lse": lse, "Delta": delta,
            **_strides("s_do", dout, 4), **_strides("s_l", lse, 3)}
    bev = consts["BLOCK_EV"]
    pre_bm = max(16, min(128, _pow2(L), 8192 // bev))
    pre = _Call("attn_bwd_preprocess", (-(-L // pre_bm), B * H),
                {"Out": out, "DOut": dout, "Delta": delta, "HQ": H, "LQ": L, "DV": EV, **_strides("s_o", out, 4),
                 **_strides("s_do", dout, 4)}, {"BLOCK_M": pre_bm, "BLOCK_EV": bev}, 4, 1)
    # every wanted capture gradient (zeros where the score's derivative is 0); the kernel adds the others
    dcaps = {c: torch.zeros(inputs[c].shape, dtype=torch.float32, device=dev) for c in group.grad_captures}
    dcap_args = {}
    for c in mod.capture_grads:
        t = dcaps[c]
        dcap_args[f"d{c}_ptr"] = t
        dcap_args.update(_strides(f"s_d{c}", t, t.dim()))
    dkdv = _Call("attn_bwd_dkdv", (nk, B * HK),
                 {**base, **_table_args(ctab), "HKV": HK, "DK": dk, "DVt": dv, **_strides("s_dk", dk, 4),
                  **_strides("s_dv", dv, 4), **dcap_args}, consts, cfg.num_warps, cfg.num_stages)
    dqc = _Call("attn_bwd_dq", (nq, B * H), {**base, **_table_args(rtab), "DQ": dq, **_strides("s_dq", dq, 4)},
                consts, cfg.num_warps, cfg.num_stages)
    return [pre, dkdv, dqc], {"q": dq, "k": dk, "v": dv, **dcaps}


def _torch_dtype(d: DType):
    import torch

    return {DType.f16: torch.float16, DType.bf16: torch.bfloat16, DType.f32: torch.float32}[d]


def _empty_case(shape: AttentionShape) -> bool:
    return shape.batch * shape.heads * shape.q_len == 0


def run_forward(group: AttentionGroup, inputs: Mapping, rows, config=None, *, cache_dir=None,
                caps=None) -> dict:
    """``{"out", "lse"}`` of ``group`` by the flash forward.

    ``inputs`` maps the op's input names (q, k, v, captures) to tensors on a CUDA device (CPU under
    ``TRITON_INTERPRET=1``); ``rows`` is the row tile table ``(count, index, masked)`` built with ``config``'s
    ``block_m`` / ``block_n``; ``config`` is a :class:`TritonAttentionConfig`, a mapping, or None (the default
    config). ValueError names the argument for unsupported dtypes, head dims, devices or table shapes.
    """
    shape, *_ = _common(group, inputs, "forward")
    cfg = _resolve(group, shape, config, "forward", caps)
    calls, outs = forward_calls(group, inputs, rows, cfg)
    if not _empty_case(shape):
        mod = _module(group, cache_dir)
        for c in calls:
            _launch(mod, render(group), c)
    return outs


def run_decode(group: AttentionGroup, inputs: Mapping, rows, config=None, *, cache_dir=None, caps=None) -> dict:
    """``{"out", "lse"}`` by the split-key (FlashDecoding) path: meant for short queries (``L <=``
    :data:`DECODE_MAX_LEN`) over long keys. ``config.splits`` programs share the key tiles listed per query tile;
    ``rows`` as for :func:`run_forward`."""
    shape, *_ = _common(group, inputs, "decode")
    cfg = _resolve(group, shape, config, "decode", caps)
    calls, outs = decode_calls(group, inputs, rows, cfg)
    if not _empty_case(shape):
        mod = _module(group, cache_dir)
        for c in calls:
            _launch(mod, render(group), c)
    return outs


def run_backward(group: AttentionGroup, inputs: Mapping, out, lse, dout, rows, cols, config=None, *,
                 cache_dir=None, caps=None) -> dict:
    """``{"q", "k", "v"}``: gradients of ``out`` (weighted by ``dout``) by the flash backward with recomputation.

    ``out`` and ``lse`` are the forward's outputs; ``rows`` is the row tile table and ``cols`` the column
    (transposed) table, both built with ``config``'s block sizes (the default backward config when None).
    Gradients have the dtypes of q, k, v. The captured tensors the group's ``grad_captures`` names get theirs
    too (float32, under their names: the dk/dv kernel adds ``p * (dp - delta) * d score_mod / d capture`` into
    them atomically); the other captured tensors are constants.
    """
    shape, *_ = _common(group, inputs, "backward")
    cfg = _resolve(group, shape, config, "backward", caps)
    calls, grads = backward_calls(group, inputs, out, lse, dout, rows, cols, cfg)
    if _empty_case(shape) or shape.kv_len == 0:
        for g in grads.values():
            g.zero_()
        return grads
    mod = _module(group, cache_dir)
    for c in calls:
        _launch(mod, render(group), c)
    return grads


# --------------------------------------------------------------------------------------------- AOT support


def aot_kernels(group: AttentionGroup, shape: AttentionShape, cfg: TritonAttentionConfig, kind: str,
                table_width: int | None = None) -> list[tuple[str, dict, dict, int, int]]:
    """``(kernel, signature, constexprs, num_warps, num_stages)`` of every launch of ``kind`` at ``shape``, for
    :func:`opgen.targets.triton.compile.aot_compile` (contiguous tensors on the meta device; nothing runs)."""
    import torch

    dt = _torch_dtype(shape.dtype)
    meta = torch.device("meta")
    B, H, HK, L, S = shape.batch, shape.heads, shape.kv_heads, shape.q_len, shape.kv_len
    inputs = {group.q: torch.empty(B, H, L, shape.head_dim, dtype=dt, device=meta),
              group.k: torch.empty(B, HK, S, shape.head_dim, dtype=dt, device=meta),
              group.v: torch.empty(B, HK, S, shape.value_dim, dtype=dt, device=meta)}
    for c in group.captures:
        t = group.op.tensor(c)
        size = [_capture_size(s) for s in t.shape]
        inputs[c] = torch.empty(*size, dtype=_capture_dtype(t.dtype), device=meta)
    nq, nk = -(-L // cfg.block_m), -(-S // cfg.block_n)

    def table(n, w):
        w = w if table_width is None else min(table_width, w)
        return (torch.empty(1, 1, n, dtype=torch.int32, device=meta),
                torch.empty(1, 1, n, w, dtype=torch.int32, device=meta),
                torch.empty(1, 1, n, w, dtype=torch.int32, device=meta))
    if kind == "forward":
        calls, _ = forward_calls(group, inputs, table(nq, nk), cfg)
    elif kind == "decode":
        calls, _ = decode_calls(group, inputs, table(nq, nk), cfg)
    elif kind == "backward":
        o = torch.empty(B, H, L, shape.value_dim, dtype=dt, device=meta)
        lse = torch.empty(B, H, L, dtype=torch.float32, device=meta)
        calls, _ = backward_calls(group, inputs, o, lse, o, table(nq, nk), table(nk, nq), cfg)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    mod = render(group)
    out = []
    for c in calls:
        sig, consts = c.signature(mod.kernels[c.kernel])
        out.append((c.kernel, sig, consts, c.num_warps, c.num_stages))
    return out


def _capture_size(s) -> int:
    """A stand-in size for a captured tensor's symbolic dim in an AOT signature (any value but 1 will do)."""
    s = sympy.sympify(s)
    return 64 if not s.is_Integer else int(s)


def _capture_dtype(d: DType):
    import torch

    return {DType.f16: torch.float16, DType.bf16: torch.bfloat16, DType.f32: torch.float32, DType.i32: torch.int32,
            DType.i64: torch.int64, DType.bool: torch.bool}[d]


__all__ = ["AttentionModule", "AttentionShape", "AttentionSpace", "TritonAttentionConfig", "aot_kernels",
           "as_config", "check", "default_config", "dscore_expr", "padded_dim", "render", "run_backward",
           "run_decode", "run_forward", "space", "unsupported", "unsupported_shape", "use_decode"]
