"""Fusion of the softmax-contraction chain into one online-softmax kernel group (:class:`AttentionGroup`).

The chain ``scores = sum_e q * k * scale -> score_mod -> masked row max -> exp -> row sum -> contraction with v
-> divide`` is recognized structurally: a sum-of-products Reduce over the head dim producing ``[b, h, i, j]``, an
optional pointwise Map of it (the score mod), a max Reduce over ``j`` whose predicate is the mask, the
exponentials, the two sums over ``j`` and the final divide. Kernels never materialize the ``[i, j]`` scores: the
score mod is inlined as an expression of the raw score value and the mask is a predicate evaluated per tile
(or skipped on full tiles; see :mod:`opgen.ir.passes.blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..errors import IRError
from ..expr import Expr, ExprOp, load, loads
from ..nodes import MAX, SUM, Map, Reduce
from ..op import Op
from ..symbols import Axis


@dataclass(frozen=True)
class AttentionGroup:
    """One fused attention kernel: ``out[b, h, i, ev] = softmax_j(mask ? score_mod(q.k * scale) : -inf) @ v``.

    ``score`` is an expression of the raw scaled score (a load of ``raw_score`` at ``[b, h, i, j]``), the index
    axes and captured lookup tensors; ``mask`` is a boolean expression of the same (None: every key is visible).
    ``kv_head`` is the key/value head read by query head ``h`` (``h // G`` under GQA). Besides ``out`` the group
    writes ``lse[b, h, i]``, the log-sum-exp of the visible scores (-inf for a fully masked row), which the
    flash backward uses to recompute the probabilities.
    """

    op: Op
    q: str
    k: str
    v: str
    out: str
    lse: str
    b: Axis
    h: Axis
    i: Axis
    j: Axis
    e: Axis
    ev: Axis
    kv_head: sympy.Expr
    scale: float
    raw_score: str
    score: Expr
    mask: Expr | None
    captures: tuple[str, ...]

    @property
    def mask_predicate(self) -> sympy.Basic | None:
        """The mask as one sympy predicate over ``b, h, i, j`` when it reads no tensor (else None)."""
        if self.mask is None:
            return sympy.true
        return self.mask.sym if self.mask.op is ExprOp.INDEX else None

    @property
    def data_dependent_mask(self) -> bool:
        """Whether the mask reads captured tensors (a document-id table, a routing table)."""
        return self.mask is not None and self.mask.op is not ExprOp.INDEX

    @property
    def grad_captures(self) -> tuple[str, ...]:
        """The captured tensors whose gradients the flash backward also computes (the op attribute
        ``capture_grads``, set on the op a backward is declared for; empty on forward ops)."""
        return tuple(n for n in dict(self.op.attrs).get("capture_grads", ()) if n in self.captures)

    def capture_leaves(self, name: str) -> tuple[Expr, ...]:
        """The distinct loads of the captured tensor ``name`` in the score expression (each has its own index,
        so each scatters its gradient to its own positions)."""
        return tuple(dict.fromkeys(n for n in self.score.walk() if n.op is ExprOp.LOAD and n.arg.tensor == name))

    @property
    def has_score_mod(self) -> bool:
        return self.score != load(self.raw_score, (self.b, self.h, self.i, self.j), self.score.dtype)

    def describe(self) -> str:
        """A short printout of the group (the ``fused`` stage)."""
        lines = [f"attention group {self.out}: online softmax over key tiles, parallel over "
                 f"({self.b}, {self.h}, query tiles of {self.i}); kv head {self.kv_head}",
                 f"  raw score = sum[{self.e}]({self.q} * {self.k}) * {self.scale:g}",
                 f"  score = {self.score}",
                 f"  mask = {self.mask if self.mask is not None else 'none'}"
                 f"{' (data-dependent: block table built at run time)' if self.data_dependent_mask else ''}"]
        if self.captures:
            lines.append(f"  captured tensors: {', '.join(self.captures)}")
        return "\n".join(lines)


def _fail(op: Op, why: str) -> IRError:
    return IRError(f"op {op.name}: not a softmax-contraction chain ({why})")


def fuse_attention(op: Op) -> AttentionGroup:
    """Recognize ``op`` as one attention group; IRError saying which link is missing otherwise."""
    nodes = list(op.nodes)
    if len(nodes) not in (7, 8):
        raise _fail(op, f"expected 7 or 8 nodes, got {len(nodes)}")
    score = nodes[0]
    if not (isinstance(score, Reduce) and score.monoid is SUM and len(score.axes) == 4 and len(score.raxes) == 1):
        raise _fail(op, "the first node must be a sum over the head dim producing [b, h, i, j]")
    b, h, i, j = score.axes
    (e,) = score.raxes
    reads = loads(score.value)
    if len(reads) != 2:
        raise _fail(op, f"the score must read exactly q and k, got {len(reads)} loads")
    qa, ka = reads[0], reads[1]
    if qa.index != (b, h, i, e) or len(ka.index) != 4 or ka.index[0] != b or ka.index[2:] != (j, e):
        raise _fail(op, f"score indices {qa.index} / {ka.index} are not q[b, h, i, e] and k[b, hk, j, e]")
    scale = _scale(op, score.value)
    rest = nodes[1:]
    modified = None
    if isinstance(rest[0], Map):
        modified, rest = rest[0], rest[1:]
        if modified.axes != (b, h, i, j):
            raise _fail(op, "the score mod must be pointwise over [b, h, i, j]")
    if len(rest) != 6:
        raise _fail(op, f"expected max, exp, sum, contraction, output and log-sum-exp nodes, got {len(rest)}")
    row_max, p, denom, acc, out, lse = rest
    if not (isinstance(row_max, Reduce) and row_max.monoid is MAX and row_max.raxes == (j,)):
        raise _fail(op, "expected a max over keys")
    if not (isinstance(acc, Reduce) and acc.monoid is SUM and acc.raxes == (j,) and len(acc.axes) == 4):
        raise _fail(op, "expected the contraction with v over keys")
    vreads = [x for x in loads(acc.value) if x.tensor != p.out]
    if len(vreads) != 1 or vreads[0].index[2] != j:
        raise _fail(op, "the contraction must read v[b, hk, j, ev]")
    va = vreads[0]
    ev = acc.axes[3]
    outputs = {t.name for t in op.outputs}
    if not (isinstance(out, Map) and isinstance(lse, Map) and {out.out, lse.out} <= outputs
            and out.axes == (b, h, i, ev) and lse.axes == (b, h, i)):
        raise _fail(op, "the last nodes must write the output [b, h, i, ev] and the log-sum-exp [b, h, i]")
    raw_load = load(score.out, (b, h, i, j), score.value.dtype)
    score_expr = modified.value if modified is not None else raw_load
    captures = tuple(t.name for t in op.inputs if t.name not in (qa.tensor, ka.tensor, va.tensor))
    return AttentionGroup(op=op, q=qa.tensor, k=ka.tensor, v=va.tensor, out=out.out, lse=lse.out, b=b, h=h, i=i, j=j, e=e,
                          ev=ev, kv_head=ka.index[1], scale=scale, raw_score=score.out, score=score_expr,
                          mask=row_max.predicate, captures=captures)


def _scale(op: Op, value: Expr) -> float:
    """The constant factor of ``q * k * scale`` (1.0 when there is none)."""
    if value.op is ExprOp.MUL and value.rhs.op is ExprOp.CONST:
        return float(value.rhs.arg)
    if value.op is ExprOp.MUL and value.lhs.op is ExprOp.LOAD and value.rhs.op is ExprOp.LOAD:
        return 1.0
    raise _fail(op, f"the score {value} is not q * k * constant")
