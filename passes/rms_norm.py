"""Pattern: RMSNorm written out, ``x * rsqrt(mean(x * x) + eps)`` (also ``x / sqrt(...)`` and ``pow(x, 2)``),
with casts anywhere. Records a norm node at the normalising op; the weight (``* w`` or ``* (1 + w)``) is an
element-wise product that the mul pass already puts in the normalised space."""

from __future__ import annotations

import torch
from otfx.passes import register_pattern
from otfx.passes._match import is_op, skip_up, tensor_args
from torch import fx

from otfx.infer.context import InferContext
from otfx.infer.kinds import RecordKind

aten = torch.ops.aten


def _centred(node) -> object:
    """``x`` if ``node`` is x - mean(x) (a layer norm written out), else ``node``."""
    node = skip_up(node)
    if is_op(node, aten.sub) and len(tensor_args(node)) == 2:
        x, mean = (skip_up(a) for a in tensor_args(node))
        if is_op(mean, aten.mean) and skip_up(mean.args[0]) is x:
            return x
    return node


def _mean_square_of(node) -> object:
    """``x`` if ``node`` is mean(x * x), mean(x ** 2) or var(x) (plus eps, through casts); else None."""
    node = skip_up(node)
    if is_op(node, aten.add) and any(not isinstance(a, fx.Node) for a in node.args):
        node = skip_up(tensor_args(node)[0])
    if is_op(node, aten.var):
        return skip_up(node.args[0])
    if not is_op(node, aten.mean):
        return None
    square = skip_up(node.args[0])
    if is_op(square, aten.pow) and square.args[1] == 2:
        return skip_up(square.args[0])
    if is_op(square, aten.mul, aten.square):
        args = tensor_args(square)
        if len(args) == 1 or skip_up(args[0]) is skip_up(args[1]):
            return skip_up(args[0])
    return None


def _normalised(node: fx.Node) -> fx.Node | None:
    """The tensor a mul/div normalises by its root mean square, if it does."""
    args = tensor_args(node)
    if len(args) != 2:
        return None
    x, scale = args
    scale = skip_up(scale)
    if is_op(node, aten.mul) and is_op(scale, aten.rsqrt):
        root = scale.args[0]
    elif is_op(node, aten.div) and is_op(scale, aten.sqrt):
        root = scale.args[0]
    else:
        return None
    source = _mean_square_of(root)
    if source is None:
        return None
    return x if skip_up(x) is source or _centred(x) is source else None


@register_pattern("rms_norm", aten.mul.Tensor, aten.div.Tensor)
def rms_norm(ctx: InferContext, node: fx.Node) -> bool:
    x = _normalised(node)
    axes = ctx.axes_of(x) if x is not None else None
    if not axes:
        return False
    ctx.record(RecordKind.norm, node, [axes[-1]], axes[-1], form="rms")
    return True
