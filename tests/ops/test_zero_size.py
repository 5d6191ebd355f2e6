"""Zero-size dims (batch, length, channels, state, heads, ...) give what torch gives: empty outputs of the right
shapes and dtypes, zeros where a sum is empty, and gradients (empty or zero) through autograd; where torch
itself raises (an empty spatial input or kernel in conv2d, a zero filter width), opgen raises ArgumentError.

References are float64 torch formulations written here (loops that also run at size 0), ``F.conv2d`` and
``F.scaled_dot_product_attention``. Fresh random data; float64 inputs, tolerance 1e-9.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import opgen
import opgen.ops as ops


def _gen() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def _leaves(g: torch.Generator, *shapes) -> list:
    return [None if s is None else torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
            for s in shapes]


def _same(fn_got, fn_ref, inputs: list, seed: int, what: str) -> None:
    """Outputs and gradients (for a fresh random output gradient) of ``fn_got`` and ``fn_ref`` agree."""
    got = fn_got(*inputs)
    got = got if isinstance(got, tuple) else (got,)
    assert all(o.requires_grad for o in got), f"{what} (seed={seed}): an output is not differentiable"
    ins = [x for x in inputs if x is not None]
    ref_ins = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    ref = fn_ref(*ref_ins)
    ref = ref if isinstance(ref, tuple) else (ref,)
    g = torch.Generator().manual_seed(seed + 1)
    douts = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]
    for o, r in zip(got, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, f"{what} (seed={seed}): {o.shape}/{o.dtype} != " \
                                                          f"{r.shape}/{r.dtype}"
        torch.testing.assert_close(o, r, atol=1e-9, rtol=1e-9, msg=lambda m: f"{what} (seed={seed}): {m}")
    pairs = [(o, d) for o, d in zip(got, douts) if o.requires_grad]
    gs = torch.autograd.grad([o for o, _ in pairs], ins, [d for _, d in pairs], allow_unused=True)
    rpairs = [(r, d) for r, d in zip(ref, douts) if r.requires_grad]
    rins = [x for x in ref_ins if x is not None]
    rgs = torch.autograd.grad([r for r, _ in rpairs], rins, [d for _, d in rpairs], allow_unused=True) \
        if rpairs else [None] * len(rins)
    for k, (a, b, x) in enumerate(zip(gs, rgs, ins)):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert a.shape == x.shape, f"{what} (seed={seed}): grad {k} shape {a.shape} != {x.shape}"
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"{what} grad {k} (seed={seed}): {m}")


# ------------------------------------------------------------------------------------------------ references

def _ref_linear_scan(a, b, initial=None):
    h = torch.zeros_like(b[..., 0]) if initial is None else initial
    out = torch.zeros_like(b)
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out = out.index_copy(-1, torch.tensor([t]), h[..., None])
    return out


def _at(X, t, dim):
    """B or C at step t, broadcastable to [batch, dim, N] (layouts [dim, N], [batch, N, L], [batch, G, N, L])."""
    if X.dim() == 2:
        return X[None]
    if X.dim() == 3:
        return X[:, None, :, t]
    return X[:, :, :, t].repeat_interleave(dim // X.shape[1], 1)


def _ref_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    bsz, dim, length = u.shape
    h = u.new_zeros(bsz, dim, A.shape[1])
    ys = []
    for t in range(length):
        bt, ct = _at(B, t, dim), _at(C, t, dim)
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * bt * u[:, :, t, None]
        ys.append((h * ct).sum(-1))
    y = torch.stack(ys, 2) if ys else u.new_zeros(bsz, dim, 0)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def _ref_chunk_gla(q, k, v, g, initial_state=None):
    b, t, h, kd = q.shape
    s = q.new_zeros(b, h, kd, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for i in range(t):
        s = s * g[:, i].exp()[..., None] + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * (kd ** -0.5 if kd else 1.0), s))
    o = torch.stack(outs, 1) if outs else q.new_zeros(b, 0, h, v.shape[-1])
    return o, s


def _ref_causal_conv1d(x, w, bias=None, silu=False):
    xp = F.pad(x, (w.shape[1] - 1, 0))
    y = sum(w[:, j, None] * xp[..., j: j + x.shape[2]] for j in range(w.shape[1]))
    y = y + bias[:, None] if bias is not None else y
    return F.silu(y) if silu else y


def _ref_conv2d(x, w, bias=None, padding=0, groups=1):
    """Direct sum over channels and taps (runs with zero channels, where F.conv2d errors or changes shape)."""
    n, c, hh, ww = x.shape
    co, cg, kh, kw = w.shape
    xp = F.pad(x, (padding,) * 4)
    oh, ow = hh + 2 * padding - kh + 1, ww + 2 * padding - kw + 1
    y = x.new_zeros(n, co, oh, ow)
    fo = co // groups
    for gi in range(groups):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                y[:, gi * fo:(gi + 1) * fo] += torch.einsum("nchw,fc->nfhw", xs[:, :, i:i + oh, j:j + ow],
                                                            w[gi * fo:(gi + 1) * fo, :, i, j])
    return y + bias[:, None, None] if bias is not None else y


def _ref_long_conv(u, k):
    y = torch.zeros_like(u)
    for j in range(k.shape[1]):
        y = y + F.pad(k[:, j, None] * u[..., : u.shape[2] - j], (j, 0))
    return y


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("shape,dim,init", [((0, 5), -1, False), ((3, 0), -1, True), ((2, 0, 4), 1, True),
                                            ((2, 3, 0), 1, True)], ids=str)
def test_linear_scan(shape, dim, init):
    g, seed = _gen()
    rest = tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
    a, b, i0 = _leaves(g, shape, shape, rest if init else None)

    def ref(a, b, i0):
        return _ref_linear_scan(a.movedim(dim, -1), b.movedim(dim, -1), i0).movedim(-1, dim)
    _same(lambda a, b, i0: ops.linear_scan(a, b, dim=dim, initial=i0), ref, [a, b, i0], seed, f"linear_scan {shape}")


@pytest.mark.parametrize("bsz,dim,length,n,layout", [(0, 3, 7, 4, 3), (2, 0, 7, 4, 3), (2, 3, 0, 4, 3),
                                                     (2, 3, 5, 0, 3), (2, 4, 5, 0, 4), (2, 3, 5, 0, 2)], ids=str)
def test_selective_scan(bsz, dim, length, n, layout):
    g, seed = _gen()
    bc = {2: (dim, n), 3: (bsz, n, length), 4: (bsz, 2, n, length)}[layout]
    u, delta, A, B, C, D, z, bias = _leaves(g, (bsz, dim, length), (bsz, dim, length), (dim, n), bc, bc, (dim,),
                                            (bsz, dim, length), (dim,))
    got = lambda *xs: ops.selective_scan(*xs, delta_softplus=True, return_last_state=True)  # noqa: E731
    _same(got, lambda *xs: _ref_selective_scan(*xs, delta_softplus=True), [u, delta, A, B, C, D, z, bias], seed,
          f"selective_scan B={bsz} D={dim} L={length} N={n}")


@pytest.mark.parametrize("shape,v_dim,init", [((1, 0, 2, 4), 3, True), ((1, 5, 2, 0), 3, True),
                                              ((1, 5, 2, 4), 0, False), ((0, 5, 2, 4), 3, False),
                                              ((1, 5, 0, 4), 3, True)], ids=str)
def test_chunk_gla(shape, v_dim, init):
    g, seed = _gen()
    b, t, h, kd = shape
    q, k, v, s0 = _leaves(g, shape, shape, (b, t, h, v_dim), (b, h, kd, v_dim) if init else None)
    gate = F.logsigmoid(torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    got = lambda q, k, v, gate, s0: ops.chunk_gla(q, k, v, gate, initial_state=s0,  # noqa: E731
                                                  output_final_state=True)
    _same(got, _ref_chunk_gla, [q, k, v, gate, s0], seed, f"chunk_gla {shape} V={v_dim}")


@pytest.mark.parametrize("shape", [(0, 3, 7), (2, 0, 7), (2, 3, 0)], ids=str)
def test_causal_conv1d(shape):
    g, seed = _gen()
    x, w, bias = _leaves(g, shape, (shape[1], 4), (shape[1],))
    _same(lambda x, w, b: ops.causal_conv1d(x, w, b, activation="silu"),
          lambda x, w, b: _ref_causal_conv1d(x, w, b, True), [x, w, bias], seed, f"causal_conv1d {shape}")


def test_causal_conv1d_zero_width_raises_like_torch():
    with pytest.raises(RuntimeError):
        F.conv1d(torch.randn(1, 3, 5), torch.randn(3, 1, 0), groups=3)
    with pytest.raises(opgen.ArgumentError, match=r"causal_conv1d: argument 'weight'.*>= 1"):
        ops.causal_conv1d(torch.randn(1, 3, 5), torch.randn(3, 0))


@pytest.mark.parametrize("xshape,wshape,groups,bias", [((0, 3, 7, 6), (4, 3, 3, 3), 1, True),
                                                       ((2, 3, 7, 6), (0, 3, 3, 3), 1, True),
                                                       ((2, 0, 7, 6), (4, 0, 3, 3), 1, True),
                                                       ((2, 0, 7, 6), (4, 0, 3, 3), 2, False),
                                                       ((0, 6, 7, 6), (6, 1, 3, 3), 6, True)], ids=str)
def test_conv2d(xshape, wshape, groups, bias):
    g, seed = _gen()
    x, w, b = _leaves(g, xshape, wshape, (wshape[0],) if bias else None)
    _same(lambda x, w, b: ops.conv2d(x, w, b, padding=1, groups=groups),
          lambda x, w, b: _ref_conv2d(x, w, b, padding=1, groups=groups), [x, w, b], seed, f"conv2d {xshape}")
    if xshape[0] == 0:  # where F.conv2d accepts the shape, it agrees
        ref = F.conv2d(x, w, b, padding=1, groups=groups)
        got = ops.conv2d(x, w, b, padding=1, groups=groups)
        assert got.shape == ref.shape and got.dtype == ref.dtype


@pytest.mark.parametrize("xshape,wshape", [((1, 3, 0, 5), (4, 3, 1, 1)), ((1, 3, 4, 5), (4, 3, 0, 1))], ids=str)
def test_conv2d_empty_spatial_raises_like_torch(xshape, wshape):
    x, w = torch.randn(xshape), torch.randn(wshape)
    with pytest.raises(RuntimeError):
        F.conv2d(x, w, padding=1)
    with pytest.raises(opgen.ArgumentError, match=r"^opgen\.ops\.conv2d: argument '(x|weight)'.*empty spatial"):
        ops.conv2d(x, w, padding=1)


@pytest.mark.parametrize("ushape,lk", [((0, 3, 7), 4), ((2, 0, 7), 4), ((2, 3, 0), 0), ((2, 3, 6), 0)], ids=str)
def test_long_conv(ushape, lk):
    g, seed = _gen()
    u, k = _leaves(g, ushape, (ushape[1], lk))
    _same(ops.long_conv, _ref_long_conv, [u, k], seed, f"long_conv {ushape} Lk={lk}")


@pytest.mark.parametrize("qs,ks,vs", [((1, 2, 0, 4), (1, 2, 5, 4), (1, 2, 5, 3)),   # L = 0
                                      ((1, 2, 3, 4), (1, 2, 0, 4), (1, 2, 0, 3)),   # S = 0: zeros
                                      ((0, 2, 3, 4), (0, 2, 5, 4), (0, 2, 5, 3)),   # B = 0
                                      ((1, 0, 3, 4), (1, 0, 5, 4), (1, 0, 5, 3)),   # H = 0
                                      ((1, 2, 3, 0), (1, 2, 5, 0), (1, 2, 5, 3)),   # E = 0: uniform weights
                                      ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 0))],  # EV = 0
                         ids=["L0", "S0", "B0", "H0", "E0", "EV0"])
def test_attention(qs, ks, vs, reference_backend):
    """(On the reference backend: E = 0 and EV = 0 run the op on a padded head dim, whatever the backend.)"""
    g, seed = _gen()
    q, k, v = _leaves(g, qs, ks, vs)
    _same(ops.attention, F.scaled_dot_product_attention, [q, k, v], seed, f"attention q{qs} k{ks} v{vs}")


def test_attention_without_keys_gives_zero_rows_and_minus_inf_lse():
    from opgen.ops.attention_op import prepare_mods

    spec, caps, _ = prepare_mods("test", None, None, torch.float32, torch.float32)
    out, lse = torch.ops.opgen.attention(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 0, 5), torch.randn(2, 3, 0, 6),
                                         list(caps), spec, 0.5, False)
    assert out.shape == (2, 3, 4, 6) and lse.shape == (2, 3, 4)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -torch.inf).all())
