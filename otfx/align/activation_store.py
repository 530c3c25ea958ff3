"""The activations one alignment reads, per model and graph node, standardised in place once when a cost
needs them (the collected matrix then holds the standardised values) and with magnitudes read before that."""

from __future__ import annotations

from collections.abc import Callable

import torch

Node = tuple[str, tuple[int, ...]]


class ActivationStore:
    """``anchor``/``other``: (node, axes) -> [rows, width] matrices from ``otfx.align.activations.collect``."""

    def __init__(self, anchor: dict[Node, torch.Tensor] | None = None,
                 other: dict[Node, torch.Tensor] | None = None) -> None:
        self.anchor, self.other = anchor or {}, other or {}
        self._norms: dict[tuple[str, Node], torch.Tensor] = {}  # squared norms once standardised
        self._magnitudes: dict[Node, torch.Tensor] = {}

    def magnitude(self, node: Node) -> torch.Tensor:
        """Mean absolute activation of each neuron of the anchor's ``node`` (read before standardising)."""
        if node not in self._magnitudes:
            self._magnitudes[node] = self.anchor[node].abs().mean(0)
        return self._magnitudes[node]

    def standardised(self, which: str, node: Node, dtype_for: Callable[[torch.Tensor], torch.dtype]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A model's activations of ``node`` standardised per neuron, and each neuron's squared norm. Done once,
        in place in the collected matrix (magnitudes of the anchor are read first)."""
        acts = self.anchor if which == "anchor" else self.other
        key = (which, node)
        if key not in self._norms:
            if which == "anchor":
                self.magnitude(node)
            x = acts[node]
            dtype = dtype_for(x)
            if x.dtype != dtype or not x.is_contiguous():
                x = acts[node] = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
            x.sub_(x.mean(0))
            squares = torch.zeros(x.shape[1], dtype=x.dtype)
            for chunk in x.split(256):  # a row block at a time stays in cache
                squares += chunk.square().sum(0)
            scale = 1 / ((squares / (x.shape[0] - 1)).sqrt() + 1e-9)
            x.mul_(scale)
            self._norms[key] = squares * scale.square()
        return acts[node], self._norms[key]
