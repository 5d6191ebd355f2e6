"""``torch.ops.opgen.attention``: one custom op for every FlexAttention-style score/mask mod.

The mods are traced once (:mod:`opgen.trace`) into IR expressions; their JSON (:mod:`opgen.ir.serialize`) is the
op's ``spec`` string argument, so ``torch.compile`` sees a constant and one registered op serves every mod::

    opgen::attention(Tensor q, Tensor k, Tensor v, Tensor[] captures, str spec, float scale, bool enable_gqa)
        -> (Tensor out, Tensor lse)
    opgen::attention_backward(Tensor q, Tensor k, Tensor v, Tensor[] captures, Tensor out, Tensor lse,
                              Tensor dout, str spec, float scale, bool enable_gqa)
        -> (Tensor dq, Tensor dk, Tensor dv, Tensor[] dcaptures)

``out`` is ``[B, HQ, L, EV]`` in q's dtype; ``lse`` is ``[B, HQ, L]`` in the accumulation dtype (``-inf`` on
fully masked rows, whose ``out`` row is 0). Gradients flow to q, k and v through ``attention_backward``
(:meth:`opgen.runtime.Session.attention_backward`: the target's flash backward, else the reference).

Captured tensors that require grad (learnable ALiBi slopes, Swin's relative-position bias table) get their
gradients from the same flash backward: the spec records which captured tensors required grad when the mods were
traced (``"grad": true``), the backward op is declared with those as ``capture_grads``, and the kernel adds
``d loss / d score_mod * d score_mod / d capture`` (the derivative by the IR's expression rules) into each
captured position a score reads. An index that is itself a captured integer tensor
(``table[relative_position_index[q_idx, kv_idx], h]``) is traced as a gather ``gather{m}`` (the spec's
``"gathers"``), computed from the captured tensors at each call; its gradient is summed back into the table by the
gather index. The TVM (CPU) and Triton (CUDA) flash backwards compute them; a target whose backward does not
(the reference) gets them from torch autograd through the reference interpreter. Integer captures and captures
traced without requires_grad get zeros.

Limits (documented, checked):

* A captured tensor that requires grad but was traced while it did not (a spec built earlier, then
  ``requires_grad_()``) raises :class:`~opgen.ir.ArgumentError` naming it (no silent zero gradient).
* A mask gets no gradient (it is boolean); a capture used only in the mask gets zeros.
* ``lse`` is **not differentiable** (it is marked so: ``lse.requires_grad`` is False); use it as a statistic.
* Under ``torch.compile``, :func:`prepare_mods` runs once per compiled frame (it is marked
  ``assume_constant_result``): create mod objects *outside* the compiled function (e.g. in a module's
  ``__init__``); captured tensors are read by reference, so in-place updates are seen, but rebinding a global or
  an attribute the mod reads to a *new* tensor is not seen until a recompile (pass a new mod object instead).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from opgen.attention_eager import eager_attention
from opgen.bridge import CustomBackward, StaticArg, TensorArg, TorchOp, autograd_inside_op
from opgen.ir import ArgumentError, DType, Expr, accum_dtype, as_dtype, promote
from opgen.ir.dtypes import to_torch
from opgen.ir.errors import FallbackWarning, UnsupportedConstruct
from opgen.ir.serialize import expr_from_obj, expr_to_obj
from opgen.ir.expr import ExprOp
from opgen.ir.symbols import Axis, Dim
from opgen.ops.attention_ir import _AXES, _EXTENTS, SCORE, declare_attention, trace
from opgen.runtime import default_session

WHO = "torch.ops.opgen.attention"
SPEC_FORMAT = "opgen.attention_spec"
SPEC_VERSION = 1
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------------ spec

@dataclass(frozen=True)
class AttentionSpec:
    """The parsed ``spec`` argument: traced score and mask expressions, the captured inputs' dtypes/dims, which of
    them get gradients (``grads``: the captured tensors required grad when the mods were traced), and the gathers
    ``gather{m}`` (``(src, dim, index)`` by IR name with their dtype/dims; see :class:`opgen.trace.Gather`)."""

    score_dtype: DType
    score: Expr
    mask: Expr | None
    captures: tuple[tuple[DType, tuple[Dim, ...]], ...]
    grads: tuple[bool, ...] = ()
    gathers: tuple[tuple[str, int, str, DType, tuple[Dim, ...]], ...] = ()

    def needs_grad(self) -> dict[str, bool]:
        """Whether each captured tensor and gather (by IR name) gets a gradient: a float captured tensor traced
        with requires_grad, and a gather of one that does."""
        need = {f"capture{n}": bool(n < len(self.grads) and self.grads[n] and dt.is_float)
                for n, (dt, _) in enumerate(self.captures)}
        for m, (src, _, _, _, _) in enumerate(self.gathers):
            need[f"gather{m}"] = need[src]
        return need


def spec_to_json(score_dtype: DType, score: Expr, mask: Expr | None,
                 captures: Sequence[tuple[DType, Sequence[Dim]]], grads: Sequence[bool] = (),
                 gathers: Sequence[tuple[str, int, str, DType, Sequence[Dim]]] = ()) -> str:
    """The ``spec`` string of traced mods (deterministic: the same mods give the same string). A captured tensor
    that gets a gradient has ``"grad": true``; gathers are listed under ``"gathers"`` (both keys only when
    present, so a spec without them reads as before)."""
    caps = []
    for n, (dt, dims_) in enumerate(captures):
        c = {"dtype": as_dtype(dt).value, "dims": [str(d) for d in dims_]}
        if n < len(grads) and grads[n]:
            c["grad"] = True
        caps.append(c)
    obj = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "score_dtype": as_dtype(score_dtype).value,
           "score": expr_to_obj(score), "mask": None if mask is None else expr_to_obj(mask), "captures": caps}
    if gathers:
        obj["gathers"] = [{"src": src, "dim": int(dim), "index": idx, "dtype": as_dtype(dt).value,
                           "dims": [str(d) for d in dims_]} for src, dim, idx, dt, dims_ in gathers]
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


@functools.lru_cache(maxsize=256)
def parse_spec(spec: str) -> AttentionSpec:
    """Parse (and cache) a ``spec`` string written by :func:`spec_to_json`."""
    if not isinstance(spec, str) or len(spec) > MAX_SPEC_CHARS:
        raise ArgumentError(f"{WHO}: argument 'spec' must be a string of at most {MAX_SPEC_CHARS} characters, got "
                            f"{type(spec).__name__} of length {len(spec) if isinstance(spec, str) else '-'}")
    try:
        obj = json.loads(spec)
    except RecursionError:
        raise ArgumentError(f"{WHO}: argument 'spec' is nested too deeply to be an attention spec") from None
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"{WHO}: argument 'spec' is not valid JSON ({exc}); build it with "
                            f"opgen.ops.attention_op.prepare_mods") from None
    if not isinstance(obj, dict) or obj.get("format") != SPEC_FORMAT or obj.get("version") != SPEC_VERSION:
        raise ArgumentError(f"{WHO}: argument 'spec' is not an attention spec of format {SPEC_FORMAT!r} version "
                            f"{SPEC_VERSION}; build it with opgen.ops.attention_op.prepare_mods")
    try:
        caps, grads = _spec_captures(obj["captures"])
        gathers = _spec_gathers(obj.get("gathers", []), caps)
        mask = None if obj["mask"] is None else expr_from_obj(obj["mask"])
        parsed = AttentionSpec(DType(obj["score_dtype"]), expr_from_obj(obj["score"]), mask, caps, grads, gathers)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ArgumentError(f"{WHO}: argument 'spec' is malformed: {exc}") from None
    _check_spec_leaves(parsed)
    return parsed


# A spec is data from outside (a string argument: it can come from an edited exported program), so everything
# in it must be what the tracer writes: captures named capture{n}, their dims capture{n}_{k}, loads of the raw
# score over (b, h, i, j) or of a capture with one index per dim, and index symbols from that fixed set.
MAX_SPEC_CHARS = 1 << 20
MAX_CAPTURES = 64
MAX_CAPTURE_RANK = 8


def _spec_captures(items: Any) -> tuple[tuple[tuple[DType, tuple[Dim, ...]], ...], tuple[bool, ...]]:
    if not isinstance(items, list) or len(items) > MAX_CAPTURES:
        raise ValueError(f"'captures' must be a list of at most {MAX_CAPTURES} entries")
    out, grads = [], []
    for n, c in enumerate(items):
        if not isinstance(c, dict) or not {"dtype", "dims"} <= set(c) <= {"dtype", "dims", "grad"} \
                or not isinstance(c["dims"], list) or c.get("grad", False) not in (True, False):
            raise ValueError(f"captures[{n}] must be an object with keys 'dtype', 'dims' (a list) and optionally "
                             f"'grad' (a boolean)")
        expected = [f"capture{n}_{k}" for k in range(len(c["dims"]))]
        if len(expected) > MAX_CAPTURE_RANK or c["dims"] != expected:
            raise ValueError(f"captures[{n}].dims must be {expected[:MAX_CAPTURE_RANK]} (at most "
                             f"{MAX_CAPTURE_RANK}), got {str(c['dims'])[:120]}")
        out.append((DType(c["dtype"]), tuple(Dim(d) for d in expected)))
        grads.append(bool(c.get("grad", False)))
    return tuple(out), tuple(grads)


def _spec_gathers(items: Any, caps) -> tuple[tuple[str, int, str, DType, tuple[Dim, ...]], ...]:
    """The ``gathers`` of a spec: each reads a captured tensor or an earlier gather, along one of its dims, by a
    captured integer tensor or an earlier integer gather; dims ``gather{m}_{k}`` as :class:`opgen.trace.Gather`."""
    if not isinstance(items, list) or len(items) > MAX_CAPTURES:
        raise ValueError(f"'gathers' must be a list of at most {MAX_CAPTURES} entries")
    known = {f"capture{n}": (dt, len(dims_)) for n, (dt, dims_) in enumerate(caps)}
    out = []
    for m, g in enumerate(items):
        if not isinstance(g, dict) or set(g) != {"src", "dim", "index", "dtype", "dims"} \
                or not isinstance(g["dims"], list) or g["src"] not in known or g["index"] not in known \
                or isinstance(g["dim"], bool) or not isinstance(g["dim"], int):
            raise ValueError(f"gathers[{m}] must be an object with keys src, dim, index, dtype, dims naming earlier "
                             f"captures or gathers")
        (sdt, srank), (idt, irank) = known[g["src"]], known[g["index"]]
        expected = [f"gather{m}_{k}" for k in range(srank - 1 + irank)]
        if not 0 <= g["dim"] < srank or not idt.is_int or DType(g["dtype"]) != sdt or g["dims"] != expected \
                or len(expected) > MAX_CAPTURE_RANK:
            raise ValueError(f"gathers[{m}] is inconsistent: dim {g['dim']} of a {srank}-D {sdt.value} tensor by a "
                             f"{irank}-D {idt.value} index must have dtype {sdt.value} and dims {expected[:8]}")
        out.append((g["src"], g["dim"], g["index"], sdt, tuple(Dim(d) for d in expected)))
        known[f"gather{m}"] = (sdt, len(expected))
    return tuple(out)


def _check_spec_leaves(spec: AttentionSpec) -> None:
    """Raise :class:`ArgumentError` unless every load and index symbol of ``spec`` is one the tracer makes."""

    symbols = set(_AXES) | set(_EXTENTS) | {d for _, dims_ in spec.captures for d in dims_} \
        | {d for *_, dims_ in spec.gathers for d in dims_}
    ranks = {f"capture{n}": len(dims_) for n, (_, dims_) in enumerate(spec.captures)}
    ranks.update({f"gather{m}": len(g[4]) for m, g in enumerate(spec.gathers)})
    for what, e in (("score", spec.score), ("mask", spec.mask)):
        if e is None:
            continue
        for node in e.walk():
            bad = ""
            if node.op is ExprOp.ARG:
                bad = "a monoid operand"
            elif node.op is ExprOp.LOAD:
                acc = node.arg
                if acc.tensor == SCORE and what == "score":
                    if tuple(acc.index) != tuple(_AXES) or acc.pad is not None:
                        bad = f"a load of {SCORE} at {acc.index} (only [b, h, i, j])"
                elif ranks.get(acc.tensor) != len(acc.index):
                    bad = f"a load of {acc.tensor!r} with {len(acc.index)} indices (loads: " \
                          f"{'score, ' if what == 'score' else ''}{', '.join(ranks) or 'no captures'})"
                leaves = [*acc.index, *(x for pair in acc.pad or () for x in pair)]
            elif node.op is ExprOp.INDEX:
                leaves = [node.arg]
            else:
                leaves = []
            if not bad:
                for leaf in leaves:
                    unknown = sorted(map(str, getattr(leaf, "free_symbols", set()) - symbols))
                    foreign = [s for s in getattr(leaf, "free_symbols", ()) if type(s) not in (Axis, Dim)]
                    if unknown or foreign:
                        bad = f"the index symbols {unknown or foreign} (allowed: b, h, i, j, B, HQ, L, S, capture dims)"
                        break
            if bad:
                raise ArgumentError(f"{WHO}: argument 'spec' is malformed: its {what} expression has {bad}; build "
                                    f"the spec with opgen.ops.attention_op.prepare_mods")


def _trace(who: str, score_mod: Callable | None, mask_mod: Callable | None, score_dtype: DType):

    return trace(who, score_mod, mask_mod, score_dtype)


@functools.lru_cache(maxsize=256)
def _spec_of(score_dtype: DType, score: Expr, mask: Expr | None,
             captures: tuple[tuple[DType, tuple[Dim, ...]], ...], grads: tuple[bool, ...] = (),
             gathers: tuple = ()) -> str:
    return spec_to_json(score_dtype, score, mask, captures, grads, gathers)


def _grad_flags(captures: Sequence[Tensor]) -> tuple[bool, ...]:
    """Which captured tensors want a gradient (float tensors that require grad)."""
    return tuple(bool(t.requires_grad and t.is_floating_point()) for t in captures)


def _score_dtype(q_dtype: Any, k_dtype: Any) -> DType:
    return accum_dtype(promote(as_dtype(q_dtype), as_dtype(k_dtype)))


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch._dynamo.assume_constant_result`` without importing ``torch._dynamo`` (1-2 s, a third of
    ``import torch``) when this module is imported: that decorator only sets the attribute set here (a test
    compares the two), and dynamo reads it when it traces a call."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant_result
def prepare_mods(who: str, score_mod: Callable | None, mask_mod: Callable | None,
                 q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[str, tuple[Tensor, ...], str]:
    """Trace ``score_mod`` / ``mask_mod`` for q and k of these dtypes into ``(spec, captures, unsupported)``: the
    op's ``spec`` string, the captured tensors in capture order (the op's ``captures``), and ``""``; or, when a
    mod uses a construct the tracer has no IR for (:class:`~opgen.ir.errors.UnsupportedConstruct`),
    ``("", (), message)``: the caller then runs :func:`eager_fallback`. A return value rather than an exception,
    so that the fallback also compiles with ``fullgraph=True``; under ``torch.compile`` (where this runs once, at
    compile time) the :class:`~opgen.ir.errors.FallbackWarning` is issued here, since ``warnings.warn`` in
    compiled code would be a graph break. Other tracing errors raise.

    Eager calls are memoized on the mods' observable state (identity of the tensors they can reach, values of
    the numbers and strings they read), so a mod is traced again only when something it reads changed. Under
    ``torch.compile`` this runs once per compiled frame and its result is a constant of the graph.
    """
    sd = _score_dtype(q_dtype, k_dtype)
    key = _cache_key(score_mod, mask_mod, sd)
    hit = _PREPARED.get(key) if key is not None else None
    if hit is not None:
        _PREPARED.move_to_end(key)
        return _spec_of(*hit[0], _grad_flags(hit[1]), hit[4]), hit[1], ""
    try:
        traced = _trace(who, score_mod, mask_mod, sd)
    except UnsupportedConstruct as exc:
        if torch.compiler.is_compiling():
            warnings.warn(f"{str(exc).rstrip('.')}{_inside_compile_hint(score_mod, mask_mod, str(exc))}. "
                          f"{_FELL_BACK}, compiled into the graph", FallbackWarning, stacklevel=3)
        return "", (), str(exc)
    caps = tuple((as_dtype(t.dtype), d) for t, d in zip(traced.captures, traced.capture_dims))
    gathers = tuple((g.src, g.dim, g.index, g.dtype, g.dims) for g in traced.gathers)
    captures = tuple(traced.captures)
    spec = _spec_of(sd, traced.score, traced.mask, caps, _grad_flags(captures), gathers)
    if key is not None and all(id(t) in key[-1] for t in captures):
        # the entry holds the mods and every tensor in the key, so that no id in the key can be reused; the spec
        # is rebuilt from its parts on a hit, with the captured tensors' requires_grad flags of that call
        _PREPARED[key] = ((sd, traced.score, traced.mask, caps), captures, (score_mod, mask_mod),
                          tuple(key[-1].values()), gathers)
        if len(_PREPARED) > _MAX_PREPARED:
            _PREPARED.popitem(last=False)
    return spec, captures, ""


_FELL_BACK = "Fell back to dense eager attention (the mods called on index tensors, O(L x S) memory, no generated " \
             "kernel)"


def _inside_compile_hint(score_mod: Any, mask_mod: Any, message: str) -> str:
    """Under torch.compile, a mod object built inside the compiled function reaches the tracer without its
    attributes (dynamo has not materialized it): say so, since the AttributeError alone is puzzling."""
    unbuilt = [m for m in (score_mod, mask_mod) if dataclasses.is_dataclass(m) and not isinstance(m, type)
               and not all(hasattr(m, f.name) for f in dataclasses.fields(m))]
    if unbuilt or "AttributeError" in message:
        return (" (a mod object created inside a torch.compile'd function is not visible to opgen's tracer: "
                "create score_mod / mask_mod objects outside it, e.g. in the module's __init__)")
    return ""


def eager_fallback(unsupported: str, q: Tensor, k: Tensor, v: Tensor, score_mod: Callable | None,
                   mask_mod: Callable | None, scale: float, enable_gqa: bool) -> Tensor:
    """Dense eager attention for mods :func:`prepare_mods` could not trace (``unsupported`` is its message):
    warns with :class:`~opgen.ir.errors.FallbackWarning` when it works; when the mods fail on index tensors too,
    raises :class:`~opgen.ir.errors.UnsupportedConstruct` with the tracer's message (which says what to change)."""
    try:
        out = eager_attention(q, k, v, score_mod, mask_mod, float(scale), bool(enable_gqa))
    except Exception:  # noqa: BLE001 - the mod fails on index tensors too: the trace error says why
        raise UnsupportedConstruct(unsupported) from None
    if not torch.compiler.is_compiling():  # (prepare_mods warned at compile time)
        warnings.warn(f"{unsupported.rstrip('.')}. {_FELL_BACK}", FallbackWarning, stacklevel=3)
    return out


# ----------------------------------------------------------------------------- memo of prepare_mods (eager)

_PREPARED: OrderedDict = OrderedDict()
_MAX_PREPARED = 64
_MAX_STATE_NODES = 256
_CONSTANT_TYPES = (types.ModuleType, type, types.BuiltinFunctionType, torch.dtype, torch.device)


class _Uncacheable(Exception):
    pass


def _cache_key(score_mod: Any, mask_mod: Any, sd: DType) -> tuple | None:
    """``(state of score_mod, state of mask_mod, dtype, reachable tensors by id)``; None when a mod reads
    something whose state cannot be summarized (it is then traced on every call)."""
    tensors: dict[int, Tensor] = {}
    budget = [_MAX_STATE_NODES]
    try:
        key = (_state(score_mod, tensors, budget, set()), _state(mask_mod, tensors, budget, set()), sd.value)
        hash(key)
    except (_Uncacheable, TypeError, RecursionError):
        return None
    return (*key, _TensorsById(tensors))


class _TensorsById(dict):
    """The tensors a mod can reach, by id; hashed and compared by the set of ids (tensors have no value hash)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and self.keys() == other.keys()


def _state(x: Any, tensors: dict[int, Tensor], budget: list[int], active: set[int]) -> Any:
    """A hashable snapshot of what a mod can read through ``x`` (tensors by identity, scalars by value)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Uncacheable
    if x is None or isinstance(x, (bool, int, float, str, bytes, complex)):
        return (type(x).__name__, x)
    if isinstance(x, Tensor):
        tensors[id(x)] = x
        return ("tensor", id(x))
    if isinstance(x, _CONSTANT_TYPES) or callable(getattr(x, "_dynamo_marked_constant", None)):
        return ("const", id(x))
    if id(x) in active:  # a cycle: the object is already being summarized
        return ("cycle", id(x))
    active.add(id(x))
    try:
        return _state_of_container(x, tensors, budget, active)
    finally:
        active.discard(id(x))


def _state_of_container(x: Any, tensors: dict[int, Tensor], budget: list[int], active: set[int]) -> Any:
    rec = functools.partial(_state, tensors=tensors, budget=budget, active=active)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(rec(v) for v in x))
    if isinstance(x, (set, frozenset)):
        return (type(x).__name__, frozenset(rec(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted(((repr(k), rec(v)) for k, v in x.items()), key=lambda kv: kv[0])))
    if isinstance(x, types.FunctionType):
        cells = tuple(rec(c.cell_contents) for c in (x.__closure__ or ()) if _cell_filled(c))
        names = _code_names(x.__code__)
        glb = tuple((n, rec(x.__globals__[n])) for n in names if n in x.__globals__)
        return ("fn", id(x.__code__), rec(x.__defaults__), rec(x.__kwdefaults__), cells, glb)
    if isinstance(x, types.MethodType):
        return ("method", rec(x.__func__), rec(x.__self__))
    if isinstance(x, functools.partial):
        return ("partial", rec(x.func), rec(x.args), rec(x.keywords))
    attrs = getattr(x, "__dict__", None)
    slots = [s for c in type(x).__mro__ for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
    if attrs is None and not slots:
        raise _Uncacheable
    fields = dict(attrs or {})
    fields.update({s: getattr(x, s) for s in slots if s not in ("__dict__", "__weakref__") and hasattr(x, s)})
    call = getattr(type(x), "__call__", None)
    return ("obj", type(x).__qualname__, id(type(x)), rec(fields),
            rec(call) if isinstance(call, types.FunctionType) else None)


def _cell_filled(c: types.CellType) -> bool:
    try:
        c.cell_contents
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=1024)
def _code_names(code: types.CodeType) -> tuple[str, ...]:
    """Global names a function (and the lambdas / comprehensions inside it) may read."""
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_code_names(c))
    return tuple(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- checking args

def _check_tensors(q: Tensor, k: Tensor, v: Tensor, captures: Sequence[Tensor], spec: AttentionSpec,
                   enable_gqa: bool) -> None:
    """Ranks, dtypes and devices (metadata only: runs in the fake kernel too)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ArgumentError(f"{WHO}: argument '{name}' expected a 4-D tensor, got {x.dim()}-D of shape "
                                f"{tuple(x.shape)}")
        if x.dtype not in _FLOAT:
            raise ArgumentError(f"{WHO}: argument '{name}' expected a floating-point tensor (float16, bfloat16, "
                                f"float32 or float64), got {x.dtype}")
        if x.device != q.device:
            raise ArgumentError(f"{WHO}: argument '{name}' is on {x.device} but 'q' is on {q.device}")
    sd = _score_dtype(q.dtype, k.dtype)
    if sd != spec.score_dtype:
        raise ArgumentError(f"{WHO}: argument 'spec' was traced for {spec.score_dtype} scores but q ({q.dtype}) "
                            f"and k ({k.dtype}) give {sd} scores; trace the mods for these dtypes "
                            f"(opgen.ops.attention_op.prepare_mods)")
    if len(captures) != len(spec.captures):
        raise ArgumentError(f"{WHO}: argument 'captures' has {len(captures)} tensors but the spec's mods capture "
                            f"{len(spec.captures)}")
    for n, (c, (dt, dims_)) in enumerate(zip(captures, spec.captures)):
        if as_dtype(c.dtype) != dt or c.dim() != len(dims_):
            raise ArgumentError(f"{WHO}: argument 'captures[{n}]' is a {c.dim()}-D {c.dtype} tensor but the spec "
                                f"expects a {len(dims_)}-D {to_torch(dt)} tensor")
        if c.device != q.device:
            raise ArgumentError(f"{WHO}: argument 'captures[{n}]' is on {c.device} but 'q' is on {q.device}; move "
                                f"captured tensors to q's device")
    shapes = lambda: f"(q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"  # noqa: E731
    for name, x in (("k", k), ("v", v)):
        _check(x.shape[0] == q.shape[0], lambda: f"{WHO}: argument '{name}' must have q's batch size {shapes()}")
    _check(k.shape[3] == q.shape[3], lambda: f"{WHO}: argument 'k' must have q's head dim {shapes()}")
    _check(v.shape[1] == k.shape[1], lambda: f"{WHO}: argument 'v' must have k's number of heads {shapes()}")
    _check(v.shape[2] == k.shape[2], lambda: f"{WHO}: argument 'v' must have k's length {shapes()}")
    if enable_gqa:
        _check(k.shape[1] != 0, lambda: f"{WHO}: argument 'k' has 0 heads; enable_gqa needs a number of heads "
                                        f"that divides q's {q.shape[1]} {shapes()}")
        _check(q.shape[1] % k.shape[1] == 0,
               lambda: f"{WHO}: argument 'k' has {k.shape[1]} heads, which must divide q's {q.shape[1]} {shapes()}")
    else:
        _check(k.shape[1] == q.shape[1], lambda: f"{WHO}: argument 'k' has {k.shape[1]} heads but q has "
                                                 f"{q.shape[1]}; they must match or enable_gqa be set {shapes()}")


def _check(cond: Any, message: Callable[[], str]) -> None:
    """``torch._check`` raising :class:`ArgumentError` (works on symbolic sizes inside the fake kernel)."""
    torch._check_with(ArgumentError, cond, message)


def check_capture_grads(captures: Sequence[Tensor], spec: str, who: str = WHO) -> None:
    """A captured tensor that requires grad must have been traced so (its ``"grad"`` flag in the spec, which
    :func:`prepare_mods` sets from ``requires_grad``): raise otherwise (instead of a silent zero gradient)."""
    grads = parse_spec(spec).grads
    for n, c in enumerate(captures):
        if c.requires_grad and not (n < len(grads) and grads[n]):
            raise ArgumentError(
                f"{who}: argument 'captures[{n}]' (a {c.dim()}-D {str(c.dtype).removeprefix('torch.')} tensor of "
                f"shape {tuple(c.shape)} captured by score_mod / mask_mod) requires grad, but the spec was traced "
                f"while it did not (no gradient would reach it); trace the mods again with "
                f"opgen.ops.attention_op.prepare_mods, or capture t.detach()")


def _declare(q: Tensor, k: Tensor, v: Tensor, captures: Sequence[Tensor], spec: str, scale: float,
             enable_gqa: bool, capture_grads: tuple[str, ...] = ()):

    parsed = parse_spec(spec)
    _check_tensors(q, k, v, captures, parsed, enable_gqa)
    return declare_attention(as_dtype(q.dtype), as_dtype(k.dtype), as_dtype(v.dtype), float(scale),
                             bool(enable_gqa), parsed.score, parsed.mask, parsed.captures, capture_grads,
                             tuple((dt, dims_) for *_, dt, dims_ in parsed.gathers))


def _inputs(q: Tensor, k: Tensor, v: Tensor, captures: Sequence[Tensor], spec: str) -> dict:
    """The op's inputs by IR name: q, k, v, ``capture{n}`` and the gathers ``gather{m}`` computed from them."""
    named = {"q": q, "k": k, "v": v, **{f"capture{n}": c for n, c in enumerate(captures)}}
    for m, (src, dim, idx, _, _) in enumerate(parse_spec(spec).gathers):
        named[f"gather{m}"] = gather(named[src], dim, named[idx])
    return named


def gather(src: Tensor, dim: int, index: Tensor) -> Tensor:
    """``src`` indexed along ``dim`` by the integer tensor ``index`` (``src[:, ..., index]`` with ``dim`` leading
    slices; negative indices count from the end, as in torch): a fresh contiguous tensor."""
    return src[(slice(None),) * dim + (index.long(),)].contiguous()


def _scatter_gather(grad: Tensor, src: Tensor, dim: int, index: Tensor) -> Tensor:
    """The gradient of :func:`gather` with respect to ``src``: ``grad`` summed into the positions it read."""
    n = src.shape[dim]
    idx = index.long().reshape(-1)
    idx = torch.where(idx < 0, idx + n, idx)
    flat = grad.reshape(*src.shape[:dim], idx.numel(), *src.shape[dim + 1:])
    return torch.zeros(src.shape, dtype=grad.dtype, device=grad.device).index_add_(dim, idx, flat)


def _fresh(x: Tensor, dtype: torch.dtype, inputs: Sequence[Tensor]) -> Tensor:
    """A contiguous result of ``dtype`` that aliases no input (custom ops must not return views of inputs)."""
    x = x.to(dtype).contiguous()
    if any(x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs if t.numel()):
        x = x.clone()
    return x


# ------------------------------------------------------------------------------------------------- the ops

def _empty_rows(q: Tensor, k: Tensor) -> bool:
    """A zero batch, head, query or key count: every output row is empty or fully masked (0, lse -inf)."""
    return q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0 or k.shape[1] == 0 or k.shape[2] == 0


def _pad_empty_dim(x: Tensor) -> Tensor:
    """``x`` with one zero column appended when its last (head) dim is 0: a zero-size head dim adds nothing to a
    score (E) or to an output (EV), so the op runs on a head dim of 1 and the results are cut back."""
    return torch.nn.functional.pad(x, (0, 1)) if x.shape[-1] == 0 else x


def _attention_zero_size(q: Tensor, k: Tensor, v: Tensor, captures: list[Tensor], spec: str, scale: float,
                         enable_gqa: bool) -> tuple[Tensor, Tensor]:
    """The op's outputs for a call with a zero-size dim (the family's closed form)."""
    op = _declare(q, k, v, captures, spec, scale, enable_gqa)
    if _empty_rows(q, k):  # no rows, or no keys: FlexAttention's fully masked rows (and SDPA's S = 0 output)
        b, hq, length = q.shape[:3]
        return (q.new_zeros((b, hq, length, v.shape[3]), dtype=to_torch(op.tensor("out").dtype)),
                q.new_full((b, hq, length), -torch.inf, dtype=to_torch(op.tensor("lse").dtype)))
    out, lse = ATTENTION.impl(_pad_empty_dim(q), _pad_empty_dim(k), _pad_empty_dim(v), captures, spec, scale,
                              enable_gqa)
    return out[..., :v.shape[3]], lse


def _check_backward_tensors(q: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor) -> None:
    """``out``, ``lse`` and ``dout`` have the forward's output shapes."""
    from opgen.ops import _args

    who = WHO + "_backward"
    b, hq, length = q.shape[:3]
    for name, x, shape in (("out", out, (b, hq, length, v.shape[3])), ("lse", lse, (b, hq, length)),
                           ("dout", dout, (b, hq, length, v.shape[3]))):
        _args.shape_is(who, name, x, shape, "the forward's output shape")


def _attention_backward(tensors: dict, statics: dict, outputs: dict, grads: dict):
    """``(dq, dk, dv, dcaptures)`` for the output gradient ``dout``. A captured tensor traced with requires_grad
    gets the flash backward's gradient of the score mod with respect to it, summed into the positions each load
    reads (gathers: scattered on into their source by the gather index); the others get zeros."""
    q, k, v, captures = tensors["q"], tensors["k"], tensors["v"], tensors["captures"]
    spec = statics["spec"]
    parsed = parse_spec(spec)
    need = parsed.needs_grad()
    op = _declare(q, k, v, captures, spec, statics["scale"], statics["enable_gqa"])
    out, lse, dout = outputs["out"], outputs["lse"], grads["out"]
    _check_backward_tensors(q, v, out, lse, dout)
    ins = (q, k, v, *captures, out, lse, dout)
    wanted = tuple(n for n, flag in need.items() if flag and _reads(op, n))
    if _empty_rows(q, k) or v.shape[3] == 0:  # the output is empty, or does not depend on any input
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), [torch.zeros_like(c) for c in captures]
    e = q.shape[3]
    named = _inputs(_pad_empty_dim(q), _pad_empty_dim(k), v, captures, spec)
    if wanted:
        op = _declare(q, k, v, captures, spec, statics["scale"], statics["enable_gqa"], wanted)
    with autograd_inside_op():  # the reference fallback differentiates the interpreter with torch.autograd
        g = dict(default_session().attention_backward(op, named, out, lse, dout, who=WHO))
        missing = [n for n in wanted if n not in g]
        if missing:   # a target whose flash backward has no capture gradients: the reference for those
            g.update(_reference_capture_grads(op, named, dout, missing))
    cap_grads = _capture_grads(parsed, captures, named, g)
    return (_fresh(g["q"][..., :e], q.dtype, ins), _fresh(g["k"][..., :e], k.dtype, ins),
            _fresh(g["v"], v.dtype, ins), [_fresh(d, c.dtype, ins) for d, c in zip(cap_grads, captures)])


def _reads(op, name: str) -> bool:
    """Whether the op's score expression reads the input ``name`` (a mask gets no gradient)."""
    from opgen.ir.expr import loads

    return any(a.tensor == name for n in op.nodes for e in n.exprs() for a in loads(e))


def _capture_grads(parsed: AttentionSpec, captures: Sequence[Tensor], named: dict, g: dict) -> list[Tensor]:
    """One gradient per captured tensor: its own (kernel or reference) plus what its gathers scatter back."""
    acc = {n: g[n] for n in g if n.startswith(("capture", "gather"))}
    for m in reversed(range(len(parsed.gathers))):
        src, dim, idx, _, _ = parsed.gathers[m]
        d = acc.get(f"gather{m}")
        if d is not None:
            s = _scatter_gather(d, named[src], dim, named[idx])
            acc[src] = acc[src] + s if src in acc else s
    return [acc[f"capture{n}"].reshape(c.shape) if f"capture{n}" in acc else torch.zeros_like(c)
            for n, c in enumerate(captures)]


def _reference_capture_grads(op, named: dict, dout: Tensor, names: Sequence[str]) -> dict:
    """Gradients of the captured inputs ``names`` by torch autograd through the reference interpreter."""
    sess = default_session()
    reference = sess.targets.get("reference")
    binding = sess.binding(op, {n: tuple(x.shape) for n, x in named.items()}, {}, WHO)
    with torch.enable_grad():
        leaves = {n: named[n].detach().requires_grad_(True) for n in names}
        res = reference.run(op, {**named, **leaves}, binding)["out"]
        gs = torch.autograd.grad(res, [leaves[n] for n in names], dout.to(res.dtype), allow_unused=True)
    return {n: (d if d is not None else torch.zeros_like(leaves[n])) for n, d in zip(names, gs)}


# opgen::attention(Tensor q, Tensor k, Tensor v, Tensor[] captures, str spec, float scale, bool enable_gqa)
#     -> (Tensor, Tensor), and its backward op (see the module docstring): a TorchOp whose backward is the flash
# backward from the saved out and lse, not the generated one; lse is not differentiable.
ATTENTION = TorchOp(
    "attention", [TensorArg("q"), TensorArg("k"), TensorArg("v"), TensorArg("captures", kind="list")],
    [StaticArg("spec", str), StaticArg("scale", float), StaticArg("enable_gqa", bool)],
    lambda t, s: _declare(t["q"], t["k"], t["v"], t["captures"], s["spec"], s["scale"], s["enable_gqa"]),
    outputs=["out", "lse"], adapt=lambda op, t, s: _inputs(t["q"], t["k"], t["v"], t["captures"], s["spec"]),
    closed_form=_attention_zero_size, run_who=WHO, warn_fallback=False,
    custom_backward=CustomBackward(_attention_backward, ("q", "k", "v", "captures"), {"out": "dout"},
                                   setup=lambda t, s: check_capture_grads(t["captures"], s["spec"])))
