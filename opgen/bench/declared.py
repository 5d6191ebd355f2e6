"""Benchmark cases for ops a user declares with ``@opgen.op``: each is the same computation as a library op, so
the ratio says what the generic bridge costs (forward, and forward+backward, which must stay within 2x of the
library op), with the torch formulation a user would otherwise write beside it; and the per-call overhead of a
small declared op against the kernel alone."""
from __future__ import annotations

from opgen import Float    # (module level: the declarations' annotations are strings under `annotations`)

from .baselines import ss_loop_plain
from .protocol import CaseResult, Impl, measure


def _declarations():
    """The declarations (made on first use: declaring registers torch ops)."""
    import opgen

    @opgen.op
    def declared_selective_scan(u: Float["B D L"], delta: Float["B D L"], A: Float["D N"], Bm: Float["B N L"],
                                C: Float["B N L"], D: Float["D"]):
        """Mamba's selective scan as a user writes it (the design's sketch, plus the skip term)."""
        b, d, n, t = opgen.axes("b d n t")
        h = opgen.scan(t, a=opgen.exp(delta[b, d, t] * A[d, n]), b=delta[b, d, t] * Bm[b, n, t] * u[b, d, t],
                       state=n, axes=(b, d, n, t))
        y = opgen.sum(n, h[b, d, n, t] * C[b, n, t], axes=(b, d, t))
        return opgen.compute(y[b, d, t] + D[d] * u[b, d, t], (b, d, t))

    @opgen.op
    def declared_ema(x: Float["B L"]):
        """A small op for the per-call overhead: an exponential moving average."""
        b, t = opgen.axes("b t")
        return opgen.scan(t, a=0.9, b=0.1 * x[b, t])

    return declared_selective_scan, declared_ema


def declared_cases(repeats: int, quick: bool) -> list[CaseResult]:
    """Declared selective scan vs the library op (fwd, fwd+bwd) and vs torch; a small declared op's call cost."""
    import torch

    import opgen

    ssm, ema = _declarations()
    b, d, n, length = (1, 64, 8, 256) if quick else (2, 256, 16, 512)
    u, delta = torch.randn(b, d, length), torch.rand(b, d, length) * 0.1
    A, B, C, D = -torch.rand(d, n), torch.randn(b, n, length), torch.randn(b, n, length), torch.randn(d)
    lib = lambda u, dl, A, B, C, D: opgen.ops.selective_scan(u, dl, A, B, C, D=D)   # noqa: E731
    loop = ss_loop_plain
    args = (u, delta, A, B, C, D)
    shape = f"B={b} D={d} N={n} L={length}"
    out = [measure("declared", f"selective_scan {shape} fwd fp32",
                   [Impl("opgen", lambda: ssm(*args)), Impl("library opgen.ops.selective_scan", lambda: lib(*args)),
                    Impl("torch reference loop", lambda: loop(*args))], repeats)]
    leaves = [x.clone().requires_grad_() for x in args]

    def fwd_bwd(fn):
        def run():
            for x in leaves:
                x.grad = None
            with torch.enable_grad():
                fn(*leaves).sum().backward()
            return leaves[1].grad
        return run

    out.append(measure("declared", f"selective_scan {shape} fwd+bwd fp32",
                       [Impl("opgen", fwd_bwd(ssm)), Impl("library opgen.ops.selective_scan", fwd_bwd(lib)),
                        Impl("torch autograd of the reference loop", fwd_bwd(loop))], max(3, repeats // 2)))
    out.append(call_overhead(ema, repeats))
    return out


def call_overhead(ema, repeats: int) -> CaseResult:
    """Microseconds per call of a small declared op (8 x 16) against its prepared kernel called directly and a
    torch op of the same size (medians of 200-call batches)."""
    import torch

    from opgen.runtime import default_session

    x = torch.randn(8, 16)
    op = ema.build()
    ema(x)
    sess = default_session()
    sess.run(op, {"x": x})
    prepared = next(v[1] for v in sess._prepared.values() if v[0] is op)    # noqa: SLF001 (measuring the kernel)
    ins = {"x": x}

    def batch(fn):
        def run():
            for _ in range(199):
                fn()
            return fn()
        return run

    res = measure("declared", "call cost of a small op (ema 8x16), 200 calls: ms/200 = us a call",
                  [Impl("opgen", batch(lambda: ema(x))),
                   Impl("its prepared kernel alone", batch(lambda: prepared(ins)), same_op=False),
                   Impl("torch x.cumsum(1)", batch(lambda: x.cumsum(1)), same_op=False)], repeats)
    res.notes["opgen"] = f"{(res.ms['opgen'] - res.ms['its prepared kernel alone']) * 5:.1f} us above the kernel"
    return res
