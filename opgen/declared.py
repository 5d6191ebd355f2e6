"""``@opgen.op``: a declared operator that is also a torch op.

:class:`DeclaredOp` is the IR declaration (:class:`~opgen.ir.builder.OpDef`: ``.build(dtype, **static)`` gives the
:class:`~opgen.ir.Op`) plus what a user calls: ``y = gated_rnn(x, f, g, r, w)`` runs
``torch.ops.opgen.<name>_<fingerprint>`` (:mod:`opgen.bridge`), with autograd, ``torch.compile`` and ``opcheck``;
keyword-only parameters of the declaration are the op's static arguments; ``.tune(shape=...)`` tunes it.

Parameters annotated ``Float[...]`` take the call's floating dtype (several such inputs of different dtypes are
promoted, as torch does); ones annotated with a dtype (``F32[...]``) must be given in it. The torch op is
registered when the declaration is made if torch is already imported (so a program exported with it loads after
importing the declaring module), else on the first call.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

from opgen.ir import ArgumentError, DType, IRError, Op
from opgen.ir.builder import OpDef, TensorType

_STATIC_KINDS = (bool, int, float, str)


class DeclaredOp(OpDef):
    """An op declaration that runs as a torch op when called."""

    def __call__(self, *tensors: Any, **static: Any) -> Any:
        """Run the op on torch tensors (positional, in declaration order; static args by keyword); returns
        the single output, or a tuple of outputs in the declaration's order."""
        top = self.__dict__.get("_torch_op") or self.torch()
        tparams, sparams = self._signature()
        if len(tensors) != len(tparams):
            raise TypeError(f"{self.name}() takes {len(tparams)} tensor arguments "
                            f"({', '.join(p for p, _ in tparams)}), got {len(tensors)}")
        if static and set(static) - {s for s, _, _ in sparams}:
            raise TypeError(f"{self.name}() got unexpected keyword arguments "
                            f"{sorted(set(static) - {s for s, _, _ in sparams})}; its static arguments are "
                            f"{[s for s, _, _ in sparams]}")
        from opgen.eager import call
        from opgen.ops._args import describe

        for (pname, _), x in zip(tparams, tensors):
            if not isinstance(x, _torch().Tensor):
                raise ArgumentError(f"op {self.name}: argument '{pname}' expected a tensor, got {describe(x)}")
        args = (*tensors, *(static.get(s, d) for s, _, d in sparams)) if sparams else tensors
        # a plain eager call (no autograd, compile, trace or mode) skips the dispatcher (~35 us a call)
        outs = call(top.forward_op, top.checked_impl, *args)
        if top.outputs is not None:
            return outs
        return outs[0] if len(outs) == 1 else tuple(outs)

    def torch(self):
        """The registered torch op (:class:`opgen.bridge.TorchOp`): ``torch.ops.opgen.<name>_<fingerprint>``
        with the tensors then the static arguments, returning a list of outputs."""
        top = self.__dict__.get("_torch_op")
        if top is None:
            top = _register(self)
            object.__setattr__(self, "_torch_op", top)
        return top

    @property
    def fingerprint(self) -> str:
        """A stable hash of the declaration: its module and qualified name and the IR fingerprint of its float32
        build with default static arguments (which sees constants a closure captured); the source text when static
        arguments have no defaults. Part of its torch op's name."""
        from opgen.bridge import source_fingerprint

        fn = self.fn
        try:
            body = self._built(DType.f32, ()).fingerprint
        except (IRError, TypeError):
            try:
                body = inspect.getsource(fn)
            except (OSError, TypeError):
                body = fn.__code__.co_code.hex()
            body += repr([c.cell_contents for c in fn.__closure__ or ()])
        return source_fingerprint(getattr(fn, "__module__", ""), fn.__qualname__, self.name, body)

    def tune(self, shape: dict[str, int], *, trials: int = 20, dtype: str = "float32", **kw: Any):
        """Tune the op's schedule at ``shape`` (dims by name); the next call at that shape bucket uses the best
        config found. See :func:`opgen.tune.declared.tune_op` for the options."""
        from opgen.tune.declared import tune_op

        return tune_op(self, shape, trials=trials, dtype=dtype, **kw)

    @functools.lru_cache(maxsize=64)
    def _built(self, dtype: Any, statics: tuple) -> Op:
        return self.build(dtype, **dict(statics))

    def _signature(self) -> tuple[tuple[tuple[str, TensorType], ...], tuple[tuple[str, type, Any], ...]]:
        sig = self.__dict__.get("_sig")
        if sig is None:
            sig = _signature(self)
            object.__setattr__(self, "_sig", sig)
        return sig


def _torch():
    import torch

    return torch


def _signature(decl: DeclaredOp):
    """((tensor param, annotation) ...), ((static param, kind, default) ...) of a declaration."""
    tensors, statics = [], []
    for p in inspect.signature(decl.fn).parameters.values():
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, decl.fn.__globals__)  # noqa: S307 (annotations are the author's code)
            except NameError as e:
                raise IRError(f"op {decl.name}: the annotation {ann!r} of parameter {p.name} names something the "
                              f"module of {decl.fn.__qualname__} does not define ({e}); with `from __future__ "
                              f"import annotations` the names in annotations must be module-level") from None
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            kind = ann if ann in _STATIC_KINDS else type(p.default) if p.default is not p.empty else None
            if kind not in _STATIC_KINDS:
                raise IRError(f"op {decl.name}: static parameter {p.name} needs an annotation bool, int, float or "
                              f"str (or a default of one of those types)")
            statics.append((p.name, kind, p.default if p.default is not p.empty else _required()))
        elif not isinstance(ann, TensorType):
            raise IRError(f"op {decl.name}: parameter {p.name} needs a tensor annotation like F32['B L']")
        else:
            tensors.append((p.name, ann))
    return tuple(tensors), tuple(statics)


def _required():
    from opgen.bridge import _REQUIRED

    return _REQUIRED


def _register(decl: DeclaredOp):
    from opgen.bridge import StaticArg, TensorArg, TorchOp, input_dtype, op_name

    tensors, statics = decl._signature()
    flexible = frozenset(name for name, ann in tensors if ann.dtype is None)

    def declare(call_tensors, call_statics):
        dtype = input_dtype(call_tensors, sorted(flexible))
        return decl._built(dtype, tuple(sorted(call_statics.items())))

    try:
        outputs = [t.name for t in decl._built(DType.f32, ()).outputs]
    except (IRError, TypeError):
        outputs = None                                   # static args without defaults: a list of outputs
    return TorchOp(op_name(decl.name, decl.fingerprint), [TensorArg(n) for n, _ in tensors],
                   [StaticArg(n, k, d) for n, k, d in statics], declare, outputs=outputs, flexible=flexible,
                   who=f"op {decl.name}")


def op(fn: Callable[..., Any] | None = None, *, name: str | None = None):
    """Declare an op from a function whose parameters are annotated ``F32["B L"]`` / ``Float["B L"]`` (tensors)
    and whose keyword-only parameters are static (bool, int, float, str); the result is callable on tensors."""
    def make(f: Callable[..., Any]) -> DeclaredOp:
        decl = DeclaredOp(f, name or f.__name__)
        if "torch" in sys.modules:
            decl.torch()
        return decl
    return make if fn is None else make(fn)
