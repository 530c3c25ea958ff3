"""Element-wise ops: activations, comparisons, dropout, casts and copies pass spaces through; binary ops
broadcast (a comparison of activations is a mask that moves with them).

``add``/``sub`` of two input-dependent tensors whose spaces differ is a residual node; ``mul`` (norm weights,
SwiGLU gates) makes its operands one space.
"""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import broadcast
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten

UNARY = [
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.neg.default, aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default,
    aten.abs.default, aten.square.default, aten.erf.default, aten.sin.default, aten.cos.default,
    aten.reciprocal.default, aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default,
    aten.softplus.default, aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.relu_.default, aten.gelu_.default, aten.silu_.default,
    aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.alpha_dropout.default, aten.feature_dropout.default,
    aten.to.other, aten.type_as.default, aten.nan_to_num.default,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.masked_fill.Scalar, aten.fill.Scalar,
    aten.expm1.default, aten.log1p.default, aten.sign.default, aten.floor.default, aten.ceil.default,
    aten.round.default, aten.trunc.default, aten.isnan.default, aten.isinf.default, aten.erfc.default,
    aten.sinh.default, aten.cosh.default, aten.atan.default, aten.acos.default, aten.asin.default,
    aten.tan.default, aten.asinh.default, aten.acosh.default, aten.atanh.default, aten.log2.default,
    aten.logical_not.default,
    aten.bitwise_not.default, aten.ge.Scalar, aten.gt.Scalar, aten.le.Scalar, aten.lt.Scalar, aten.eq.Scalar,
    aten.ne.Scalar, aten.remainder.Scalar, aten.floor_divide.Scalar, aten.fmod.Scalar, aten.rsub.Scalar,
]

#: copies and casts: a parameter read through them is still that parameter
VIEW_LIKE = [aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
             aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
             aten.lift_fresh_copy.default, aten.dropout.default]


def _same_as_input(ctx: InferContext, node: fx.Node) -> None:
    ctx.set_axes(node, list(ctx.axes_of(node.args[0])))


@register(*UNARY)
def unary(ctx: InferContext, node: fx.Node) -> None:
    """Same spaces as the input (softmax over an axis is equivariant to permuting it)."""
    _same_as_input(ctx, node)


@register(*VIEW_LIKE, view=True)
def copy(ctx: InferContext, node: fx.Node) -> None:
    """Same spaces as the input; eval-mode dropout is the identity."""
    _same_as_input(ctx, node)


def _tensors(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and InferContext.shape(a) is not None]


@register(aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor, aten.subtract.Tensor)
def add(ctx: InferContext, node: fx.Node) -> None:
    ctx.set_axes(node, broadcast(ctx, node, _tensors(node), "residual"))


@register(aten.mul.Tensor, aten.div.Tensor, aten.where.self, aten.maximum.default, aten.minimum.default,
          aten.pow.Tensor_Tensor, aten.masked_fill.Tensor, aten.where.ScalarOther, aten.where.ScalarSelf,
          aten.add.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.sub.Scalar, aten.div.Tensor_mode,
          aten.lerp.Scalar, aten.addcmul.default, aten.where.Scalar, aten.pow.Scalar, aten.ge.Tensor,
          aten.gt.Tensor, aten.le.Tensor, aten.lt.Tensor,
          aten.eq.Tensor, aten.ne.Tensor, aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor,
          aten.bitwise_or.Tensor, aten.logical_and.default, aten.logical_or.default, aten.logical_xor.default,
          aten.min.other, aten.max.other, aten.clamp.Tensor,
          aten.multiply.Tensor, aten.floor_divide.default, aten.remainder.Tensor, aten.fmod.Tensor)
def multiply(ctx: InferContext, node: fx.Node) -> None:
    ctx.set_axes(node, broadcast(ctx, node, _tensors(node), None))


@register(aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default)
def no_output(ctx: InferContext, node: fx.Node) -> None:
    ctx.set_axes(node, None)
