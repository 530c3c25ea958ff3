"""Stage 4: rewrite a model's parameters into the anchor's spaces with the transport maps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from otfx.align.maps import TransportMaps


def unique_params(inference) -> list[str]:
    """Parameter names in graph order, one per tensor (tied parameters by their first name)."""
    seen, names = set(), []
    params = inference.traced.parameters()
    for fqn in inference.param_axes:
        ptr = params[fqn].data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            names.append(fqn)
    return names


def rewrite_params(maps: TransportMaps, sink: Callable[[str, torch.Tensor], None]) -> None:
    """Call ``sink(fqn, tensor)`` once per parameter (tied ones once) with the other model's tensor moved to the
    anchor's spaces, in the maps' compute dtype, as soon as its maps are known (see ``TransportMaps.rewrite``).
    A tensor may alias the other model's parameter (when no axis moves): do not modify it in place."""
    maps.rewrite(unique_params(maps.anchor), sink)


def aligned_params(maps: TransportMaps) -> dict[str, torch.Tensor]:
    """The other model's parameters expressed in the anchor's spaces (float64, anchor shapes, graph order)."""
    out: dict[str, torch.Tensor] = {}
    rewrite_params(maps, lambda fqn, value: out.__setitem__(fqn, value.to(torch.float64, copy=True)))
    return {fqn: out[fqn] for fqn in unique_params(maps.anchor)}
