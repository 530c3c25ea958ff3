"""What the map graph is built from: the classes of one pair of models under a configuration, with the tables
that say how each class gets its map (its producers' rows, the records that combine it, the products it is a
factor of, the graph nodes whose activations carry it)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from otfx.align.config import FusionConfig
from otfx.infer.context import Record
from otfx.infer.result import Inference
from otfx.infer.spaces import merged


@dataclass(frozen=True)
class Producer:
    """Rows of a parameter that create a class: ``axis`` of ``fqn``, from row ``offset_anchor`` (anchor) and
    ``offset_other`` (other model): the summands of a produced sum (fused q|k|v rows) get their slice."""

    fqn: str
    axis: int
    offset_anchor: int
    offset_other: int


class PairStructure:
    """The classes of ``anchor``'s spaces with the soft links of ``config`` merged, and their widths in both
    models (the other model shares the anchor's space ids: ``check_same_architecture`` made sure)."""

    def __init__(self, anchor: Inference, other: Inference, config: FusionConfig):
        self.anchor, self.other, self.config = anchor, other, config
        self.part = merged(anchor.spaces, config.merged_kinds())
        self.combines = self._combines()
        #: classes whose only producers are parameters written into them as they are (a bias, an attention
        #: sink), where the graph gives the plan anyway: those rows describe the class but do not solve it
        self.producers, self.described = self._producers()
        self.carriers = self._carriers()
        self.act_nodes = self._act_nodes()

    def root(self, sid: int) -> int:
        return self.part.find(sid)

    def width(self, sid: int) -> tuple[int, int]:
        """(anchor width, other width) of a space."""
        return self.anchor.spaces.size(sid), self.other.spaces.size(sid)

    def is_fixed(self, sid: int) -> bool:
        return self.part.is_fixed(sid)

    def trivial(self, root: int) -> bool:
        """A fixed class of equal widths, or one of width 0 or 1: moving along it leaves a tensor as it is (no plan
        is built)."""
        n_a, n_b = self.width(root)
        return n_a == n_b and (self.part.is_fixed(root) or n_a <= 1)

    def structure(self, root: int) -> tuple[str, list[int]] | None:
        return self.part.structure.get(self.root(root))

    def side(self, fqn: str, axis: int) -> str:
        """Whether a parameter's axis is consumed (``"in"``) or produced (``"out"``) by its layer."""
        return "in" if (fqn, axis) in self.anchor.consumed else "out"

    def flat_factors(self, sid: int) -> list[int]:
        """The atomic factors of a product class, outer first (a class that is not a product: itself)."""
        root = self.root(sid)
        structure = self.part.structure.get(root)
        if structure is None or structure[0] != "prod":
            return [root]
        return [leaf for child in structure[1] for leaf in self.flat_factors(child)]

    def leaves(self, sid: int) -> list[int]:
        """The atomic classes a class is made of, through its sums and products, in order."""
        root = self.root(sid)
        structure = self.part.structure.get(root)
        if structure is None:
            return [root]
        return [leaf for child in structure[1] for leaf in self.leaves(child)]

    def pinned(self, sid: int) -> bool:
        """Whether any atomic part of a class is fixed (rotary dims pinned by their frequencies)."""
        return any(self.part.is_fixed(leaf) for leaf in self.leaves(sid))

    def dim_parts(self, sid: int) -> list[tuple[int, int, int, bool]]:
        """The parts of a head dim in order, as (class, anchor width, other width, free): a direct sum is split
        into its parts (rotary and pass-through dims, the q | k | v dims of a fused head), and a part with a
        fixed leaf stays put as a whole (a map inside it would not commute with the rotary op)."""
        root = self.root(sid)
        structure = self.part.structure.get(root)
        if structure and structure[0] == "sum":
            return [part for child in structure[1] for part in self.dim_parts(child)]
        return [(root, *self.width(root), not self.pinned(root))]

    def head_aware(self, root: int) -> bool:
        """A produced product solved head by head: asked for, or needed where a factor has a fixed part (rotary
        head dims must stay put, partial rotary's pass-through dims move only among themselves)."""
        structure = self.structure(root)
        return bool(structure and structure[0] == "prod" and (
            self.config.heads == "aware" or any(self.pinned(f) for f in self.flat_factors(root))))

    def solved_alone(self, sid: int) -> bool:
        """Whether a class has a plan of its own (produced, a residual add or concat), not one read off a
        product it is a factor of."""
        root = self.root(sid)
        return root in self.producers or root in self.combines

    def params_of(self, root: int) -> list[str]:
        """``fqn axis k`` of the anchor's parameter axes in a class."""
        return [f"{fqn} axis {axis}" for fqn, axes in self.anchor.param_axes.items()
                for axis, sid in enumerate(axes) if self.root(sid) == root]

    def describe(self, root: int) -> str:
        params = self.params_of(root)
        return f"space {root} (width {self.width(root)[0]}; {', '.join(params[:3]) or 'no parameters'})"

    def layer_nodes(self, root: int) -> list[str]:
        """Graph nodes of the layers whose output is the class."""
        return [r.node for r in self.anchor.records if r.kind == "layer" and r.output is not None
                and self.root(r.output) == root]

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

    # ---- tables ---------------------------------------------------------------------------------------
    def _producers(self) -> tuple[dict[int, list[Producer]], dict[int, list[Producer]]]:
        """(the producers that solve each class, the written-only producers of classes the graph gives anyway).

        A parameter written into a class as it is (a zero-initialised bias, one sink per head) may carry little
        or nothing that tells its neurons apart, and a class with a producer is solved from its rows alone; so
        where every producer of a class is written and a residual add or concat, a produced product the class
        is a factor of, or its own factors give its plan, the graph's plan is kept."""
        table: dict[int, list[Producer]] = defaultdict(list)
        layered: set[int] = set()  # classes with a layer's rows among their producers

        def give(sid: int, fqn: str, axis: int, off_a: int, off_b: int, written: bool) -> None:
            root = self.root(sid)
            if self.part.is_fixed(root):
                return  # a fixed space needs no cost (position tables also write the sequence axis)
            structure = self.part.structure.get(root)
            if structure and structure[0] == "sum":
                for child in structure[1]:
                    give(child, fqn, axis, off_a, off_b, written)
                    n_a, n_b = self.width(child)
                    off_a, off_b = off_a + n_a, off_b + n_b
                return
            if not written:
                layered.add(root)
            if Producer(fqn, axis, off_a, off_b) not in table[root]:
                table[root].append(Producer(fqn, axis, off_a, off_b))

        for p in self.anchor.producer_list:
            give(p.space, p.param, p.axis, 0, 0, p.written)
        carried = {f for root in layered for f in self.flat_factors(root) if f != root}

        def given(root: int) -> bool:
            if root in self.combines or root in carried:
                return True
            structure = self.part.structure.get(root)
            return bool(structure and structure[0] == "prod" and all(
                f in layered or self.part.is_fixed(f) or given(f) for f in self.flat_factors(root)))

        described = {root: ps for root, ps in table.items() if root not in layered and given(root)}
        return {root: ps for root, ps in table.items() if root not in described}, described

    def _combines(self) -> dict[int, Record]:
        table: dict[int, Record] = {}
        for r in self.anchor.records:
            if r.kind in ("residual", "concat") and r.output is not None:
                out = self.root(r.output)
                if any(self.root(s) != out for s in r.inputs):
                    table[out] = r
        return table

    def _carriers(self) -> dict[int, list[int]]:
        """For each factor class, the product classes it is a factor of whose plan is computed: produced ones
        first, then residual adds and concats (a stream read in groups by a grouped convolution)."""
        table: dict[int, list[int]] = defaultdict(list)
        for root in [*self.producers, *(r for r in self.combines if r not in self.producers)]:
            factors = self.flat_factors(root)
            if len(factors) > 1:
                for f in factors:
                    table[f].append(root)
        return dict(table)

    def _act_nodes(self) -> dict[int, list[tuple[str, tuple[int, ...]]]]:
        """Graph nodes (name, axes) whose output carries each class: one axis, or one per factor in order
        (queries as [batch, heads, seq, head_dim] carry heads x head_dim)."""
        table: dict[int, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
        roots_of = {name: [self.root(s) for s in axes] for name, axes in self.anchor.node_axes.items()}
        for name, roots in roots_of.items():
            for axis, root in enumerate(roots):
                table[root].append((name, (axis,)))
        for root in list(self.producers):
            factors = self.flat_factors(root)
            if len(factors) < 2:
                continue
            for name, roots in roots_of.items():
                if all(f in roots for f in factors):
                    table[root].append((name, tuple(roots.index(f) for f in factors)))
        return dict(table)
