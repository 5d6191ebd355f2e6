"""The Triton target object (see :mod:`opgen.targets.base`).

It runs ops that fuse into one affine scan group (:func:`opgen.ir.passes.fuse_scan`): linear recurrences,
Mamba's selective scan, gated linear attention and their variants; attention groups; and window groups
(convolutions, :func:`opgen.ir.passes.window.fuse_window`, rendered by :mod:`.window`). On a CUDA device the
kernels are compiled by Triton; with ``TRITON_INTERPRET=1`` in the environment (set before triton is first
imported) they run in Triton's interpreter on CPU tensors, which is how CI checks them without a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from opgen.ir.dtypes import to_torch
from opgen.ir.passes import ScanGroup, ScanVariant, fuse_scan
from opgen.targets.base import Caps

from .attention_call import attention_group, default_config as attention_default_config
from .attention_call import run_backward as run_attention_backward, run_forward as run_attention
from .compile import _default_cache_dir, interpreter_enabled, load_module
from .scan import check, default_config, launch_kwargs, render, variants
from .window import window_group


@functools.lru_cache(maxsize=512)
def scan_group(op) -> ScanGroup | None:
    """The fused scan group of ``op`` that this backend can render, or None."""
    group = fuse_scan(op)
    if group is None:
        return None
    try:
        render(group, ScanVariant.SEQUENTIAL)
    except (ValueError, NotImplementedError, KeyError):
        return None
    return group


@dataclass
class TritonTarget:
    """Generated Triton kernels for fused scan, attention and window groups.

    ``cache_dir`` receives the generated sources (``<cache_dir>/triton/<sha256>.py``); it defaults to
    ``$OPGEN_CACHE_DIR`` or ``~/.cache/opgen``. ``configs`` optionally maps an op fingerprint to a tuned
    config used instead of the default.
    """

    cache_dir: Path | str | None = None
    configs: dict = field(default_factory=dict)
    name: str = "triton"

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else _default_cache_dir()

    # capability and availability ------------------------------------------------------------------------
    def caps(self) -> Caps:
        import torch

        if not interpreter_enabled() and torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            return Caps(device_kind="cuda", name=p.name, cores=p.multi_processor_count,
                        shared_memory=int(getattr(p, "shared_memory_per_block_optin", 0) or 0),
                        registers=int(getattr(p, "regs_per_multiprocessor", 0) or 0),
                        extra={"capability": (p.major, p.minor)})
        return Caps(device_kind="cpu", name="triton interpreter", cores=os.cpu_count() or 1,
                    extra={"interpreter": True})

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install triton)"
        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        if interpreter_enabled():
            return True, ""
        import torch

        if not torch.cuda.is_available():
            return False, ("no CUDA device is visible (set TRITON_INTERPRET=1 before importing triton to run the "
                           "kernels in Triton's CPU interpreter)")
        return True, ""

    def supports(self, op, device_kind: str) -> bool:
        if interpreter_enabled():
            if device_kind not in ("cpu", "cuda"):
                return False
        elif device_kind != "cuda":
            return False
        return scan_group(op) is not None or attention_group(op) is not None or window_group(op) is not None

    # running --------------------------------------------------------------------------------------------
    def config(self, op, binding, variant: ScanVariant | str | None = None) -> dict:
        """The config used for ``op`` at ``binding``: a registered tuned one, else the default."""
        tuned = self.configs.get(op.fingerprint)
        if tuned is not None and variant is None:
            return dict(tuned)
        caps = None
        if not interpreter_enabled():
            try:
                caps = self.caps()
            except Exception:  # noqa: BLE001 (no torch / no device: heuristics use the H100 defaults)
                caps = None
        ag = attention_group(op)
        if ag is not None:
            return attention_default_config(ag, binding, caps)
        wg = window_group(op)
        if wg is not None:
            from .window import default_config as window_default_config

            return window_default_config(wg, binding, caps).to_dict()
        return default_config(self._group(op), binding, caps, variant)

    def _group(self, op) -> ScanGroup:
        group = scan_group(op)
        if group is None:
            raise NotImplementedError(f"the triton target cannot run op {op.name}: it does not fuse into one "
                                      f"affine scan kernel")
        return group

    def source(self, op, config: Mapping[str, Any], binding=None) -> str:
        """The generated module text for ``op`` under ``config`` (window ops also need the ``binding``: channel
        counts and window sizes are baked in)."""
        wg = window_group(op)
        if wg is not None:
            from .window import as_config, render as render_window

            if binding is None:
                raise ValueError(f"triton target, op {op.name}: the source of a window kernel needs a binding")
            variant = as_config(config).variant
            if variant == "fft":
                raise ValueError(f"triton target, op {op.name}: the fft variant has no Triton source (torch.fft)")
            return render_window(wg, binding, variant).source
        if attention_group(op) is not None:
            from .attention import render as render_attention

            return render_attention(attention_group(op)).source
        return render(self._group(op), config["variant"]).source

    def run(self, op, inputs: Mapping, binding, config: Mapping[str, Any] | None = None) -> dict:
        """Compute the op's outputs with the generated kernel (``config``: a dict from :meth:`config`, a
        :func:`~opgen.targets.triton.scan.space` or a tuner; the default config when None)."""
        import torch

        ag = attention_group(op)
        if ag is not None:
            return run_attention(ag, inputs, binding, config, self.cache_dir, self.caps())
        wg = window_group(op)
        if wg is not None:
            from .window import run as run_window

            return run_window(wg, inputs, binding, config, self.cache_dir, self._caps_or_none())
        group = self._group(op)
        cfg = dict(config) if config is not None else self.config(op, binding)
        why = check(group, cfg)
        if why is not None:
            raise ValueError(f"triton target, op {op.name}: invalid config {cfg}: {why}")
        spec = render(group, cfg["variant"])
        mod = load_module(spec.source, self.cache_dir)
        missing = [t.name for t in op.inputs if t.name not in inputs]
        if missing:
            raise ValueError(f"triton target, op {op.name}: missing inputs {missing}")
        device = inputs[op.inputs[0].name].device if op.inputs else torch.device("cuda")
        outputs = {name: torch.empty(binding.shapes[name], dtype=to_torch(op.tensor(name).dtype), device=device)
                   for name in spec.outputs}
        args = [inputs[t.name] for t in op.inputs] + [outputs[n] for n in spec.outputs]
        dims = {f"dim_{d.name}": int(binding.dims[d]) for d in op.dims}
        mod.launch(*args, **dims, **launch_kwargs(cfg))
        return {t.name: outputs[t.name] for t in op.outputs}

    def prepare_group(self, op, binding, device_kind: str):
        """The fused kernel of a group of ``op``'s nodes (a scan's backward: :mod:`.scan_adjoint`) at ``binding``
        as ``(group, call)``, ``call(tensors) -> {member output: tensor}``; None when ``op`` has no such group.
        On CUDA; on CPU tensors only under ``TRITON_INTERPRET=1`` (as :meth:`supports`)."""
        from .scan_adjoint import scan_adjoint_group
        from .scan_adjoint_call import adjoint_call

        if device_kind != "cuda" and not (device_kind == "cpu" and interpreter_enabled()):
            return None
        group = scan_adjoint_group(op)
        if group is None:
            return None
        return group, adjoint_call(group, binding, self.cache_dir)

    def attention_backward(self, op, inputs: Mapping, binding, out, lse, dout, config=None) -> dict:
        """dq, dk, dv of an attention op by the flash backward (its own default config)."""
        group = attention_group(op)
        if group is None:
            raise NotImplementedError(f"the triton target has no attention backward for op {op.name}")
        return run_attention_backward(group, inputs, binding, out, lse, dout, self.cache_dir, self.caps())

    def _caps_or_none(self) -> Caps | None:
        if interpreter_enabled():
            return None
        try:
            return self.caps()
        except Exception:  # noqa: BLE001 (no torch / no device: heuristics use the H100 defaults)
            return None

    def variants(self, op) -> tuple[ScanVariant, ...]:
        """The variants available for ``op`` on this target (none to choose for attention ops; window ops choose
        theirs with the ``variant`` knob of their config)."""
        if attention_group(op) is not None or window_group(op) is not None:
            return ()
        return variants(self._group(op))
