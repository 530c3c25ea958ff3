"""Stage 3: transport maps, one per class of the flow graph, computed on demand in dependency order.

A map ``T`` for a space is an (n_other x n_anchor) transport plan. Layers solve theirs from a cost between
their producing rows (input side already aligned by the maps that feed them) or their activations; residual
and concat nodes combine their inputs' maps by the residual policy; sums are block-diagonal, products are
Kronecker products, and a factor (heads, head dims) is the marginal of a product that was solved.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    Both use the plan's true marginals. A permutation plan (EMD, LSA) is applied as an index (the same values
    as the dense product, without the matmul); the dense product runs in ``tensor``'s dtype.
    """
    index = permutation_index(plan)
    if index is not None:
        return tensor.index_select(axis, index)
    return _dense_apply(tensor, axis, plan_weights(plan, side).to(tensor.dtype))


def plan_weights(plan: torch.Tensor, side: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (n_other x n_anchor) weights that ``apply_map`` contracts an axis with: the plan over its column
    sums (``side="out"``) or its row sums (``side="in"``), computed in ``dtype``."""
    sums = plan.sum(0, keepdim=True) if side == "out" else plan.sum(1, keepdim=True)
    if dtype == plan.dtype:
        return plan / sums.clamp_min(1e-300)
    return plan.to(dtype).div_(sums.to(dtype).clamp_min(torch.finfo(dtype).tiny))


def _dense_apply(tensor: torch.Tensor, axis: int, weights: torch.Tensor) -> torch.Tensor:
    """(n_other x n_anchor) ``weights`` contracted with ``tensor``'s ``axis``; no transposed copies for the
    last axis."""
    if tensor.ndim > 1 and axis == tensor.ndim - 1:
        return tensor @ weights
    moved = tensor.movedim(axis, 0)
    shape = moved.shape
    out = weights.T @ moved.reshape(shape[0], -1)
    return out.reshape((weights.shape[1], *shape[1:])).movedim(0, axis)


def permutation_index(plan: torch.Tensor) -> torch.Tensor | None:
    """For a plan that is a (scaled) permutation matrix, the other model's row feeding each anchor column;
    None for any other plan. ``apply_map`` with such a plan is exactly ``index_select`` with this index."""
    n_b, n_a = plan.shape if plan.ndim == 2 else (0, -1)
    if n_b != n_a or int(torch.count_nonzero(plan[:, 0])) != 1 or int(torch.count_nonzero(plan)) != n_a:
        return None
    cols = plan.max(1).indices  # row-wise: contiguous, unlike a column-wise argmax
    if not bool((plan.gather(1, cols[:, None]) > 0).all()):  # a row without mass
        return None
    if bool((torch.bincount(cols, minlength=n_a) != 1).any()):  # two rows into one column
        return None
    index = torch.empty_like(cols)
    index[cols] = torch.arange(n_a)
    return index


class _Mover:
    """A plan prepared for repeated use on one side in one dtype: an index (a permutation; nothing at all for
    the identity) or dense (n_other x n_anchor) weights."""

    __slots__ = ("identity", "index", "weights")

    def __init__(self, plan: torch.Tensor, side: str, dtype: torch.dtype, index: torch.Tensor | None):
        """``index``: ``permutation_index(plan)``, found once for both sides."""
        self.index = index
        self.identity = self.index is not None and bool((self.index == torch.arange(len(self.index))).all())
        self.weights = None if self.index is not None else plan_weights(plan, side, dtype)

    def __call__(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        if self.identity:
            return tensor
        if self.index is not None:
            return tensor.index_select(axis, self.index)
        return _dense_apply(tensor, axis, self.weights.to(tensor.dtype))


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
                 acts_other: dict[str, torch.Tensor] | None = None, compute_dtype: torch.dtype | None = None):
        """``compute_dtype``: the dtype of features, costs and rewritten tensors; by default each parameter's
        own (float32 for float32 models, at least float32). Plans are float64 whatever it is."""
        self.anchor, self.other, self.config = anchor, other, config
        self.part = merged(anchor.spaces, config.merged_kinds())
        self.acts_anchor, self.acts_other = acts_anchor or {}, acts_other or {}
        self._standard: dict[tuple, torch.Tensor] = {}  # (model, node) -> squared norms, once standardised
        self._magnitudes: dict[tuple, torch.Tensor] = {}
        self.params_anchor = {k: v.detach() for k, v in anchor.traced.parameters().items()}
        self.params_other = {k: v.detach() for k, v in other.traced.parameters().items()}
        self.compute_dtype = compute_dtype
        self.maps: dict[int, torch.Tensor] = {}
        self.stats: list[MapStats] = []
        #: seconds per stage (rows, cost, solve, plans, rewrite, ...), each exclusive of the stages it calls
        self.timings: dict[str, float] = defaultdict(float)
        self._clock: list[list[float]] = []  # open stages: [time spent in nested stages]
        self._movers: dict[int, dict[tuple[str, torch.dtype], _Mover]] = defaultdict(dict)  # class -> prepared
        self._indices: dict[int, torch.Tensor | None] = {}  # permutation_index of each used plan
        #: the other model's parameter with every axis but one aligned, (fqn, axis) -> tensor: a producer's
        #: rows for the cost, kept until the rewrite finishes the tensor with the remaining axis
        self.partials: dict[tuple[str, int], torch.Tensor] = {}
        self._busy: set[int] = set()
        #: drop a class's plan and prepared weights once no parameter axis moves with it and every class that
        #: reads it is computed (set by ``fuse``; a dropped plan that is asked for again is recomputed)
        self.release = False
        self.recomputed = 0
        self._pending: dict[int, int] = {}
        self._readers: dict[int, set[int]] = {}
        self._waiting: set[int] = set()
        self._released: set[int] = set()
        self._unready: dict[str, set[int]] = {}  # parameters not yet rewritten -> classes still unknown
        self._sink: Callable[[str, torch.Tensor], None] | None = None
        self._dispatching = False
        self.producers = self._producers()
        self.combines = self._combines()
        self.carriers = self._carriers()
        self.act_nodes = self._act_nodes()

    # ---- bookkeeping ----------------------------------------------------------------------------------
    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent in the block to ``timings[stage]``, less the time of the stages nested in it."""
        start = time.perf_counter()
        self._clock.append([0.0])
        try:
            yield
        finally:
            nested = self._clock.pop()[0]
            elapsed = time.perf_counter() - start
            self.timings[stage] += elapsed - nested
            if self._clock:
                self._clock[-1][0] += elapsed

    def dtype_for(self, tensor: torch.Tensor) -> torch.dtype:
        """The dtype a tensor is aligned in: ``compute_dtype``, else its own (at least float32)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32

    def side(self, fqn: str, axis: int) -> str:
        """Whether a parameter's axis is consumed (``"in"``) or produced (``"out"``) by its layer."""
        return "in" if (fqn, axis) in self.anchor.consumed else "out"

    def move(self, tensor: torch.Tensor, axis: int, sid: int, side: str) -> torch.Tensor:
        """``apply_map(tensor, axis, self.map(sid), side)``, with the plan prepared once per side and dtype;
        a fixed space is left as it is without building its (identity) plan."""
        root = self.root(sid)
        if root not in self.maps and self._trivial(root):
            return tensor
        key = (side, tensor.dtype)
        mover = self._movers[root].get(key)
        if mover is None:
            plan = self.map(sid)
            with self.timed("prepare"):
                if root not in self._indices:
                    self._indices[root] = permutation_index(plan)
                mover = self._movers[root][key] = _Mover(plan, side, tensor.dtype, self._indices[root])
        return mover(tensor, axis)

    def partial(self, fqn: str, axis: int) -> torch.Tensor:
        """The other model's ``fqn`` in the compute dtype with every axis but ``axis`` aligned (cached)."""
        key = (fqn, axis)
        value = self.partials.get(key)
        if value is None:
            with self.timed("rows"):
                value = self.params_other[fqn]
                value = value.to(self.dtype_for(value))
                for j, sid in enumerate(self.anchor.param_axes[fqn]):
                    if j != axis:
                        value = self.move(value, j, sid, self.side(fqn, j))
            self.partials[key] = value
        return value

    def aligned(self, fqn: str) -> torch.Tensor:
        """The other model's ``fqn`` with every axis moved to the anchor's spaces, in the compute dtype; reuses
        (and drops) a producer's cached partial. May alias the other model's tensor when nothing moves."""
        with self.timed("rewrite"):
            axes = self.anchor.param_axes[fqn]
            cached = [key for key in self.partials if key[0] == fqn]
            if cached:
                value = self.partials.pop(cached[0])
                for key in cached[1:]:
                    del self.partials[key]
                todo = [cached[0][1]]
            else:
                value = self.params_other[fqn]
                value = value.to(self.dtype_for(value))
                todo = list(range(len(axes)))
            for axis in todo:
                value = self.move(value, axis, axes[axis], self.side(fqn, axis))
            return value

    # ---- rewrite and memory ---------------------------------------------------------------------------
    def rewrite(self, names: list[str], sink: Callable[[str, torch.Tensor], None]) -> None:
        """Call ``sink(fqn, aligned tensor)`` once for each of ``names``, as soon as the maps of its axes are
        known (while the maps of later layers are still being computed), so that a producer's partly aligned
        rows are finished at once and, with ``release``, plans are dropped early. Parameters whose maps are
        not needed by others' come in graph order."""
        self._pending = defaultdict(int)
        self._unready = {}
        for fqn in names:
            roots = set()
            for sid in self.anchor.param_axes[fqn]:
                root = self.root(sid)
                self._pending[root] += 1
                if not self._trivial(root):
                    roots.add(root)
            self._unready[fqn] = roots
        self._readers = self._structural_readers()
        self._sink = sink
        try:
            for fqn in names:
                while fqn in self._unready:  # computing one map may finish (and release) the others
                    missing = next((r for r in self._unready[fqn] if r not in self.maps), None)
                    if missing is None:
                        self._dispatch()
                    else:
                        self.map(missing)
        finally:
            self._sink = None
            self.partials.clear()

    def _trivial(self, root: int) -> bool:
        """A fixed class of equal widths: moving along it leaves a tensor as it is (no plan is built)."""
        n_a, n_b = self.width(root)
        return n_a == n_b and (self.part.is_fixed(root) or n_a == 1)

    def _dispatch(self) -> None:
        """Rewrite (and hand to the sink) every parameter whose maps are now all known."""
        if self._sink is None or self._dispatching:
            return
        self._dispatching = True
        try:
            for fqn in list(self._unready):
                roots = self._unready[fqn]
                roots.difference_update([r for r in roots if r in self.maps])
                if not roots:
                    del self._unready[fqn]
                    value = self.aligned(fqn)
                    self._finished(fqn)
                    self._sink(fqn, value)
        finally:
            self._dispatching = False

    def _reads(self, root: int) -> list[int]:
        """The classes whose plans ``_compute(root)`` builds its plan from (besides the maps that move its
        producers' rows, which the rewrite counts), following ``_compute``'s cases in order."""
        if self._trivial(root) or self.part.is_fixed(root):
            return []
        structure = self.part.structure.get(root)
        if structure and structure[0] == "sum":
            return [self.root(c) for c in structure[1]]
        if self.producers.get(root):
            factors = self.flat_factors(root)
            aware = structure and structure[0] == "prod" and (
                self.config.heads == "aware" or any(self.part.is_fixed(f) for f in factors))
            return factors if aware else []
        if root in self.combines:
            return [self.root(s) for s in self.combines[root].inputs]
        if structure and structure[0] == "prod":
            return [self.root(c) for c in structure[1]]
        return self.carriers.get(root, [])[:1]

    def _structural_readers(self) -> dict[int, set[int]]:
        """For each class, the classes that will be computed from its plan: ``_reads`` over the classes that
        the rewrite needs, and the classes those read, and so on."""
        readers: dict[int, set[int]] = defaultdict(set)
        todo, needed = [r for r, n in self._pending.items() if n > 0], set()
        while todo:
            root = todo.pop()
            if root in needed:
                continue
            needed.add(root)
            for read in self._reads(root):
                readers[read].add(root)
                todo.append(read)
        return readers

    def _finished(self, fqn: str) -> None:
        """The rewrite of ``fqn`` is done: its classes may no longer be needed."""
        if not self.release:
            return
        for sid in self.anchor.param_axes[fqn]:
            root = self.root(sid)
            self._pending[root] = self._pending.get(root, 0) - 1
            if self._pending[root] <= 0:
                self._waiting.add(root)
        self._sweep()

    def _sweep(self) -> None:
        for root in list(self._waiting):
            if root in self.maps and all(r in self.maps or r in self._released for r in self._readers.get(root, ())):
                self._waiting.discard(root)
                self._released.add(root)
                del self.maps[root]
                self._indices.pop(root, None)
                self._movers.pop(root, None)

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
            if self.part.is_fixed(root):
                return  # a fixed space needs no cost (position tables also write the sequence axis)
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
        self.recomputed += root in self._released
        try:
            with self.timed("plans"):
                plan = self._compute(root)
        finally:
            self._busy.discard(root)
        self.maps[root] = plan
        self._dispatch()
        if self.release:
            if self._pending.get(root, 0) <= 0:
                self._waiting.add(root)
            self._sweep()
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
            magnitudes.append(self._magnitude(node))
        mags = torch.stack(magnitudes)  # inputs x width
        if policy == "weighted_scalar":
            w = mags.mean(1) / mags.mean(1).sum()
            return sum(wi * p for wi, p in zip(w, plans))
        w = mags / mags.sum(0, keepdim=True).clamp_min(1e-12)
        return sum(p * wi[None, :] for wi, p in zip(w, plans))

    # ---- solving --------------------------------------------------------------------------------------
    def _rows(self, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Features of each neuron of a class: rows of its producers (other side aligned, each producer's rows
        scaled to unit norm) or activations."""
        if self.config.cost == "activations":
            return self._activation_rows(root)
        blocks, used = self._blocks(root)
        with self.timed("rows"):
            return (torch.cat([_unit_rows(a) for a, _ in blocks], 1), torch.cat([_unit_rows(b) for _, b in blocks], 1),
                    used)

    def _blocks(self, root: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
        """The rows of each producer of a class (anchor, other with its input side aligned), unscaled."""
        blocks, used = [], []
        for fqn, axis, off_a, off_b in self.producers[root]:
            try:
                blocks.append(self._producer_rows(root, fqn, axis, off_a, off_b))
            except _Cycle as cycle:
                if cycle.root != root:
                    raise
                continue  # this producer reads the stream it writes: its input side cannot be aligned yet
            used.append(fqn)
        if not blocks:
            raise FusionError(f"no producer of {self.describe(root)} can be aligned; try residual='mean'")
        return blocks, used

    def _producer_rows(self, root: int, fqn: str, axis: int, off_a: int, off_b: int):
        wb = self.partial(fqn, axis)
        wa = self.params_anchor[fqn].to(wb.dtype)
        n_a, n_b = self.width(root)
        rows_a = wa.movedim(axis, 0).narrow(0, off_a, n_a).reshape(n_a, -1)
        rows_b = wb.movedim(axis, 0).narrow(0, off_b, n_b).reshape(n_b, -1)
        return rows_a, rows_b

    def _activation_rows(self, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        rows_a, rows_b, _, _, used = self._activation_features(root)
        return rows_a, rows_b, used

    def _activation_features(self, root: int):
        """Standardised activations of a class as rows (neurons x samples, strided views), their squared norms
        and the node they come from."""
        layer_nodes = [r.node for r in self.anchor.records if r.kind == "layer" and r.output is not None
                       and self.root(r.output) == root]
        node = self.activation_node(root, layer_nodes)
        if node is None or node not in self.acts_anchor:
            raise FusionError(f"no activations were collected for {self.describe(root)}")
        with self.timed("rows"):
            a, norms_a = self._standardised("anchor", node)
            b, norms_b = self._standardised("other", node)
            return a.T, b.T, norms_a, norms_b, [node[0]]

    def _magnitude(self, node) -> torch.Tensor:
        """Mean absolute activation of each neuron of the anchor's ``node`` (read before standardising)."""
        if node not in self._magnitudes:
            self._magnitudes[node] = self.acts_anchor[node].abs().mean(0)
        return self._magnitudes[node]

    def _standardised(self, which: str, node) -> tuple[torch.Tensor, torch.Tensor]:
        """A model's activations of ``node`` standardised per neuron (``_standardise``), and the squared norm of
        each standardised neuron. Done once, in place in the collected matrix (which then holds them)."""
        key = (which, node)
        if key not in self._standard:
            acts = self.acts_anchor if which == "anchor" else self.acts_other
            if which == "anchor" and self.config.residual.startswith("weighted"):
                self._magnitude(node)
            x = acts[node]
            dtype = self.dtype_for(x)
            if x.dtype != dtype or not x.is_contiguous():
                x = acts[node] = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
            x.sub_(x.mean(0))
            squares = torch.zeros(x.shape[1], dtype=x.dtype)
            for chunk in x.split(256):  # a row block at a time stays in cache
                squares += chunk.square().sum(0)
            scale = 1 / ((squares / (x.shape[0] - 1)).sqrt() + 1e-9)
            x.mul_(scale)
            self._standard[key] = squares * scale.square()
        acts = self.acts_anchor if which == "anchor" else self.acts_other
        return acts[node], self._standard[key]

    def _activation_cost(self, root: int) -> tuple[torch.Tensor, list[str]]:
        """The cost between the standardised activations of a class, from one Gram matrix and the norms."""
        rows_a, rows_b, norms_a, norms_b, used = self._activation_features(root)
        with self.timed("cost"):
            gram = rows_b @ rows_a.T
            return gram.mul_(-2).add_(norms_b[:, None]).add_(norms_a[None]).clamp_min_(0).sqrt_(), used

    def _cost(self, rows_b: torch.Tensor, rows_a: torch.Tensor) -> torch.Tensor:
        """Euclidean distances between the rows (``torch.cdist``), without copying the features."""
        with self.timed("cost"):
            return _sq_dists(rows_b, rows_a, unit=False).clamp_min_(0).sqrt_()

    def _block_cost(self, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The cost of ``_rows``' features (each producer's rows at unit norm, concatenated), one producer at a
        time, without copying or concatenating the rows."""
        with self.timed("cost"):
            total = None
            for rows_a, rows_b in blocks:
                d2 = _sq_dists(rows_b, rows_a, unit=True)
                total = d2 if total is None else total.add_(d2)
            return total.clamp_min_(0).sqrt_()

    def _ot(self, cost: torch.Tensor):
        """``solve`` with the configured solver; the cost is handed over in float64 (the solver's dtype), so
        that no second copy of it stays alive while the solver runs: do not keep a reference to it."""
        with self.timed("solve"):
            cost = cost.to(torch.float64)
            return solve(cost, method=self.config.solver, reg=self.config.reg, max_iter=self.config.max_iter)

    def _solve(self, root: int) -> torch.Tensor:
        if self.config.cost == "activations":
            cost, used = self._activation_cost(root)
            plan, info = self._ot(cost)
        else:
            blocks, used = self._blocks(root)
            plan, info = self._ot(self._block_cost(blocks))
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
                b = self.move(b, i, f, "out")
        u = outer.index(unknown)
        a = a.movedim(u, 0).reshape(sizes_a[u], -1, *blocks_a.shape[1:])
        b = b.movedim(u, 0).reshape(sizes_b[u], -1, *blocks_b.shape[1:])
        with self.timed("cost"):
            cost = sum(_pair_costs(b[:, k], a[:, k]) for k in range(a.shape[1]))
        plan, info = self._ot(cost)
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
            with self.timed("cost"):
                pair_cost = _pair_costs(blocks_b, blocks_a)
            head_plan, info = self._ot(pair_cost)
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
            with self.timed("rows"):
                aligned_b = apply_map(blocks_b, 0, head_plan, "out")  # heads of other in anchor order
                feats_a = blocks_a.transpose(0, 1).reshape(d_a, -1)
                feats_b = aligned_b.transpose(0, 1).reshape(d_b, -1)
            inner_plan, info = self._ot(self._cost(feats_b, feats_a))
            self.stats.append(MapStats(self.root(inner), "head_dims", d_a, d_b, info.method, info.cost_range,
                                       info.sharpness, info.iterations, used))
            self.maps[self.root(inner)] = inner_plan
        return torch.kron(head_plan, inner_plan)


def _pair_costs(blocks_b: torch.Tensor, blocks_a: torch.Tensor) -> torch.Tensor:
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


def factor_marginal(plan: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """The (b_i x a_i) marginal of a plan reshaped to (b_1..b_k, a_1..a_k)."""
    others = [d for d in range(2 * k) if d not in (i, k + i)]
    return plan.sum(dim=others) if others else plan


def _sq_dists(rows_b: torch.Tensor, rows_a: torch.Tensor, unit: bool) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``rows_b`` and ``rows_a`` (n_b x n_a) by one matmul, as
    ``torch.cdist`` computes them for many rows; ``unit``: of the rows scaled as ``_unit_rows`` scales them.
    The rows may be strided views (transposed activations): nothing is copied but the result."""
    dtype = torch.promote_types(rows_a.dtype, rows_b.dtype)
    rows_a, rows_b = rows_a.to(dtype), rows_b.to(dtype)
    norm_a, norm_b = rows_a.norm(dim=1), rows_b.norm(dim=1)
    gram = rows_b @ rows_a.T
    if unit:
        scale_a, scale_b = 1 / (norm_a + 1e-9), 1 / (norm_b + 1e-9)
        gram.mul_(scale_b[:, None]).mul_(scale_a[None])
        norm_a, norm_b = norm_a * scale_a, norm_b * scale_b
    return gram.mul_(-2).add_(norm_b.square()[:, None]).add_(norm_a.square()[None])


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=1, keepdim=True) + 1e-9)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(x, 0)
    return (x - mean).div_(std + 1e-9)
