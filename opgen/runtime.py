"""Running an op: bind sizes (cached per shape), pick a target, execute.

The session state is one :class:`Session` value (config + target registry + binding cache); the library
functions use :func:`default_session`, created on first use from the environment.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

from opgen.ir import ArgumentError, Binding, Op, ShapeError, bind, reduction_terms
from opgen.targets.base import TargetRegistry

from .config import Config, from_env


@dataclass
class Session:
    """Config, targets and a bounded cache of bindings keyed by (op, shapes, dims)."""

    config: Config
    targets: TargetRegistry
    _bindings: OrderedDict = field(default_factory=OrderedDict)
    _prepared: OrderedDict = field(default_factory=OrderedDict)
    _warned_devices: set = field(default_factory=set)
    max_cached_bindings: int = 1024

    def binding(self, op: Op, shapes: Mapping[str, tuple[int, ...]], dims: Mapping[str, int], who: str) -> Binding:
        """Bind sizes once per distinct call signature; shape errors become :class:`ArgumentError`."""
        key = (op, tuple(sorted(shapes.items())), tuple(sorted(dims.items())))
        hit = self._bindings.get(key)
        if hit is not None:
            self._bindings.move_to_end(key)
            return hit
        try:
            b = bind(op, shapes, dims, who=who)
        except ShapeError as e:
            raise ArgumentError(str(e)) from None
        self._bindings[key] = b
        if len(self._bindings) > self.max_cached_bindings:
            self._bindings.popitem(last=False)
        return b

    def run(self, op: Op, inputs: Mapping, dims: Mapping[str, int] | None = None, who: str | None = None) -> dict:
        """Execute ``op`` on named torch ``inputs`` with the tuned config for this shape (default config when
        nothing was tuned); returns the outputs by name."""
        inputs = resolve_views(inputs)
        needs_grad = _needs_autograd(inputs)
        key = None
        if not needs_grad:
            # a repeated call signature runs its prepared kernel call: no binding, target or config lookups
            # (~70 of ~150 us per call of a small conv2d); keyed by the op's identity (kept in the entry)
            key = (id(op), tuple((k, x.shape, x.dtype, x.device) for k, x in inputs.items()),
                   tuple(sorted(dims.items())) if dims else (), self.config.backend)
            hit = self._prepared.get(key)
            if hit is not None and hit[0] is op:
                return hit[1](inputs)
        who = who or f"op {op.name}"
        shapes = {name: tuple(x.shape) for name, x in inputs.items()}
        b = self.binding(op, shapes, dict(dims or {}), who)
        device = next(iter(inputs.values())).device.type if inputs else "cpu"
        target = self.target_for(op, device)
        if target.name != "reference" and needs_grad:
            # compiled kernels have no autograd of their own (the torch ops route gradients through generated
            # backward ops); a direct call that needs gradients runs on the differentiable reference instead
            target = self.targets.get("reference")
        if target.name == "reference":
            return target.run(op, inputs, b, self._node_runner(op, b, device, inputs))
        config = self.tuned_config(op, b, target)
        prepare = getattr(target, "prepare", None)
        call = prepare(op, b, config) if prepare is not None and key is not None else None
        if call is None:
            return target.run(op, inputs, b, config)
        self._prepared[key] = (op, call)
        if len(self._prepared) > self.max_cached_bindings:
            self._prepared.popitem(last=False)
        return call(inputs)

    def attention_backward(self, op: Op, inputs: Mapping, out, lse, dout, who: str | None = None) -> dict:
        """Gradients ``{"q", "k", "v"}`` of an attention op (see :mod:`opgen.ops.attention`) from the forward's
        ``out`` and ``lse`` and the output gradient ``dout``: the flash backward of the target that runs the
        forward when it has one, else the reference (torch autograd through the interpreter)."""
        who = who or f"op {op.name}"
        inputs = resolve_views(inputs)
        out, lse, dout = (_resolved(x) for x in (out, lse, dout))
        shapes = {name: tuple(x.shape) for name, x in inputs.items()}
        b = self.binding(op, shapes, {}, who)
        device = next(iter(inputs.values())).device.type
        target = self.target_for(op, device)
        backward = getattr(target, "attention_backward", None)
        if backward is not None:
            return backward(op, inputs, b, out, lse, dout, self.tuned_config(op, b, target))
        return _reference_attention_backward(self.targets.get("reference"), op, inputs, b, dout)

    def _node_runner(self, op: Op, binding: Binding, device: str, inputs: Mapping):
        """For an op no compiled target runs whole (a backward op with two scans, say): run each scan node
        that a compiled target supports as its own kernel, the rest in the interpreter. None when not useful."""
        if self.config.backend != "auto" or _needs_autograd(inputs) or len(op.nodes) < 2:
            return None
        key = ("nodes", op, tuple(sorted((d.name, v) for d, v in binding.dims.items())), device)
        compiled = self._bindings.get(key)
        if compiled is None:
            compiled = self._bindings[key] = self._node_plan(op, binding, device)
        if not compiled:
            return None
        from opgen.targets.reference.evaluate import SKIPPED

        def run_node(k: int, tensors: dict):
            entry = compiled.get(k)
            if entry is None:
                return None
            if entry[0] == "group":
                _, t, group, call = entry
                if call is not None:                 # the group's first member: the fused kernel computes it all
                    tensors.update(call({n: tensors[n] for n in group.reads}))
                name = op.nodes[k].out
                return tensors[name] if name in group.outputs else SKIPPED
            sub, t, node_kernel, sb, config, call = entry
            ins = {x.name: tensors[x.name] for x in sub.inputs}
            if node_kernel:
                return t.run_node(sub, ins, sb)[sub.outputs[0].name]
            if call is not None:
                return call(ins)[sub.outputs[0].name]
            return t.run(sub, ins, sb, config)[sub.outputs[0].name]
        run_node.compiled = {op.nodes[k].out: c[1].name for k, c in compiled.items()}  # type: ignore[attr-defined]
        return run_node

    def _group_plan(self, op: Op, binding: Binding, device: str) -> dict:
        """``{node index: ("group", target, group, call or None)}`` for the members of a fused node group of
        ``op`` (a scan's backward) that a compiled target runs as one kernel; the call sits at its first member."""
        for t in self.targets.available_targets():
            prepare = getattr(t, "prepare_group", None)
            hit = prepare(op, binding, device) if prepare is not None else None
            if hit is None:
                continue
            group, call = hit
            names = [n.out for n in op.nodes]
            first = names.index(group.first)
            if any(r in names and names.index(r) > first for r in group.reads):
                return {}                   # not ordered for it (see ir.passes.scan_adjoint.group_scan_adjoint)
            return {names.index(m): ("group", t, group, call if names.index(m) == first else None)
                    for m in group.members}
        return {}

    def _node_plan(self, op: Op, binding: Binding, device: str) -> dict:
        """``{node index: (single-node op, target, runs as a node kernel, its binding, tuned config, prepared call or
        None)}`` for the scan and reduction nodes of ``op`` that a compiled target runs (memoized per op, sizes
        and device)."""
        from opgen.ir import Reduce, Scan
        from opgen.ir.passes.split import node_op

        compiled = self._group_plan(op, binding, device)
        for k, n in enumerate(op.nodes):
            if k in compiled or not isinstance(n, (Scan, Reduce)):
                continue
            sub = node_op(op, k)
            sb = _sub_binding(binding, sub)
            if isinstance(n, Reduce) and reduction_terms(n, sb) < self.config.min_node_kernel_work:
                continue                     # small: the interpreter is as fast, and there is no compile
            try:
                t = self.targets.select(sub, device)
            except LookupError:
                continue
            if t.name != "reference":
                config = self.tuned_config(sub, sb, t)
                prepare = getattr(t, "prepare", None)
                compiled[k] = (sub, t, False, sb, config, prepare(sub, sb, config) if prepare is not None else None)
            elif isinstance(n, Reduce):
                nt = self.targets.select_node(sub, device, sb)
                if nt is not None:
                    compiled[k] = (sub, nt, True, sb, None, None)
        return compiled

    def target_for(self, op: Op, device: str):
        """The target a call runs on: the configured backend, or the first available one that supports it."""
        if self.config.backend == "auto":
            target = self.targets.select(op, device)
            if target.name == "reference" and device not in self._warned_devices:
                self._warn_no_compiled_target(device)
            return target
        return self.targets.get(self.config.backend)

    def _warn_no_compiled_target(self, device: str) -> None:
        """One :class:`~opgen.ir.errors.FallbackWarning` per device kind (per session: the default one is the
        process's) when no compiled target can run anything on ``device`` here (apache-tvm not installed, say):
        every call on it runs in the reference interpreter. An op that a compiled target merely does not take
        whole is its family's matter (:meth:`opgen.bridge.TorchOp._warn_fallback`)."""
        self._warned_devices.add(device)
        why = self.targets.no_compiled_target(device)
        if not why:
            return
        import warnings

        from opgen.ir.errors import FallbackWarning

        kind = device.upper()
        warnings.warn(f"opgen: no compiled {kind} target: {why}; {kind} calls run on the reference interpreter "
                      f"(slow)", FallbackWarning, stacklevel=_caller_stacklevel())

    def tuned_config(self, op: Op, binding: Binding, target):
        """The best tuned config of ``op`` at these sizes on ``target`` (None: use the default), memoized."""
        key = ("config", op, tuple(sorted((d.name, v) for d, v in binding.dims.items())), target.name)
        if key not in self._bindings:
            from opgen.tune.call_config import lookup_config

            self._bindings[key] = lookup_config(op, binding, target, self.config.tune_storage,
                                                self.config.cache_dir)
        return self._bindings[key]

    def forget_tuned(self, op: Op | None = None) -> int:
        """Drop what this session memoized from tuned-config lookups of ``op`` (every op when None): its configs,
        its node plans and its prepared calls, so the next call looks the config up again (after tuning it in this
        process, say). Returns the number of entries dropped."""
        def mine(o) -> bool:
            return op is None or o is op or o == op

        stale = [k for k in self._bindings
                 if isinstance(k, tuple) and len(k) > 1 and isinstance(k[0], str) and k[0] in ("config", "nodes")
                 and mine(k[1])]
        for k in stale:
            del self._bindings[k]
        prepared = [k for k, (o, _) in self._prepared.items() if mine(o)]
        for k in prepared:
            del self._prepared[k]
        return len(stale) + len(prepared)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by this module's caller name the first frame outside opgen
    and torch (the user's call), not opgen's or torch's dispatch code."""
    import sys

    level, f = 2, sys._getframe(2)    # (this function's caller's caller: the frame that calls warnings.warn)
    while f is not None and f.f_code.co_filename.startswith(_internal_prefixes()):
        level, f = level + 1, f.f_back
    return level - 1 if f is None else level


@functools.lru_cache(maxsize=1)
def _internal_prefixes() -> tuple[str, ...]:
    import os
    import sys

    names = ("opgen", "opgen.ir", "opgen.schedules", "opgen.targets", "torch")
    return tuple(os.path.dirname(sys.modules[n].__file__) + os.sep for n in names
                 if getattr(sys.modules.get(n), "__file__", None))


def _resolved(x):
    """``x`` with a pending negation or conjugation (``torch._neg_view``, ``.conj()``) applied: kernels read the
    storage through its data pointer, which does not see those bits."""
    if x.is_neg() or x.is_conj():
        return x.resolve_neg().resolve_conj()
    return x


def resolve_views(inputs: Mapping) -> Mapping:
    """``inputs`` with every neg / conj view resolved (the same mapping when there is none: the usual case)."""
    if not any(x.is_neg() or x.is_conj() for x in inputs.values()):
        return inputs
    return {k: _resolved(x) for k, x in inputs.items()}


def _sub_binding(binding: Binding, sub: Op) -> Binding:
    """``binding`` restricted to the tensors and axes of ``sub`` (a node of the bound op)."""
    ext = {a: binding.extents[a] for a, _ in sub.extents}
    return Binding(binding.dims, ext, {x.name: binding.shapes[x.name] for x in sub.tensors})


def _needs_autograd(inputs: Mapping) -> bool:
    import torch

    return torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in inputs.values())


def _reference_attention_backward(reference, op: Op, inputs: Mapping, binding: Binding, dout) -> dict:
    """dq, dk, dv by torch autograd through the reference interpreter (the oracle for the flash backward)."""
    import torch

    names = ("q", "k", "v")
    with torch.enable_grad():
        leaves = {n: inputs[n].detach().requires_grad_(True) for n in names}
        ins = {**inputs, **leaves}
        out = reference.run(op, ins, binding)["out"]
        grads = torch.autograd.grad(out, [leaves[n] for n in names], dout.to(out.dtype), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(inputs[n])) for n, g in zip(names, grads)}


def make_session(config: Config | None = None) -> Session:
    """A session with every target of this build, in preference order: TVM (CPU), Triton (CUDA), reference."""
    from opgen.targets.reference import ReferenceTarget
    from opgen.targets.triton import TritonTarget
    from opgen.targets.tvm import TVMTarget

    cfg = config or from_env()
    targets = (TVMTarget(cache_dir=cfg.cache_dir), TritonTarget(cache_dir=cfg.cache_dir),
               ReferenceTarget(max_elements=cfg.reference_max_elements))
    return Session(cfg, TargetRegistry(targets))


@functools.lru_cache(maxsize=1)
def default_session() -> Session:
    """The process-wide session built from the environment on first use."""
    return make_session()
