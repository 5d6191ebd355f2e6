"""Tuning ops that users declare: :func:`tune_op` for an ``@opgen.op`` declaration, a built op, or its name.

The tuner measures each config in a separate worker process (:mod:`opgen.tune.measure`), which rebuilds the op
from its **qualified name** ``"package.module:attribute"``: an :class:`~opgen.ir.builder.OpDef` found there is built
with the dtype and static options given here, and a plain function defined in that module is called (with the
static options) and must return an :class:`~opgen.ir.Op` (what ``IRProblem`` does for ``examples/gated_rnn.py``).

Where the name comes from:

- a string: checked against a strict pattern (dotted identifiers, one colon, dotted identifiers) before anything
  is imported; a module that cannot be imported, an attribute that is missing and an attribute that is not an op
  declaration are :class:`~opgen.ir.ArgumentError` naming the argument;
- an ``OpDef``: its function's module and the module attribute that holds it; a declaration inside a function
  (``f.<locals>.op``) cannot be imported by another process and is refused with the fix. One in ``__main__`` (a
  script run as ``python script.py``) is imported by the worker from the script's file (checked to be a regular
  ``.py`` file) under a private module name, so the script's ``if __name__ == "__main__":`` block does not run
  there (its other top-level statements do). ``__main__`` without a file (a REPL, ``python -c``, a notebook) is
  refused: move the declaration into a module;
- a built ``Op``: the ``OpDef`` of that name among the loaded modules whose build (the op's input dtype, its
  ``attrs`` as static options) has the same fingerprint, else an error asking for the declaration or its name.

The spec sent to the worker also records the ``sys.path`` entry the module was imported from (a worker started
before that entry was added gets it appended) and the op's fingerprint: a worker that builds a different op
(the module changed on disk meanwhile) fails its setup with both fingerprints instead of tuning something else.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import stat
import sys
import types
from dataclasses import dataclass
from typing import Any, Mapping

from opgen.ir import ArgumentError, Op
from opgen.ir.builder import OpDef

from .library import LibraryProblem
from .problem import ProblemSpec

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
#: ``package.module:attribute`` (the attribute may be dotted: ``module:Class.attr``); nothing else
QUALNAME = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_MAIN_ALIAS = "_opgen_main_"          # the module name a worker gives a ``__main__`` script it imports by file
_BACKENDS = ("auto", "tvm", "triton")
WHAT = ("an @opgen.op declaration (OpDef), a built opgen Op, or a 'package.module:attribute' string naming a "
        "module-level OpDef or a function that returns an Op")


@dataclass(frozen=True)
class Declaration:
    """Where a worker process finds a declaration: ``qualname`` ``"module:attr"``; ``root`` the ``sys.path`` entry
    its module was imported from (None when unknown); ``file`` the script a ``__main__`` module was run from."""

    qualname: str
    root: str | None = None
    file: str | None = None


# -- naming and importing --------------------------------------------------------------------------------------

def check_qualname(name: Any, who: str = "decl") -> str:
    """``name`` when it is a ``"package.module:attribute"`` string; :class:`ArgumentError` otherwise (nothing is
    imported here)."""
    if not isinstance(name, str) or QUALNAME.fullmatch(name) is None:
        got = repr(name) if isinstance(name, str) else f"{type(name).__name__} {name!r}"[:200]
        raise ArgumentError(f"{who}: expected {WHAT}, like 'mypkg.ops:gated_rnn' (dotted Python identifiers, one "
                            f"colon, no spaces); got {got}")
    return name


def _is_regular_py(path: str) -> bool:
    try:
        return path.endswith(".py") and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _import_script(file: str) -> types.ModuleType:
    """The ``__main__`` script at ``file``, imported (once per process) under a private name: not as ``__main__``,
    so its ``if __name__ == "__main__":`` block does not run."""
    if not _is_regular_py(file):
        raise ArgumentError(f"decl: the script {file!r} that declared the op is not a regular .py file (any more)")
    name = f"{_MAIN_ALIAS}{abs(hash(os.path.realpath(file))):x}"
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ArgumentError(f"decl: cannot import the script {file!r}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def load(decl: Declaration, who: str = "decl") -> tuple[Any, types.ModuleType]:
    """The object ``decl`` names and the module it was found in, imported (in this process or a worker)."""
    name = check_qualname(decl.qualname, who)
    module, _, attr = name.partition(":")
    if module == "__main__":
        main = sys.modules.get("__main__")
        here = getattr(main, "__file__", None)
        if decl.file is None:
            raise ArgumentError(f"{who} {name!r}: a measuring process has its own __main__; pass the OpDef itself "
                                "(its script file is recorded) or name it by its module")
        if here and os.path.realpath(here) == os.path.realpath(decl.file):
            mod = main                               # the script that declared it: this process
        else:
            mod = _import_script(decl.file)          # a worker
    else:
        if decl.root is not None and decl.root not in sys.path:
            sys.path.append(decl.root)               # a worker started before the parent could import it
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
                raise ArgumentError(f"{who} {name!r}: no module named {exc.name!r} on sys.path (check the "
                                    "spelling, install the package, or run from the directory that holds "
                                    "it)") from exc
            raise ArgumentError(f"{who} {name!r}: importing module {module!r} failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the user's module raised while importing: say so, keep the cause
            raise ArgumentError(f"{who} {name!r}: importing module {module!r} failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    obj: Any = mod
    parts = attr.split(".")
    for k, part in enumerate(parts):
        if not hasattr(obj, part):
            where = f"module {module!r}" if k == 0 else f"{module}:{'.'.join(parts[:k])}"
            raise ArgumentError(f"{who} {name!r}: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj, mod


def build(obj: Any, name: str, dtype: str | None, static: Mapping[str, Any], home: types.ModuleType | None = None,
          who: str = "decl") -> Op:
    """The op of the object found at ``name`` (in module ``home``): an OpDef built with ``dtype`` (default float32)
    and ``static``; a plain function defined in ``home`` called with ``static``, returning an Op; anything else is
    refused (without calling it)."""
    if isinstance(obj, OpDef):
        return obj.build(dtype or "float32", **dict(static))
    if isinstance(obj, Op):
        if static:
            raise ArgumentError(f"{who} {name!r} is a built Op, which carries its static options; it takes none, "
                                f"got {sorted(static)}")
        op = obj
    elif isinstance(obj, types.FunctionType) and home is not None and obj.__globals__ is vars(home):
        required = [p.name for p in inspect.signature(obj).parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        missing = [p for p in required if p not in static]
        if missing:
            raise ArgumentError(f"{who} {name!r}: the function needs arguments {missing}; a declaration function "
                                "is called with the static options only")
        op = obj(**dict(static))
        if not isinstance(op, Op):
            raise ArgumentError(f"{who} {name!r}: the function returned {type(op).__name__}, not an opgen Op")
    else:
        kind = "a function defined in another module" if isinstance(obj, types.FunctionType) else \
            f"an object of type {type(obj).__name__}"
        raise ArgumentError(f"{who} {name!r} is {kind}, not an op declaration; expected {WHAT}")
    if dtype is not None:
        from opgen.ir import as_dtype

        have = {t.dtype for t in op.inputs}
        if as_dtype(dtype) not in have:
            raise ArgumentError(f"{who} {name!r}: dtype {dtype!r} does not apply: the op's inputs are "
                                f"{sorted(str(d) for d in have)} (dtype builds an OpDef; a built op keeps its own)")
    return op


def _root_of(mod: types.ModuleType) -> str | None:
    """The ``sys.path`` entry ``mod`` was imported from (None when that cannot be told)."""
    file = getattr(mod, "__file__", None)
    if not file:
        return None
    root = os.path.dirname(os.path.abspath(file))
    depth = mod.__name__.count(".") + (1 if os.path.basename(file).startswith("__init__.") else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def _check_main_file(file: str | None, what: str, who: str) -> None:
    """Refuse a ``__main__`` that a worker cannot import: none, or not run from a regular .py file."""
    if not file:
        raise ArgumentError(f"{who}: {what} is declared in an interactive __main__ (a REPL, python -c or a "
                            "notebook), which a measuring process cannot import; put the declaration in a module "
                            "file and pass it, or its 'module:attribute' name")
    if not _is_regular_py(os.path.abspath(file)):
        raise ArgumentError(f"{who}: {what} is declared in __main__ run from {file!r}, not a regular .py file that "
                            "a measuring process could import; put the declaration in a module file")


def _from_opdef(d: OpDef, who: str) -> Declaration:
    fn = d.fn
    module, qual = fn.__module__, fn.__qualname__
    if "<locals>" in qual:
        raise ArgumentError(f"{who}: op {d.name!r} is declared inside a function ({module}.{qual}); the measuring "
                            "process imports a declaration by its module and name, so declare it at module level "
                            "(or pass 'module:function' naming a module-level function that builds it)")
    mod = sys.modules.get(module)
    if mod is None:
        raise ArgumentError(f"{who}: op {d.name!r} comes from module {module!r}, which is not loaded")
    attr = next((k for k, v in vars(mod).items() if v is d and k == qual), None) or \
        next((k for k, v in vars(mod).items() if v is d), None)
    if attr is None:
        raise ArgumentError(f"{who}: op {d.name!r} is not a module-level attribute of {module!r} (the measuring "
                            "process finds a declaration by its module and name); assign it to a module-level name")
    if module == "__main__":
        file = getattr(mod, "__file__", None)
        _check_main_file(file, f"op {d.name!r} (__main__:{attr})", who)
        file = os.path.abspath(file)
        return Declaration(f"__main__:{attr}", file=file)
    return Declaration(f"{module}:{attr}", root=_root_of(mod))


def _find_opdef(op: Op, who: str) -> tuple[Declaration, str]:
    """The declaration of a built op among the loaded modules (fingerprint-checked) and its dtype."""
    dtypes = sorted({str(t.dtype) for t in op.inputs})
    static = dict(op.attrs)
    seen: set[int] = set()
    for mod in list(sys.modules.values()):
        if not isinstance(mod, types.ModuleType):
            continue
        for v in list(vars(mod).values()):
            if not issubclass(type(v), OpDef) or v.name != op.name or id(v) in seen:   # type(): no attribute access on
                continue                                                    # lazy or deprecated module objects
            seen.add(id(v))
            for dt in dtypes:
                try:
                    same = v.build(dt, **static) == op
                except Exception:  # noqa: BLE001 - another declaration of the same name: not this one
                    same = False
                if same:
                    return _from_opdef(v, who), dt
    raise ArgumentError(f"{who}: cannot find the declaration of the built op {op.name!r} in the loaded modules; pass "
                        "its @opgen.op declaration (with dtype= and static options), or 'module:function' naming it "
                        "or a module-level function that returns this op")


def locate(decl: Any, dtype: str | None = None, static: Mapping[str, Any] | None = None,
           who: str = "decl") -> tuple[Declaration, Op, str | None, dict[str, Any]]:
    """``(where a worker finds it, the op, the dtype to build it with, its static options)`` for an OpDef, a
    built Op or a qualified name."""
    static = dict(static or {})
    if isinstance(decl, str):
        check_qualname(decl, who)
        d = Declaration(decl)
        if decl.partition(":")[0] == "__main__":
            main = sys.modules.get("__main__")
            file = getattr(main, "__file__", None)
            _check_main_file(file, decl, who)
            d = Declaration(decl, file=os.path.abspath(file))
        obj, mod = load(d, who)
        op = build(obj, decl, dtype, static, mod, who)
        if d.file is None:
            d = Declaration(decl, root=_root_of(mod))
        return d, op, dtype, static
    if isinstance(decl, OpDef):
        d = _from_opdef(decl, who)
        return d, decl.build(dtype or "float32", **static), dtype or "float32", static
    if isinstance(decl, Op):
        if static:
            raise ArgumentError(f"{who}: a built Op carries its static options ({dict(decl.attrs)}); pass static "
                                f"options only with an OpDef or a name, got {sorted(static)}")
        d, dt = _find_opdef(decl, who)
        if dtype is not None:
            from opgen.ir import as_dtype

            if as_dtype(dtype) != as_dtype(dt):
                raise ArgumentError(f"{who}: dtype {dtype!r} does not apply to the built op {decl.name!r} (built for "
                                    f"{dt}); pass its OpDef to tune another dtype")
        return d, decl, dt, dict(decl.attrs)
    check_qualname(decl, who)
    raise AssertionError("unreachable")


# -- the problem --------------------------------------------------------------------------------------------------

def check_shape(op: Op, shape: Mapping[str, int], who: str = "shape") -> dict[str, int]:
    """``shape`` as ``{dim: int}`` when it gives every dim of ``op`` and nothing else."""
    if not isinstance(shape, Mapping):
        raise ArgumentError(f"{who}: expected a dict of dim sizes like {{'B': 2, 'L': 512}}, got "
                            f"{type(shape).__name__} {shape!r}")
    names = [d.name for d in op.dims]
    bad = {k: v for k, v in shape.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ArgumentError(f"{who}: dim sizes must be positive ints, got {bad}")
    missing = [n for n in names if n not in shape]
    unknown = sorted(set(shape) - set(names))
    if missing or unknown:
        raise ArgumentError(f"{who}: op {op.name} takes dims {', '.join(names)}" + (f"; missing {missing}" if missing
                            else "") + (f"; unknown {unknown}" if unknown else "") + f" (got {dict(shape)})")
    return {n: int(shape[n]) for n in names}


def input_shapes(op: Op, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every input of ``op`` at ``dims``."""
    from opgen.ir.index import evaluate_int

    by_name = {d.name: d for d in op.dims}
    values = {by_name[k]: v for k, v in dims.items() if k in by_name}
    return {t.name: tuple(evaluate_int(s, values) for s in t.shape) for t in op.inputs}


def resolve_backend(backend: str, who: str = "backend") -> str:
    if backend not in _BACKENDS:
        raise ArgumentError(f"{who}: expected one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        import torch

        return "triton" if torch.cuda.is_available() else "tvm"
    return backend


class DeclaredProblem(LibraryProblem):
    """A user-declared op at concrete ``dims`` on one backend; inputs are drawn from N(0, 1) with ``seed``. Rebuilt
    in the measuring process from its spec (the declaration's qualified name, never a pickled object)."""

    def __init__(self, decl: str, dims: Mapping[str, int], backend: str = "tvm", dtype: str | None = None,
                 static: Mapping[str, Any] | None = None, seed: int = 0, cache_dir: str | None = None,
                 root: str | None = None, file: str | None = None, fingerprint: str | None = None,
                 op: Op | None = None) -> None:
        import torch

        from opgen.ir.dtypes import to_torch

        static = dict(static or {})
        where = Declaration(decl, root, file)
        if op is None:
            obj, mod = load(where)
            op = build(obj, decl, dtype, static, mod)
        if fingerprint is not None and op.fingerprint != fingerprint:
            raise ArgumentError(f"decl {decl!r} builds op {op.name} with fingerprint {op.fingerprint[:12]} in this "
                                f"process, but the tuner's op has {fingerprint[:12]} (did its module change?)")
        self.spec = ProblemSpec("opgen.tune.declared:make_declared_problem",
                                {"decl": decl, "dims": dict(dims), "backend": backend, "dtype": dtype,
                                 "static": static, "seed": seed, "cache_dir": cache_dir, "root": root, "file": file,
                                 "fingerprint": op.fingerprint})
        self.op = op
        self.op_name, self.dims, self.backend = op.name, check_shape(op, dims), backend
        gen = torch.Generator().manual_seed(seed)
        shapes = input_shapes(op, self.dims)
        self.inputs = {t.name: torch.randn(*shapes[t.name], generator=gen).to(to_torch(t.dtype)) for t in op.inputs}
        if backend == "triton" and torch.cuda.is_available():
            self.inputs = {k: v.to("cuda") for k, v in self.inputs.items()}
        self._attach(backend, cache_dir)


def make_declared_problem(**kwargs: Any) -> DeclaredProblem:
    """The factory named in :attr:`DeclaredProblem.spec` (called in the measuring process)."""
    return DeclaredProblem(**kwargs)


def declared_problem(decl: Any, shape: Mapping[str, int], *, dtype: str | None = None, backend: str = "auto",
                     cache_dir: str | os.PathLike | None = None, seed: int = 0,
                     static: Mapping[str, Any] | None = None, who: str = "decl",
                     shape_who: str = "shape") -> DeclaredProblem:
    """The tuning problem of ``decl`` (see :func:`tune_op`) at ``shape``; :class:`ArgumentError` for bad arguments
    (``who`` names the argument that gave ``decl``), RuntimeError when the backend is unavailable here."""
    import json

    try:
        json.dumps(dict(static or {}))
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"static options must be JSON values (bool, int, float, str, lists of them): the "
                            f"measuring process rebuilds the op from them; got {dict(static or {})!r} ({exc})") from None
    where, op, dt, st = locate(decl, dtype, static, who)
    dims = check_shape(op, shape, shape_who)
    return DeclaredProblem(where.qualname, dims, resolve_backend(backend), dt, st, seed,
                           None if cache_dir is None else os.fspath(cache_dir), where.root, where.file, op=op)


# -- the entry point --------------------------------------------------------------------------------------------

def tune_op(decl: Any, shape: Mapping[str, int], *, trials: int | None = 20, measured: int | None = None,
            dtype: str | None = None, backend: str = "auto", storage: Any = None, progress: bool = True,
            seconds: float | None = None, seed: int | None = None, timeout: float = 60.0, measurer: Any = None,
            **static: Any):
    """Tune a user-declared op at one shape and make this process's next calls use the result.

    ``decl``: an ``@opgen.op`` declaration (:class:`~opgen.ir.builder.OpDef`, built here with ``dtype``, default
    float32, and the ``static`` keyword options), a built :class:`~opgen.ir.Op` (its declaration is found among the
    loaded modules), or ``"package.module:attribute"`` naming a module-level OpDef or a function returning an Op.
    See the module doc for what a worker process can import.
    ``shape``: every dim of the op, ``{"B": 2, "C": 256, "L": 512}``.
    ``trials`` / ``measured``: distinct feasible configs this call measures (the smaller when both; repeats and
    infeasible configs do not count; the run stops early when the space has no more); ``seconds``: a wall-time
    budget besides. ``backend``: ``"auto"`` (Triton with a GPU, else TVM), ``"tvm"`` or ``"triton"``.
    ``storage``: the tuning store; default the default session's (``OPGEN_TUNE_STORAGE``, else the journal in its
    cache dir), which is where ``opgen.run`` looks; a session reads another store only when configured with it.
    ``seed``: reproducible sampling; ``timeout``: seconds per config; ``measurer``: a running
    :class:`~opgen.tune.measure.Measurer` to reuse (tests). Keyword names other than these are the op's static
    options. Returns the :class:`~opgen.tune.tuner.TuneResult`; afterwards the default session forgets the configs
    it memoized for this op, so its next call at that shape bucket looks up (and uses) the tuned one.
    """
    from opgen import runtime

    from .tuner import tune

    for name, v in (("trials", trials), ("measured", measured)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ArgumentError(f"tune_op: {name} must be a positive int or None, got {v!r}")
    session = runtime.default_session()
    problem = declared_problem(decl, shape, dtype=dtype, backend=backend, cache_dir=session.config.cache_dir,
                               seed=0, static=static)
    if storage is None:
        storage = session.config.tune_storage
    kw: dict[str, Any] = {"measurer": measurer} if measurer is not None else {"timeout": timeout}
    res = tune(problem, trials=trials, measured=measured, seconds=seconds, storage=storage,
               cache_dir=session.config.cache_dir, progress=progress, seed=seed, **kw)
    session.forget_tuned(problem.op)
    return res


__all__ = ["Declaration", "DeclaredProblem", "QUALNAME", "check_qualname", "declared_problem", "locate",
           "make_declared_problem", "tune_op"]
