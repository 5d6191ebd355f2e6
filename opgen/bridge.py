"""The one path from IR ops to torch: a family of built ops becomes a ``torch.library`` custom op.

A :class:`TorchOp` registers ``torch.ops.opgen.<name>`` (and ``<name>_backward``) for a *family* of IR ops: a
``declare`` function maps the call's tensors (their dtypes) and static arguments to the :class:`~opgen.ir.Op` to
run. Every registered op gets

* a fake kernel from the IR's shape arithmetic (:mod:`opgen.ir.shape_plan`: symbolic sizes, no ``int()``, fresh
  outputs), so ``torch.compile(fullgraph=True)`` with dynamic sizes sees one opaque node;
* a kernel that binds the sizes (clear errors naming the op, the argument, what was expected and what came) and
  runs the op on the session's target for the tensors' device (CPU: TVM, CUDA: Triton; an op no compiled target
  takes runs its scan and reduction nodes as compiled node kernels and the rest in the reference interpreter,
  with one :class:`~opgen.ir.errors.FallbackWarning` per op and device saying so);
* autograd through the op's generated backward op (:func:`opgen.ir.passes.grad.grad_op`), itself run on compiled
  kernels where they exist; only the gradients ``ctx.needs_input_grad`` asks for are generated and computed, and
  a backward that cannot be generated raises when ``.backward()`` first needs it (forward-only use works).
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from opgen.ir import ArgumentError, DType, Op, as_dtype
from opgen.ir.dtypes import to_torch
from opgen.ir.errors import FallbackWarning
from opgen.ir.shape_plan import output_shapes
from opgen.runtime import default_session

_SCHEMA_TYPES = {bool: "bool", int: "SymInt", float: "float", str: "str"}
_REQUIRED = object()


@dataclass(frozen=True)
class TensorArg:
    """A tensor parameter of a bridged op; ``optional`` ones may be None (the op then has no such input)."""

    name: str
    optional: bool = False


@dataclass(frozen=True)
class StaticArg:
    """A non-tensor parameter (bool, int, float or str), passed to ``declare``."""

    name: str
    kind: type
    default: Any = _REQUIRED


Declare = Callable[[Mapping[str, Optional[Tensor]], Mapping[str, Any]], Op]


def op_name(qualname: str, fingerprint: str) -> str:
    """The torch op name for a declaration: its name (dots as underscores) and 12 hex digits of its fingerprint,
    so two ops of the same name never clash."""
    return f"{qualname.replace('.', '_')}_{fingerprint[:12]}"


def source_fingerprint(*parts: str) -> str:
    """A stable fingerprint of a declaration's identity (module, qualified name, source text)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class TorchOp:
    """``torch.ops.opgen.<name>`` for a family of IR ops; calling it calls the registered op.

    ``declare(tensors, statics)`` returns the op for a call (tensors by parameter name, None for absent optional
    ones); ``flexible`` names the tensor parameters whose dtype follows the call (cast to the op's input dtype when
    they differ); the others must match it. ``n_outputs`` fixes the schema's outputs (``None``: a list).
    """

    def __init__(self, name: str, tensors: Sequence[TensorArg], statics: Sequence[StaticArg], declare: Declare,
                 *, n_outputs: int | None = None, flexible: frozenset[str] = frozenset(), who: str | None = None,
                 namespace: str = "opgen") -> None:
        self.name, self.tensors, self.statics = name, tuple(tensors), tuple(statics)
        self.declare, self.n_outputs, self.flexible = declare, n_outputs, flexible
        self.who = who or f"torch.ops.{namespace}.{name}"
        self.qualified = f"{namespace}::{_unused_name(namespace, name)}"
        self._warned: set[tuple[Op, str]] = set()
        self._fwd = self._register_forward()
        self._bwd = self._register_backward()
        self._fwd.register_autograd(self._autograd_backward, setup_context=self._setup_context)

    # schema ------------------------------------------------------------------------------------------------
    def _params(self) -> list[str]:
        ps = [f"Tensor{'?' if t.optional else ''} {t.name}" for t in self.tensors]
        for s in self.statics:
            default = "" if s.default is _REQUIRED else f"={_schema_default(s.default)}"
            ps.append(f"{_SCHEMA_TYPES[s.kind]} {s.name}{default}")
        return ps

    def _register_forward(self):
        outs = "Tensor[]" if self.n_outputs is None else (
            "Tensor" if self.n_outputs == 1 else "(" + ", ".join(["Tensor"] * self.n_outputs) + ")")
        schema = f"({', '.join(self._params())}) -> {outs}"
        op = torch.library.custom_op(self.qualified, self._forward_kernel, mutates_args=(), schema=schema)
        op.register_fake(self._forward_fake)
        return op

    def _register_backward(self):
        ps = self._params()
        ps.insert(len(self.tensors), "Tensor?[] grads")
        ps.insert(len(self.tensors) + 1, "bool[] needs")
        schema = f"({', '.join(ps)}) -> Tensor[]"
        op = torch.library.custom_op(self.qualified + "_backward", self._backward_kernel, mutates_args=(),
                                     schema=schema)
        op.register_fake(self._backward_fake)
        return op

    # the call ----------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fwd(*args, **kwargs)

    def _split(self, args: Sequence[Any]) -> tuple[dict[str, Optional[Tensor]], dict[str, Any]]:
        n = len(self.tensors)
        tensors = {t.name: a for t, a in zip(self.tensors, args[:n])}
        statics = {s.name: a for s, a in zip(self.statics, args[n:])}
        return tensors, statics

    def build(self, tensors: Mapping[str, Optional[Tensor]], statics: Mapping[str, Any]) -> Op:
        """The IR op for a call, after checking that every tensor is a dense floating tensor on one device."""
        dev = None
        for t in self.tensors:
            x = tensors[t.name]
            if x is None:
                if not t.optional:
                    raise ArgumentError(f"{self.who}: argument '{t.name}' expected a tensor, got None")
                continue
            if x.layout != torch.strided:
                raise ArgumentError(f"{self.who}: argument '{t.name}' expected a dense (strided) tensor, "
                                    f"got layout {x.layout}")
            if dev is None:
                dev = (t.name, x.device)
            elif x.device != dev[1]:
                raise ArgumentError(f"{self.who}: argument '{t.name}' is on {x.device} but '{dev[0]}' is on "
                                    f"{dev[1]}; all tensors must be on one device")
        return self.declare(tensors, statics)

    def _inputs(self, op: Op, tensors: Mapping[str, Optional[Tensor]]) -> dict[str, Tensor]:
        """The op's inputs by name, cast where the parameter's dtype follows the call; dtype errors otherwise."""
        out = {}
        for p in op.inputs:
            x = tensors.get(p.name)
            if x is None:
                raise ArgumentError(f"{self.who}: the op needs input '{p.name}', which was not given")
            want = to_torch(p.dtype)
            if x.dtype != want:
                if p.name not in self.flexible or not x.dtype.is_floating_point:
                    raise ArgumentError(f"{self.who}: argument '{p.name}' expected a {_dt_name(want)} tensor, got "
                                        f"{_dt_name(x.dtype)} of shape {tuple(x.shape)}")
                x = x.to(want)
            out[p.name] = x
        return out

    def _forward_kernel(self, *args: Any) -> Any:
        tensors, statics = self._split(args)
        op = self.build(tensors, statics)
        inputs = self._inputs(op, tensors)
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        if any(0 in s for s in shapes.values()):
            return self._pack(self._zero_size(op, inputs))
        session = default_session()
        device = next(iter(inputs.values())).device.type
        self._warn_fallback(session, op, device)
        res = session.run(op, inputs, who=self.who)
        return self._pack([_fresh_output(res[t.name], inputs) for t in op.outputs])

    def _zero_size(self, op: Op, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        """Outputs of a call with an empty input: empty outputs; an output with elements has no IR value."""
        shapes = output_shapes(op, lambda name, k: inputs[name].shape[k])
        ref = next(iter(inputs.values()))
        outs = []
        for t in op.outputs:
            if 0 not in shapes[t.name]:
                raise ArgumentError(f"{self.who}: an input has a zero-size dim ({_shapes(inputs)}), but output "
                                    f"'{t.name}' would have shape {shapes[t.name]}; the op's dims must be positive")
            outs.append(ref.new_empty(shapes[t.name], dtype=to_torch(t.dtype)))
        return outs

    def _forward_fake(self, *args: Any) -> Any:
        tensors, statics = self._split(args)
        op = self.build(tensors, statics)
        for p in op.inputs:
            x = tensors.get(p.name)
            if x is None or x.dim() != p.rank:
                raise ArgumentError(f"{self.who}: argument '{p.name}' expected a {p.rank}-D tensor, got "
                                    f"{'None' if x is None else f'{x.dim()}-D'}")
        shapes = output_shapes(op, lambda name, k: tensors[name].shape[k])
        ref = next(x for x in tensors.values() if x is not None)
        return self._pack([ref.new_empty(shapes[t.name], dtype=to_torch(t.dtype)) for t in op.outputs])

    def _pack(self, outs: list[Tensor]) -> Any:
        if self.n_outputs is None:
            return outs
        if len(outs) != self.n_outputs:
            raise ArgumentError(f"{self.who}: the op has {len(outs)} outputs, the schema {self.n_outputs}")
        return outs[0] if self.n_outputs == 1 else tuple(outs)

    def _warn_fallback(self, session, op: Op, device: str) -> None:
        """One FallbackWarning per (op, device) when no compiled target runs the op whole."""
        if (op, device) in self._warned or session.config.backend != "auto":
            return
        self._warned.add((op, device))
        target = session.target_for(op, device)
        if target.name != "reference":
            return
        reasons = []
        for t in session.targets._targets:                                   # noqa: SLF001 (same package)
            if t.name == "reference":
                continue
            ok, why = t.available()
            reasons.append(f"{t.name}: {why or 'does not take this op whole'}" if ok or why else t.name)
        warnings.warn(f"{self.who}: no compiled target runs op {op.name} whole on {device} ({'; '.join(reasons)}); "
                      f"its scan and large reduction nodes run as compiled node kernels where a target has them, "
                      f"the rest in the reference interpreter", FallbackWarning, stacklevel=4)

    # autograd ----------------------------------------------------------------------------------------------
    def _setup_context(self, ctx, inputs, output) -> None:
        n = len(self.tensors)
        ctx.save_for_backward(*inputs[:n])
        ctx.statics = tuple(inputs[n:])

    def _autograd_backward(self, ctx, *grads):
        tensors = ctx.saved_tensors
        n = len(self.tensors)
        needs = [bool(ctx.needs_input_grad[k]) and tensors[k] is not None and tensors[k].dtype.is_floating_point
                 for k in range(n)]
        if not any(needs):
            return (None,) * (n + len(self.statics))
        if self.n_outputs is None:
            grads = grads[0] if len(grads) == 1 and isinstance(grads[0], (list, tuple)) else grads
        gs = self._bwd(*tensors, [g.contiguous() if g is not None else None for g in grads], needs, *ctx.statics)
        return (*[g if need else None for g, need in zip(gs, needs)], *([None] * len(self.statics)))

    def backward_op(self, op: Op, wrt: tuple[str, ...]) -> Op:
        """The generated backward op of ``op`` for the inputs ``wrt`` (memoized)."""
        return _backward(op, wrt)

    def _backward_kernel(self, *args: Any) -> list[Tensor]:
        n = len(self.tensors)
        tensors = {t.name: a for t, a in zip(self.tensors, args[:n])}
        grads, needs = args[n], args[n + 1]
        statics = {s.name: a for s, a in zip(self.statics, args[n + 2:])}
        op = self.build(tensors, statics)
        inputs = self._inputs(op, tensors)
        wrt = tuple(t.name for t, need in zip(self.tensors, needs) if need and t.name in inputs)
        ref = next(iter(inputs.values()))
        if any(0 in x.shape for x in inputs.values()):
            return [ref.new_zeros(x.shape, dtype=x.dtype) if x is not None and need else ref.new_empty(0)
                    for x, need in zip(tensors.values(), needs)]
        back = self.backward_op(op, wrt)
        shapes = output_shapes(op, lambda name, k: inputs[name].shape[k])
        full = {}
        for t, g in zip(op.outputs, list(grads) + [None] * (len(op.outputs) - len(grads))):
            if g is None:
                g = ref.new_zeros(shapes[t.name], dtype=to_torch(t.dtype))
            elif tuple(g.shape) != tuple(shapes[t.name]):
                raise ArgumentError(f"{self.who}: the gradient of output '{t.name}' has shape {tuple(g.shape)}, "
                                    f"expected {tuple(shapes[t.name])}")
            full[f"grad_{t.name}"] = g.to(to_torch(t.dtype)).contiguous()
        res = default_session().run(back, {**inputs, **full}, who=self.who + " (backward)")
        out = []
        for t, need in zip(self.tensors, needs):
            x = tensors[t.name]
            if need and t.name in wrt:
                out.append(res[f"grad_{t.name}"].to(x.dtype).contiguous().clone()
                           if _aliases(res[f"grad_{t.name}"], inputs) else res[f"grad_{t.name}"].to(x.dtype)
                           .contiguous())
            else:
                out.append(ref.new_empty(0))
        return out

    def _backward_fake(self, *args: Any) -> list[Tensor]:
        n = len(self.tensors)
        tensors = list(args[:n])
        needs = args[n + 1]
        statics = {s.name: a for s, a in zip(self.statics, args[n + 2:])}
        named = {t.name: x for t, x in zip(self.tensors, tensors)}
        op = self.build(named, statics)
        wrt = tuple(t.name for t, need in zip(self.tensors, needs) if need and named[t.name] is not None)
        self.backward_op(op, wrt)       # a backward that cannot be generated fails here, when it is traced
        ref = next(x for x in tensors if x is not None)
        return [x.new_empty(x.shape) if x is not None and need else ref.new_empty(0)
                for x, need in zip(tensors, needs)]


@functools.lru_cache(maxsize=256)
def _backward(op: Op, wrt: tuple[str, ...]) -> Op:
    """The backward op, its gradient reductions restaged into window reductions where that makes them ones."""
    from opgen.ir.passes.grad import grad_op
    from opgen.ir.passes.restage import restage_windows

    return restage_windows(grad_op(op, wrt))


def _fresh_output(y: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """``y``, copied when it shares storage with an input (a custom op's outputs may not alias its inputs)."""
    return y.clone() if _aliases(y, inputs) else y


def _aliases(y: Tensor, inputs: Mapping[str, Tensor]) -> bool:
    ptr = y.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in inputs.values() if x.numel() and y.numel())


def _unused_name(namespace: str, name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... when an op of that name is already registered (a declaration run
    twice, e.g. a re-run notebook cell): never replace another op's kernels."""
    ns = getattr(torch.ops, namespace)
    candidate, k = name, 1
    while True:
        try:
            getattr(ns, candidate)
        except (AttributeError, RuntimeError):
            return candidate
        k += 1
        candidate = f"{name}_{k}"


def _schema_default(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _dt_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _shapes(inputs: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())


def torch_op(op: Op) -> TorchOp:
    """A built op as a torch op ``torch.ops.opgen.<name>_<fingerprint>`` taking its inputs positionally and
    returning its outputs (one tensor, or a tuple in the op's output order); input dtypes must match the op's."""
    return _torch_op_of(op)


@functools.lru_cache(maxsize=None)
def _torch_op_of(op: Op) -> TorchOp:
    name = op_name(op.name, op.fingerprint)
    return TorchOp(name, [TensorArg(t.name) for t in op.inputs], (), lambda tensors, statics: op,
                   n_outputs=len(op.outputs), who=f"op {op.name}")


def input_dtype(tensors: Mapping[str, Optional[Tensor]], names: Sequence[str]) -> DType:
    """The promoted floating dtype of the tensors ``names`` (float32 when none is given)."""
    from opgen.ir import promote

    ds = [as_dtype(tensors[n].dtype) for n in names if tensors.get(n) is not None
          and tensors[n].dtype.is_floating_point]
    return promote(*ds) if ds else DType.f32
