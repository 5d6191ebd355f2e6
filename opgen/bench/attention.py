"""The attention cases of ``opgen bench``: opgen's block-sparse kernels against SDPA and compiled FlexAttention.

Every case runs in one process, interleaved (see :mod:`opgen.bench.protocol`). Baselines get their set-up outside
the timed region (SDPA's boolean mask, FlexAttention's ``create_block_mask``); the set-up costs are reported as
notes beside opgen's, whose tile table is derived from the mask predicate once per shape and cached.
"""
from __future__ import annotations

import time
from .protocol import CaseResult, Impl, measure


def _dense_mask(mask_mod, length: int, kv_length: int):
    import torch

    i = torch.arange(length)[:, None]
    j = torch.arange(kv_length)[None, :]
    return mask_mod(0, 0, i, j)


def _flex(q, k, v, mask_mod, length: int, kv_length: int) -> tuple[Impl, float] | None:
    """Compiled FlexAttention with its block mask (None when flex_attention cannot run here)."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    t0 = time.perf_counter()
    block = create_block_mask(mask_mod, None, None, length, kv_length, device="cpu")
    setup = time.perf_counter() - t0
    fn = torch.compile(flex_attention, fullgraph=True)
    t0 = time.perf_counter()
    try:
        fn(q, k, v, block_mask=block)
    except Exception:  # noqa: BLE001 - flex on CPU needs a C++ compiler; report the case without it
        return None
    return Impl("compiled FlexAttention", lambda: fn(q, k, v, block_mask=block), time.perf_counter() - t0), setup


def _opgen(q, k, v, mask_mod, **kw) -> tuple[Impl, float]:
    """opgen's attention; the first call (tile table from the predicate, kernel compile) is timed apart."""
    import opgen

    t0 = time.perf_counter()
    opgen.ops.attention(q, k, v, mask_mod=mask_mod, **kw)
    first = time.perf_counter() - t0
    return Impl("opgen", lambda: opgen.ops.attention(q, k, v, mask_mod=mask_mod, **kw)), first


def _mask_case(op: str, case: str, q, k, v, mask_mod, repeats: int, with_flex: bool) -> CaseResult:
    import torch.nn.functional as F

    length, kv_length = q.shape[2], k.shape[2]
    ours, first = _opgen(q, k, v, mask_mod)
    t0 = time.perf_counter()
    dense = _dense_mask(mask_mod, length, kv_length)
    dense_setup = time.perf_counter() - t0
    impls = [ours, Impl("SDPA, boolean mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense))]
    flex = _flex(q, k, v, mask_mod, length, kv_length) if with_flex else None
    if flex is not None:
        impls.append(flex[0])
    res = measure(op, case, impls, repeats)
    res.notes["opgen"] = (f"first call {first * 1e3:.0f} ms (tile table + kernel build, cached per shape); "
                          f"mask set-up at run time: 0")
    res.notes["SDPA, boolean mask"] = f"dense L x S mask built in {dense_setup * 1e3:.1f} ms (untimed)"
    if flex is not None:
        res.notes["compiled FlexAttention"] = (f"compile {flex[0].compile_s:.1f} s; create_block_mask "
                                               f"{flex[1] * 1e3:.1f} ms per mask (untimed)")
    return res


def attention_cases(repeats: int, quick: bool) -> list[CaseResult]:
    """Sliding window, 2-D neighborhood and dense causal attention, fp32, B=1, H=4, D=64."""
    import torch
    import torch.nn.functional as F

    from opgen import masks

    import opgen

    b, h, d = 1, 4, 64
    out = []
    length, window = (512, 64) if quick else (4096, 256)
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    out.append(_mask_case("attention", f"sliding window w={window} causal, L={length}, B={b} H={h} D={d} fp32",
                          q, k, v, masks.sliding_window(window), repeats, with_flex=not quick))
    side = 24 if quick else 64
    q, k, v = (torch.randn(b, h, side * side, d) for _ in range(3))
    out.append(_mask_case("attention", f"neighborhood 2-D 7x7 on {side}x{side} tokens, B={b} H={h} D={d} fp32",
                          q, k, v, masks.neighborhood_2d(side, side, 7), repeats, with_flex=not quick))
    length, window = (512, 64) if quick else (4096, 256)
    out.append(_fwd_bwd_case(b, h, d, length, masks.sliding_window(window), repeats, with_flex=not quick))
    for images, side, channels, heads in ([(2, 14, 96, 3)] if quick else [(8, 56, 96, 3), (8, 28, 192, 6)]):
        out.append(swin_window_case(images, side, channels, heads, repeats))
    length = 256 if quick else 2048
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    impls = [Impl("opgen", lambda: opgen.ops.attention(q, k, v, mask_mod=masks.causal)),
             Impl("SDPA is_causal=True", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
    out.append(measure("attention", f"dense causal L={length}, B={b} H={h} D={d} fp32", impls, repeats))
    return out


def _fwd_bwd_case(b: int, h: int, d: int, length: int, mask_mod, repeats: int, with_flex: bool) -> CaseResult:
    """Forward + backward (the gradient of q is compared) against autograd through SDPA with a boolean mask and
    through compiled FlexAttention."""
    import torch
    import torch.nn.functional as F

    import opgen

    leaves = [torch.randn(b, h, length, d).requires_grad_() for _ in range(3)]
    dout = torch.randn(b, h, length, d)
    dense = _dense_mask(mask_mod, length, length)

    def step(fn):
        def run():
            for x in leaves:
                x.grad = None
            with torch.enable_grad():
                fn(*leaves).backward(dout)
            return leaves[0].grad
        return run

    impls = [Impl("opgen", step(lambda q, k, v: opgen.ops.attention(q, k, v, mask_mod=mask_mod))),
             Impl("SDPA, boolean mask (autograd)", step(lambda q, k, v: F.scaled_dot_product_attention(
                 q, k, v, attn_mask=dense)))]
    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block = create_block_mask(mask_mod, None, None, length, length, device="cpu")
            flex = torch.compile(flex_attention, fullgraph=True)
            run = step(lambda q, k, v: flex(q, k, v, block_mask=block))
            run()
            impls.append(Impl("compiled FlexAttention (autograd)", run))
        except Exception:  # noqa: BLE001 - flex backward unavailable on this build: report without it
            pass
    return measure("attention", f"sliding window fwd+bwd, L={length}, B={b} H={h} D={d} fp32", impls,
                   max(3, repeats // 2))


def relative_position_index(window: int):
    """Swin's relative_position_index for a ``window x window`` window ([window**2, window**2] int64)."""
    import torch

    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def swin_window_case(images: int, side: int, channels: int, heads: int, repeats: int,
                     window: int = 7) -> CaseResult:
    """A Swin block's window attention, forward + backward with a learnable relative-position bias table
    ``[(2M-1)^2, heads]`` indexed by the relative_position_index: opgen with ``score_mod = s + table[index[q, kv],
    h]`` (the table gets its gradient from the flash backward) against SDPA on the window partitions with the
    gathered bias as an additive float mask (autograd through the gather). Compared: the table's gradient."""
    import torch
    import torch.nn.functional as F

    import opgen

    m = window
    n = m * m
    windows = images * (side // m) ** 2
    d = channels // heads
    index = relative_position_index(m)
    table = (torch.randn((2 * m - 1) ** 2, heads) * 0.02).requires_grad_()
    leaves = [torch.randn(windows, heads, n, d).requires_grad_() for _ in range(3)]
    dout = torch.randn(windows, heads, n, d)

    def score_mod(s, b, h, q_idx, kv_idx):
        return s + table[index[q_idx, kv_idx], h]

    def step(fn):
        def run():
            for x in (*leaves, table):
                x.grad = None
            with torch.enable_grad():
                fn(*leaves).backward(dout)
            return table.grad
        return run

    def sdpa(q, k, v):
        bias = table[index.reshape(-1)].view(n, n, heads).permute(2, 0, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    impls = [Impl("opgen", step(lambda q, k, v: opgen.ops.attention(q, k, v, score_mod=score_mod))),
             Impl("SDPA on window partitions, float bias mask (autograd)", step(sdpa))]
    return measure("attention", f"Swin window attention fwd+bwd, learnable bias table, window {m}, {images} images "
                   f"{side}x{side} C={channels} heads={heads} ({windows} windows of {n} tokens, D={d}) fp32",
                   impls, repeats)
