"""Shape ops: reshape-like ops split an axis into a product of spaces (heads x head_dim) or merge axes into
one; transposes reorder axes; expand adds broadcast axes that nothing constrains."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index
from torch import fx

from otfx.infer.context import InferContext
from otfx.infer.spaces import align_groups

aten = torch.ops.aten


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.view_as.default, aten.reshape_as.default)
def reshape(ctx: InferContext, node: fx.Node) -> None:
    x = node.args[0]
    in_axes, in_shape, out_shape = ctx.axes_of(x), ctx.shape(x), ctx.shape(node)
    ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    groups = align_groups([s for _, s in ins], [s for _, s in outs], "prod")
    if groups is None:
        ctx.fix_node(node, f"reshape {in_shape} -> {out_shape} mixes axes", unknown=False)
        return
    spaces = ctx.spaces
    out_axes: list[int | None] = [None] * len(out_shape)
    for left, right in groups:
        src = [in_axes[ins[i][0]] for i in left]
        dst = [outs[j][0] for j in right]
        if len(src) == 1 and len(dst) == 1:
            out_axes[dst[0]] = src[0]
        elif len(src) == 1:
            parts = [spaces.new(out_shape[j]) for j in dst]
            spaces.set_structure(src[0], "prod", parts)
            for j, part in zip(dst, parts):
                out_axes[j] = part
        elif len(dst) == 1:
            out_axes[dst[0]] = spaces.product(src)
        else:
            ctx.fix_node(node, f"reshape {in_shape} -> {out_shape} regroups axes", unknown=False)
            return
    for j, s in enumerate(out_shape):
        if out_axes[j] is None:
            out_axes[j] = spaces.new(s)
    ctx.set_axes(node, out_axes)


def _reorder(ctx: InferContext, node: fx.Node, order: list[int]) -> None:
    x = node.args[0]
    axes = ctx.axes_of(x)
    ctx.set_axes(node, [axes[i] for i in order])
    if x in ctx.param_view:
        name, mapping = ctx.param_view[x]
        ctx.param_view[node] = (name, [mapping[i] for i in order])


@register(aten.transpose.int, aten.swapaxes.default)
def transpose(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node.args[0]))
    a, b = dim_index(node.args[1], ndim), dim_index(node.args[2], ndim)
    order = list(range(ndim))
    order[a], order[b] = order[b], order[a]
    _reorder(ctx, node, order)


@register(aten.t.default, aten.numpy_T.default)
def t(ctx: InferContext, node: fx.Node) -> None:
    _reorder(ctx, node, list(range(len(ctx.shape(node.args[0]))))[::-1])


@register(aten.permute.default)
def permute(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node.args[0]))
    _reorder(ctx, node, [dim_index(d, ndim) for d in node.args[1]])


@register(aten.movedim.int)
def movedim(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node.args[0]))
    order = list(range(ndim))
    src, dst = dim_index(node.args[1], ndim), dim_index(node.args[2], ndim)
    order.insert(dst, order.pop(src))
    _reorder(ctx, node, order)


def _insert_axes(ctx: InferContext, node: fx.Node, mapping: list[int | None]) -> None:
    """Output axis j is input axis mapping[j], or a new unconstrained axis where None."""
    x = node.args[0]
    axes, shape = ctx.axes_of(x), ctx.shape(node)
    ctx.set_axes(node, [axes[m] if m is not None else ctx.spaces.new(shape[j]) for j, m in enumerate(mapping)])
    if x in ctx.param_view:
        name, pmap = ctx.param_view[x]
        ctx.param_view[node] = (name, [pmap[m] if m is not None else None for m in mapping])


@register(aten.unsqueeze.default)
def unsqueeze(ctx: InferContext, node: fx.Node) -> None:
    ndim = len(ctx.shape(node))
    d = dim_index(node.args[1], ndim)
    mapping: list[int | None] = list(range(ndim - 1))
    mapping.insert(d, None)
    _insert_axes(ctx, node, mapping)


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(ctx: InferContext, node: fx.Node) -> None:
    in_shape = ctx.shape(node.args[0])
    dims = arg(node, 1, "dim", None)
    if dims is None:
        dims = [i for i, s in enumerate(in_shape) if s == 1]
    dims = {dim_index(d, len(in_shape)) for d in ([dims] if isinstance(dims, int) else dims)}
    _insert_axes(ctx, node, [i for i in range(len(in_shape)) if not (i in dims and in_shape[i] == 1)])


@register(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
def expand(ctx: InferContext, node: fx.Node) -> None:
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    lead = len(out_shape) - len(in_shape)
    mapping: list[int | None] = [None] * lead
    for i, s in enumerate(in_shape):
        mapping.append(i if s == out_shape[lead + i] else None)
    _insert_axes(ctx, node, mapping)
