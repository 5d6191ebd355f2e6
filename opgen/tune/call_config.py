"""The call-time half of tuning a library or declared op: its study key and knob space on a target, and the lookup
of its tuned config (:func:`lookup_config`, what :meth:`opgen.runtime.Session.tuned_config` calls).

Nothing here needs the op library (``opgen.ops``): the runtime imports this module, and :mod:`opgen.tune.library`
(the tuning problems, which declare the library ops) imports it too, so tune time and call time build the same key
and space. :mod:`opgen.tune.library` re-exports :func:`key_parts`, :func:`lookup_config` and :func:`_space`.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Mapping

from opgen.ir.errors import FallbackWarning
from opgen.schedules import Knob, Space

from . import lookup
from .key import KeyParts, study_key, target_fingerprint


def key_parts(op, binding, target) -> KeyParts:
    """The tuning key of ``op`` at ``binding``'s sizes on ``target`` (the same at tune time and call time)."""
    dims = {str(d): v for d, v in binding.dims.items()}
    dtypes = sorted({str(t.dtype) for t in op.inputs})
    return KeyParts.of(op.name, op.fingerprint, dims, dtypes, target.name, target_fingerprint(target))


def lookup_config(op, binding, target, storage=None, cache_dir=None) -> Any | None:
    """The tuned config for this call (in the target's own form), or None when nothing was tuned."""
    try:
        space, to_config = _space(target, op, binding)
    except Exception:  # noqa: BLE001 - no space for this op on this target: nothing tuned
        return None
    key = study_key(key_parts(op, binding, target), space.fingerprint)
    cfg = lookup.best_config(key, storage, cache_dir=cache_dir)
    if cfg is None:
        return None
    why = space.infeasible(cfg)
    if why is not None:                      # stored data is checked like any input: never handed to a kernel
        warnings.warn(f"opgen: the tuned config stored for study {key.name} does not fit its knob space ({why}); "
                      f"op {op.name} runs with its default config. Tune it again, or re-import valid records",
                      FallbackWarning, stacklevel=2)
        return None
    return to_config(cfg)


def _space(target, op, binding) -> tuple[Space, Callable[[Mapping[str, Any]], Any]]:
    """The backend's schedule space as an :class:`opgen.schedules.Space`, and a config converter."""
    if target.name == "tvm":
        from opgen.targets.tvm.attention_call import attention_group

        if attention_group(op) is not None:
            return _tvm_attention_space(target, op, binding)
        from opgen.targets.tvm.window import window_group

        if _group(op) is None and window_group(op) is not None:
            return _tvm_window_space(target, window_group(op), binding)
        from opgen.targets.tvm.scan import ScanConfig
        from opgen.targets.tvm.target import check_config, default_config, space

        group = target.group(op)
        native = space(group)
        default = default_config(group, binding, target.caps()).to_json()
        knobs = tuple(Knob(k.name, tuple(k.values)) for k in native.knobs)
        knobs = tuple(Knob(k.name, k.choices if default[k.name] in k.choices else k.choices + (default[k.name],))
                      for k in knobs)

        def check(cfg: Mapping[str, Any]) -> str | None:
            ok, why = check_config(ScanConfig(**cfg), group, binding)
            return None if ok else why

        return Space(f"tvm/{op.name}", knobs, default, check), lambda cfg: ScanConfig(**cfg)
    from opgen.targets.triton.attention_call import attention_group as triton_attention_group
    from opgen.targets.triton.window import window_group as triton_window_group

    if triton_attention_group(op) is not None:
        return _triton_attention_space(target, triton_attention_group(op), binding)
    if triton_window_group(op) is not None:
        return _triton_window_space(target, triton_window_group(op), binding)
    from opgen.targets.triton.scan import space as triton_space

    native = triton_space(target.group(op) if hasattr(target, "group") else _group(op), binding)
    configs = [json.dumps(c, sort_keys=True) for c in native.enumerate()]
    default = json.dumps(dict(native.default), sort_keys=True)
    if default not in configs:
        configs.insert(0, default)
    return (Space(f"triton/{op.name}", (Knob("config", tuple(configs)),), {"config": default}),
            lambda cfg: json.loads(cfg["config"]))


def _triton_window_space(target, group, binding) -> tuple[Space, Callable[[Mapping[str, Any]], Any]]:
    """The Triton window kernels' feasible configs (every variant's tiles, warps, stages; tf32 for fp32 gemm) as
    one categorical knob, the default first."""
    from opgen.targets.triton.window import space as window_space

    caps = target.caps() if hasattr(target, "caps") else None
    native = window_space(group, binding, caps)
    default = json.dumps(native.default.to_dict(), sort_keys=True)
    configs = [json.dumps(c.to_dict(), sort_keys=True) for c in native.enumerate()]
    configs = [default] + [c for c in configs if c != default]
    return (Space(f"triton/{group.op.name}/window", (Knob("config", tuple(configs)),), {"config": default}),
            lambda cfg: json.loads(cfg["config"]))


def _tvm_attention_space(target, op, binding) -> tuple[Space, Callable[[Mapping[str, Any]], Any]]:
    """The forward attention kernel's knobs (tile sizes, register blocks, vector width, fast math)."""
    from opgen.targets.tvm.attention import (AttentionConfig, attention_space, check_attention_config,
                                             default_attention_config)
    from opgen.targets.tvm.attention_call import attention_group

    group = attention_group(op)
    dtype = op.tensor(group.q).dtype
    sizes = {str(d): v for d, v in binding.dims.items()}
    default = default_attention_config(group, sizes, target.caps(), dtype).to_json()
    knobs = []
    for k in attention_space(group, target.caps()).knobs:
        choices = tuple(k.values)
        knobs.append(Knob(k.name, choices if default[k.name] in choices else choices + (default[k.name],)))
    return (Space(f"tvm/{op.name}", tuple(knobs), default,
                  lambda cfg: check_attention_config(AttentionConfig(**cfg), dtype)),
            lambda cfg: AttentionConfig(**cfg))


def _triton_attention_space(target, group, binding) -> tuple[Space, Callable[[Mapping[str, Any]], Any]]:
    """The Triton attention kernel's knobs at this shape (the decode kernel's for short queries over long keys, as
    the target picks): block sizes, warps, stages, splits, fp32 dot precision; the kernel's own feasibility check."""
    from opgen.schedules.attention import AttentionShape, triton_attention_space, use_decode

    shape = AttentionShape.of(group, binding.shapes)
    kind = "decode" if use_decode(shape) else "forward"
    native = triton_attention_space(group, shape, target.caps(), kind)
    default = native.default.to_dict()
    knobs = tuple(Knob(name, tuple(choices) if default[name] in choices else tuple(choices) + (default[name],))
                  for name, choices in native.knobs.items())
    return (Space(f"triton/{group.op.name}/{kind}", knobs, default, native.infeasible),
            lambda cfg: dict(cfg))


def _tvm_window_space(target, group, binding) -> tuple[Space, Callable[[Mapping[str, Any]], Any]]:
    """The window kernels' knobs (variant: direct, gemm, fft where it applies; tiles, blocks, unrolling); a 1-D
    window's ``rows_tile`` has only the value 1 (any other fails the kernel's check at every shape)."""
    from opgen.targets.tvm.window import (WindowConfig, check_window_config, default_window_config,
                                          window_space)

    from opgen.targets.tvm.window import static_window

    default = default_window_config(group, binding, target.caps()).to_json()
    one_d = not static_window(group, binding).row.real
    knobs = []
    for k in window_space(group, binding, target.caps()).knobs:
        choices = tuple(k.values)
        if one_d and k.name == "rows_tile":       # a 1-D window has one output row: other values are impossible
            choices = (1,)
        knobs.append(Knob(k.name, choices if default[k.name] in choices else choices + (default[k.name],)))

    def check(cfg: Mapping[str, Any]) -> str | None:
        ok, why = check_window_config(WindowConfig(**cfg), group, binding)
        return None if ok else why

    return Space(f"tvm/{group.op.name}", tuple(knobs), default, check), lambda cfg: WindowConfig(**cfg)


def _group(op):
    from opgen.ir.passes import fuse_scan

    return fuse_scan(op)
