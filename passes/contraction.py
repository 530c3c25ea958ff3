"""Layers: ops that contract an input axis with a weight and create a new output space (the layer's TM).

linear, addmm (GPT-2 Conv1D, weight [in, out]), mm/matmul/bmm with a weight, conv1d/conv2d patch embeddings
and embedding lookups. A matmul of two activations (attention scores, attention x values) contracts two
spaces that the flow graph links rather than merges.
"""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg, is_dynamic
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


def layer_output(ctx: InferContext, node: fx.Node, x_axis: int, weight: fx.Node, in_axis: int, out_axis: int) -> int:
    """A layer's core: the input axis is contracted with ``weight[in_axis]`` (a consumed axis) and the node's
    last axis is a new space made by the rows of ``weight[out_axis]`` (its producer); returns that space."""
    ctx.link(x_axis, ctx.axes_of(weight)[in_axis])
    ctx.consume(weight, in_axis)
    out = ctx.spaces.new(ctx.shape(node)[-1])
    ctx.link(ctx.axes_of(weight)[out_axis], out)
    ctx.produce(out, weight, out_axis, node)
    return out


def _layer(ctx: InferContext, node: fx.Node, x: fx.Node, weight: fx.Node, in_axis: int, out_axis: int,
           bias: fx.Node | None) -> None:
    """Output = x[..., in] contracted with weight[in_axis]; the new last axis is weight[out_axis]."""
    x_axes, w_axes = ctx.axes_of(x), ctx.axes_of(weight)
    if x_axes is None or w_axes is None:
        ctx.fix_node(node, f"unsupported arguments to {node.target}", unknown=True)
        return
    out = layer_output(ctx, node, x_axes[-1], weight, in_axis, out_axis)
    if isinstance(bias, fx.Node) and ctx.axes_of(bias):
        ctx.link(ctx.axes_of(bias)[-1], out)
    ctx.set_axes(node, x_axes[:-1] + [out])


@register(aten.linear.default)
def linear(ctx: InferContext, node: fx.Node) -> None:
    _layer(ctx, node, node.args[0], node.args[1], 1, 0, arg(node, 2, "bias"))


@register(aten.addmm.default)
def addmm(ctx: InferContext, node: fx.Node) -> None:
    bias, x, weight = node.args[:3]
    if is_dynamic(ctx, weight):
        ctx.fix_node(node, "addmm with an input-dependent right operand", unknown=True)
        return
    _layer(ctx, node, x, weight, 0, 1, bias)


@register(aten.mm.default, aten.matmul.default, aten.bmm.default)
def matmul(ctx: InferContext, node: fx.Node) -> None:
    _product(ctx, node, *node.args[:2])


@register(aten.baddbmm.default, aten.addbmm.default)
def baddbmm(ctx: InferContext, node: fx.Node) -> None:
    """beta * input + alpha * (batch1 @ batch2): the product, plus an added tensor broadcast into it (ALiBi)."""
    bias, a, b = node.args[:3]
    _product(ctx, node, a, b)
    out, bias_axes, bias_shape = ctx.axes_of(node), ctx.axes_of(bias), ctx.shape(bias)
    if out is None or bias_axes is None:
        return
    for d in range(1, min(len(bias_axes), len(out)) + 1):
        if bias_shape[-d] == ctx.shape(node)[-d]:
            ctx.link(bias_axes[-d], out[-d])


def _product(ctx: InferContext, node: fx.Node, a: fx.Node, b: fx.Node) -> None:
    a_axes, b_axes = ctx.axes_of(a), ctx.axes_of(b)
    if a_axes is None or b_axes is None or len(a_axes) < 2 or len(b_axes) < 2:
        ctx.fix_node(node, f"{node.target} on vectors", unknown=True)
        return
    if not is_dynamic(ctx, b) and len(b_axes) == 2 and is_dynamic(ctx, a):
        _layer(ctx, node, a, b, 0, 1, None)
        return
    if not is_dynamic(ctx, b) and len(b_axes) > 2 and is_dynamic(ctx, a) and ctx.param_view.get(b) is not None:
        _batched_layer(ctx, node, a, b)
        return
    if not (is_dynamic(ctx, a) and is_dynamic(ctx, b)):
        # products of parameters or buffers only (e.g. rotary frequencies): plain exact contraction
        ctx.link(a_axes[-1], b_axes[-2])
        kind = "exact"
    else:
        ctx.link(a_axes[-1], b_axes[-2], "contract")
        kind = "heads"
    batch = _batch_axes(ctx, node, a, b, kind)
    ctx.record("matmul", node, [a_axes[-1], b_axes[-2]], b_axes[-1], a=a.name, b=b.name,
               a_heads=a_axes[-3] if len(a_axes) > 2 else None, b_heads=b_axes[-3] if len(b_axes) > 2 else None)
    ctx.set_axes(node, batch + [a_axes[-2], b_axes[-1]])


def _batch_axes(ctx: InferContext, node: fx.Node, a: fx.Node, b: fx.Node, kind: str) -> list[int]:
    """The batch axes of a (batched) matmul's output: the operands' axes that broadcast into each, linked
    (``kind``); a new space where neither has it."""
    out_shape, batch = ctx.shape(node), []
    for d in range(len(out_shape) - 2):
        offset = len(out_shape) - d
        cands = [ax[len(ax) - offset] for ax, sh in ((ctx.axes_of(a), ctx.shape(a)), (ctx.axes_of(b), ctx.shape(b)))
                 if len(ax) >= offset and sh[len(sh) - offset] == out_shape[d]]
        for c in cands[:-1]:
            ctx.link(c, cands[-1], kind)
        batch.append(cands[-1] if cands else ctx.spaces.new(out_shape[d]))
    return batch


def _batched_layer(ctx: InferContext, node: fx.Node, a: fx.Node, weight: fx.Node) -> None:
    """An activation times a stacked weight (experts run as one bmm, Llama 4): a layer per batch entry, the
    same permutation of its output units for all of them; batch axes are one space with the activation's."""
    a_axes, nd = ctx.axes_of(a), len(ctx.axes_of(weight))
    out = layer_output(ctx, node, a_axes[-1], weight, nd - 2, nd - 1)
    ctx.set_axes(node, _batch_axes(ctx, node, a, weight, "exact") + [a_axes[-2], out])


@register(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
          aten.conv3d.padding)
def conv(ctx: InferContext, node: fx.Node) -> None:
    x, weight = node.args[:2]
    bias = arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    x_axes, w_axes = ctx.axes_of(x), ctx.axes_of(weight)
    shape = ctx.shape(node)
    if x_axes is None or w_axes is None or len(x_axes) != len(shape):
        ctx.fix_node(node, "unbatched convolution", unknown=True)
        return
    if groups > 1 and groups == shape[1] == ctx.shape(x)[1]:
        _depthwise(ctx, node, x_axes, w_axes, bias)
        return
    if groups > 1:
        _grouped(ctx, node, x_axes, w_axes, bias, groups)
        return
    ctx.link(x_axes[1], w_axes[1])
    ctx.consume(weight, 1)
    for kernel_axis in w_axes[2:]:
        ctx.spaces.fix(kernel_axis, "convolution kernel position")
    out = ctx.spaces.new(shape[1])
    ctx.link(w_axes[0], out)
    ctx.produce(out, weight, 0, node)
    if isinstance(bias, fx.Node):
        ctx.link(ctx.axes_of(bias)[0], out)
    spatial = ctx.fresh(shape[2:], "convolution output position")
    ctx.set_axes(node, [x_axes[0], out, *spatial])


def _grouped(ctx: InferContext, node: fx.Node, x_axes, w_axes, bias, groups: int) -> None:
    """1 < groups: input channels are (group, channel in group), output channels (group, unit in group), and
    group i's units read group i's channels alone. So the groups are one space in and out (moved together), the
    channels in a group are contracted with the weight's input axis, and its units are a new space made by the
    weight's rows, one permutation for every group (a depthwise convolution with a channel multiplier m: each
    channel becomes m units, channel x copy, as in PiT's pooling)."""
    shape, spaces = ctx.shape(node), ctx.spaces
    in_width, out_width = ctx.shape(node.args[0])[1] // groups, shape[1] // groups
    group = spaces.new(groups)
    if in_width == 1:
        ctx.link(x_axes[1], group)
    else:
        inner = spaces.new(in_width)
        spaces.set_structure(x_axes[1], "prod", [group, inner])
        ctx.link(inner, w_axes[1])
        ctx.consume(node.args[1], 1)
    for kernel_axis in w_axes[2:]:
        ctx.spaces.fix(kernel_axis, "convolution kernel position")
    out = spaces.product([group, spaces.new(out_width)]) if out_width > 1 else group
    ctx.link(w_axes[0], out)
    if out_width > 1:
        ctx.produce(out, node.args[1], 0, node)
    if isinstance(bias, fx.Node) and ctx.axes_of(bias):
        ctx.link(ctx.axes_of(bias)[0], out)
    ctx.set_axes(node, [x_axes[0], out, *ctx.fresh(shape[2:], "convolution output position")])


def _depthwise(ctx: InferContext, node: fx.Node, x_axes, w_axes, bias) -> None:
    """groups == channels: channel c is filtered by w[c] alone, so channels keep their space (like a norm's
    weight, the filter is not a producer); kernel and output positions are fixed."""
    shape = ctx.shape(node)
    ctx.link(x_axes[1], w_axes[0])
    for kernel_axis in w_axes[2:]:
        ctx.spaces.fix(kernel_axis, "convolution kernel position")
    if isinstance(bias, fx.Node) and ctx.axes_of(bias):
        ctx.link(ctx.axes_of(bias)[0], x_axes[1])
    ctx.set_axes(node, [x_axes[0], x_axes[1], *ctx.fresh(shape[2:], "convolution output position")])


@register(aten.embedding.default)
def embedding(ctx: InferContext, node: fx.Node) -> None:
    weight, ids = node.args[:2]
    w_axes, id_axes = ctx.axes_of(weight), ctx.axes_of(ids)
    ctx.spaces.fix(w_axes[0], "embedding rows are indexed by token id")
    out = ctx.spaces.new(ctx.shape(node)[-1])
    ctx.link(w_axes[1], out)
    ctx.produce(out, weight, 1, node)
    ctx.tables.add(node)
    ctx.set_axes(node, list(id_axes) + [out])
