"""In-place element-wise ops (``x += y``, ``x.add_(y)``, ``x.mul_(w)``): the same spaces as their functional
forms; the mutated tensor takes the result's spaces, since later ops may read it through its old node."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import broadcast
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


def _tensors(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and InferContext.shape(a) is not None]


def _write_back(ctx: InferContext, node: fx.Node, axes: list[int]) -> None:
    ctx.set_axes(node, axes)
    target = node.args[0]
    if isinstance(target, fx.Node) and ctx.shape(target) == ctx.shape(node):
        ctx.set_axes(target, list(axes))


@register(aten.add_.Tensor, aten.sub_.Tensor)
def add_(ctx: InferContext, node: fx.Node) -> None:
    """A residual add when two activations with different spaces meet, as ``add``."""
    _write_back(ctx, node, broadcast(ctx, node, _tensors(node), "residual"))


@register(aten.mul_.Tensor, aten.div_.Tensor, aten.add_.Scalar, aten.sub_.Scalar, aten.mul_.Scalar,
          aten.div_.Scalar, aten.masked_fill_.Scalar, aten.clamp_.default, aten.tanh_.default,
          aten.sigmoid_.default, aten.neg_.default, aten.exp_.default, aten.sqrt_.default, aten.rsqrt_.default,
          aten.pow_.Scalar, aten.hardtanh_.default, aten.leaky_relu_.default, aten.mish_.default,
          aten.detach_.default, aten.copy_.default, aten.fill_.Tensor, aten.fill_.Scalar, aten.zero_.default)
def multiply_(ctx: InferContext, node: fx.Node) -> None:
    """Operands are one space, as ``mul``."""
    _write_back(ctx, node, broadcast(ctx, node, _tensors(node), None))
