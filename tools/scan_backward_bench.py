"""The fused scan backward against its forward and against the node-by-node generated backward (issue 22).

    python tools/scan_backward_bench.py THREADS       # TVM_NUM_THREADS=1 for one thread

Interleaved medians (wall time) in one process: selective_scan at Mamba's goal size and at D=512 L=1024 (also with
the fused group disabled: the backward op run node by node, as before), chunk_gla against torch autograd of a
chunked torch GLA, and the declared minGRU / SSD scans of examples/declared_rnns.py. Writes
``/tmp/b22/res_<THREADS>.json``. The model-shaped blocks are in ``opgen bench training``.
"""
import os, sys, time, statistics, json
import torch

threads = int(sys.argv[1])
torch.set_num_threads(threads)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from opgen.ops import selective_scan, chunk_gla
import opgen.runtime as rt

def med(xs): return statistics.median(xs) * 1e3

def timeit(fns, reps):
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            s = time.perf_counter(); f(); out[k].append(time.perf_counter() - s)
    return {k: med(v) for k, v in out.items()}

res = {}
# ---- selective_scan
def ss_case(B, D, N, L, reps, unfused=False):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, D, L, generator=g), torch.randn(B, D, L, generator=g) * 0.5, -torch.rand(D, N, generator=g) - 0.5,
          torch.randn(B, N, L, generator=g), torch.randn(B, N, L, generator=g), torch.randn(D, generator=g),
          torch.randn(B, D, L, generator=g), torch.randn(D, generator=g)]
    xs = [x.requires_grad_() for x in xs]
    gy = torch.randn(B, D, L, generator=g)
    def fw():
        with torch.no_grad(): selective_scan(*xs, delta_softplus=True)
    def fb():
        for x in xs: x.grad = None
        selective_scan(*xs, delta_softplus=True).backward(gy)
    fw(); fb()
    return timeit({"fwd": fw, "fwd+bwd": fb}, reps)
r = ss_case(2, 1536, 16, 2048, 5)
res["selective_scan B2 D1536 N16 L2048"] = r
print("selective_scan goal", r, "ratio", r["fwd+bwd"] / r["fwd"], flush=True)
r = ss_case(2, 512, 16, 1024, 7)
res["selective_scan B2 D512 N16 L1024"] = r
print("selective_scan D512 L1024", r, "ratio", r["fwd+bwd"] / r["fwd"], flush=True)
# unfused (the node-by-node generated backward, as before): disable the group plan
orig = rt.Session._group_plan
rt.Session._group_plan = lambda self, op, b, d: {}
import opgen.bridge as br
br._grad_groups.cache_clear()
rt.default_session()._bindings.clear()
r = ss_case(2, 512, 16, 1024, 3)
res["selective_scan B2 D512 N16 L1024 unfused"] = r
print("unfused D512 L1024", r, "ratio", r["fwd+bwd"] / r["fwd"], flush=True)
rt.Session._group_plan = orig
rt.default_session()._bindings.clear()
# ---- chunk_gla vs torch chunked autograd
def torch_chunk(q, k, v, g, scale, C=64):
    q, k, v, g = [x.transpose(1, 2) for x in (q, k, v, g)]
    Bq, Hq, Tq, Kq = q.shape
    S = q.new_zeros(Bq, Hq, Kq, v.shape[-1]); outs = []
    mask = torch.tril(torch.ones(C, C, dtype=torch.bool))
    for s in range(0, Tq, C):
        qc, kc, vc, gc = q[:, :, s:s+C], k[:, :, s:s+C], v[:, :, s:s+C], g[:, :, s:s+C]
        n = qc.shape[2]
        gcum = gc.cumsum(2)
        qg = qc * torch.exp(gcum) * scale
        A = (qg @ (kc * torch.exp(-gcum)).transpose(-1, -2)).masked_fill(~mask[:n, :n], 0)
        outs.append(qg @ S + A @ vc)
        S = S * torch.exp(gcum[:, :, -1]).unsqueeze(-1) + (kc * torch.exp(gcum[:, :, -1:] - gcum)).transpose(-1, -2) @ vc
    return torch.cat(outs, 2).transpose(1, 2)
B, T, H, K, V = 2, 1024, 8, 64, 64
g0 = torch.Generator().manual_seed(1)
xs = [torch.randn(B, T, H, K, generator=g0) * 0.5, torch.randn(B, T, H, K, generator=g0) * 0.5,
      torch.randn(B, T, H, V, generator=g0), -torch.rand(B, T, H, K, generator=g0) * 0.1]
a = [x.clone().requires_grad_() for x in xs]; b = [x.clone().requires_grad_() for x in xs]
go = torch.randn(B, T, H, V, generator=g0)
def o_f():
    with torch.no_grad(): chunk_gla(*a, scale=0.125)
def o_fb():
    for x in a: x.grad = None
    chunk_gla(*a, scale=0.125)[0].backward(go)
def t_fb():
    for x in b: x.grad = None
    torch_chunk(*b, 0.125).backward(go)
o_fb(); t_fb()
err = max(((x.grad - y.grad).abs().max() / y.grad.abs().max()).item() for x, y in zip(a, b))
r = timeit({"fwd": o_f, "fwd+bwd": o_fb, "torch chunked fwd+bwd": t_fb}, 5)
r["max grad rel diff"] = err
res["chunk_gla B2 T1024 H8 K=V=64"] = r
print("chunk_gla", r, "speedup", r["torch chunked fwd+bwd"] / r["fwd+bwd"], flush=True)
# ---- declared ops
import declared_rnns as dr
for name, op, shapes in [("min_gru B2 L1024 D512", dr.min_gru, [(2, 1024, 512), (2, 1024, 512)]),
                         ("ssd_scan B2 L1024 H8 P64 G1 N16", dr.ssd_scan, [(2, 1024, 8, 64), (2, 1024, 8), (8,), (2, 1024, 1, 16), (2, 1024, 1, 16), (8,)])]:
    g1 = torch.Generator().manual_seed(2)
    xs = [torch.randn(*s, generator=g1) * 0.5 for s in shapes]
    if len(xs) > 2:
        xs[1] = torch.rand(*shapes[1], generator=g1) * 0.1; xs[2] = -torch.rand(8, generator=g1)
    xs = [x.requires_grad_() for x in xs]
    def fw():
        with torch.no_grad(): op(*xs)
    def fb():
        for x in xs: x.grad = None
        op(*xs).sum().backward()
    fw(); fb()
    r = timeit({"fwd": fw, "fwd+bwd": fb}, 5)
    res[name] = r
    print(name, r, "ratio", r["fwd+bwd"] / r["fwd"], flush=True)
os.makedirs("/tmp/b22", exist_ok=True)
with open(f"/tmp/b22/res_{threads}.json", "w") as f:
    json.dump(res, f, indent=1)
