"""The TVM CPU target: fused scans rendered to TVMScript, compiled with LLVM for the host CPU, called zero-copy.

``TVMTarget().run(op, inputs, binding)`` runs an op whose graph fuses into one :class:`ScanGroup`
(``opgen.ir.passes.fuse_scan``): linear_scan, selective_scan, chunk_gla, ... in float32 or float64.
The schedule is a :class:`~opgen.schedules.scan.ScanConfig`: :func:`default_config` picks one from the
problem and the CPU; :func:`space` describes every knob (values and constraints) as plain data for a tuner (both
from :mod:`opgen.schedules.scan`).
"""
from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from opgen.ir import DType, Op
from opgen.ir.passes import ScanGroup, fuse_scan
from opgen.ir.passes.correlation import fuse_correlation
from opgen.targets.spectral import run_correlation_fft, run_window_fft
from opgen.ir.symbols import Dim
from opgen.schedules.scan import (ScanConfig, as_scan_config as as_config,  # noqa: F401 (the old names)
                                  check_scan_config as check_config, default_scan_config,
                                  legalize_scan_config as legalize, scan_space as space)
from opgen.schedules.space import TargetKnob as Knob, TargetSpace as Space  # noqa: F401
from opgen.targets.base import Caps

from .attention_call import attention_group, run_backward, run_forward, supports_attention
from .host import _cpu_flags, _cpu_name, host_vector_bits  # noqa: F401 (host_vector_bits re-exported)
from .scan import KernelSource, render_scan
from .window import (WindowConfig, WindowSource, as_window_config, resolve_window_config, window_group,
                     window_kernel, window_source, window_supported)

SUPPORTED_DTYPES = frozenset({DType.f32, DType.f64})
_INT32_LIMIT = 2**31 - 1


# ------------------------------------------------------------------------------------------------ schedules
# The scan kernel's knobs, checks and default config live in :mod:`opgen.schedules.scan`; the default reads this
# host's SIMD width when the capability record gives none.


def default_config(group: ScanGroup, binding, caps: Caps | None = None) -> ScanConfig:
    """A heuristic config (:func:`opgen.schedules.scan.default_scan_config`)."""
    return default_scan_config(group, binding, caps, host_vector_bits=host_vector_bits)


# --------------------------------------------------------------------------------------------------- target


@functools.lru_cache(maxsize=512)
def _group(op: Op) -> ScanGroup | None:
    return fuse_scan(op)


@functools.lru_cache(maxsize=512)
def _renderable(op: Op) -> bool:
    """The op fuses into one scan group (or one window group: a convolution) and its kernel renders (pure
    Python: no tvm import)."""
    g = _group(op)
    if g is None:
        return window_supported(window_group(op))[0] or correlation_group(op) is not None
    try:
        render_scan(g, ScanConfig())
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _state_dims(group: ScanGroup) -> tuple[Dim, ...]:
    """Dims that are the extents of state axes (baked in by ``static_state``)."""
    out = []
    for a in group.state:
        e = group.op.extent(a)
        if isinstance(e, Dim) and e not in out:
            out.append(e)
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _render(group: ScanGroup, cfg: ScanConfig, static: tuple, index_bits: int) -> KernelSource:
    return render_scan(group, cfg, static_dims=dict(static), index_bits=index_bits)


class TVMTarget:
    """Fused scans on the host CPU through TVM (LLVM). ``cache_dir``: where compiled kernels persist (None:
    memory only; pass ``opgen.config.Config.cache_dir`` for the user's cache)."""

    name = "tvm"
    device_kinds = ("cpu",)      # the device kinds it compiles for (TargetRegistry.no_compiled_target)

    def __init__(self, cache_dir: str | os.PathLike | None = None, target=None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._target = target
        self._cache = None
        self._plans: OrderedDict = OrderedDict()
        self.max_plans = 4096

    # protocol ------------------------------------------------------------------------------------------------
    def caps(self) -> Caps:
        flags = _cpu_flags()
        return Caps(device_kind="cpu", name=f"tvm llvm: {_cpu_name()}", cores=os.cpu_count() or 1,
                    vector_bits=host_vector_bits(),
                    extra={"fma": "fma" in flags, "avx512f": "avx512f" in flags})

    def available(self) -> tuple[bool, str]:
        return _tvm_available()

    def supports(self, op: Op, device_kind: str) -> bool:
        if device_kind != "cpu":
            return False
        if supports_attention(op):
            return True
        if any(t.dtype not in SUPPORTED_DTYPES for t in op.inputs + op.outputs):
            return False
        return _renderable(op)

    def run(self, op: Op, inputs: Mapping, binding, config: ScanConfig | Mapping | None = None) -> dict:
        """Compute the op's outputs (fresh tensors in their declared dtypes). Inputs are made contiguous and
        converted to their declared dtypes when needed; misaligned views are passed as they are."""
        call = self.prepare(op, binding, config)
        if call is not None:
            return call(inputs)
        group = attention_group(op)
        if group is not None:
            return run_forward(group, inputs, binding, self.cache, self.caps(), config)
        wg = window_group(op)               # not a kernel call: one of the FFT paths (see prepare)
        if wg is None:
            return _on_cpu(op, inputs, lambda: run_correlation_fft(correlation_group(op), inputs, binding))
        return _on_cpu(op, inputs, lambda: run_window_fft(wg, inputs, binding))

    def prepare(self, op: Op, binding, config: ScanConfig | Mapping | None = None):
        """``run`` at these sizes and config as a callable ``inputs -> outputs`` that skips the per-call dispatch
        (the caller keys it by the op and the inputs' shapes, dtypes and devices), or None where ``run`` takes
        another path (attention, the FFT variants)."""
        if attention_group(op) is not None:
            return None
        if _group(op) is None:
            wg = window_group(op)
            if wg is None and correlation_group(op) is not None:
                return None
            if wg is not None and self._window_variant(wg, binding, config) == "fft":
                return None
        return self._bound_call(op, binding, config)

    def _bound_call(self, op: Op, binding, config):
        """The kernel call at ``binding``: allocate the outputs, convert the inputs, run."""
        from opgen.targets.memory import empty

        fn, plan, scalars = self._plan(op, binding, config)
        shapes = binding.shapes
        tail = [binding.dims[d] for d in scalars]

        def call(inputs: Mapping) -> dict:
            args = []
            outs = {}
            for name, is_output, dtype in plan:
                if is_output:
                    x = empty(shapes[name], dtype=dtype)
                    outs[name] = x
                else:
                    x = inputs[name]
                    if x.device.type != "cpu":
                        raise ValueError(f"the tvm target runs on CPU tensors; input {name!r} is on {x.device}")
                    if x.dtype != dtype:
                        x = x.to(dtype)
                    if not x.is_contiguous():
                        x = x.contiguous()
                args.append(x)
            fn(*args, *tail)
            return outs

        return call

    def supports_node(self, op: Op, device_kind: str, binding=None) -> bool:
        """A single builtin reduction (node by node execution of a generated backward op) on the CPU. (Whether a
        node is worth a kernel at its sizes is the session's call: ``Config.min_node_kernel_work``.)"""
        from .reduce import reduce_supported

        return device_kind == "cpu" and reduce_supported(op)[0]

    def run_node(self, op: Op, inputs: Mapping, binding) -> dict:
        """Run a single-reduction op with the reduction kernel (:mod:`.reduce`)."""
        from .reduce import run_reduce

        return run_reduce(op, inputs, binding, self.cache)

    def prepare_group(self, op: Op, binding, device_kind: str):
        """The fused kernel of a group of ``op``'s nodes (a scan's backward: :mod:`.scan_adjoint`) at ``binding``
        as ``(group, call)``, ``call(tensors) -> {member output: tensor}``; None when ``op`` has no such group."""
        from .attention_backward import tvm_threads
        from .scan_adjoint import adjoint_call, lane_vector_group, scan_adjoint_group

        if device_kind != "cpu":
            return None
        group = scan_adjoint_group(op)
        if group is None:
            return None
        return group, adjoint_call(lane_vector_group(group, binding), binding, self.cache, tvm_threads())

    def attention_backward(self, op: Op, inputs: Mapping, binding, out, lse, dout, config=None) -> dict:
        """Gradients of an attention op's q, k, v by the flash backward kernels (see :mod:`.attention_call`)."""
        group = attention_group(op)
        if group is None:
            raise ValueError(f"op {op.name} is not an attention op; the tvm target has no backward for it")
        return run_backward(group, inputs, binding, out, lse, dout, self.cache)

    def _window_variant(self, group, binding, config) -> str:
        """The variant a window call runs (memoized per group, sizes and config)."""
        key = ("variant", id(group), tuple(sorted(((d.name, v) for d, v in binding.dims.items()))),
               _any_config(config))
        hit = self._plans.get(key)
        if hit is None or hit[0] is not group:
            hit = (group, resolve_window_config(group, binding, _any_config(config), self.caps()).variant)
            self._plans[key] = hit
        return hit[1]

    def _plan(self, op: Op, binding, config: ScanConfig | None):
        """(kernel, [(tensor, is output, torch dtype)], scalar dims), cached per (op, sizes, config): a repeated
        call costs a dict lookup, not a render + hash (~150 us)."""
        # keyed by identity (hashing an Op walks all its nodes: 8 us); the op is kept in the entry and compared
        config = _any_config(config)
        key = (id(op), tuple(sorted(((d.name, v) for d, v in binding.dims.items()))), config)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is op:
            self._plans.move_to_end(key)
            return hit[1]
        from opgen.ir.dtypes import to_torch

        wg = window_group(op) if _group(op) is None else None
        if wg is not None:
            fn, ks = window_kernel(wg, binding, config, self.cache, self.caps())
        else:
            fn, ks = self.kernel(op, binding, config)
        plan = tuple((name, op.tensor(name).kind == "output", to_torch(op.tensor(name).dtype)) for name in ks.tensors)
        hit = (fn, plan, ks.scalars)
        self._plans[key] = (op, hit)
        if len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return hit

    # helpers ------------------------------------------------------------------------------------------------
    @property
    def cache(self):
        if self._cache is None:
            from .compile import KernelCache

            self._cache = KernelCache(self.cache_dir, self._target)
        return self._cache

    def group(self, op: Op) -> ScanGroup:
        g = _group(op)
        if g is None:
            raise ValueError(f"op {op.name} does not fuse into one scan kernel; the tvm target cannot run it")
        return g

    def config_for(self, op: Op, binding, config: ScanConfig | Mapping | None = None) -> ScanConfig:
        """The config a call uses: ``config`` (a :class:`ScanConfig` or its JSON dict, legalized for these
        sizes) or the default."""
        g = self.group(op)
        cfg = as_config(config) if config is not None else default_config(g, binding, self.caps())
        return legalize(cfg, g, binding)

    def source(self, op: Op, binding, config: ScanConfig | WindowConfig | None = None) -> KernelSource | WindowSource:
        """The rendered kernel a call with these sizes uses."""
        if _group(op) is None and window_group(op) is not None:
            return window_source(window_group(op), binding, config, self.caps())
        g = self.group(op)
        cfg = self.config_for(op, binding, config)
        baked = set(_state_dims(g)) if cfg.static_state else set()
        if cfg.interleave or cfg.time_vector:   # size-1 dims as literals: unit strides (interleave: 2.41 -> 2.18 ms)
            derived = {d for d, _ in op.derived}
            baked |= {d for d, v in binding.dims.items() if v == 1 and d not in derived}
        static = tuple(sorted(((d, binding.dims[d]) for d in baked), key=lambda x: x[0].name))
        biggest = max(math.prod(s) for s in binding.shapes.values())
        bits = 64 if biggest > _INT32_LIMIT else 32
        return _render(g, cfg, static, bits)

    def kernel(self, op: Op, binding, config: ScanConfig | None = None):
        """(compiled function, its :class:`KernelSource`) for a call with these sizes."""
        ks = self.source(op, binding, config)
        return self.cache.get(ks.text), ks


@functools.lru_cache(maxsize=512)
def correlation_group(op: Op):
    """``fuse_correlation(op)`` (a lag correlation: a 1-D convolution's weight gradient), cached per op."""
    return fuse_correlation(op)


def _on_cpu(op: Op, inputs: Mapping, run) -> dict:
    for name, x in inputs.items():
        if getattr(x, "device", None) is not None and x.device.type != "cpu":
            raise ValueError(f"the tvm target runs on CPU tensors; input {name!r} of op {op.name} is on {x.device}")
    return run()


def _any_config(config):
    """A scan or window config from itself or its JSON dict (window configs have a ``variant``), or None."""
    if config is None or isinstance(config, (ScanConfig, WindowConfig)):
        return config
    if isinstance(config, Mapping) and "variant" in config:
        return as_window_config(config)
    return as_config(config)


def _tvm_available() -> tuple[bool, str]:
    """Whether apache-tvm and apache-tvm-ffi are installed, decided without importing them (``import tvm`` takes
    seconds, and a call whose kernel is cached on disk needs only tvm_ffi). A package that is installed but
    fails to import (a broken native library) is reported where it is imported, by an ImportError naming it
    (:func:`opgen.targets.tvm.compile.import_tvm`); from then on the target is unavailable with that reason."""
    from .compile import tvm_import_failure

    why = tvm_import_failure()
    return (False, why) if why else _tvm_installed()


@functools.lru_cache(maxsize=1)
def _tvm_installed() -> tuple[bool, str]:
    import importlib.util
    import sys

    for module, dist in (("tvm", "apache-tvm"), ("tvm_ffi", "apache-tvm-ffi")):
        if sys.modules.get(module) is not None:
            continue
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:             # (an import hook that hides the module says so this way)
            spec = None
        except (ImportError, ValueError) as e:
            return False, f"{dist} cannot be found ({type(e).__name__}: {e})"
        if spec is None:
            return False, f"{dist} is not installed (pip install {dist})"
    return True, ""
