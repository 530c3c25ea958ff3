"""Normalisation layers: the map passes through; weight and bias live in the normalised space."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


@register(aten.layer_norm.default, aten.rms_norm.default)
def layer_norm(ctx: InferContext, node: fx.Node) -> None:
    x = node.args[0]
    shape = node.args[1]
    x_axes = ctx.axes_of(x)
    k = len(shape)
    for param in (arg(node, 2, "weight"), arg(node, 3, "bias") if node.target == aten.layer_norm.default else None):
        p_axes = ctx.axes_of(param)
        if p_axes:
            for a, b in zip(p_axes[-k:], x_axes[-k:]):
                ctx.link(a, b)
    ctx.record("norm", node, [x_axes[-1]], x_axes[-1])
    ctx.set_axes(node, list(x_axes))
