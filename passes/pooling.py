"""Pooling over positions (avg/max pooling, adaptive pooling) and repetition (``repeat_interleave``,
``repeat``) between blocks: channels keep their spaces; pooled positions are new fixed spaces; a repeated
axis becomes a product of the original and a new copy axis."""

from __future__ import annotations

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


@register(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default, aten.max_pool1d.default,
          aten.max_pool2d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
          aten._adaptive_avg_pool2d.default, aten.max_pool2d_with_indices.default,
          aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default)
def pool(ctx: InferContext, node: fx.Node) -> None:
    """[N, C, *spatial] or [C, *spatial] with 1-3 spatial axes (the op's number): channels pass through."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    name = str(node.target)
    spatial = 3 if "3d" in name else 2 if "2d" in name else 1
    if axes is None or len(axes) < spatial + 1:
        ctx.fix_node(node, "pooling of unexpected rank", unknown=True)
        return
    val = node.meta["val"]
    first = val[0] if isinstance(val, (tuple, list)) else val
    out = list(axes[:-spatial]) + ctx.fresh([int(s) for s in first.shape[-spatial:]], "pooled positions")
    if isinstance(val, (tuple, list)):  # (values, indices): the indices are positions
        ctx.set_axes(node, [out] + [ctx.fresh([int(s) for s in v.shape], "pooling indices") for v in val[1:]])
    else:
        ctx.set_axes(node, out)


@register(aten.repeat_interleave.self_int)
def repeat_interleave(ctx: InferContext, node: fx.Node) -> None:
    """Each entry repeated r times along ``dim``: index i * r + j is entry i, copy j (kv heads repeated
    for grouped-query attention: the query heads are kv heads x group)."""
    x, repeats = node.args[:2]
    dim = arg(node, 2, "dim")
    axes = ctx.axes_of(x)
    if dim is None or not isinstance(repeats, int) or axes is None:
        ctx.fix_node(node, "repeat_interleave over a flattened tensor or by a tensor of counts", unknown=False)
        return
    dim = dim_index(dim, len(axes))
    out = list(axes)
    if repeats != 1:
        out[dim] = ctx.spaces.product([axes[dim], ctx.spaces.new(repeats)])
    ctx.set_axes(node, out)


@register(aten.repeat.default)
def repeat(ctx: InferContext, node: fx.Node) -> None:
    """Tiling: axis d of size n repeated r times is (copy, entry) = r x n; a size-1 axis becomes r copies; new
    leading axes are new spaces (a learned probe repeated over the batch)."""
    x, sizes = node.args[:2]
    axes = ctx.axes_of(x)
    shape = ctx.shape(x)
    lead = len(sizes) - len(axes)
    out = [ctx.spaces.new(r) for r in sizes[:lead]]
    for sid, n, r in zip(axes, shape, sizes[lead:]):
        if r == 1:
            out.append(sid)
        elif n == 1:
            out.append(ctx.spaces.new(r))
        else:
            out.append(ctx.spaces.product([ctx.spaces.new(r), sid]))
    ctx.set_axes(node, out)


@register(aten.im2col.default)
def im2col(ctx: InferContext, node: fx.Node) -> None:
    """``unfold`` (sliding windows, ConvBERT's span convolution): [N, C, H, W] -> [N, C x window, blocks]; the
    channels are the outer factor of the new axis, the window position its fixed inner factor."""
    x = node.args[0]
    axes, val = ctx.axes_of(x), node.meta.get("val")
    if axes is None or len(axes) not in (3, 4) or not isinstance(val, torch.Tensor):
        ctx.fix_node(node, "im2col of unexpected rank", unknown=True)
        return
    batched = len(axes) == 4
    channels = axes[1] if batched else axes[0]
    window = int(val.shape[-2]) // ctx.spaces.size(channels)
    unfolded = ctx.spaces.product([channels, ctx.spaces.new(window, "position within an unfold window")])
    blocks = ctx.spaces.new(int(val.shape[-1]), "unfold block position")
    ctx.set_axes(node, ([axes[0]] if batched else []) + [unfolded, blocks])
