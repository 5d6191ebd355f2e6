"""The one path from IR ops to torch: a family of built ops becomes a ``torch.library`` custom op.

A :class:`TorchOp` registers ``torch.ops.opgen.<name>`` and ``<name>_backward`` for a *family* of IR ops: a
``declare`` function maps the call's tensors (their dtypes, ranks) and static arguments to the
:class:`~opgen.ir.Op` to run. The library ops (:mod:`opgen.ops`) and every op a user declares with ``@opgen.op``
(:mod:`opgen.declared`) go through it. Every registered op gets

* a fake kernel from the IR's shape arithmetic (:mod:`opgen.ir.shape_plan`: symbolic sizes, no ``int()``, fresh
  outputs), so ``torch.compile(fullgraph=True)`` with dynamic sizes sees one opaque node;
* a kernel that checks and binds the arguments (errors name the op, the argument, what was expected and what
  came) and runs the op on the session's target for the tensors' device (CPU: TVM, CUDA: Triton; an op that no
  compiled target takes whole runs its scan and large reduction nodes as compiled node kernels and the rest in
  the reference interpreter, with one :class:`~opgen.ir.errors.FallbackWarning` per op and device saying so);
* autograd through the generated backward op (:func:`opgen.ir.passes.grad.grad_op`), itself run on compiled
  kernels where they exist: only the gradients ``ctx.needs_input_grad`` asks for are generated and computed, each
  gradient that a compiled target takes alone runs as its own op; a backward that cannot be generated raises,
  naming the node and why, when ``.backward()`` first needs it (forward-only use keeps working);
* calls with a zero-size dim (IR dims are positive): the family's closed form when it has one
  (``closed_form(*args)``: outputs, and gradients by torch autograd through it), else empty outputs.

The backward op's schema is ``(<tensor params>, Tensor grad_<output>..., <static params>, bool[]? mask=None)
-> Tensor[]``: one gradient per tensor parameter (an empty tensor where absent or not asked for by ``mask``). A
family with a backward of its own (:class:`CustomBackward`, e.g. attention's flash backward from the saved ``out``
and ``lse``) states that op instead.
"""
from __future__ import annotations

import contextlib
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

_SCHEMA_TYPES = {bool: "bool", int: "int", float: "float", str: "str", list: "int[]"}
_REQUIRED = object()


@dataclass(frozen=True)
class TensorArg:
    """A tensor parameter of a bridged op; ``optional`` ones may be None (the op then has no such input). A
    ``kind="list"`` one is a ``Tensor[]`` (its family's ``adapt`` names the op's inputs, its ``check`` checks
    them; it gets no gradient, so it needs a :class:`CustomBackward`)."""

    name: str
    optional: bool = False
    kind: str = "tensor"


@dataclass(frozen=True)
class CustomBackward:
    """A family's own backward op ``<name>_backward``, instead of the generated one. Its schema is
    ``(<tensor params>, Tensor <output>..., Tensor <grads[output]>..., <static params>) -> (Tensor, ...)``: the
    forward's outputs (autograd saves them), the gradients of the outputs in ``grads`` (the others are not
    differentiable, and marked so), and one gradient per tensor parameter in ``wrt`` (the other parameters get
    none). ``run(tensors, statics, outputs, grads)`` computes them (``outputs`` and ``grads`` by output name);
    ``setup(tensors, statics)`` runs when autograd records a call (e.g. to refuse a parameter that requires grad
    but gets none). It has no double backward."""

    run: Callable[..., Sequence[Tensor]]
    wrt: tuple[str, ...]
    grads: Mapping[str, str]
    setup: Callable[..., None] | None = None


@dataclass(frozen=True)
class StaticArg:
    """A non-tensor parameter: ``kind`` is bool, int, float, str, or list (a list of ints)."""

    name: str
    kind: type
    default: Any = _REQUIRED


Declare = Callable[[Mapping[str, Optional[Tensor]], Mapping[str, Any]], Op]
Adapt = Callable[[Op, Mapping[str, Optional[Tensor]], Mapping[str, Any]], dict]


def op_name(qualname: str, fingerprint: str) -> str:
    """The torch op name for a declaration: its name (dots as underscores) and 12 hex digits of its fingerprint,
    so two ops of the same name never clash."""
    return f"{qualname.replace('.', '_')}_{fingerprint[:12]}"


def source_fingerprint(*parts: str) -> str:
    """A stable fingerprint of a declaration's identity (module, qualified name, IR or source text)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class TorchOp:
    """``torch.ops.opgen.<name>`` for a family of IR ops; calling it calls the registered op.

    ``declare(tensors, statics)`` returns the op for a call (tensors by parameter name, None for absent optional
    ones). ``adapt(op, tensors, statics)`` gives the op's inputs by name (default: the tensors themselves, cast
    where the parameter is in ``flexible`` (its dtype follows the call), else required to match the op's dtype);
    a gradient of an adapted input is reshaped back to its parameter's shape. ``outputs`` names the op's outputs
    for the schema (``None``: a list of tensors). ``check(who, *args)`` validates a call (forward and backward
    kernels; the public functions check before :meth:`impl`). ``run_who`` names the op in binding errors.
    ``custom_backward`` replaces the generated backward (see :class:`CustomBackward`).
    """

    def __init__(self, name: str, tensors: Sequence[TensorArg], statics: Sequence[StaticArg], declare: Declare,
                 *, outputs: Sequence[str] | None = None, flexible: frozenset[str] = frozenset(),
                 adapt: Adapt | None = None, check: Callable[..., None] | None = None,
                 closed_form: Callable[..., Any] | None = None, who: str | None = None,
                 run_who: str | None = None, warn_fallback: bool = True, namespace: str = "opgen",
                 custom_backward: CustomBackward | None = None) -> None:
        self.tensors, self.statics = tuple(tensors), tuple(statics)
        self.custom_backward = custom_backward
        if custom_backward is None and any(t.kind == "list" for t in self.tensors):
            raise ValueError(f"{name}: a Tensor[] parameter gets no generated gradient; give a custom_backward")
        if custom_backward is not None and outputs is None:
            raise ValueError(f"{name}: a custom_backward needs the outputs named")
        self.declare, self.outputs, self.flexible = declare, None if outputs is None else tuple(outputs), flexible
        self.adapt, self.check, self.closed_form = adapt, check, closed_form
        self.name = _unused_name(namespace, name)
        self.qualified = f"{namespace}::{self.name}"
        self.who = who or f"torch.ops.{namespace}.{self.name}"
        self.backward_who = f"torch.ops.{namespace}.{self.name}_backward" if who is None else f"{who} (backward)"
        self.run_who = run_who or self.who
        self.warn_fallback = warn_fallback
        self._warned: set[tuple[Op, str]] = set()
        self._plans: dict = {}
        self._fwd = self._register_forward()
        if custom_backward is None:
            self._bwd = self._register_backward()
            self._fwd.register_autograd(self._autograd_backward, setup_context=self._setup_context)
        else:
            self._bwd = self._register_custom_backward()
            self._fwd.register_autograd(self._custom_autograd_backward, setup_context=self._custom_setup_context)

    # schema ------------------------------------------------------------------------------------------------
    def _tensor_params(self) -> list[str]:
        return [f"Tensor{'[]' if t.kind == 'list' else '?' if t.optional else ''} {t.name}" for t in self.tensors]

    def _static_params(self) -> list[str]:
        ps = []
        for s in self.statics:
            default = "" if s.default is _REQUIRED else f"={_schema_default(s.default)}"
            ps.append(f"{_SCHEMA_TYPES[s.kind]} {s.name}{default}")
        return ps

    def _register_forward(self):
        n = None if self.outputs is None else len(self.outputs)
        outs = "Tensor[]" if n is None else "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"
        schema = f"({', '.join(self._tensor_params() + self._static_params())}) -> {outs}"
        op = torch.library.custom_op(self.qualified, self._forward_kernel, mutates_args=(), schema=schema)
        op.register_fake(self._forward_fake)
        return op

    def _register_backward(self):
        grads = ["Tensor?[] grads"] if self.outputs is None else [f"Tensor grad_{o}" for o in self.outputs]
        ps = self._tensor_params() + grads + self._static_params() + ["bool[]? mask=None"]
        op = torch.library.custom_op(self.qualified + "_backward", self._backward_kernel, mutates_args=(),
                                     schema=f"({', '.join(ps)}) -> Tensor[]")
        op.register_fake(self._backward_fake)
        return op

    @property
    def forward_op(self):
        """The registered forward op (``torch.ops.opgen.<name>``)."""
        return self._fwd

    @property
    def backward(self):
        """The registered backward op (``torch.ops.opgen.<name>_backward``)."""
        return self._bwd

    # the call ----------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fwd(*args, **kwargs)

    def _split(self, args: Sequence[Any]) -> tuple[dict[str, Optional[Tensor]], dict[str, Any]]:
        n = len(self.tensors)
        tensors = {t.name: a for t, a in zip(self.tensors, args[:n])}
        statics = {s.name: a for s, a in zip(self.statics, args[n:])}
        for s in self.statics[len(args) - n:]:
            statics[s.name] = s.default
        return tensors, statics

    def _generic_check(self, who: str, tensors: Mapping[str, Optional[Tensor]]) -> None:
        """Every tensor given (unless optional), dense, and on one device."""
        dev = None
        for t in self.tensors:
            x = tensors[t.name]
            if t.kind == "list":    # (the family's check checks its tensors)
                continue
            if x is None:
                if not t.optional:
                    raise ArgumentError(f"{who}: argument '{t.name}' expected a tensor, got None")
                continue
            if x.layout != torch.strided:
                raise ArgumentError(f"{who}: argument '{t.name}' expected a dense (strided) tensor, got layout "
                                    f"{x.layout}")
            if dev is None:
                dev = (t.name, x.device)
            elif x.device != dev[1]:
                raise ArgumentError(f"{who}: argument '{t.name}' is on {x.device} but '{dev[0]}' is on {dev[1]}; "
                                    f"all tensors must be on one device")

    def _inputs(self, op: Op, tensors: Mapping[str, Optional[Tensor]], statics: Mapping[str, Any],
                who: str) -> dict[str, Tensor]:
        """The op's inputs by name (see the class docstring)."""
        if self.adapt is not None:
            return self.adapt(op, tensors, statics)
        out = {}
        for p in op.inputs:
            x = tensors.get(p.name)
            if x is None:
                raise ArgumentError(f"{who}: the op needs input '{p.name}', which was not given")
            want = to_torch(p.dtype)
            if x.dtype != want:
                if p.name not in self.flexible or not x.dtype.is_floating_point:
                    raise ArgumentError(f"{who}: argument '{p.name}' expected a {_dt_name(want)} tensor, got "
                                        f"{_dt_name(x.dtype)} of shape {tuple(x.shape)}")
                x = x.to(want)
            out[p.name] = x
        return out

    def _empty_call(self, tensors: Mapping[str, Optional[Tensor]]) -> bool:
        return any(isinstance(x, Tensor) and x.numel() == 0 for x in tensors.values())

    def impl(self, *args: Any) -> Any:
        """The forward without the dispatcher and without :attr:`check` (the caller checked the arguments)."""
        tensors, statics = self._split(args)
        if self._empty_call(tensors) and self.closed_form is not None:
            return self._pack(list(_closed_form_outputs(self.closed_form, *args)))
        op = self.declare(tensors, statics)
        inputs = self._inputs(op, tensors, statics, self.who)
        if self._empty_call(inputs):
            return self._pack(self._empty_outputs(op, inputs))
        self._remember(args, op, inputs)
        session = default_session()
        device = next(iter(inputs.values())).device.type
        self._warn_fallback(session, op, device)
        res = session.run(op, inputs, who=self.run_who)
        return self._pack([_fresh_output(res[t.name], inputs) for t in op.outputs])

    def checked_impl(self, *args: Any) -> Any:
        """The forward without the dispatcher, after the argument checks (for plain eager calls). A repeated call
        signature (dtypes, devices, layouts, static args) of a family without ``adapt``/``check`` hooks reuses
        the op and input casts found the first time (~20 us a call)."""
        n = len(self.tensors)
        plan = None
        if self.adapt is None and self.check is None:
            key = _call_key(args, n)
            plan = self._plans.get(key) if key is not None else None
        if plan is None or any(a is not None and a.numel() == 0 for a in args[:n]):
            return self._forward_kernel(*args)
        op, casts = plan
        inputs = {name: (args[k] if cast is None else args[k].to(cast)) for name, k, cast in casts}
        res = default_session().run(op, inputs, who=self.run_who)
        return self._pack([_fresh_output(res[t.name], inputs) for t in op.outputs])

    def _remember(self, args: Sequence[Any], op: Op, inputs: Mapping[str, Tensor]) -> None:
        """Record how a checked call signature maps to the op and its input casts (see :meth:`checked_impl`)."""
        if self.adapt is not None or self.check is not None:
            return
        key = _call_key(args, len(self.tensors))
        if key is None:
            return
        index = {t.name: k for k, t in enumerate(self.tensors)}
        casts = tuple((name, index[name], None if x.dtype == args[index[name]].dtype else x.dtype)
                      for name, x in inputs.items())
        if len(self._plans) >= 256:
            self._plans.clear()
        self._plans[key] = (op, casts)

    def _forward_kernel(self, *args: Any) -> Any:
        tensors, statics = self._split(args)
        self._generic_check(self.who, tensors)
        if self.check is not None:
            self.check(self.who, *args)
        return self.impl(*args)

    def _empty_outputs(self, op: Op, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        """Outputs of a call with an empty input and no closed form: empty outputs (an output with elements has
        no value without the family's closed form: a clear error)."""
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
        op = self.declare(tensors, statics)
        inputs = self._fake_inputs(op, tensors, statics)
        shapes = output_shapes(op, lambda name, k: inputs[name].shape[k])
        ref = next(x for x in tensors.values() if x is not None)
        return self._pack([ref.new_empty(shapes[t.name], dtype=to_torch(t.dtype)) for t in op.outputs])

    def _fake_inputs(self, op: Op, tensors, statics) -> dict[str, Tensor]:
        inputs = self._inputs(op, tensors, statics, self.who) if self.adapt is not None else tensors
        for p in op.inputs:
            x = inputs.get(p.name)
            if x is None or x.dim() != p.rank:
                raise ArgumentError(f"{self.who}: argument '{p.name}' expected a {p.rank}-D tensor, got "
                                    f"{'None' if x is None else f'{x.dim()}-D'}")
        return inputs

    def _pack(self, outs: list[Tensor]) -> Any:
        if self.outputs is None:
            return outs
        if len(outs) != len(self.outputs):
            raise ArgumentError(f"{self.who}: the op has {len(outs)} outputs, the schema {len(self.outputs)}")
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _warn_fallback(self, session, op: Op, device: str) -> None:
        """One FallbackWarning per (op, device) when no compiled target runs the op whole (``warn_fallback``: a
        library family documents instead which calls run where). When no compiled target can run anything on the
        device here (apache-tvm not installed, say), the session's one warning for the device says so instead
        (:meth:`opgen.runtime.Session.target_for`)."""
        if not self.warn_fallback or (op, device) in self._warned or session.config.backend != "auto":
            return
        self._warned.add((op, device))
        if session.target_for(op, device).name != "reference" or session.targets.no_compiled_target(device):
            return
        reasons = []
        for name in session.targets.names():
            if name == "reference":
                continue
            ok, why = session.targets.get(name).available()
            reasons.append(f"{name}: {why if not ok else 'does not take this op whole'}")
        warnings.warn(f"{self.who}: no compiled target runs op {op.name} whole on {device} ({'; '.join(reasons)}); "
                      f"its scan and large reduction nodes run as compiled node kernels where a target has them, "
                      f"the rest in the reference interpreter", FallbackWarning, stacklevel=4)

    # autograd ----------------------------------------------------------------------------------------------
    def _setup_context(self, ctx, inputs, output) -> None:
        n = len(self.tensors)
        ctx.save_for_backward(*inputs[:n])
        ctx.statics = tuple(inputs[n:])
        outs = output if isinstance(output, (list, tuple)) else (output,)
        ctx.out_meta = tuple((o.shape, o.dtype) for o in outs)

    def _autograd_backward(self, ctx, *grads):
        tensors = ctx.saved_tensors
        n = len(self.tensors)
        mask = [bool(ctx.needs_input_grad[k]) and tensors[k] is not None for k in range(n)]
        if not any(mask):
            return (None,) * (n + len(self.statics))
        if self.outputs is None and len(grads) == 1 and isinstance(grads[0], (list, tuple)):
            grads = tuple(grads[0])
        ref = next(t for t in tensors if t is not None)
        full = [g.contiguous() if g is not None else ref.new_zeros(shape, dtype=dt)
                for g, (shape, dt) in zip(grads, ctx.out_meta)]
        args = (*tensors, full, *ctx.statics, mask) if self.outputs is None else (*tensors, *full, *ctx.statics, mask)
        gs = self._bwd(*args)
        return (*[g if m else None for g, m in zip(gs, mask)], *([None] * len(self.statics)))

    def backward_op(self, op: Op, wrt: tuple[str, ...]) -> Op:
        """The generated backward op of ``op`` for the inputs ``wrt`` (memoized)."""
        return backward_op(op, wrt)

    def _split_backward(self, args: Sequence[Any]):
        n = len(self.tensors)
        tensors = {t.name: a for t, a in zip(self.tensors, args[:n])}
        k = n + 1 if self.outputs is None else n + len(self.outputs)
        grads = list(args[n]) if self.outputs is None else list(args[n:k])
        rest = list(args[k:])
        mask = rest[len(self.statics)] if len(rest) > len(self.statics) else None
        statics = {s.name: (rest[i] if i < len(rest) else s.default) for i, s in enumerate(self.statics)}
        return tensors, grads, statics, mask, args[:n] + tuple(rest[:len(self.statics)])

    def _mask(self, who: str, tensors: Mapping[str, Optional[Tensor]], mask) -> list[bool]:
        if mask is None:
            return [x is not None and x.dtype.is_floating_point for x in tensors.values()]
        if len(mask) != len(self.tensors) or any(not isinstance(m, bool) for m in mask):
            raise ArgumentError(f"{who}: argument 'mask' expected a list of {len(self.tensors)} bools, got "
                                f"{mask!r}")
        return [bool(m) and tensors[t.name] is not None for m, t in zip(mask, self.tensors)]

    def _backward_kernel(self, *args: Any) -> list[Tensor]:
        who = self.backward_who
        tensors, grads, statics, mask, fwd_args = self._split_backward(args)
        self._generic_check(who, tensors)
        if self.check is not None:
            self.check(who, *fwd_args)
        mask = self._mask(who, tensors, mask)
        ref = next(x for x in tensors.values() if x is not None)
        if self._empty_call(tensors) and self.closed_form is not None:
            self._check_grad_shapes(who, self._declared_output_shapes(tensors, statics), grads)
            return zero_size_grads(self.closed_form, fwd_args, grads, mask)
        op = self.declare(tensors, statics)
        inputs = self._inputs(op, tensors, statics, who)
        shapes = output_shapes(op, lambda name, k: inputs[name].shape[k])
        self._check_grad_shapes(who, [shapes[t.name] for t in op.outputs], grads)
        if self._empty_call(inputs):
            return [ref.new_zeros(x.shape, dtype=x.dtype) if x is not None and m else ref.new_empty(0)
                    for x, m in zip(tensors.values(), mask)]
        full = {}
        for t, g in zip(op.outputs, grads + [None] * (len(op.outputs) - len(grads))):
            g = ref.new_zeros(shapes[t.name], dtype=to_torch(t.dtype)) if g is None else g
            full[f"grad_{t.name}"] = g.to(to_torch(t.dtype)).contiguous()
        wrt = tuple(t.name for t, m in zip(self.tensors, mask) if m and t.name in inputs)
        res = run_grads(op, inputs, full, wrt, self.run_who)
        out = []
        for t, m in zip(self.tensors, mask):
            x = tensors[t.name]
            if m and f"grad_{t.name}" in res:
                g = res[f"grad_{t.name}"]
                g = g.reshape(x.shape).to(x.dtype).contiguous()
                out.append(g.clone() if _aliases(g, {**inputs, **full}) else g)
            else:
                out.append(ref.new_empty(0))
        return out

    def _declared_output_shapes(self, tensors, statics) -> list[tuple]:
        """Output shapes of a zero-size call from the closed form (the IR has no zero dims)."""
        args = [tensors[t.name] for t in self.tensors] + [statics[s.name] for s in self.statics]
        return [tuple(o.shape) for o in _closed_form_outputs(self.closed_form, *args)]

    def _check_grad_shapes(self, who: str, shapes: Sequence[tuple], grads: Sequence[Optional[Tensor]]) -> None:
        names = self.outputs or tuple(f"output {k}" for k in range(len(shapes)))
        for name, shape, g in zip(names, shapes, grads):
            if g is None:
                continue
            if not isinstance(g, Tensor) or tuple(g.shape) != tuple(shape):
                from opgen.ops._args import describe

                raise ArgumentError(f"{who}: argument 'grad_{name}' expected shape {tuple(shape)} (the shape of "
                                    f"{name}), got {describe(g)}")

    def _backward_fake(self, *args: Any) -> list[Tensor]:
        tensors, grads, statics, mask, _ = self._split_backward(args)
        mask = self._mask(self.backward_who, tensors, mask)
        if not (self._empty_call(tensors) and self.closed_form is not None):
            op = self.declare(tensors, statics)
            wrt = tuple(t.name for t, m in zip(self.tensors, mask) if m and t.name in {p.name for p in op.inputs})
            backward_op(op, wrt)       # a backward that cannot be generated fails here, when it is traced
        ref = next(x for x in tensors.values() if x is not None)
        # contiguous, whatever the inputs' strides (what the kernels return; inductor checks them)
        return [x.new_empty(x.shape) if x is not None and m else ref.new_empty(0)
                for x, m in zip(tensors.values(), mask)]

    # a family's own backward (CustomBackward) ------------------------------------------------------------------
    def _register_custom_backward(self):
        b = self.custom_backward
        ps = (self._tensor_params() + [f"Tensor {o}" for o in self.outputs] + [f"Tensor {b.grads[o]}" for o in
              self.outputs if o in b.grads] + self._static_params())
        kinds = {t.name: t.kind for t in self.tensors}
        types_ = ["Tensor[]" if kinds.get(w) == "list" else "Tensor" for w in b.wrt]   # a list gets a list
        outs = types_[0] if len(b.wrt) == 1 else "(" + ", ".join(types_) + ")"
        op = torch.library.custom_op(self.qualified + "_backward", self._custom_backward_kernel, mutates_args=(),
                                     schema=f"({', '.join(ps)}) -> {outs}")
        op.register_fake(self._custom_backward_fake)
        op.register_autograd(self._no_double_backward, setup_context=lambda ctx, inputs, output: None)
        return op

    def _split_custom_backward(self, args: Sequence[Any]):
        n, m = len(self.tensors), len(self.outputs)
        grads = [o for o in self.outputs if o in self.custom_backward.grads]
        tensors, statics = self._split((*args[:n], *args[n + m + len(grads):]))
        return tensors, statics, dict(zip(self.outputs, args[n:n + m])), dict(zip(grads, args[n + m:]))

    def _custom_backward_kernel(self, *args: Any) -> Any:
        tensors, statics, outputs, grads = self._split_custom_backward(args)
        self._generic_check(self.backward_who, tensors)
        gs = tuple(self.custom_backward.run(tensors, statics, outputs, grads))
        return gs[0] if len(gs) == 1 else gs

    def _custom_backward_fake(self, *args: Any) -> Any:
        tensors, statics, _, _ = self._split_custom_backward(args)
        self.declare(tensors, statics)
        gs = tuple([x.new_empty(x.shape) for x in tensors[name]] if isinstance(tensors[name], (list, tuple))
                   else tensors[name].new_empty(tensors[name].shape) for name in self.custom_backward.wrt)
        return gs[0] if len(gs) == 1 else gs

    def _no_double_backward(self, ctx, *grads):
        raise NotImplementedError(f"{self.who}: double backward (gradients of {self.name} gradients) is not "
                                  f"supported")

    def _custom_setup_context(self, ctx, inputs, output) -> None:
        b, n = self.custom_backward, len(self.tensors)
        tensors, statics = self._split(inputs)
        if b.setup is not None:
            b.setup(tensors, statics)
        outs = output if isinstance(output, (list, tuple)) else (output,)
        ctx.mark_non_differentiable(*(o for name, o in zip(self.outputs, outs) if name not in b.grads))
        ctx.list_lens = [len(x) if t.kind == "list" else None for t, x in zip(self.tensors, inputs[:n])]
        flat = [y for t, x in zip(self.tensors, inputs[:n]) for y in (x if t.kind == "list" else [x])]
        ctx.save_for_backward(*flat, *outs)
        ctx.statics = tuple(inputs[n:])

    def _custom_autograd_backward(self, ctx, *grads):
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if k is None else [next(saved) for _ in range(k)] for k in ctx.list_lens]
        outs = list(saved)
        b = self.custom_backward
        gs = [(g if g is not None else torch.zeros_like(o)).contiguous()
              for name, g, o in zip(self.outputs, grads, outs) if name in b.grads]
        res = self._bwd(*tensors, *outs, *gs, *ctx.statics)
        res = dict(zip(b.wrt, res if isinstance(res, (list, tuple)) else (res,)))
        return (*[res.get(t.name, [None] * len(x) if t.kind == "list" else None)
                  for t, x in zip(self.tensors, tensors)], *([None] * len(self.statics)))


# ------------------------------------------------------------------------------------------------ backward

@functools.lru_cache(maxsize=256)
def backward_op(op: Op, wrt: tuple[str, ...]) -> Op:
    """The backward op of ``op`` for the inputs ``wrt``, its gradient reductions restaged into window
    reductions where that makes them ones (memoized)."""
    from opgen.ir.passes.grad import grad_op
    from opgen.ir.passes.restage import restage_windows
    from opgen.ir.passes.scan_adjoint import group_scan_adjoint

    return group_scan_adjoint(restage_windows(grad_op(op, wrt)))


@functools.lru_cache(maxsize=256)
def _grad_groups(op: Op, wrt: tuple[str, ...], device: str) -> tuple[tuple[str, ...], ...]:
    """The backward ops to run for ``wrt``: each gradient that a compiled target takes alone, the rest together."""
    if len(wrt) < 2:
        return (wrt,) if wrt else ()
    from opgen.ir.passes.scan_adjoint import fuse_scan_adjoint

    if fuse_scan_adjoint(backward_op(op, wrt)) is not None:
        return (wrt,)               # one fused pass computes every gradient of the scan (each alone recomputes it)
    sess = default_session()
    alone = []
    for k in wrt:
        try:
            if sess.target_for(backward_op(op, (k,)), device).name != "reference":
                alone.append(k)
        except (LookupError, ArgumentError):
            pass
    rest = tuple(k for k in wrt if k not in alone)
    return tuple((k,) for k in alone) + ((rest,) if rest else ())


def run_grads(op: Op, inputs: Mapping[str, Tensor], grads: Mapping[str, Tensor], wrt: tuple[str, ...],
              who: str) -> dict[str, Tensor]:
    """``{"grad_<input>": ...}`` for the inputs ``wrt`` of ``op`` given the output gradients ``grads``
    (``{"grad_<output>": ...}``), by the generated backward ops on the session's targets."""
    present = {k: v.contiguous() for k, v in inputs.items()}
    res: dict = {}
    if not wrt:
        return res
    device = next(iter(present.values())).device.type
    for group in _grad_groups(op, wrt, device):
        back = backward_op(op, group)
        try:
            res.update(default_session().run(back, {**present, **grads}, who=who + " (backward)"))
        except ArgumentError:
            # the bounds check rejects some generated backward ops whose reads are in bounds (stride-1 grouped
            # conv2d dx reads weight[.., g - C*(g // C), ..]): torch autograd through the reference interpreter
            res.update(_reference_grads(op, present, grads, group))
    return res


def _reference_grads(op: Op, present: Mapping[str, Tensor], grads: Mapping[str, Tensor],
                     wrt: Sequence[str]) -> dict:
    """The gradients ``wrt`` by torch autograd through the differentiable reference interpreter."""
    with autograd_inside_op():
        leaves = {k: v.detach().requires_grad_(k in wrt) for k, v in present.items()}
        outs = default_session().run(op, leaves, who=f"{op.name} (reference backward)")
        names = [t.name for t in op.outputs]
        gs = torch.autograd.grad([outs[n] for n in names], [leaves[k] for k in wrt],
                                 [grads[f"grad_{n}"] for n in names], allow_unused=True)
    return {f"grad_{k}": g if g is not None else torch.zeros_like(present[k]) for k, g in zip(wrt, gs)}


@contextlib.contextmanager
def autograd_inside_op():
    """Grad mode with the autograd dispatch keys back on (a custom op's kernel runs with them excluded), so code
    inside a kernel that uses ``torch.autograd`` records a graph."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        if exclude.has(k):
            exclude = exclude.remove(k)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


# -------------------------------------------------------------------------------------- zero-size closed forms

def _closed_form_outputs(formula: Callable, *args) -> tuple[Tensor, ...]:
    """The outputs of the closed form ``formula(*args)`` of a zero-size call (fresh tensors, no grad)."""
    with torch.no_grad():
        outs = formula(*args)
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def zero_size_grads(formula: Callable, args: Sequence, grads: Sequence[Optional[Tensor]],
                    mask: Sequence[bool]) -> list[Tensor]:
    """Gradients of the tensor ``args`` whose ``mask`` entry is set, by torch autograd through the closed form
    ``formula(*args)`` of a zero-size call (zeros where an input does not reach the outputs; an empty tensor
    for absent or unmasked inputs); ``grads`` are the output gradients (None: zero)."""
    ref = next(a for a in args if isinstance(a, Tensor))
    with autograd_inside_op():
        leaves = [a.detach().requires_grad_(bool(m)) if isinstance(a, Tensor) and m else a
                  for a, m in zip(args, list(mask) + [False] * (len(args) - len(mask)))]
        outs = formula(*leaves)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        wrt = [x for x in leaves if isinstance(x, Tensor) and x.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs],
                                  allow_unused=True) if wrt and pairs else [None] * len(wrt)
    it = iter(got)
    res = []
    for x in leaves[:len(mask)]:
        if isinstance(x, Tensor) and x.requires_grad:
            g = next(it)
            # (a clone: a gradient passed straight through, e.g. initial_state's, would alias an input)
            res.append(g.clone(memory_format=torch.contiguous_format) if g is not None
                       else torch.zeros_like(x, memory_format=torch.contiguous_format))
        else:
            res.append(ref.new_empty(0))
    return res


# ------------------------------------------------------------------------------------------------- helpers

def _call_key(args: Sequence[Any], n: int):
    """What a call's checks depend on besides sizes: each tensor's dtype, device and layout, and the static args
    (None when a static arg is unhashable)."""
    key = tuple(None if a is None else (a.dtype, a.device, a.layout) for a in args[:n]) + tuple(args[n:])
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _fresh_output(y: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """``y``, copied when it shares storage with an input (a custom op's outputs may not alias its inputs)."""
    return y.clone() if _aliases(y, inputs) else y


def _aliases(y: Tensor, inputs: Mapping[str, Tensor]) -> bool:
    if not y.numel():
        return False
    ptr = y.untyped_storage().data_ptr()
    return any(x.numel() and x.untyped_storage().data_ptr() == ptr for x in inputs.values())


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


def given_inputs(op: Op, tensors: Mapping[str, Optional[Tensor]], statics: Mapping[str, Any]) -> dict:
    """An ``adapt`` for families whose ``declare`` follows the call's dtypes: the tensors given, by name."""
    return {k: v for k, v in tensors.items() if v is not None}


def torch_op(op: Op) -> TorchOp:
    """A built op as a torch op ``torch.ops.opgen.<name>_<fingerprint>`` taking its inputs positionally and
    returning its outputs (one tensor, or a tuple in the op's output order); input dtypes must match the op's."""
    return _torch_op_of(op)


@functools.lru_cache(maxsize=None)
def _torch_op_of(op: Op) -> TorchOp:
    return TorchOp(op_name(op.name, op.fingerprint), [TensorArg(t.name) for t in op.inputs], (),
                   lambda tensors, statics: op, outputs=[t.name for t in op.outputs], who=f"op {op.name}")


def input_dtype(tensors: Mapping[str, Optional[Tensor]], names: Sequence[str]) -> DType:
    """The promoted floating dtype of the tensors ``names`` (float32 when none is given)."""
    from opgen.ir import promote

    ds = [as_dtype(tensors[n].dtype) for n in names if tensors.get(n) is not None
          and tensors[n].dtype.is_floating_point]
    return promote(*ds) if ds else DType.f32
