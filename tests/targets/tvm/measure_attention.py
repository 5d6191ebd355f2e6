"""Timing script (not a test) for the TVM flash-attention forward kernel against torch, 1 thread.

    TVM_NUM_THREADS=1 python3 tests/targets/tvm/measure_attention.py [--rounds 7] [--config '{"pv_rows": 6}']

Cases (fp32, B=1, H=4, D=64): sliding window w=256 causal at L=4096 (vs SDPA with a boolean mask and
torch.compile'd FlexAttention with a block mask) and dense causal at L=2048 (vs SDPA is_causal=True and
FlexAttention). Every implementation runs once per round, interleaved, so machine load hits all alike; the
medians of per-call times are printed, measured as process CPU time (``time.process_time``: on a shared machine
wall time mostly measures other processes) and as wall time. Tile tables are written directly for these masks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from opgen import masks  # noqa: E402
from opgen.ir.passes.attention import fuse_attention  # noqa: E402
from opgen.ops.attention import declare_attention, trace  # noqa: E402
from opgen.targets.tvm.attention import AttentionConfig, attention_forward, default_attention_config  # noqa: E402
from opgen.targets.tvm.compile import KernelCache  # noqa: E402


def band_table(L: int, bm: int, bn: int, window: int | None):
    """(count, index, masked) for the causal band ``0 <= i - j < window`` (window None: plain causal)."""
    w = window if window is not None else L
    nq = -(-L // bm)
    rows = []
    for t in range(nq):
        i0, i1 = t * bm, min(L, t * bm + bm) - 1
        ent = []
        for u in range(max(0, (i0 - w + 1) // bn), i1 // bn + 1):
            j0, j1 = u * bn, min(L, u * bn + bn) - 1
            if i1 - j0 >= 0 and i0 - j1 < w:                       # some pair visible
                full = i0 - j1 >= 0 and i1 - j0 < w                # every pair visible
                ent.append((u, 0 if full else 1))
        rows.append(ent)
    W = max(len(r) for r in rows)
    count = torch.zeros(1, 1, nq, dtype=torch.int32)
    index = torch.zeros(1, 1, nq, W, dtype=torch.int32)
    masked = torch.zeros(1, 1, nq, W, dtype=torch.int32)
    for t, ent in enumerate(rows):
        count[0, 0, t] = len(ent)
        for n, (u, m) in enumerate(ent):
            index[0, 0, t, n], masked[0, 0, t, n] = u, m
    return count, index, masked


def _flex(L: int, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if window is None:
        def mm(b, h, qi, ki):
            return qi >= ki
    else:
        def mm(b, h, qi, ki):
            return (qi - ki >= 0) & (qi - ki < window)
    bm = create_block_mask(mm, None, None, L, L, device="cpu")
    fa = torch.compile(flex_attention)
    return lambda q, k, v: fa(q, k, v, block_mask=bm)


def run_case(name: str, L: int, window: int | None, rounds: int, config: dict, flex: bool) -> None:
    B, H, D = 1, 4, 64
    mask = masks.sliding_window(window) if window is not None else masks.causal
    tr = trace("measure", None, mask)
    group = fuse_attention(declare_attention(scale=1 / math.sqrt(D), score=tr.score, mask=tr.mask))
    cfg = default_attention_config(group, {"L": L, "S": L})
    if config:
        cfg = AttentionConfig(**{**cfg.to_json(), **config})
    table = band_table(L, cfg.block_m, cfg.block_n, window)
    cache = KernelCache()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    ins = {"q": q, "k": k, "v": v}
    t0 = time.perf_counter()
    ours = attention_forward(group, ins, table, cfg, cache)["out"]
    compile_s = time.perf_counter() - t0
    impls = {"tvm": lambda: attention_forward(group, ins, table, cfg, cache)}
    i = torch.arange(L)
    if window is None:
        impls["sdpa is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        dense = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
        impls["sdpa bool mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if flex:
        fx = _flex(L, window)
        fx(q, k, v)
        impls["flex (compiled)"] = lambda: fx(q, k, v)
    err = (ours - ref).abs().max().item()
    cpu: dict[str, list[float]] = {n: [] for n in impls}
    wall: dict[str, list[float]] = {n: [] for n in impls}
    for f in impls.values():
        f()
    for _ in range(rounds):
        for n, f in impls.items():
            c0, w0 = time.process_time(), time.perf_counter()
            f()
            cpu[n].append(time.process_time() - c0)
            wall[n].append(time.perf_counter() - w0)
    print(f"\n{name}: L={L} window={window} B={B} H={H} D={D}, config {json.dumps(cfg.to_json())}")
    print(f"  tvm first call (render + compile or load) {compile_s:.2f} s; max |out - sdpa| = {err:.2e}")
    base = statistics.median(cpu["tvm"])
    for n in impls:
        mc, mw = statistics.median(cpu[n]), statistics.median(wall[n])
        print(f"  {n:18s} cpu {mc * 1e3:8.2f} ms   wall {mw * 1e3:8.2f} ms   tvm speedup (cpu) {mc / base:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--config", type=json.loads, default={}, help="AttentionConfig overrides (JSON)")
    ap.add_argument("--no-flex", action="store_true", help="skip torch.compile'd FlexAttention")
    ap.add_argument("--case", choices=("window", "causal", "all"), default="all")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.case in ("window", "all"):
        run_case("sliding window", 4096, 256, a.rounds, a.config, not a.no_flex)
    if a.case in ("causal", "all"):
        run_case("dense causal", 2048, None, a.rounds, a.config, not a.no_flex)


if __name__ == "__main__":
    main()
