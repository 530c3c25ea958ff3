"""Stage 4: rewrite a model's parameters into the anchor's spaces with the transport maps."""

from __future__ import annotations

import torch

from otfx.align.maps import TransportMaps, apply_map


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


def aligned_params(maps: TransportMaps) -> dict[str, torch.Tensor]:
    """The other model's parameters expressed in the anchor's spaces (float64, anchor shapes)."""
    anchor = maps.anchor
    out: dict[str, torch.Tensor] = {}
    for fqn in unique_params(anchor):
        value = maps.params_other[fqn].double()
        for axis, sid in enumerate(anchor.param_axes[fqn]):
            side = "in" if (fqn, axis) in anchor.consumed else "out"
            value = apply_map(value, axis, maps.map(sid), side)
        out[fqn] = value
    return out
