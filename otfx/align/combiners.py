"""Map combiners: the plan of a residual add's (or concat's) output from the plans of its inputs, by the
residual policy (the paper's mean, magnitude-weighted scalar or per-neuron, or ``shared``: one map per stream,
where the graph has no combine node left; ``orthogonal``: as shared, with a rotation of the stream where the
function allows it). One function per policy, registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps

Combiner = Callable[["TransportMaps", list[int], list[torch.Tensor]], torch.Tensor]
COMBINERS: dict[str, Combiner] = {}


def register_combiner(name: str, needs_magnitudes: bool = False) -> Callable[[Combiner], Combiner]:
    def deco(fn: Combiner) -> Combiner:
        if name in COMBINERS:
            raise ValueError(f"a residual combiner named {name!r} is already registered")
        fn.needs_magnitudes = needs_magnitudes
        COMBINERS[name] = fn
        return fn

    return deco


@register_combiner("mean")
def mean(maps: TransportMaps, inputs: list[int], plans: list[torch.Tensor]) -> torch.Tensor:
    return sum(plans) / len(plans)


COMBINERS["shared"] = mean  # residual links merged: only concats remain to combine
COMBINERS["orthogonal"] = mean  # as shared, the stream's one map orthogonal (``orthogonal.py``)


def _magnitudes(maps: TransportMaps, inputs: list[int]) -> torch.Tensor | None:
    """Mean absolute activation per neuron of each input (inputs x width), None where one was not collected."""
    rows = []
    for s in inputs:
        node = maps.activation_node(maps.root(s))
        if node is None or node not in maps.acts.anchor:
            return None
        rows.append(maps.acts.magnitude(node))
    return torch.stack(rows)


@register_combiner("weighted_scalar", needs_magnitudes=True)
def weighted_scalar(maps: TransportMaps, inputs: list[int], plans: list[torch.Tensor]) -> torch.Tensor:
    mags = _magnitudes(maps, inputs)
    if mags is None:
        return mean(maps, inputs, plans)
    w = mags.mean(1) / mags.mean(1).sum()
    return sum(wi * p for wi, p in zip(w, plans))


@register_combiner("weighted_matrix", needs_magnitudes=True)
def weighted_matrix(maps: TransportMaps, inputs: list[int], plans: list[torch.Tensor]) -> torch.Tensor:
    mags = _magnitudes(maps, inputs)
    if mags is None:
        return mean(maps, inputs, plans)
    w = mags / mags.sum(0, keepdim=True).clamp_min(1e-12)
    return sum(p * wi[None, :] for wi, p in zip(w, plans))
