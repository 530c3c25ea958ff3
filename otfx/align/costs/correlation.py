"""Correlation cost (Git Re-Basin's activation matching, Verma & Elbayad 2024): the cost between neuron j of the
other model and neuron i of the anchor is 1 - the Pearson correlation of their activations over the
calibration data (samples x kept tokens), averaged over every graph node that stands for the class.

What is read for a class:
* a class written by several layers (the residual stream under ``residual="shared"``): the stream itself at the
  input of every norm that reads it (``stream="norms"``: after the embedding and after each residual add), so
  one map is solved from correlations accumulated over the whole stream; ``stream="writers"`` reads the
  writers' outputs instead (the residual *updates*, a weaker signal: 06_quality's diagnosis);
* otherwise the class's complete value, as the ``activations`` cost reads it (``class_node``): an embedding
  after its position table, a value projection at the attention context, MLP units after their nonlinearity.
  ``read="layer"`` reads the producing layer's output (after an element-wise nonlinearity that follows it when
  ``post_nonlinearity``): the earlier rule, kept for the diagnosis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otfx.align.config import FusionError
from otfx.align.costs import register_cost
from otfx.align.costs.activations import NodeChooser, class_node

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps

Node = tuple[str, tuple[int, ...]]
NONLINEAR = {"gelu", "relu", "silu", "tanh", "sigmoid", "elu", "leaky_relu", "hardswish", "mish", "celu", "selu",
             "softplus", "hardtanh", "relu6", "gelu_", "relu_", "silu_"}


def _op(node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


@register_cost("correlation")
class CorrelationCost:
    reads_rows = False
    needs_data = True
    #: a class with several writers: read the stream at the inputs of the norms ("norms") or at its writers'
    #: outputs ("writers")
    stream = "norms"
    #: a class with one writer: its complete value ("complete") or the producing layer's output ("layer")
    read = "complete"
    #: with ``read="layer"``: a layer's units after the element-wise nonlinearity that follows it
    post_nonlinearity = True

    def __init__(self) -> None:
        self._chooser: tuple[int, NodeChooser] | None = None

    def nodes(self, maps: TransportMaps, root: int) -> list[Node]:
        """The graph nodes (name, axes) whose activations stand for a class (see the module docstring)."""
        inference = maps.anchor
        graph = {n.name: n for n in inference.traced.graph.nodes}
        layers = maps.structure.layer_nodes(root)
        if len(layers) <= 1 and self.read == "complete":
            if self._chooser is None or self._chooser[0] != id(inference):
                self._chooser = (id(inference), NodeChooser(maps))
            node = class_node(maps, root, "complete", self._chooser[1])
            return [node] if node is not None else []
        last_axis = {name: (len(axes) - 1,) for name, axes in inference.node_axes.items()
                     if axes and maps.root(axes[-1]) == root}
        out: list[Node] = []
        if self.stream == "norms" and len(layers) > 1:
            for r in inference.records:
                if r.kind == "norm" and r.node in graph:
                    src = graph[r.node].args[0]
                    if getattr(src, "name", None) in last_axis:
                        out.append((src.name, last_axis[src.name]))
        if not out:
            for name in layers:
                pick = name
                users = list(graph[name].users) if name in graph else []
                if self.post_nonlinearity and len(users) == 1 and _op(users[0]) in NONLINEAR:
                    pick = users[0].name
                if pick in last_axis:
                    out.append((pick, last_axis[pick]))
        if not out:
            node = maps.activation_node(root, layers)
            if node is not None:
                out.append(node)
        return list(dict.fromkeys(out))

    def wanted(self, maps: TransportMaps, roots: list[int]) -> list[Node]:
        return [n for r in roots for n in self.nodes(maps, r)]

    def _standardised(self, maps: TransportMaps, root: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        nodes = self.nodes(maps, root)
        missing = [n for n in nodes if n not in maps.acts.anchor or n not in maps.acts.other]
        if not nodes or missing:
            raise FusionError(f"no activations were collected for {maps.describe(root)}")
        with maps.timed("rows"):
            a = [maps.acts.standardised("anchor", n, maps.dtype_for)[0] for n in nodes]
            b = [maps.acts.standardised("other", n, maps.dtype_for)[0] for n in nodes]
        return a, b, [n[0] for n in nodes]

    def features(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Standardised activations of every node as rows (neurons x samples of all nodes), each node's block
        scaled by 1 / sqrt(rows x nodes) so that a squared distance is 2 (1 - mean correlation)."""
        a, b, used = self._standardised(maps, root)
        k = len(a)
        with maps.timed("rows"):
            rows_a = torch.cat([x.T / ((x.shape[0] - 1) * k) ** 0.5 for x in a], 1)
            rows_b = torch.cat([x.T / ((x.shape[0] - 1) * k) ** 0.5 for x in b], 1)
        return rows_a, rows_b, used

    def cost(self, maps: TransportMaps, root: int) -> tuple[torch.Tensor, list[str]]:
        """1 - the correlation averaged over the nodes: (n_other x n_anchor), in [0, 2]."""
        a, b, used = self._standardised(maps, root)
        with maps.timed("cost"):
            corr = None
            for xa, xb in zip(a, b):
                c = (xb.T @ xa).div_(xa.shape[0] - 1)
                corr = c if corr is None else corr.add_(c)
            return corr.div_(-len(a)).add_(1), used
