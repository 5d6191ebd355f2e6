"""Tile tables of an attention call, shared by the TVM and Triton kernels.

A mask that reads no tensor is classified once per (predicate, sizes, tile sizes) from its sympy predicate
(:func:`opgen.ir.passes.blocks.classify_tiles`) and memoized, so a repeated call pays a dict lookup: no mask is
built at run time. A data-dependent mask (document ids, a routing table) is classified on every call from the
captured tensors (:func:`~opgen.ir.passes.blocks.classify_tiles_runtime`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

from opgen.ir.passes.attention import AttentionGroup
from opgen.ir.passes.blocks import TileTable, classify_tiles, classify_tiles_runtime


@dataclass(frozen=True, eq=False)
class TilePlan:
    """A tile table with its per-query-tile (``rows``) and per-key-tile (``cols``) lists as int32 tensors."""

    table: TileTable
    rows: tuple[Any, Any, Any]
    cols: tuple[Any, Any, Any]


def attention_sizes(group: AttentionGroup, inputs: Mapping[str, Any]) -> dict[str, int]:
    """``B``, ``HQ``, ``L``, ``S`` of a call, read from the q and k tensors."""
    q, k = inputs[group.q], inputs[group.k]
    return {"B": int(q.shape[0]), "HQ": int(q.shape[1]), "L": int(q.shape[2]), "S": int(k.shape[2])}


@functools.lru_cache(maxsize=256)
def _static_plan(predicate, B: int, H: int, L: int, S: int, block_m: int, block_n: int, dims: tuple) -> TilePlan:
    table = classify_tiles(predicate, L=L, S=S, block_m=block_m, block_n=block_n, B=B, H=H, dims=dict(dims))
    return TilePlan(table, table.rows(), table.cols())


def tile_plan(group: AttentionGroup, inputs: Mapping[str, Any], dims: Mapping, block_m: int, block_n: int,
              device: Any = None) -> TilePlan:
    """The tile plan of one call; ``dims`` holds the op's bound dims (by symbol) for sizes the mask mentions."""
    sizes = attention_sizes(group, inputs)
    named = tuple(sorted((str(d), int(v)) for d, v in dims.items()))
    pred = group.mask_predicate
    if pred is not None:
        plan = _static_plan(pred, sizes["B"], sizes["HQ"], sizes["L"], sizes["S"], block_m, block_n, named)
        if device is None or str(device) == "cpu":
            return plan
        return _on_device(plan, device)
    tensors = {n: inputs[n] for n in group.captures}
    table = classify_tiles_runtime(group.mask, tensors, L=sizes["L"], S=sizes["S"], block_m=block_m,
                                   block_n=block_n, B=sizes["B"], H=sizes["HQ"], dims=dict(named))
    return TilePlan(table, table.rows(device), table.cols(device))


@functools.lru_cache(maxsize=256)
def _on_device_cached(plan: TilePlan, device: str) -> TilePlan:
    move = lambda t: tuple(x.to(device) for x in t)  # noqa: E731
    return TilePlan(plan.table, move(plan.rows), move(plan.cols))


def _on_device(plan: TilePlan, device: Any) -> TilePlan:
    return _on_device_cached(plan, str(device))
