"""Tuning problems for the library's fused scans on a compiled backend (TVM on CPU, Triton on CUDA).

``make_problem(op, dims, backend)`` is the factory the measuring child process calls (its arguments are JSON).
Inputs are made from the seed inside the process; the reference backend gives the expected outputs.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Mapping

from opgen.schedules import Space

from .call_config import _space, key_parts, lookup_config  # noqa: F401 (re-exported)
from .key import KeyParts
from .problem import ProblemSpec

#: dims each op's ``--shape`` must give
SHAPE_DIMS = {"linear_scan": ("C", "L"), "selective_scan": ("B", "D", "N", "L"), "chunk_gla": ("B", "T", "H", "K", "V"),
              "attention": ("B", "H", "L", "D"), "long_conv": ("B", "H", "L", "Lk"), "causal_conv1d": ("B", "D", "L", "W"),
              "depthwise_conv2d": ("N", "C", "H", "W", "K"), "conv2d": ("N", "C", "F", "H", "W", "K")}

#: dims a ``--shape`` may add (with their defaults): the stride and groups of a dense conv2d
OPTIONAL_DIMS = {"conv2d": {"S": 1, "G": 1}}

#: the mods of the tuned attention problem (the library example: ALiBi scores, causal 256-key sliding window)
ATTENTION_WINDOW = 256


def _inputs(op_name: str, dims: Mapping[str, int], dtype, gen) -> tuple[Any, dict]:
    import torch

    from opgen.ir import as_dtype
    from opgen.ops.scan import declare_chunk_gla, declare_linear_scan, declare_selective_scan

    dt = as_dtype(dtype)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    u01 = lambda *s: torch.rand(*s, generator=gen).to(dtype)  # noqa: E731
    if op_name == "linear_scan":
        c, n = dims["C"], dims["L"]
        return declare_linear_scan(dt, dt), {"a": (u01(c, n, 1) * 0.1 + 0.9), "b": r(c, n, 1)}
    if op_name == "selective_scan":
        b, d, n, n_l = dims["B"], dims["D"], dims["N"], dims["L"]
        op = declare_selective_scan(dt, dt, dt, dt, dt, "variable", "variable", dt, dt, dt, True, True)
        return op, {"u": r(b, d, n_l), "delta": r(b, d, n_l) * 0.5, "A": -u01(d, n), "B": r(b, n, n_l),
                    "C": r(b, n, n_l), "D": r(d), "z": r(b, d, n_l), "delta_bias": r(d) * 0.1}
    if op_name == "chunk_gla":
        b, t, h, k, v = dims["B"], dims["T"], dims["H"], dims["K"], dims["V"]
        op = declare_chunk_gla(dt, dt, dt, dt, k ** -0.5, None, True)
        g = torch.nn.functional.logsigmoid(r(b, t, h, k).float()).to(dtype) / 16
        return op, {"q": r(b, t, h, k), "k": r(b, t, h, k), "v": r(b, t, h, v), "g": g}
    if op_name == "attention":
        return _attention_inputs(dims, dt, r)
    if op_name in _CONVS:
        return _conv_inputs(op_name, dims, dt, r)
    raise ValueError(f"no tuning problem for op {op_name!r}; tunable: {sorted(SHAPE_DIMS)}")


def _attention_inputs(dims: Mapping[str, int], dt, r) -> tuple[Any, dict]:
    """The library's attention example (ALiBi, sliding window) at ``dims``, declared as a user call would."""
    from opgen import masks, scores
    from opgen.ir import accum_dtype
    from opgen.ops.attention import declare_attention, trace

    b, h, n, d = dims["B"], dims["H"], dims["L"], dims["D"]
    slopes = scores.alibi_slopes(h)
    t = trace("opgen tune attention", scores.alibi(slopes), masks.sliding_window(ATTENTION_WINDOW), accum_dtype(dt))
    caps = tuple((accum_dtype(dt), c) for c in t.capture_dims)
    op = declare_attention(dt, dt, dt, float(1.0 / d ** 0.5), False, t.score, t.mask, caps)
    return op, {"q": r(b, h, n, d), "k": r(b, h, n, d), "v": r(b, h, n, d), "capture0": slopes}


_CONVS = ("long_conv", "causal_conv1d", "depthwise_conv2d", "conv2d")


def _conv_inputs(op_name: str, dims: Mapping[str, int], dt, r) -> tuple[Any, dict]:
    """The library convolutions: long_conv (Hyena), causal_conv1d (Mamba, with bias and silu), a depthwise
    K x K conv2d with bias and "same" padding (ConvNeXt / RepLKNet), and a dense (or grouped: G) C -> F K x K
    conv2d with padding K // 2, stride S and no bias (ResNet; the op ``opgen.ops.conv2d(x, w, stride=S,
    padding=K // 2, groups=G)`` runs)."""
    from opgen.ops.conv import declare_causal_conv1d, declare_conv2d, declare_depthwise_conv2d, declare_long_conv

    if op_name == "long_conv":
        b, h, n, k = dims["B"], dims["H"], dims["L"], dims["Lk"]
        return declare_long_conv(dt, dt), {"u": r(b, h, n), "k": r(h, k) / k ** 0.5}
    if op_name == "causal_conv1d":
        b, d, n, w = dims["B"], dims["D"], dims["L"], dims["W"]
        return declare_causal_conv1d(dt, dt, dt, "silu"), {"x": r(b, d, n), "weight": r(d, w), "bias": r(d)}
    n, c, hh, ww, k = dims["N"], dims["C"], dims["H"], dims["W"], dims["K"]
    p = k // 2
    if op_name == "conv2d":
        f, s, g = dims["F"], dims.get("S", 1), dims.get("G", 1)
        if c % g or f % g:
            raise ValueError(f"opgen tune conv2d: groups G={g} must divide C={c} and F={f}")
        op = declare_conv2d(dt, dt, None, (s, s), (p, p, p, p), (1, 1), g)
        return op, {"x": r(n, c, hh, ww), "weight": r(f, c // g, k, k) / (k * (c // g) ** 0.5)}
    op = declare_depthwise_conv2d(dt, dt, dt, (1, 1), (p, p, p, p), (1, 1))     # what opgen.ops.conv runs for groups=C
    return op, {"x": r(n, c, hh, ww), "weight": r(c, k, k) / k, "bias": r(c)}


def _target(backend: str, cache_dir: str | None):
    if backend == "tvm":
        from opgen.targets.tvm import TVMTarget

        return TVMTarget(cache_dir=cache_dir)
    if backend == "triton":
        from opgen.targets.triton import TritonTarget

        return TritonTarget(cache_dir=cache_dir)
    raise ValueError(f"unknown backend {backend!r}; expected 'tvm' or 'triton'")


class LibraryProblem:
    """One library scan at concrete dims on one backend."""

    def __init__(self, op: str, dims: Mapping[str, int], backend: str, dtype: str = "float32", seed: int = 0,
                 cache_dir: str | None = None) -> None:
        import torch

        self.spec = ProblemSpec("opgen.tune.library:make_problem",
                                {"op": op, "dims": dict(dims), "backend": backend, "dtype": dtype, "seed": seed,
                                 "cache_dir": cache_dir})
        self.op_name, self.dims, self.backend = op, dict(dims), backend
        if op not in SHAPE_DIMS:
            raise ValueError(f"no tuning problem {op!r}; tunable: {', '.join(SHAPE_DIMS)}")
        missing = [d for d in SHAPE_DIMS[op] if d not in dims]
        if missing:
            raise ValueError(f"opgen tune {op}: --shape needs {', '.join(SHAPE_DIMS[op])} (missing {missing})")
        unknown = sorted(set(dims) - set(SHAPE_DIMS[op]) - set(OPTIONAL_DIMS.get(op, {})))
        if unknown:
            optional = ", ".join(f"{k} (default {v})" for k, v in OPTIONAL_DIMS.get(op, {}).items())
            raise ValueError(f"opgen tune {op}: unknown --shape dims {unknown}; it takes {', '.join(SHAPE_DIMS[op])}"
                             + (f" and optionally {optional}" if optional else ""))
        gen = torch.Generator().manual_seed(seed)
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        self.op, inputs = _inputs(op, dims, getattr(torch, dtype), gen)
        self.inputs = {k: v.to(device) for k, v in inputs.items()}
        self._attach(backend, cache_dir)

    def _attach(self, backend: str, cache_dir: str | None) -> None:
        """Bind the inputs' sizes, open the backend and its schedule space."""
        from opgen.ir import bind

        self.binding = bind(self.op, {k: tuple(v.shape) for k, v in self.inputs.items()})
        self.target = _target(backend, cache_dir)
        ok, why = self.target.available()
        if not ok:
            raise RuntimeError(f"backend {backend} is not available here: {why}")
        self._space, self._to_config = _space(self.target, self.op, self.binding)

    def key_parts(self) -> KeyParts:
        return key_parts(self.op, self.binding, self.target)

    def space(self) -> Space:
        return self._space

    def build(self, config: Mapping[str, Any]) -> Callable[[], Any]:
        cfg = self._to_config(config)
        run = lambda: self.target.run(self.op, self.inputs, self.binding, cfg)  # noqa: E731
        run()  # compile now: a failure is a compile error of this config, not a wrong result
        return run

    def reference(self) -> Any:
        from opgen.targets.reference import evaluate

        return evaluate(self.op, self.inputs, self.binding)


def baseline_ms(problem: LibraryProblem, repeats: int = 5) -> tuple[float, str]:
    """Median ms of the torch formulation a user would otherwise run, on the problem's inputs."""
    import statistics
    import time

    import torch

    x = problem.inputs
    if problem.op_name == "linear_scan":
        name, fn = "torch cumprod/cumsum", lambda: (lambda p: p * torch.cumsum(x["b"] / p, 1))(torch.cumprod(x["a"], 1))
    elif problem.op_name == "selective_scan":
        from opgen.bench.baselines import _ss_loop

        name = "torch reference loop"
        fn = lambda: _ss_loop(x["u"], x["delta"] + x["delta_bias"][:, None], x["A"], x["B"], x["C"], x["D"],  # noqa
                              x["z"])
    elif problem.op_name == "attention":
        import torch.nn.functional as F

        from opgen import masks, scores

        n, heads = x["q"].shape[2], x["q"].shape[1]
        i, j = torch.arange(n).view(1, 1, n, 1), torch.arange(n).view(1, 1, 1, n)
        bias = scores.alibi(x["capture0"])(torch.zeros(()), 0, torch.arange(heads).view(1, heads, 1, 1), i, j)
        keep = masks.sliding_window(ATTENTION_WINDOW)(0, 0, i, j)
        bias = bias.masked_fill(~keep, float("-inf"))
        name, fn = "SDPA with a dense bias + boolean mask", lambda: F.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], attn_mask=bias)
    elif problem.op_name in _CONVS:
        name, fn = _conv_baseline(problem.op_name, x, problem.dims)
    else:
        def fn():
            q, k, v, g = x["q"], x["k"], x["v"], x["g"]
            s, outs = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3]), []
            for i in range(q.shape[1]):
                s = s * g[:, i].exp()[..., None] + k[:, i, :, :, None] * v[:, i, :, None, :]
                outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * q.shape[3] ** -0.5, s))
            return torch.stack(outs, 1)
        name = "torch recurrent loop"
    times = []
    with torch.no_grad():
        fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), name


def _conv_baseline(op_name: str, x: Mapping[str, Any], dims: Mapping[str, int]) -> tuple[str, Callable[[], Any]]:
    """What a user would otherwise run: a torch.fft convolution, F.conv1d with padding and slicing, F.conv2d."""
    import torch
    import torch.nn.functional as F

    if op_name == "long_conv":
        u, k = x["u"], x["k"]
        n = 2 * u.shape[-1]
        return "torch.fft convolution", lambda: torch.fft.irfft(
            torch.fft.rfft(u, n) * torch.fft.rfft(k, n), n)[..., :u.shape[-1]]
    if op_name == "causal_conv1d":
        w = x["weight"]
        return "F.conv1d + pad/slice, silu", lambda: F.silu(F.conv1d(
            x["x"], w[:, None], x["bias"], padding=w.shape[1] - 1, groups=w.shape[0])[..., :x["x"].shape[-1]])
    if op_name == "conv2d":
        w = x["weight"]
        return "F.conv2d (oneDNN)", lambda: F.conv2d(x["x"], w, None, stride=dims.get("S", 1), padding=w.shape[-1] // 2,
                                                     groups=dims.get("G", 1))
    w = x["weight"][:, None]
    return "F.conv2d", lambda: F.conv2d(x["x"], w, x["bias"], padding=w.shape[-1] // 2, groups=w.shape[0])


class IRProblem(LibraryProblem):
    """A user-declared op (``factory`` = ``"module:function"`` returning an :class:`~opgen.ir.Op`) at ``dims``;
    inputs are drawn from N(0, 1) (``uniform`` names draw from U(0, 1))."""

    def __init__(self, factory: str, dims: Mapping[str, int], backend: str = "tvm", seed: int = 0,
                 cache_dir: str | None = None, uniform: tuple[str, ...] = ()) -> None:
        import torch

        from opgen.ir.dtypes import to_torch
        from opgen.ir.index import evaluate_int

        self.spec = ProblemSpec("opgen.tune.library:make_ir_problem",
                                {"factory": factory, "dims": dict(dims), "backend": backend, "seed": seed,
                                 "cache_dir": cache_dir, "uniform": list(uniform)})
        self.op = _load(factory)()
        self.op_name, self.dims, self.backend = self.op.name, dict(dims), backend
        gen = torch.Generator().manual_seed(seed)
        by_name = {d.name: d for d in self.op.dims}
        values = {by_name[k]: v for k, v in dims.items() if k in by_name}
        self.inputs = {}
        for t in self.op.inputs:
            shape = tuple(evaluate_int(s, values) for s in t.shape)
            draw = torch.rand if t.name in uniform else torch.randn
            self.inputs[t.name] = draw(*shape, generator=gen).to(to_torch(t.dtype))
        self._attach(backend, cache_dir)


def _load(path: str):
    import importlib

    module, _, fn = path.partition(":")
    obj = importlib.import_module(module)
    for part in fn.split("."):
        obj = getattr(obj, part)
    return obj


def make_ir_problem(**kwargs) -> IRProblem:
    """The factory named in :attr:`IRProblem.spec`."""
    kwargs["uniform"] = tuple(kwargs.get("uniform", ()))
    return IRProblem(**kwargs)


def make_problem(**kwargs) -> LibraryProblem:
    """The factory named in :attr:`LibraryProblem.spec`."""
    return LibraryProblem(**kwargs)


__all__ = ["LibraryProblem", "make_problem", "SHAPE_DIMS", "asdict"]
