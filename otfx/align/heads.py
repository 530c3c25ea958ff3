"""Head-aware alignment of a produced product (heads x head_dim, or kv_heads x group x head_dim): whole heads
are matched first by the optimal cost of matching their dims, then the dims within heads (one map shared by
all heads) given the head map. A head dim that is a direct sum (partial rotary: rotary | pass-through dims; a
fused q | k | v head) is matched part by part: a part with a fixed leaf keeps its order, the others move only
among themselves, so the map commutes with the rotary op. A factor another node owns (grouped-query kv heads
solved from the keys, a rotary-fixed head dim) is read, not solved: the map graph orders it first."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from otfx.align.config import FusionError
from otfx.align.costs.weights import distances
from otfx.align.plans import apply_map, factor_marginal, identity_plan
from otfx.align.solvers import solve_batch

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps


def solve_heads(maps: TransportMaps, root: int, owns: list[int]) -> dict[int, torch.Tensor]:
    """Plans of the product ``root`` and of the factors it ``owns``."""
    factors = maps.structure.flat_factors(root)
    outer, inner = factors[:-1], factors[-1]
    parts = maps.structure.dim_parts(inner)
    rows_a, rows_b, used = maps.costs.features(maps, root)
    h_a = h_b = 1
    for f in outer:
        h_a, h_b = h_a * maps.width(f)[0], h_b * maps.width(f)[1]
    d_a, d_b = maps.width(inner)
    blocks_a, blocks_b = rows_a.reshape(h_a, d_a, -1), rows_b.reshape(h_b, d_b, -1)
    solved: dict[int, torch.Tensor] = {}
    unknown = [f for f in outer if f in owns]
    if len(unknown) == 1 and len(outer) > 1:
        solved[unknown[0]] = _one_factor(maps, outer, unknown[0], blocks_a, blocks_b, used, parts)
    elif unknown:
        with maps.timed("cost"):
            pair_cost = pair_costs(blocks_b, blocks_a, parts)
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
        solved.update(_dim_plans(maps, inner, feats_a, feats_b, owns, used))
    inner_plan = solved[inner] if inner in solved else maps.plan(inner)
    solved[root] = torch.kron(head_plan, inner_plan)
    return solved


def _dim_plans(maps: TransportMaps, inner: int, feats_a: torch.Tensor, feats_b: torch.Tensor, owns: list[int],
               used: list[str]) -> dict[int, torch.Tensor]:
    """Plans of a head dim (rows: dims, features: every head's rows, heads aligned) and of its parts: each free
    part matched on its own rows (a part that occurs twice, the q and k dims of a fused head, on both), a
    pinned part kept in order, a part another node owns read; the head dim is their block-diagonal."""
    s = maps.structure
    groups = _groups(s.dim_parts(inner))
    plans: dict[int, torch.Tensor] = {}
    for part, (rows_a, rows_b, free) in groups.items():
        n_a, n_b = s.width(part)
        if not free:
            if n_a != n_b:
                raise FusionError(f"cannot align {s.describe(part)}: its dims are pinned (rotary) but its width is "
                                  f"{n_b} in {s.other.traced.name} and {n_a} in the anchor")
            plans[part] = identity_plan(n_a)
        elif part in owns or part == s.root(inner):
            with maps.timed("cost"):
                cost = distances(torch.cat([feats_b[i] for i in rows_b], 1), torch.cat([feats_a[i] for i in rows_a], 1))
            plans[part] = maps.ot(cost, part, "head_dims", used)
        else:
            plans[part] = maps.plan(part)
    _block_diagonal(maps, inner, plans)
    return plans


def _groups(parts: list[tuple[int, int, int, bool]]) -> dict[int, tuple[list[slice], list[slice], bool]]:
    """For each class among a head dim's parts: its slices in the anchor and in the other model, and whether
    it is free."""
    groups: dict[int, tuple[list[slice], list[slice], bool]] = defaultdict(lambda: ([], [], True))
    off_a = off_b = 0
    for root, n_a, n_b, free in parts:
        rows_a, rows_b, _ = groups[root]
        rows_a.append(slice(off_a, off_a + n_a))
        rows_b.append(slice(off_b, off_b + n_b))
        groups[root] = (rows_a, rows_b, free)
        off_a, off_b = off_a + n_a, off_b + n_b
    return dict(groups)


def _block_diagonal(maps: TransportMaps, sid: int, plans: dict[int, torch.Tensor]) -> torch.Tensor:
    """The plan of a sum of parts from its parts' plans, each block with its share of the mass (as ``sum``
    nodes are evaluated), written into ``plans`` for every sum on the way."""
    root = maps.structure.root(sid)
    if root not in plans:
        children = maps.structure.structure(root)[1]
        n_a = maps.width(root)[0]
        plans[root] = torch.block_diag(*[_block_diagonal(maps, c, plans) * (maps.width(c)[0] / n_a)
                                         for c in children])
    return plans[root]


def _one_factor(maps: TransportMaps, outer: list[int], unknown: int, blocks_a: torch.Tensor,
                blocks_b: torch.Tensor, used: list[str], parts: list | None = None) -> torch.Tensor:
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
        cost = sum(pair_costs(b[:, k], a[:, k], parts) for k in range(a.shape[1]))
    return maps.ot(cost, unknown, "heads", used)


def pair_costs(blocks_b: torch.Tensor, blocks_a: torch.Tensor, parts: list | None = None) -> torch.Tensor:
    """Cost of matching head hb to head ha: the optimal cost of matching their dims ([heads, dims, features]),
    the dims of each of the head dim's ``parts`` (``PairStructure.dim_parts``) among themselves, a pinned part's
    in order."""
    dtype = torch.promote_types(blocks_a.dtype, blocks_b.dtype)
    whole = [(None, blocks_a.shape[1], blocks_b.shape[1], True)]
    h_b, h_a = blocks_b.shape[0], blocks_a.shape[0]
    cost = torch.zeros(h_b, h_a, dtype=torch.float64)
    for rows_a, rows_b, free in _groups(parts or whole).values():
        a = torch.cat([blocks_a[:, r] for r in rows_a], 2).to(dtype)
        b = torch.cat([blocks_b[:, r] for r in rows_b], 2).to(dtype)
        costs = torch.cdist(b[:, None], a[None])  # hb x ha x dims_b x dims_a
        share = sum(r.stop - r.start for r in rows_a) / blocks_a.shape[1]  # of the mean over the head's dims
        if not free:
            cost += share * costs.diagonal(dim1=-2, dim2=-1).mean(-1).to(torch.float64)
            continue
        plans = solve_batch(costs.reshape(h_b * h_a, *costs.shape[2:]), method="emd")[0]  # one solve each
        for hb in range(h_b):
            for ha in range(h_a):
                cost[hb, ha] += share * (plans[hb * h_a + ha] * costs[hb, ha]).sum()  # one sum each: same rounding
    return cost
