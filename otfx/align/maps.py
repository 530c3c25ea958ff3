"""Stage 3: transport maps, evaluated over the map graph (``mapgraph.py``) in topological order.

A map ``T`` for a class is an (n_other x n_anchor) transport plan. Each node of the graph is computed by the
evaluator of its kind from the plans of its predecessors, with the configured cost provider (``costs/``),
solver (``solvers.py``), residual combiner (``combiners.py``) and head handling (``heads.py``); parameters
are rewritten (``rewrite.py``) as soon as the plans of their axes are known, and a plan is released once
every node computed from it and every parameter moved by it is done.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import networkx as nx
import torch

from otfx.align.activation_store import ActivationStore
from otfx.align.batching import peers, solve_peers
from otfx.align.combiners import COMBINERS
from otfx.align.config import FusionConfig, FusionError
from otfx.align.costs import cost_provider
from otfx.align.heads import solve_heads
from otfx.align.mapgraph import build_map_graph, todo_order
from otfx.align.orthogonal import (
    FoldedParams,
    Stream,
    StreamFallbackWarning,
    orthogonal_streams,
    procrustes,
    stream_nodes,
    stream_rows,
)
from otfx.align.plans import factor_marginal, identity_plan
from otfx.align.rewrite import Rewriter, unique_params
from otfx.align.solvers import PlanInfo, solve
from otfx.align.structure import PairStructure
from otfx.align.timing import Stopwatch
from otfx.infer.result import Inference


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
    converged: bool = True
    fallback: str | None = None
    marginal_error: float = 0.0


class TransportMaps:
    """Maps from ``other``'s spaces to ``anchor``'s, for one pair of models of the same architecture."""

    def __init__(self, anchor: Inference, other: Inference, config: FusionConfig,
                 acts_anchor: dict | None = None, acts_other: dict | None = None,
                 compute_dtype: torch.dtype | None = None, params_anchor: Mapping[str, torch.Tensor] | None = None,
                 params_other: Mapping[str, torch.Tensor] | None = None, fallback: str | None = None):
        """``compute_dtype``: the dtype of features, costs and rewritten tensors; by default each parameter's
        own (at least float32). Plans are float64 whatever it is. ``params_anchor``/``params_other``: where
        the tensors are read from (e.g. checkpoints on disk, read when needed) instead of the traced models.
        ``fallback``: with ``residual="orthogonal"``, the policy used instead when no stream can rotate (the
        automatic default passes ``"mean"``); None: such streams keep one transport plan each, as ``shared``."""
        if None in (config.reg, config.repair, config.residual, config.cost):
            config = config.resolved(has_data=False)  # the maps alone: no repair, the default reg without it
        self.anchor, self.other, self.config = anchor, other, config
        self.structure = PairStructure(anchor, other, config)
        self.part = self.structure.part
        self.costs = cost_provider(config.cost)
        self.acts = ActivationStore(acts_anchor, acts_other)
        self.params_anchor = params_anchor if params_anchor is not None else _detached(anchor)
        self.params_other = params_other if params_other is not None else _detached(other)
        #: streams rotated by an orthogonal map (``residual="orthogonal"``), their norms' gains folded in both
        #: models; their plans are the maps themselves (``linear``), and the folded gains move with no map
        self.orthogonal: dict[int, Stream] = {}
        self.invariant: set[str] = set()
        if config.residual == "orthogonal":
            self._fold_streams(fallback)
        self.compute_dtype = compute_dtype
        self.maps: dict[int, torch.Tensor] = {}
        self.stats: list[MapStats] = []
        self.timed = Stopwatch()
        self.timings = self.timed.timings
        self.rewriter = Rewriter(self)
        #: drop a plan once every node computed from it and every parameter it moves is done (set by ``fuse``)
        self.release = False
        self.recomputed = 0  # plans computed again after their release (the graph's order makes it 0)
        self._released: set[int] = set()
        self._graphs: dict[tuple[str, ...], nx.DiGraph] = {}
        self._current: nx.DiGraph | None = None
        #: the nodes of the running evaluation in its order (``run``), where ready same-sized problems are
        #: solved together (``batching.py``); None outside ``run``: one node at a time
        self.pending: list[int] | None = None

    def _fold_streams(self, fallback: str | None) -> None:
        self.orthogonal, why_not = orthogonal_streams(self.structure)
        if not self.orthogonal and fallback is not None:
            why = "; ".join(f"{self.describe(r)}: {w}" for r, w in why_not.items()) or "the model has no residual add"
            warnings.warn(f"otfx: residual='orthogonal': no residual stream can rotate, so residual={fallback!r} is "
                          f"used ({why})", StreamFallbackWarning, stacklevel=4)
            self.config = replace(self.config, residual=fallback)
            self.structure = PairStructure(self.anchor, self.other, self.config)
            self.part = self.structure.part
            return
        for root, why in why_not.items():
            warnings.warn(f"otfx: residual='orthogonal': {self.describe(root)} keeps a transport plan: {why}",
                          StreamFallbackWarning, stacklevel=4)
        if self.orthogonal:
            self.params_anchor = FoldedParams(self.params_anchor, self.orthogonal)
            self.params_other = FoldedParams(self.params_other, self.orthogonal)
            self.invariant = self.params_anchor.invariant

    # ---- the pair's structure -------------------------------------------------------------------------
    acts_anchor = property(lambda self: self.acts.anchor)
    acts_other = property(lambda self: self.acts.other)
    producers = property(lambda self: self.structure.producers)
    partials = property(lambda self: self.rewriter.partials)

    def root(self, sid: int) -> int:
        return self.part.find(sid)

    def width(self, sid: int) -> tuple[int, int]:
        return self.structure.width(sid)

    def describe(self, root: int) -> str:
        return self.structure.describe(root)

    def side(self, fqn: str, axis: int) -> str:
        return self.structure.side(fqn, axis)

    def activation_node(self, root: int, layer_nodes: list[str] | None = None):
        return self.structure.activation_node(root, layer_nodes)

    def dtype_for(self, tensor: torch.Tensor) -> torch.dtype:
        """The dtype a tensor is aligned in: ``compute_dtype``, else its own (at least float32)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32

    @property
    def graph(self) -> nx.DiGraph:
        """The map graph of every parameter of the anchor (the last graph ``run`` evaluated, if any)."""
        if self._current is None:
            self._current = self.graph_for(unique_params(self.anchor))
        return self._current

    def graph_for(self, names: list[str]) -> nx.DiGraph:
        key = tuple(names)
        if key not in self._graphs:
            self._graphs[key] = build_map_graph(self.structure, names, self.costs.reads_rows)
        self._current = self._graphs[key]
        return self._current

    def activation_nodes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The graph nodes whose activations this alignment reads: the cost provider's for the solved classes,
        and the inputs of residual adds for a combiner that weighs them by magnitude."""
        g = self.graph
        solved = [r for r, kind in g.nodes(data="kind") if kind in ("solve", "heads")]
        wanted = list(self.costs.wanted(self, solved))
        if getattr(COMBINERS[self.config.residual], "needs_magnitudes", False):
            inputs = [self.root(s) for r, d in g.nodes(data=True) if d["kind"] == "combine"
                      and d["record"].kind == "residual" for s in d["record"].inputs]
            wanted += [n for n in (self.activation_node(r) for r in dict.fromkeys(inputs)) if n is not None]
        if not self.costs.reads_rows:  # an activation cost: rotations from the stream after every residual add
            wanted += [n for root in self.orthogonal for n in stream_nodes(self.structure, root)]
        return list(dict.fromkeys(wanted))

    # ---- evaluation -----------------------------------------------------------------------------------
    def plan(self, sid: int) -> torch.Tensor:
        """The plan of a class that is already computed (a trivial class's identity)."""
        root = self.root(sid)
        if root in self.maps:
            return self.maps[root]
        if self.structure.trivial(root):
            return identity_plan(self.width(root)[0])
        raise FusionError(f"internal: the plan of {self.describe(root)} was asked for before it was computed")

    def evaluated(self, root: int) -> bool:
        """The class's plan was computed (it may have been released since)."""
        return root in self.maps or root in self._released

    def map(self, sid: int) -> torch.Tensor:
        """The plan of a class, computing it (and what it is computed from) if needed."""
        root = self.root(sid)
        if root in self.maps or self.structure.trivial(root) and root not in self.graph:
            return self.plan(root)
        g = self.graph
        for node in nx.topological_sort(g.subgraph(nx.ancestors(g, root) | {root})):
            if node not in self.maps:
                self._evaluate(node)
        return self.maps[root]

    def run(self, names: list[str], sink: Callable[[str, torch.Tensor], None]) -> None:
        """Evaluate the map graph of ``names`` in topological order and call ``sink(fqn, aligned tensor)`` for
        each parameter as soon as the plans of its axes are known; with ``release``, plans are dropped as soon
        as nothing needs them any more."""
        g = self.graph_for(names)
        rank = {root: i for i, root in enumerate(todo_order(self.structure, g, names))}
        waiting: dict[int, list[str]] = defaultdict(list)
        refs: dict[int, int] = {root: g.out_degree(root) for root in g}
        roots_of = {fqn: {self.root(sid) for sid in self.anchor.param_axes[fqn]} & g.nodes.keys() for fqn in names}
        pending = {fqn: {r for r in roots if r not in self.maps} for fqn, roots in roots_of.items()}
        for fqn, roots in roots_of.items():
            for r in roots:
                waiting[r].append(fqn)
                refs[r] += 1
        index = {fqn: i for i, fqn in enumerate(names)}

        def done(root: int) -> None:
            refs[root] -= 1
            if self.release and refs[root] <= 0 and root in self.maps:
                del self.maps[root]
                self._released.add(root)
                self.rewriter.release(root)

        def dispatch(ready: list[str]) -> None:
            for fqn in sorted(ready, key=index.__getitem__):
                sink(fqn, self.rewriter.aligned(fqn))
                for r in roots_of[fqn]:
                    done(r)

        self.pending = list(nx.lexicographical_topological_sort(g, key=rank.get))
        try:
            dispatch([fqn for fqn, roots in pending.items() if not roots])
            for root in self.pending:
                if root not in self.maps:
                    self._evaluate(root)
                ready = []
                for fqn in waiting.get(root, ()):
                    pending[fqn].discard(root)
                    if not pending[fqn]:
                        ready.append(fqn)
                dispatch(ready)
                for pred in list(g.predecessors(root)):
                    done(pred)
                if refs[root] <= 0:
                    refs[root] += 1  # a node nothing reads: released like the others
                    done(root)
        finally:
            self.rewriter.partials.clear()
            self.pending = None

    def _evaluate(self, root: int) -> None:
        data = self.graph.nodes[root] if root in self.graph else None
        if data is None:
            raise FusionError(f"internal: {self.describe(root)} is not in the map graph")
        self.recomputed += root in self._released
        with self.timed("plans"):
            result = EVALUATORS[data["kind"]](self, root, data)
        if isinstance(result, dict):
            self.maps.update(result)
        else:
            self.maps[root] = result

    def ot(self, cost: torch.Tensor, space: int, kind: str, used: list[str]) -> torch.Tensor:
        """``solve`` with the configured solver, the statistics recorded; the cost is handed over in its own
        dtype: the solver's normalisation writes the float64 copy it works on (no separate conversion)."""
        with self.timed("solve"):
            plan, info = solve(cost, method=self.config.solver, reg=self.config.reg, max_iter=self.config.max_iter)
        self.record(space, kind, plan, info, used)
        return plan

    def record(self, space: int, kind: str, plan: torch.Tensor, info: PlanInfo, used: list[str]) -> None:
        """Keep the statistics of one solved (n_other x n_anchor) plan."""
        n_b, n_a = plan.shape
        self.stats.append(MapStats(space, kind, n_a, n_b, info.method, info.cost_range, info.sharpness,
                                   info.iterations, used, info.converged, info.fallback, info.marginal_error))


def _detached(inference: Inference) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in inference.traced.parameters().items()}


def _identity(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    return identity_plan(maps.width(root)[0])


def _keep(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    warnings.warn(f"otfx: no transport map can be computed for {maps.describe(root)}; keeping its order",
                  stacklevel=3)
    return identity_plan(maps.width(root)[0])


def _sum(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    """Block-diagonal, each block with its share of the mass."""
    n_a = maps.width(root)[0]
    children = maps.structure.structure(root)[1]
    return torch.block_diag(*[maps.plan(c) * (maps.width(c)[0] / n_a) for c in children])


def _product(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    plan = torch.ones(1, 1, dtype=torch.float64)
    for child in maps.structure.structure(root)[1]:
        plan = torch.kron(plan, maps.plan(child))
    return plan


def _solve(maps: TransportMaps, root: int, data: dict) -> torch.Tensor | dict[int, torch.Tensor]:
    stream = maps.orthogonal.get(root)
    if stream is not None:
        return _rotation(maps, root, stream)
    group = peers(maps, root)
    if len(group) > 1:
        return solve_peers(maps, group)
    cost, used = maps.costs.cost(maps, root)
    return maps.ot(cost, root, "layer", used)


def _rotation(maps: TransportMaps, root: int, stream: Stream) -> torch.Tensor:
    """The orthogonal map of a residual stream: Procrustes on the weights cost's features, or for an activation
    cost on the stream's activations after every residual add (no marginals: the rewriter applies the map as
    it is, on both sides)."""
    nodes = [] if maps.costs.reads_rows else [n for n in stream_nodes(maps.structure, root) if n in maps.acts.anchor]
    if nodes:
        with maps.timed("rows"):
            rows_a, rows_b = stream_rows(maps.acts.anchor, nodes), stream_rows(maps.acts.other, nodes)
        used = [n[0] for n in nodes]
    else:
        rows_a, rows_b, used = maps.costs.features(maps, root)
    with maps.timed("solve"):
        rotation = procrustes(rows_b, rows_a, stream.fix_ones)
    n = rotation.shape[0]
    maps.stats.append(MapStats(root, "stream", n, n, "procrustes" + (" (fixing 1)" if stream.fix_ones else ""),
                               producers=used))
    return rotation


def _heads(maps: TransportMaps, root: int, data: dict) -> dict[int, torch.Tensor]:
    return solve_heads(maps, root, data["owns"])


def _factor(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    return maps.plan(root)  # written by the heads node that owns it, which the graph evaluates first


def _marginal(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    """The map of a factor class, as the marginal of a solved product's map over its other factors."""
    carrier = next(iter(maps.graph.predecessors(root)))
    factors = maps.structure.flat_factors(carrier)
    sizes_b = [maps.width(f)[1] for f in factors]
    sizes_a = [maps.width(f)[0] for f in factors]
    return factor_marginal(maps.plan(carrier).reshape(*sizes_b, *sizes_a), factors.index(root), len(factors))


def _block(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    """The map of a part of a sum, as its diagonal block of the sum's map (the sum a solved product's factor)."""
    whole = next(iter(maps.graph.predecessors(root)))
    off_a = off_b = 0
    for child in maps.structure.structure(whole)[1]:
        n_a, n_b = maps.width(child)
        if maps.root(child) == root:
            block = maps.plan(whole)[off_b:off_b + n_b, off_a:off_a + n_a]
            return block / block.sum().clamp_min(1e-300)
        off_a, off_b = off_a + n_a, off_b + n_b
    raise FusionError(f"internal: {maps.describe(root)} is not a part of {maps.describe(whole)}")


def _combine(maps: TransportMaps, root: int, data: dict) -> torch.Tensor:
    record = data["record"]
    policy = maps.config.residual if record.kind == "residual" else "mean"
    return COMBINERS[policy](maps, list(record.inputs), [maps.plan(s) for s in record.inputs])


EVALUATORS: dict[str, Callable[[TransportMaps, int, dict], torch.Tensor | dict[int, torch.Tensor]]] = {
    "fixed": _identity, "keep": _keep, "sum": _sum, "product": _product, "solve": _solve, "heads": _heads,
    "factor": _factor, "marginal": _marginal, "block": _block, "combine": _combine,
}
