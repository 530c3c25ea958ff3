"""Stage 4: rewrite a model's parameters into the anchor's spaces with the transport maps.

Plans are prepared once per class, side and dtype (an index for a permutation, dense weights otherwise); a
producer's rows with every axis but one aligned are cached for the cost and finished by the rewrite.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from otfx.align.plans import Mover, permutation_index
from otfx.conventions import unique_parameter_names

if TYPE_CHECKING:
    from otfx.align.maps import TransportMaps


class Rewriter:
    """Moves the other model's tensors into the anchor's spaces with ``maps``' plans."""

    def __init__(self, maps: TransportMaps):
        self.maps = maps
        self._movers: dict[int, dict[tuple[str, torch.dtype], Mover]] = defaultdict(dict)
        self._indices: dict[int, torch.Tensor | None] = {}  # permutation_index of each used plan
        #: (fqn, axis) -> the other model's parameter with every axis but ``axis`` aligned (a producer's rows
        #: for the cost), kept until the rewrite finishes the tensor with the remaining axis
        self.partials: dict[tuple[str, int], torch.Tensor] = {}

    def release(self, root: int) -> None:
        """Forget what was prepared from a class's plan."""
        self._indices.pop(root, None)
        self._movers.pop(root, None)

    def move(self, tensor: torch.Tensor, axis: int, sid: int, side: str) -> torch.Tensor:
        """``apply_map(tensor, axis, plan, side)`` with the plan prepared once per side and dtype; a trivial
        class leaves the tensor as it is without building its (identity) plan."""
        maps = self.maps
        root = maps.root(sid)
        if root not in maps.maps and maps.structure.trivial(root):
            return tensor
        key = (side, tensor.dtype)
        mover = self._movers[root].get(key)
        if mover is None:
            plan = maps.plan(root)
            with maps.timed("prepare"):
                linear = root in maps.orthogonal  # the plan is the map itself, no marginals
                if root not in self._indices:
                    self._indices[root] = None if linear else permutation_index(plan)
                mover = self._movers[root][key] = Mover(plan, side, tensor.dtype, self._indices[root], linear)
        return mover(tensor, axis)

    def partial(self, fqn: str, axis: int) -> torch.Tensor:
        """The other model's ``fqn`` in the compute dtype with every axis but ``axis`` aligned (cached)."""
        key = (fqn, axis)
        value = self.partials.get(key)
        if value is None:
            maps = self.maps
            with maps.timed("rows"):
                value = maps.params_other[fqn]
                value = value.to(maps.dtype_for(value))
                for j, sid in enumerate(maps.anchor.param_axes[fqn]):
                    if j != axis:
                        value = self.move(value, j, sid, maps.side(fqn, j))
            self.partials[key] = value
        return value

    def aligned(self, fqn: str) -> torch.Tensor:
        """The other model's ``fqn`` with every axis moved to the anchor's spaces, in the compute dtype; reuses
        (and drops) a producer's cached partial. May alias the other model's tensor when nothing moves."""
        maps = self.maps
        with maps.timed("rewrite"):
            if fqn in maps.invariant:  # a folded gain: constant along the axis every map moves
                value = maps.params_other[fqn]
                return value.to(maps.dtype_for(value))
            axes = maps.anchor.param_axes[fqn]
            cached = [key for key in self.partials if key[0] == fqn]
            if cached:
                value = self.partials.pop(cached[0])
                for key in cached[1:]:
                    del self.partials[key]
                todo = [cached[0][1]]
            else:
                value = maps.params_other[fqn]
                value = value.to(maps.dtype_for(value))
                todo = list(range(len(axes)))
            for axis in todo:
                value = self.move(value, axis, axes[axis], maps.side(fqn, axis))
            return value


def unique_params(inference) -> list[str]:
    """Parameter names in graph order, one per tensor (tied parameters by their first name)."""
    params = inference.traced.parameters()
    return unique_parameter_names([(fqn, params[fqn]) for fqn in inference.param_axes])


def rewrite_params(maps: TransportMaps, sink: Callable[[str, torch.Tensor], None]) -> None:
    """Call ``sink(fqn, tensor)`` once per parameter (tied ones once) with the other model's tensor moved to the
    anchor's spaces, in the maps' compute dtype, as soon as its maps are known (see ``TransportMaps.run``).
    A tensor may alias the other model's parameter (when no axis moves): do not modify it in place."""
    maps.run(unique_params(maps.anchor), sink)


def aligned_params(maps: TransportMaps) -> dict[str, torch.Tensor]:
    """The other model's parameters expressed in the anchor's spaces (float64, anchor shapes, graph order)."""
    out: dict[str, torch.Tensor] = {}
    rewrite_params(maps, lambda fqn, value: out.__setitem__(fqn, value.to(torch.float64, copy=True)))
    return {fqn: out[fqn] for fqn in unique_params(maps.anchor)}
