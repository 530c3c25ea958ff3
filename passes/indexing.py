"""Slicing, tuple items, and the index and mask bookkeeping ops that never carry features.

A slice that cuts an axis makes it a sum of the kept and dropped parts (rotary halves, position tables).
Index ops (gather, index, topk, ...) are understood but freeze every space they touch; scans (cumsum,
tril) freeze the axes they run along; creation ops (arange, zeros) make fixed positions.
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
    if end <= start:  # an empty slice reads nothing
        ctx.set_axes(node, axes[:dim] + [ctx.spaces.new(0, "empty slice")] + axes[dim + 1:])
        return
    if step != 1:
        _strided(ctx, node, axes, dim, n, start, end, step)
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


def _strided(ctx: InferContext, node: fx.Node, axes: list[int], dim: int, n: int, start: int, end: int,
             step: int) -> None:
    """x[..., start::step] over the whole axis is one entry of each block of ``step``: the axis is the
    product (blocks x step) and the slice keeps the blocks (interleaved rotary halves)."""
    if n % step or start >= step or end < n - (step - 1 - start):
        ctx.fix_node(node, "strided slice", unknown=False)
        return
    blocks, within = ctx.spaces.new(n // step), ctx.spaces.new(step, "strided slice: position within a block")
    ctx.spaces.set_structure(axes[dim], "prod", [blocks, within])
    ctx.set_axes(node, axes[:dim] + [blocks] + axes[dim + 1:])


FIXING = [
    aten.diff.default, aten.index.Tensor, aten.gather.default, aten.index_select.default,
    aten.any.default, aten.any.dim, aten.all.default, aten.all.dim, aten.argmax.default, aten.argmin.default,
    aten.masked_select.default, aten.sort.default, aten.topk.default, aten.nonzero.default,
]


@register(*FIXING)
def fixing(ctx: InferContext, node: fx.Node) -> None:
    ctx.fix_node(node, f"index or mask op {node.target}", unknown=False)


CREATION = [
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
    aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.new_ones.default,
    aten.new_zeros.default, aten.new_full.default, aten.new_empty.default,
]


@register(*CREATION)
def creation(ctx: InferContext, node: fx.Node) -> None:
    """A tensor made from a shape (``x.new_zeros`` reads only x's dtype): fixed positions, touching nothing."""
    ctx.set_axes(node, ctx.fresh_like(node.meta.get("val"), f"made by {node.target}"))


@register(aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default)
def constant_like(ctx: InferContext, node: fx.Node) -> None:
    """A constant of x's shape: the same under every permutation, so its axes are new and unconstrained."""
    ctx.set_axes(node, ctx.fresh_like(node.meta.get("val")))


@register(aten.cumsum.default, aten.cumprod.default, aten.tril.default, aten.triu.default)
def scan(ctx: InferContext, node: fx.Node) -> None:
    """Order-dependent along some axes (cumsum's ``dim``; tril/triu's last two): those are fixed, the others
    keep their spaces (a cumulative sum over a padding mask leaves the batch alone)."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    if node.target in (aten.tril.default, aten.triu.default):
        ordered = {len(axes) - 2, len(axes) - 1}
    else:
        ordered = {dim_index(arg(node, 1, "dim"), len(axes))}
    ctx.freeze(node, [axes[d] for d in ordered], f"order matters along this axis in {node.target}")
    ctx.set_axes(node, list(axes))


@register(aten.pad.default, aten.constant_pad_nd.default)
def pad(ctx: InferContext, node: fx.Node) -> None:
    """Padding (last axis first, as F.pad): a padded axis is the sum of new fixed pads and the original."""
    x, widths = node.args[:2]
    axes = ctx.axes_of(x)
    mode = arg(node, 2, "mode", "constant")
    if axes is None or mode not in ("constant", None) or any(w < 0 for w in widths):
        ctx.fix_node(node, f"padding in {mode} mode", unknown=False)
        return
    out = list(axes)
    for i in range(len(widths) // 2):
        d = len(axes) - 1 - i
        lo, hi = widths[2 * i], widths[2 * i + 1]
        if lo or hi:
            parts = [ctx.spaces.new(n, "padding") for n in (lo,) if n] + [axes[d]] + [
                ctx.spaces.new(n, "padding") for n in (hi,) if n]
            out[d] = ctx.spaces.direct_sum(parts)
    ctx.set_axes(node, out)


@register(aten.roll.default, aten.flip.default)
def roll(ctx: InferContext, node: fx.Node) -> None:
    """Rolling or flipping along some axes (shifted windows): those axes are positions, the others pass."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    dims = arg(node, 2 if node.target == aten.roll.default else 1, "dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims) or list(range(len(axes)))
    ctx.freeze(node, [axes[dim_index(d, len(axes))] for d in dims], f"order matters along this axis in {node.target}")
    ctx.set_axes(node, list(axes))
