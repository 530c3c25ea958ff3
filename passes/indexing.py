"""Slicing, tuple items, and the index and mask bookkeeping ops that never carry features.

A slice that cuts an axis makes it a sum of the kept and dropped parts (rotary halves, position tables).
Mask ops (arange, comparisons, cumsum, gather, ...) are understood but freeze every space they touch.
"""

from __future__ import annotations

import operator

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index
from torch import fx

from otfx.infer.context import InferContext

aten = torch.ops.aten


@register(operator.getitem)
def getitem(ctx: InferContext, node: fx.Node) -> None:
    source, index = node.args
    items = ctx.axes.get(source)
    ctx.set_axes(node, items[index] if isinstance(items, list) and isinstance(items[index], list) else None)


@register(aten.slice.Tensor, view=True)
def slice_(ctx: InferContext, node: fx.Node) -> None:
    x = node.args[0]
    axes, in_shape = ctx.axes_of(x), ctx.shape(x)
    dim = dim_index(arg(node, 1, "dim", 0), len(axes))
    n = in_shape[dim]
    start = arg(node, 2, "start", 0) or 0
    end = arg(node, 3, "end", None)
    step = arg(node, 4, "step", 1) or 1
    start = max(0, start + n if start < 0 else start)
    end = n if end is None else min(n, end + n if end < 0 else end)
    if start == 0 and end >= n and step == 1:
        ctx.set_axes(node, list(axes))
        return
    if step != 1:
        ctx.fix_node(node, "strided slice", unknown=False)
        return
    spaces = ctx.spaces
    parts, kept = [], None
    for lo, hi in ((0, start), (start, end), (end, n)):
        if hi > lo:
            sid = spaces.new(hi - lo)
            parts.append(sid)
            if (lo, hi) == (start, end):
                kept = sid
    spaces.set_structure(axes[dim], "sum", parts)
    spaces.together.append(parts)
    spaces.kept.append(kept)
    ctx.set_axes(node, axes[:dim] + [kept] + axes[dim + 1:])


FIXING = [
    aten.arange.default, aten.arange.start, aten.arange.start_step,
    aten.ge.Scalar, aten.ge.Tensor, aten.gt.Scalar, aten.gt.Tensor, aten.le.Scalar, aten.le.Tensor,
    aten.lt.Scalar, aten.lt.Tensor, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    aten.bitwise_not.default, aten.logical_not.default, aten.logical_and.default, aten.logical_or.default,
    aten.cumsum.default, aten.diff.default, aten.index.Tensor, aten.gather.default, aten.index_select.default,
    aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default,
    aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
    aten.scalar_tensor.default, aten.any.default, aten.any.dim, aten.all.default, aten.all.dim,
    aten.argmax.default, aten.argmin.default, aten.tril.default, aten.triu.default,
    aten.masked_select.default, aten.sort.default, aten.topk.default, aten.nonzero.default,
]


@register(*FIXING)
def fixing(ctx: InferContext, node: fx.Node) -> None:
    ctx.fix_node(node, f"index or mask op {node.target}", unknown=False)
