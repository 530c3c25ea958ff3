"""Activations-based cost: a neuron is its activations over the calibration data (samples x kept tokens) at
the graph node that carries its class, standardised per neuron; the cost is the Euclidean distance between
standardised activations (a monotone function of their correlation).

Which node stands for a class (``class_node``): the *last* node in graph order that carries the class on its
last axis, i.e. the class's complete value where its readers see it: an embedding after its class token and
position table are added (the patch projection alone is a rank-(patch pixels) map of the image and leaves
the stream's channels nearly collinear), a value projection's class at the attention context the output
projection reads, an MLP's units after their nonlinearity. A norm's output counts only where nothing else
carries the class. ``read = "layer"`` restores the producing layer's own output (the earlier rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otfx.align.config import FusionError
from otfx.align.costs import register_cost

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps

Node = tuple[str, tuple[int, ...]]


class NodeChooser:
    """The graph-order index, norm outputs and layouts of the anchor's graph, read once per alignment."""

    def __init__(self, maps: TransportMaps) -> None:
        inference = maps.anchor
        self.order = {n.name: i for i, n in enumerate(inference.traced.graph.nodes)}
        self.norms = {r.node for r in inference.records if r.kind == "norm"}
        self.ndim = {name: len(axes) for name, axes in inference.node_axes.items()}

    def complete(self, maps: TransportMaps, root: int) -> Node | None:
        """The last node (graph order) carrying ``root`` on its last axis, preferring [batch, seq, width]
        tensors and non-norm outputs; None where no node carries it so."""
        last_axis = [(n, a) for n, a in maps.structure.act_nodes.get(root, [])
                     if len(a) == 1 and a[0] == self.ndim.get(n, 0) - 1 and a[0] >= 1 and n in self.order]
        for keep in (lambda n: self.ndim[n] == 3 and n not in self.norms, lambda n: self.ndim[n] == 3,
                     lambda n: n not in self.norms, lambda n: True):
            picked = [(n, a) for n, a in last_axis if keep(n)]
            if picked:
                return max(picked, key=lambda na: self.order[na[0]])
        return None


def class_node(maps: TransportMaps, root: int, read: str, chooser: NodeChooser) -> Node | None:
    """The node whose activations stand for ``root``: ``read="complete"`` (the module docstring's rule, falling
    back to the layer's output) or ``"layer"`` (the producing layer's output)."""
    node = chooser.complete(maps, root) if read == "complete" else None
    return node or maps.activation_node(root, maps.structure.layer_nodes(root))


@register_cost("activations")
class ActivationsCost:
    needs_data = True
    reads_rows = False
    #: "complete": the class's last carrier in graph order (the default); "layer": the producing layer's output
    read = "complete"

    def __init__(self) -> None:
        self._chooser: tuple[int, NodeChooser] | None = None

    def chooser(self, maps: TransportMaps) -> NodeChooser:
        if self._chooser is None or self._chooser[0] != id(maps.anchor):
            self._chooser = (id(maps.anchor), NodeChooser(maps))
        return self._chooser[1]

    def wanted(self, maps: TransportMaps, roots: list[int]) -> list[Node]:
        nodes = (class_node(maps, r, self.read, self.chooser(maps)) for r in roots)
        return [n for n in nodes if n is not None]

    def node(self, maps: TransportMaps, root: int) -> Node:
        node = class_node(maps, root, self.read, self.chooser(maps))
        if node is None or node not in maps.acts.anchor:
            raise FusionError(f"no activations were collected for {maps.describe(root)}")
        return node

    def features(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Standardised activations as rows (neurons x samples, strided views)."""
        node = self.node(maps, root)
        with maps.timed("rows"):
            a, _ = maps.acts.standardised("anchor", node, maps.dtype_for)
            b, _ = maps.acts.standardised("other", node, maps.dtype_for)
        return a.T, b.T, [node[0]]

    def cost(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, list[str]]:
        """The distances between standardised activations, from one Gram matrix and the squared norms."""
        node = self.node(maps, root)
        with maps.timed("rows"):
            a, norms_a = maps.acts.standardised("anchor", node, maps.dtype_for)
            b, norms_b = maps.acts.standardised("other", node, maps.dtype_for)
        with maps.timed("cost"):
            gram = b.T @ a
            return gram.mul_(-2).add_(norms_b[:, None]).add_(norms_a[None]).clamp_min_(0).sqrt_(), [node[0]]
