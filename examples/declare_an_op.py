"""Declare an op, look at its IR, run it with the reference backend, and check it against plain torch.

    python examples/declare_an_op.py

An op is a Python function whose parameters are annotated with a dtype and named dims (``F32["B D L"]``;
``opgen.Float[...]`` leaves the dtype to be chosen at build time). Its body does not compute anything: it
*declares* the computation with axes (loop indices), indexing (``x[b, d, t]`` is a read) and compute nodes
(``opgen.scan``, ``opgen.compute``, ``opgen.sum``, ...). ``.build()`` turns it into the IR, which every backend
runs; here the reference backend, a torch interpreter of the IR.
"""
import torch
import torch.nn.functional as F

import opgen
from opgen import F32
from opgen.ir import bind
from opgen.targets.reference import evaluate


# --- 1. a minimal gated linear RNN -------------------------------------------------------------------------
#   h[t] = sigmoid(f[t]) * h[t-1] + (1 - sigmoid(f[t])) * x[t]        (h[-1] = 0)
#   y[t] = h[t] * silu(g[t])

@opgen.op
def gated_rnn(f: opgen.Float["B D L"], x: opgen.Float["B D L"], g: opgen.Float["B D L"]):
    b, d, t = opgen.axes("b d t")              # loop indices; their extents are inferred from the reads
    forget = opgen.sigmoid(f[b, d, t])
    h = opgen.scan(t, a=forget, b=(1 - forget) * x[b, d, t])   # h = a * h[prev] + b along t; b, d are lanes
    return {"y": opgen.compute(h[b, d, t] * opgen.silu(g[b, d, t]))}


op = gated_rnn.build(dtype="float32")          # the IR for float32 inputs (Float["..."] params)
print(op.pretty(verified=True))                # nodes, axis extents and how each read stays in bounds
print("fingerprint:", op.fingerprint[:16], "(stable across processes; independent of axis names and the op name)\n")

# Bind concrete sizes (this checks every shape against the declaration), then run on random data.
B, D, L = 2, 3, 50
torch.manual_seed(0)
f, x, g = torch.randn(B, D, L), torch.randn(B, D, L), torch.randn(B, D, L)
binding = bind(op, {"f": f.shape, "x": x.shape, "g": g.shape})
y = evaluate(op, {"f": f, "x": x, "g": g}, binding)["y"]

# The same thing as a plain torch loop.
h = torch.zeros(B, D)
ref = torch.empty(B, D, L)
for t in range(L):
    a = torch.sigmoid(f[..., t])
    h = a * h + (1 - a) * x[..., t]
    ref[..., t] = h * F.silu(g[..., t])
err = (y - ref).abs().max().item()
print(f"gated_rnn: y {tuple(y.shape)} {y.dtype}, max |y - torch loop| = {err:.2e}")
assert err < 1e-5


# --- 2. a scan over a 2-D grid in zigzag order ------------------------------------------------------------
# A scan can visit several axes in any traversal order: row_major, column_major, zigzag (boustrophedon, as in
# PlainMamba), strided (atrous chains). Here: an exponential moving average over the pixels of each channel,
# row by row, alternating direction. The decay is a static (keyword-only) parameter of the op.

@opgen.op
def zigzag_ema(img: F32["C H W"], *, decay: float):
    c, r, w = opgen.axes("c r w")
    H, W = opgen.dims("H W")                   # the same dims the annotation names
    return opgen.scan((r, w), a=decay, b=(1 - decay) * img[c, r, w], traversal=opgen.zigzag((H, W)))


ema = zigzag_ema.build(decay=0.75)
print("\n" + ema.pretty())

C, H, W = 2, 4, 6
# The visiting order itself: a scan with a = 1, b = 1 counts, so h is the visit number of each pixel (declared
# here with the explicit builder, the other way to write an op).
with opgen.OpBuilder("visit_order") as bld:
    im = bld.input("img", opgen.dims("H W"), opgen.DType.f32)
    r, w = opgen.axes("r w")
    order = bld.scan((r, w), a=1.0, b=1.0 + 0.0 * im[r, w], traversal=opgen.zigzag(opgen.dims("H W")))
    order_op = bld.build({"order": order})
img = torch.rand(H, W)
visits = evaluate(order_op, {"img": img}, bind(order_op, {"img": img.shape}))["order"]
print("zigzag visiting order on a 4x6 grid:\n", visits.int())

img = torch.rand(C, H, W)
out = evaluate(ema, {"img": img}, bind(ema, {"img": img.shape}))["out"]
seq = img.clone()
seq[:, 1::2] = seq[:, 1::2].flip(-1)           # boustrophedon: odd rows right to left
seq = seq.reshape(C, H * W)
h, states = torch.zeros(C), []
for s in range(H * W):
    h = 0.75 * h + 0.25 * seq[:, s]
    states.append(h)
ref = torch.stack(states, -1).reshape(C, H, W)
ref[:, 1::2] = ref[:, 1::2].flip(-1)           # back to image layout
err = (out - ref).abs().max().item()
print(f"zigzag_ema: out {tuple(out.shape)}, max |out - torch loop| = {err:.2e}")
assert err < 1e-6
