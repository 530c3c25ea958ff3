"""Activations-based cost: a neuron is its activations over the calibration data (samples x kept tokens) at
the graph node that carries its class, standardised per neuron; the cost is the Euclidean distance between
standardised activations (a monotone function of their correlation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from otfx.align.config import FusionError
from otfx.align.costs import register_cost

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps


@register_cost("activations")
class ActivationsCost:
    needs_data = True
    reads_rows = False

    def wanted(self, maps: TransportMaps, roots: list[int]) -> list[tuple[str, tuple[int, ...]]]:
        nodes = (maps.activation_node(r, maps.structure.layer_nodes(r)) for r in roots)
        return [n for n in nodes if n is not None]

    def node(self, maps: TransportMaps, root: int) -> tuple[str, tuple[int, ...]]:
        node = maps.activation_node(root, maps.structure.layer_nodes(root))
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
