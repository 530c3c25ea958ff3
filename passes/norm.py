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


@register(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
def batch_norm(ctx: InferContext, node: fx.Node) -> None:
    """Eval-mode batch norm: a per-channel affine map (axis 1) from running statistics, so weight, bias and
    the running mean and variance live in the channel space and the map passes through. No ``norm`` node:
    it does not normalise across channels."""
    x = node.args[0]
    x_axes = ctx.axes_of(x)
    params = [arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 3, "running_mean"), arg(node, 4, "running_var")]
    for param in params:
        p_axes = ctx.axes_of(param) if isinstance(param, fx.Node) else None
        if p_axes:
            ctx.link(p_axes[0], x_axes[1])
    out = list(x_axes)
    if node.target == aten.batch_norm.default:
        ctx.set_axes(node, out)
    else:  # (output, saved mean, saved inverse std)
        ctx.set_axes(node, [out, *ctx.fresh_like(list(node.meta["val"][1:]), "batch statistics")])
