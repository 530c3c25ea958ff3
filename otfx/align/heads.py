"""Head-aware alignment of a produced product (heads x head_dim, or kv_heads x group x head_dim): whole heads
are matched first by the optimal cost of matching their dims, then the dims within heads (one map shared by
all heads) given the head map. A factor another node owns (grouped-query kv heads solved from the keys, a
rotary-fixed head dim) is read, not solved: the map graph orders it first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otfx.align.costs.weights import distances
from otfx.align.plans import apply_map, factor_marginal
from otfx.align.solvers import solve

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps


def solve_heads(maps: TransportMaps, root: int, owns: list[int]) -> dict[int, torch.Tensor]:
    """Plans of the product ``root`` and of the factors it ``owns``."""
    factors = maps.structure.flat_factors(root)
    outer, inner = factors[:-1], factors[-1]
    rows_a, rows_b, used = maps.costs.features(maps, root)
    h_a = h_b = 1
    for f in outer:
        h_a, h_b = h_a * maps.width(f)[0], h_b * maps.width(f)[1]
    d_a, d_b = maps.width(inner)
    blocks_a, blocks_b = rows_a.reshape(h_a, d_a, -1), rows_b.reshape(h_b, d_b, -1)
    solved: dict[int, torch.Tensor] = {}
    unknown = [f for f in outer if f in owns]
    if len(unknown) == 1 and len(outer) > 1:
        solved[unknown[0]] = _one_factor(maps, outer, unknown[0], blocks_a, blocks_b, used)
    elif unknown:
        with maps.timed("cost"):
            pair_cost = pair_costs(blocks_b, blocks_a)
        head_plan = maps.ot(pair_cost, root, "heads", used)
        t = head_plan.reshape(*[maps.width(f)[1] for f in outer], *[maps.width(f)[0] for f in outer])
        for i, f in enumerate(outer):
            if f in unknown:
                solved[f] = factor_marginal(t, i, len(outer))
    head_plan = torch.ones(1, 1, dtype=torch.float64)
    for f in outer:
        head_plan = torch.kron(head_plan, solved[f] if f in solved else maps.plan(f))
    if inner in owns:
        with maps.timed("rows"):
            aligned_b = apply_map(blocks_b, 0, head_plan, "out")  # heads of other in anchor order
            feats_a = blocks_a.transpose(0, 1).reshape(d_a, -1)
            feats_b = aligned_b.transpose(0, 1).reshape(d_b, -1)
        with maps.timed("cost"):
            cost = distances(feats_b, feats_a)
        solved[inner] = maps.ot(cost, inner, "head_dims", used)
    inner_plan = solved[inner] if inner in solved else maps.plan(inner)
    solved[root] = torch.kron(head_plan, inner_plan)
    return solved


def _one_factor(maps: TransportMaps, outer: list[int], unknown: int, blocks_a: torch.Tensor,
                blocks_b: torch.Tensor, used: list[str]) -> torch.Tensor:
    """Solve one head factor given the others: align the known factors, then match the unknown one."""
    sizes_a = [maps.width(f)[0] for f in outer]
    sizes_b = [maps.width(f)[1] for f in outer]
    a = blocks_a.reshape(*sizes_a, *blocks_a.shape[1:])
    b = blocks_b.reshape(*sizes_b, *blocks_b.shape[1:])
    for i, f in enumerate(outer):
        if f != unknown:
            b = maps.rewriter.move(b, i, f, "out")
    u = outer.index(unknown)
    a = a.movedim(u, 0).reshape(sizes_a[u], -1, *blocks_a.shape[1:])
    b = b.movedim(u, 0).reshape(sizes_b[u], -1, *blocks_b.shape[1:])
    with maps.timed("cost"):
        cost = sum(pair_costs(b[:, k], a[:, k]) for k in range(a.shape[1]))
    return maps.ot(cost, unknown, "heads", used)


def pair_costs(blocks_b: torch.Tensor, blocks_a: torch.Tensor) -> torch.Tensor:
    """Cost of matching head hb to head ha: the optimal cost of matching their dims ([heads, dims, features])."""
    dtype = torch.promote_types(blocks_a.dtype, blocks_b.dtype)
    costs = torch.cdist(blocks_b.to(dtype)[:, None], blocks_a.to(dtype)[None])  # hb x ha x dims_b x dims_a
    cost = torch.zeros(blocks_b.shape[0], blocks_a.shape[0], dtype=torch.float64)
    for hb in range(blocks_b.shape[0]):
        for ha in range(blocks_a.shape[0]):
            c = costs[hb, ha]
            p, _ = solve(c, method="emd")
            cost[hb, ha] = (p * c).sum()
    return cost
