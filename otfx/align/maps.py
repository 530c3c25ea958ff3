"""Stage 3: transport maps, one per class of the flow graph, computed on demand in dependency order.

A map ``T`` for a space is an (n_other x n_anchor) transport plan. Layers solve theirs from a cost between
their producing rows (input side already aligned by the maps that feed them) or their activations; residual
and concat nodes combine their inputs' maps by the residual policy; sums are block-diagonal, products are
Kronecker products, and a factor (heads, head dims) is the marginal of a product that was solved.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from otfx.align.config import FusionConfig, FusionError
from otfx.align.solvers import solve
from otfx.infer.result import Inference
from otfx.infer.spaces import merged


class _Cycle(Exception):
    """A map was needed while it was being computed (a residual stream that feeds itself)."""

    def __init__(self, root: int):
        super().__init__(root)
        self.root = root


def apply_map(tensor: torch.Tensor, axis: int, plan: torch.Tensor, side: str) -> torch.Tensor:
    """Move ``tensor``'s ``axis`` from the other model's space to the anchor's with ``plan``.

    Rows that a layer produces (``side="out"``) become weighted averages of the other model's rows; inputs
    that a layer consumes (``side="in"``) are summed, so merged neurons keep their total contribution.
    Both use the plan's true marginals.
    """
    if side == "out":
        weights = plan / plan.sum(0, keepdim=True).clamp_min(1e-300)
    else:
        weights = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)
    moved = tensor.movedim(axis, 0)
    shape = moved.shape
    out = weights.T.to(moved.dtype) @ moved.reshape(shape[0], -1)
    return out.reshape((plan.shape[1], *shape[1:])).movedim(0, axis)


def identity_plan(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) / n


@dataclass
class MapStats:
    """What the solver saw for one class: widths, cost range, sharpness, iterations."""

    space: int
    kind: str
    width_anchor: int
    width_other: int
    method: str = ""
    cost_range: tuple[float, float] = (0.0, 0.0)
    sharpness: float = 1.0
    iterations: int = 0
    producers: list[str] = field(default_factory=list)


class TransportMaps:
    """Maps from ``other``'s spaces to ``anchor``'s, for one pair of models of the same architecture."""

    def __init__(self, anchor: Inference, other: Inference, config: FusionConfig,
                 acts_anchor: dict[str, torch.Tensor] | None = None,
                 acts_other: dict[str, torch.Tensor] | None = None):
        self.anchor, self.other, self.config = anchor, other, config
        self.part = merged(anchor.spaces, config.merged_kinds())
        self.acts_anchor, self.acts_other = acts_anchor or {}, acts_other or {}
        self.params_anchor = {k: v.detach() for k, v in anchor.traced.parameters().items()}
        self.params_other = {k: v.detach() for k, v in other.traced.parameters().items()}
        self.maps: dict[int, torch.Tensor] = {}
        self.stats: list[MapStats] = []
        self._busy: set[int] = set()
        self.producers = self._producers()
        self.combines = self._combines()
        self.carriers = self._carriers()
        self.act_nodes = self._act_nodes()

    # ---- structure ------------------------------------------------------------------------------------
    def root(self, sid: int) -> int:
        return self.part.find(sid)

    def width(self, sid: int) -> tuple[int, int]:
        return self.anchor.spaces.size(sid), self.other.spaces.size(sid)

    def _producers(self) -> dict[int, list[tuple[str, int, int, int]]]:
        """Per class: (param, axis, row offset in the anchor, row offset in the other model); the summands of a
        produced sum (fused q|k|v rows) get their slice of rows."""
        table: dict[int, list[tuple[str, int, int, int]]] = defaultdict(list)

        def give(sid: int, fqn: str, axis: int, off_a: int, off_b: int) -> None:
            root = self.root(sid)
            structure = self.part.structure.get(root)
            if structure and structure[0] == "sum":
                for child in structure[1]:
                    give(child, fqn, axis, off_a, off_b)
                    n_a, n_b = self.width(child)
                    off_a, off_b = off_a + n_a, off_b + n_b
            elif (fqn, axis, off_a, off_b) not in table[root]:
                table[root].append((fqn, axis, off_a, off_b))

        for space, fqn, axis, _node in self.anchor.producer_list:
            give(space, fqn, axis, 0, 0)
        return table

    def _combines(self) -> dict[int, list]:
        table: dict[int, list] = {}
        for r in self.anchor.records:
            if r.kind in ("residual", "concat") and r.output is not None:
                out = self.root(r.output)
                if any(self.root(s) != out for s in r.inputs):
                    table[out] = r
        return table

    def flat_factors(self, sid: int) -> list[int]:
        root = self.root(sid)
        structure = self.part.structure.get(root)
        if structure is None or structure[0] != "prod":
            return [root]
        return [leaf for child in structure[1] for leaf in self.flat_factors(child)]

    def _carriers(self) -> dict[int, list[int]]:
        """For each factor class, the produced product classes it is a factor of."""
        table: dict[int, list[int]] = defaultdict(list)
        for root in self.producers:
            factors = self.flat_factors(root)
            if len(factors) > 1:
                for f in factors:
                    table[f].append(root)
        return table

    def _act_nodes(self) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
        """Graph nodes (name, axes) whose output carries each class: one axis, or one per factor in order
        (queries as [batch, heads, seq, head_dim] carry heads x head_dim)."""
        table: dict[int, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
        for name, axes in self.anchor.node_axes.items():
            roots = [self.root(s) for s in axes]
            for axis, root in enumerate(roots):
                table[root].append((name, (axis,)))
        for root in list(self.producers):
            factors = self.flat_factors(root)
            if len(factors) < 2:
                continue
            for name, axes in self.anchor.node_axes.items():
                roots = [self.root(s) for s in axes]
                if all(f in roots for f in factors):
                    table[root].append((name, tuple(roots.index(f) for f in factors)))
        return dict(table)

    def activation_node(self, root: int, layer_nodes: list[str] | None = None) -> tuple[str, tuple[int, ...]] | None:
        """The node whose activations stand for a class: the producing layer's output where there is one,
        else the first [batch, seq, width] tensor that carries it."""
        candidates = self.act_nodes.get(root, [])
        for n, a in candidates:
            if layer_nodes and n in layer_nodes:
                return n, a
        for n, a in candidates:
            if len(self.anchor.node_axes[n]) == 3 and a == (2,):
                return n, a
        return candidates[0] if candidates else None

    # ---- maps -----------------------------------------------------------------------------------------
    def map(self, sid: int) -> torch.Tensor:
        root = self.root(sid)
        if root in self.maps:
            return self.maps[root]
        if root in self._busy:
            raise _Cycle(root)
        self._busy.add(root)
        try:
            plan = self._compute(root)
        finally:
            self._busy.discard(root)
        self.maps[root] = plan
        return plan

    def _compute(self, root: int) -> torch.Tensor:
        n_a, n_b = self.width(root)
        if self.part.is_fixed(root) or n_a == n_b == 1:
            if n_a != n_b:
                raise FusionError(f"a fixed space has width {n_b} in {self.other.traced.name} but {n_a} in the "
                                  f"anchor ({self.describe(root)}); only free spaces may differ in width")
            return identity_plan(n_a)
        structure = self.part.structure.get(root)
        if structure and structure[0] == "sum":  # block-diagonal, each block with its share of the mass
            return torch.block_diag(*[self.map(c) * (self.width(c)[0] / n_a) for c in structure[1]])
        if self.producers.get(root):
            if structure and structure[0] == "prod" and (
                    self.config.heads == "aware" or any(self.part.is_fixed(f) for f in self.flat_factors(root))):
                return self._aware(root)  # head-aware, also where a fixed factor (rotary head dims) must stay put
            return self._solve(root)
        if root in self.combines:
            return self._combine(root)
        if structure and structure[0] == "prod":
            plan = torch.ones(1, 1, dtype=torch.float64)
            for child in structure[1]:
                plan = torch.kron(plan, self.map(child))
            return plan
        if self.carriers.get(root):
            return self._marginal(root, self.carriers[root][0])
        if n_a != n_b:
            raise FusionError(f"cannot align {self.describe(root)}: nothing produces it and widths differ "
                              f"({n_b} vs {n_a})")
        warnings.warn(f"otfx: no transport map can be computed for {self.describe(root)}; keeping its order",
                      stacklevel=2)
        return identity_plan(n_a)

    def describe(self, root: int) -> str:
        params = [f"{fqn} axis {axis}" for fqn, axes in self.anchor.param_axes.items()
                  for axis, sid in enumerate(axes) if self.root(sid) == root]
        return f"space {root} (width {self.width(root)[0]}; {', '.join(params[:3]) or 'no parameters'})"

    def _combine(self, root: int) -> torch.Tensor:
        record = self.combines[root]
        inputs = [s for s in record.inputs]
        plans = [self.map(s) for s in inputs]
        policy = self.config.residual if record.kind == "residual" else "mean"
        if policy in ("mean", "shared"):
            return sum(plans) / len(plans)
        magnitudes = []
        for s in inputs:
            node = self.activation_node(self.root(s))
            if node is None or node not in self.acts_anchor:
                return sum(plans) / len(plans)
            magnitudes.append(self.acts_anchor[node].abs().mean(0))
        mags = torch.stack(magnitudes)  # inputs x width
        if policy == "weighted_scalar":
            w = mags.mean(1) / mags.mean(1).sum()
            return sum(wi * p for wi, p in zip(w, plans))
        w = mags / mags.sum(0, keepdim=True).clamp_min(1e-12)
        return sum(p * wi[None, :] for wi, p in zip(w, plans))

    # ---- solving --------------------------------------------------------------------------------------
    def _rows(self, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Features of each neuron of a class: rows of its producers (other side aligned) or activations."""
        if self.config.cost == "activations":
            return self._activation_rows(root)
        feats_a, feats_b, used = [], [], []
        for fqn, axis, off_a, off_b in self.producers[root]:
            try:
                a, b = self._producer_rows(root, fqn, axis, off_a, off_b)
            except _Cycle as cycle:
                if cycle.root != root:
                    raise
                continue  # this producer reads the stream it writes: its input side cannot be aligned yet
            feats_a.append(a)
            feats_b.append(b)
            used.append(fqn)
        if not feats_a:
            raise FusionError(f"no producer of {self.describe(root)} can be aligned; try residual='mean'")
        return torch.cat(feats_a, 1), torch.cat(feats_b, 1), used

    def _producer_rows(self, root: int, fqn: str, axis: int, off_a: int, off_b: int):
        wa = self.params_anchor[fqn].double()
        wb = self.params_other[fqn].double()
        for j, sid in enumerate(self.anchor.param_axes[fqn]):
            if j != axis:
                side = "in" if (fqn, j) in self.anchor.consumed else "out"
                wb = apply_map(wb, j, self.map(sid), side)
        n_a, n_b = self.width(root)
        rows_a = wa.movedim(axis, 0).narrow(0, off_a, n_a).reshape(n_a, -1)
        rows_b = wb.movedim(axis, 0).narrow(0, off_b, n_b).reshape(n_b, -1)
        return _unit_rows(rows_a), _unit_rows(rows_b)

    def _activation_rows(self, root: int):
        layer_nodes = [r.node for r in self.anchor.records if r.kind == "layer" and r.output is not None
                       and self.root(r.output) == root]
        node = self.activation_node(root, layer_nodes)
        if node is None or node not in self.acts_anchor:
            raise FusionError(f"no activations were collected for {self.describe(root)}")
        a = _standardise(self.acts_anchor[node])
        b = _standardise(self.acts_other[node])
        return a.T, b.T, [node[0]]

    def _solve(self, root: int) -> torch.Tensor:
        rows_a, rows_b, used = self._rows(root)
        cost = torch.cdist(rows_b, rows_a)
        plan, info = solve(cost, method=self.config.solver, reg=self.config.reg, max_iter=self.config.max_iter)
        n_a, n_b = self.width(root)
        self.stats.append(MapStats(root, "layer", n_a, n_b, info.method, info.cost_range, info.sharpness,
                                   info.iterations, used))
        return plan

    def _marginal(self, root: int, carrier: int) -> torch.Tensor:
        """The map of a factor class, as the marginal of a solved product's map over its other factors."""
        factors = self.flat_factors(carrier)
        plan = self.map(carrier)
        sizes_b = [self.width(f)[1] for f in factors]
        sizes_a = [self.width(f)[0] for f in factors]
        i = factors.index(root)
        return factor_marginal(plan.reshape(*sizes_b, *sizes_a), i, len(factors))

    def _solve_outer_elsewhere(self, root: int, outer: list[int]) -> None:
        """Let products whose only head factor is an unknown factor of ours solve it first (grouped-query
        attention: kv heads come from the keys and values, query heads within a group from the queries)."""
        if len(outer) < 2:
            return
        for f in outer:
            if self.root(f) in self.maps or self.part.is_fixed(f):
                continue
            for carrier in self.carriers.get(self.root(f), []):
                if carrier != root and carrier not in self._busy and self.flat_factors(carrier)[:-1] == [self.root(f)]:
                    try:
                        self.map(carrier)
                    except _Cycle:
                        continue
                    if self.root(f) in self.maps:
                        break

    def _solve_one_factor(self, root, outer, unknown, blocks_a, blocks_b, used) -> None:
        """Solve one head factor given the others: align the known factors, then match the unknown one."""
        sizes_a = [self.width(f)[0] for f in outer]
        sizes_b = [self.width(f)[1] for f in outer]
        a = blocks_a.reshape(*sizes_a, *blocks_a.shape[1:])
        b = blocks_b.reshape(*sizes_b, *blocks_b.shape[1:])
        for i, f in enumerate(outer):
            if f != unknown:
                b = apply_map(b, i, self.map(f), "out")
        u = outer.index(unknown)
        a = a.movedim(u, 0).reshape(sizes_a[u], -1, *blocks_a.shape[1:])
        b = b.movedim(u, 0).reshape(sizes_b[u], -1, *blocks_b.shape[1:])
        cost = sum(_pair_costs(b[:, k], a[:, k]) for k in range(a.shape[1]))
        plan, info = solve(cost, method=self.config.solver, reg=self.config.reg, max_iter=self.config.max_iter)
        self.stats.append(MapStats(self.root(unknown), "heads", sizes_a[u], sizes_b[u], info.method, info.cost_range,
                                   info.sharpness, info.iterations, used))
        self.maps[self.root(unknown)] = plan

    def _aware(self, root: int) -> torch.Tensor:
        """Head-aware alignment: match whole heads first (by the cost of matching their dims), then the dims
        within heads, shared by all heads, given the head map."""
        factors = self.flat_factors(root)
        outer, inner = factors[:-1], factors[-1]
        rows_a, rows_b, used = self._rows(root)
        h_a = h_b = 1
        for f in outer:
            h_a, h_b = h_a * self.width(f)[0], h_b * self.width(f)[1]
        d_a, d_b = self.width(inner)
        blocks_a = rows_a.reshape(h_a, d_a, -1)
        blocks_b = rows_b.reshape(h_b, d_b, -1)
        self._solve_outer_elsewhere(root, outer)
        unknown = [f for f in outer if self.root(f) not in self.maps and not self.part.is_fixed(f)]
        if len(unknown) == 1 and len(outer) > 1:
            self._solve_one_factor(root, outer, unknown[0], blocks_a, blocks_b, used)
        elif unknown:
            head_plan, info = solve(_pair_costs(blocks_b, blocks_a), method=self.config.solver, reg=self.config.reg,
                                    max_iter=self.config.max_iter)
            self.stats.append(MapStats(root, "heads", h_a, h_b, info.method, info.cost_range, info.sharpness,
                                       info.iterations, used))
            t = head_plan.reshape(*[self.width(f)[1] for f in outer], *[self.width(f)[0] for f in outer])
            for i, f in enumerate(outer):
                if f in unknown:
                    self.maps[self.root(f)] = factor_marginal(t, i, len(outer))
        head_plan = torch.ones(1, 1, dtype=torch.float64)
        for f in outer:
            head_plan = torch.kron(head_plan, self.map(f))
        if self.root(inner) in self.maps or self.part.is_fixed(inner):
            inner_plan = self.map(inner)
        else:
            aligned_b = apply_map(blocks_b, 0, head_plan, "out")  # heads of other in anchor order
            feats_a = blocks_a.transpose(0, 1).reshape(d_a, -1)
            feats_b = aligned_b.transpose(0, 1).reshape(d_b, -1)
            inner_plan, info = solve(torch.cdist(feats_b, feats_a), method=self.config.solver, reg=self.config.reg,
                                     max_iter=self.config.max_iter)
            self.stats.append(MapStats(self.root(inner), "head_dims", d_a, d_b, info.method, info.cost_range,
                                       info.sharpness, info.iterations, used))
            self.maps[self.root(inner)] = inner_plan
        return torch.kron(head_plan, inner_plan)


def _pair_costs(blocks_b: torch.Tensor, blocks_a: torch.Tensor) -> torch.Tensor:
    """Cost of matching head hb to head ha: the optimal cost of matching their dims ([heads, dims, features])."""
    cost = torch.zeros(blocks_b.shape[0], blocks_a.shape[0], dtype=torch.float64)
    for hb in range(blocks_b.shape[0]):
        for ha in range(blocks_a.shape[0]):
            c = torch.cdist(blocks_b[hb], blocks_a[ha])
            p, _ = solve(c, method="emd")
            cost[hb, ha] = (p * c).sum()
    return cost


def factor_marginal(plan: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """The (b_i x a_i) marginal of a plan reshaped to (b_1..b_k, a_1..a_k)."""
    others = [d for d in range(2 * k) if d not in (i, k + i)]
    return plan.sum(dim=others) if others else plan


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=1, keepdim=True) + 1e-9)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / (x.std(0) + 1e-9)
