"""Same-sized ``solve`` nodes of the map graph that are ready at once (every plan they are computed from known),
solved in one ``solve_batch`` call: the per-head and per-layer classes of a transformer are many small problems
of equal width, and a batched torch Sinkhorn iterates them together instead of paying its per-iteration overhead
once per class. The plans are those of one ``solve`` each, to the solver's float tolerance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otfx.align.solvers import BATCH_BYTES, BATCHED, solve_batch

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps

#: float64 bytes of the problems solved as one batch (one chunk of ``solve_batch``: the costs, then the plans, of
#: the classes solved early are held until the rewrite reaches them)
PEER_BYTES = BATCH_BYTES


def peers(maps: TransportMaps, root: int) -> list[int]:
    """``root`` and the ``solve`` nodes after it in the run's order that could be solved with it now: same
    widths, computed from plans that are all known, not rotated; only for a batched solver and problems small
    enough that a chunk holds two or more."""
    order = maps.pending
    if order is None or maps.config.solver not in BATCHED:
        return [root]
    g = maps.graph
    width = g.nodes[root]["width"]
    size = 8 * width[0] * width[1]
    if 2 * size > BATCH_BYTES:
        return [root]
    group = [root]
    for node in order:
        if (len(group) + 1) * size > PEER_BYTES:
            break
        data = g.nodes[node]
        if (node == root or data["kind"] != "solve" or data["width"] != width or maps.evaluated(node)
                or node in maps.orthogonal or not ready(maps, node)):
            continue
        group.append(node)
    return group


def ready(maps: TransportMaps, node: int) -> bool:
    """Every plan the node's cost is computed from is known (or trivial)."""
    return all(p in maps.maps or maps.structure.trivial(p) for p in maps.graph.predecessors(node))


def solve_peers(maps: TransportMaps, roots: list[int]) -> dict[int, torch.Tensor]:
    """The plans of ``roots`` (same widths), their costs stacked and solved in one batch."""
    n_a, n_b = maps.graph.nodes[roots[0]]["width"]
    costs, used = None, []
    for i, root in enumerate(roots):
        cost, names = maps.costs.cost(maps, root)
        if costs is None:
            costs = torch.empty(len(roots), n_b, n_a, dtype=cost.dtype, device=cost.device)
        costs[i] = cost  # the solver's normalisation writes the float64 copy it works on
        used.append(names)
    del cost
    config = maps.config
    with maps.timed("solve"):
        plans, infos = solve_batch(costs, method=config.solver, reg=config.reg, max_iter=config.max_iter)
    del costs
    out = {}
    for root, plan, info, names in zip(roots, plans, infos, used, strict=True):
        out[root] = plan.clone()  # its own storage: each plan is released on its own
        maps.record(root, "layer", plan, info, names)
    return out
