"""Slicing, tuple items, and the index and mask bookkeeping ops that never carry features.

A slice that cuts an axis makes it a sum of the kept and dropped parts (rotary halves, position tables).
Index ops (index, gather, index_put) fix the axes they read by position and pass the others through; top-k,
sort and argmax fix an axis only where its positions become ids; scans (cumsum, tril) fix the axes they run
along; creation ops (arange, zeros) make fixed positions.
"""

from __future__ import annotations

import operator

import torch
from otfx.passes import register
from otfx.passes._common import arg, dim_index, is_dynamic
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
    aten.diff.default, aten.any.default, aten.any.dim, aten.all.default, aten.all.dim,
    aten.masked_select.default, aten.nonzero.default, aten.unique_consecutive.default, aten.unique_dim.default,
    aten._unique2.default,
]


@register(*FIXING)
def fixing(ctx: InferContext, node: fx.Node) -> None:
    ctx.fix_node(node, f"index or mask op {node.target}", unknown=False)


def _indexed_dims(ctx: InferContext, indices: list) -> list[tuple[int, fx.Node]] | None:
    """(first axis, index tensor) per index of ``x[indices]``: an integer index takes one axis, a boolean
    mask as many as it has; None when an index is not a traced tensor."""
    out, d = [], 0
    for idx in indices:
        if idx is None:
            d += 1
            continue
        val = idx.meta.get("val") if isinstance(idx, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        out.append((d, idx))
        d += val.ndim if val.dtype == torch.bool else 1
    return out


def _index_axes(ctx: InferContext, node: fx.Node, x: fx.Node, indices: list):
    """For ``x[indices]``: x's axes read by position (fixed), the axes the index tensors give the result, and
    where they go; None when the indexing is not one this pass follows."""
    axes, dims = ctx.axes_of(x), _indexed_dims(ctx, indices)
    if axes is None or dims is None or not dims:
        return None
    taken = []
    for d, idx in dims:
        val = idx.meta["val"]
        taken.extend(range(d, d + (val.ndim if val.dtype == torch.bool else 1)))
    if taken and max(taken) >= len(axes):
        return None
    index_shape = list(torch.broadcast_shapes(*[tuple(i.meta["val"].shape) for _, i in dims])) \
        if all(i.meta["val"].dtype != torch.bool for _, i in dims) else None
    adjacent = taken == list(range(taken[0], taken[-1] + 1))
    first = taken[0] if adjacent else 0
    if index_shape is None:  # a boolean mask: the result's rows are data-dependent positions
        index_axes = ctx.fresh([ctx.shape(node)[first]], "positions chosen by a mask")
    elif len(dims) == 1 and list(ctx.shape(dims[0][1])) == index_shape:
        index_axes = list(ctx.axes_of(dims[0][1]) or ctx.fresh(index_shape))
    else:
        index_axes = ctx.fresh(index_shape, "positions picked by several indices")
    return [axes[t] for t in taken], index_axes, first, [a for k, a in enumerate(axes) if k not in taken]


IDS = "its positions are read as ids"
ID_MAKERS = {aten.topk.default, aten.sort.default, aten.sort.stable, aten.max.dim, aten.min.dim, aten.argmax.default,
             aten.argmin.default}


def _from_ids(index, steps: int = 8) -> bool:
    """Whether an index tensor is computed from the indices output of top-k, sort, max or argmax (following
    the first argument of each op on the way: item access, views, casts, ``// top_k``): the positions it names
    are ids of that op's axis."""
    while isinstance(index, fx.Node) and steps > 0:
        if index.target in ID_MAKERS:
            return True
        if not index.args or not isinstance(index.args[0], fx.Node):
            return False
        index, steps = index.args[0], steps - 1
    return False


def _freeze_read(ctx: InferContext, node: fx.Node, x: fx.Node, read: list[int], index: list) -> None:
    """Fix the axes an index op reads by position. Rows of a parameter looked up by index, entries picked by
    the model's own constant indices (two class logits) and an axis already made ids (a router's experts,
    gathered at its top-k) are ids (``ordered``), as an embedding's rows; an activation indexed by computed
    positions is a layout a pass could follow, reported by ``coverage``."""
    constant = not any(is_dynamic(ctx, i) for i in index if isinstance(i, fx.Node))
    coarse = ctx.spaces.coarse
    ids = any(_from_ids(i) for i in index) or all(
        any(r.startswith(IDS) for r in coarse.fixed.get(coarse.find(s), [])) for s in read)
    ctx.freeze(node, read, "read by position (an index op)", ordered=not is_dynamic(ctx, x) or constant or ids)


@register(aten.index.Tensor)
def index(ctx: InferContext, node: fx.Node) -> None:
    """``x[idx]`` (advanced indexing): the indexed axes are read by position, so they are fixed; the other
    axes pass through (tokens gathered into expert groups keep their features, a relative-position table
    looked up by index keeps its heads), and the result's indexed part has the index tensor's axes."""
    x, indices = node.args[:2]
    found = _index_axes(ctx, node, x, list(indices))
    if found is None:
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    read, index_axes, first, rest = found
    out = rest[:first] + index_axes + rest[first:]
    if len(out) != len(ctx.shape(node)) or [ctx.spaces.size(a) for a in out] != list(ctx.shape(node)):
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    _freeze_read(ctx, node, x, read, list(indices))
    ctx.set_axes(node, out)


@register(aten.index_select.default)
def index_select(ctx: InferContext, node: fx.Node) -> None:
    """``x.index_select(dim, idx)``: as ``x[..., idx]`` along ``dim``."""
    x, dim, idx = node.args[:3]
    axes = ctx.axes_of(x)
    if axes is None:
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    dim = dim_index(dim, len(axes))
    _freeze_read(ctx, node, x, [axes[dim]], [idx])
    ctx.set_axes(node, axes[:dim] + list(ctx.axes_of(idx) or ctx.fresh(ctx.shape(idx))) + axes[dim + 1:])


@register(aten.index_put_.default, aten.index_put.default)
def index_put(ctx: InferContext, node: fx.Node) -> None:
    """``x[idx] = values``: the indexed axes of x are positions (fixed); its other axes are one space with the
    values' trailing axes, which broadcast against them."""
    x, indices, values = node.args[:3]
    found = _index_axes(ctx, node, x, list(indices))
    if found is None:
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    read, _, _, rest = found
    x_axes = ctx.axes_of(x)
    ctx.freeze(node, read, "written by position (an index op)")
    v_axes, v_shape = ctx.axes_of(values), ctx.shape(values)
    if isinstance(values, fx.Node) and v_axes is not None:
        for d in range(1, min(len(rest), len(v_axes)) + 1):
            if v_shape[-d] == ctx.spaces.size(rest[-d]):
                ctx.link(v_axes[-d], rest[-d])
    ctx.set_axes(node, list(x_axes))
    if node.target == aten.index_put_.default:
        ctx.set_axes(x, list(x_axes))


def _along_dim(ctx: InferContext, node: fx.Node):
    """(x, dim, idx, x's axes, idx's axes) of gather/scatter, whose index has x's rank; None (the node fixed)
    otherwise."""
    x, dim, idx = node.args[:3]
    axes, idx_axes = ctx.axes_of(x), ctx.axes_of(idx)
    if axes is None or idx_axes is None or len(axes) != len(idx_axes):
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return None
    return x, dim_index(dim, len(axes)), idx, axes, idx_axes


@register(aten.gather.default)
def gather(ctx: InferContext, node: fx.Node) -> None:
    """``x.gather(dim, idx)``: x's ``dim`` is read by position (fixed); an axis where idx is as long as x
    passes through (tokens gathered with their features), a shorter one is positions."""
    found = _along_dim(ctx, node)
    if found is None:
        return
    x, dim, idx, axes, idx_axes = found
    x_shape, idx_shape = ctx.shape(x), ctx.shape(idx)
    out, read = [], [axes[dim]]
    for d in range(len(axes)):
        if d == dim:
            out.append(idx_axes[d])
        elif idx_shape[d] == x_shape[d]:
            out.append(axes[d])
        else:
            read.append(axes[d])
            out.append(ctx.spaces.new(idx_shape[d], "positions picked by gather"))
    _freeze_read(ctx, node, x, read, [idx])
    ctx.set_axes(node, out)


def _used(node: fx.Node, item: int) -> bool:
    return any(u.target is operator.getitem and u.args[1] == item for u in node.users)


@register(aten.topk.default, aten.sort.default, aten.sort.stable)
def ranked(ctx: InferContext, node: fx.Node) -> None:
    """top-k and sort along ``dim``: the values come out by rank, the same under any permutation of that axis,
    so it is only fixed when the indices are used, as ids of its positions (a router's experts); the other
    axes pass through."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    if axes is None:
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    dim = dim_index(arg(node, 2 if node.target == aten.topk.default else 1, "dim", -1), len(axes))
    if _used(node, 1):
        ctx.freeze(node, [axes[dim]], f"{IDS} ({node.target} indices)", ordered=True)
    rank = ctx.spaces.new(int(node.meta["val"][0].shape[dim]), "rank")
    out = axes[:dim] + [rank] + axes[dim + 1:]
    ctx.set_axes(node, [list(out), list(out)])


@register(aten.max.dim, aten.min.dim)
def extreme(ctx: InferContext, node: fx.Node) -> None:
    """max/min along ``dim`` with indices: the values do not depend on the order of that axis; the indices
    are ids of its positions, so it is fixed when they are used."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    if axes is None:
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    dim, keepdim = dim_index(arg(node, 1, "dim"), len(axes)), arg(node, 2, "keepdim", False)
    if _used(node, 1):
        ctx.freeze(node, [axes[dim]], f"{IDS} ({node.target} indices)", ordered=True)
    out = axes[:dim] + (ctx.fresh([1]) if keepdim else []) + axes[dim + 1:]
    ctx.set_axes(node, [list(out), list(out)])


@register(aten.index_add.default, aten.index_add_.default, aten.index_copy.default, aten.index_copy_.default)
def index_add(ctx: InferContext, node: fx.Node) -> None:
    """``x.index_add(dim, idx, src)``: x's ``dim`` is written by position (fixed); src's other axes are x's."""
    x, dim, idx, src = node.args[:4]
    axes, src_axes = ctx.axes_of(x), ctx.axes_of(src)
    if axes is None or src_axes is None or len(axes) != len(src_axes):
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    dim = dim_index(dim, len(axes))
    _freeze_read(ctx, node, x, [axes[dim]], [idx])
    for d in range(len(axes)):
        if d != dim and ctx.shape(src)[d] == ctx.shape(x)[d]:
            ctx.link(src_axes[d], axes[d])
    ctx.set_axes(node, list(axes))
    if str(node.target).endswith("_.default"):
        ctx.set_axes(x, list(axes))


@register(aten.scatter.value, aten.scatter.src, aten.scatter_.value, aten.scatter_.src, aten.scatter_add.default,
          aten.scatter_reduce.two)
def scatter(ctx: InferContext, node: fx.Node) -> None:
    """``x.scatter(dim, idx, src)``: x's ``dim`` is written by position (fixed, as gather reads it); on the
    other axes src and x are one space where idx spans them."""
    found = _along_dim(ctx, node)
    if found is None:
        return
    x, dim, idx, axes, _ = found
    src = node.args[3] if len(node.args) > 3 else None
    x_shape, idx_shape = ctx.shape(x), ctx.shape(idx)
    read = [axes[dim]] + [axes[d] for d in range(len(axes)) if d != dim and idx_shape[d] != x_shape[d]]
    _freeze_read(ctx, node, x, read, [idx])
    src_axes = ctx.axes_of(src) if isinstance(src, fx.Node) else None
    if src_axes is not None and len(src_axes) == len(axes):
        for d in range(len(axes)):
            if d != dim and idx_shape[d] == x_shape[d] == ctx.shape(src)[d]:
                ctx.link(src_axes[d], axes[d])
    ctx.set_axes(node, list(axes))
    if str(node.target).startswith("aten.scatter_."):
        ctx.set_axes(x, list(axes))


@register(aten.argmax.default, aten.argmin.default)
def arg_extreme(ctx: InferContext, node: fx.Node) -> None:
    """argmax/argmin: positions along ``dim`` (all axes without one) become ids, so those axes are fixed."""
    x = node.args[0]
    axes = ctx.axes_of(x)
    dim, keepdim = arg(node, 1, "dim"), arg(node, 2, "keepdim", False)
    if axes is None:
        ctx.fix_node(node, f"index op {node.target}", unknown=False)
        return
    if dim is None:
        ctx.freeze(node, list(axes), f"{IDS} ({node.target})", ordered=True)
        ctx.set_axes(node, ctx.fresh_like(node.meta.get("val")))
        return
    dim = dim_index(dim, len(axes))
    ctx.freeze(node, [axes[dim]], f"{IDS} ({node.target})", ordered=True)
    kept = ctx.fresh([1]) if keepdim else []
    ctx.set_axes(node, axes[:dim] + kept + axes[dim + 1:])


@register(aten.histc.default, aten.bincount.default)
def counts(ctx: InferContext, node: fx.Node) -> None:
    """A histogram counts values over all positions: the same under any permutation of its input, so nothing
    is fixed; its bins are new fixed positions."""
    ctx.set_axes(node, ctx.fresh_like(node.meta.get("val"), f"bins of {node.target}"))


CREATION = [
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
    aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.new_ones.default,
    aten.new_zeros.default, aten.new_full.default, aten.new_empty.default, aten.eye.default, aten.eye.m,
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
    ctx.freeze(node, [axes[d] for d in ordered], f"order matters along this axis in {node.target}", ordered=True)
    ctx.set_axes(node, list(axes))


@register(aten.pad.default, aten.constant_pad_nd.default)
def pad(ctx: InferContext, node: fx.Node) -> None:
    """Padding (last axis first, as F.pad): a padded axis is the sum of new fixed pads and the original."""
    x, widths = node.args[:2]
    axes = ctx.axes_of(x)
    mode = arg(node, 2, "mode", "constant")
    if axes is None or mode not in ("constant", None):
        ctx.fix_node(node, f"padding in {mode} mode", unknown=False)
        return
    out = list(axes)
    for i in range(len(widths) // 2):
        d = len(axes) - 1 - i
        lo, hi = widths[2 * i], widths[2 * i + 1]
        if lo < 0 or hi < 0:  # a shift (pad one end, crop the other): positions along d move, the rest pass
            ctx.freeze(node, [axes[d]], "shifted by padding", ordered=True)
            out[d] = ctx.spaces.new(ctx.shape(node)[d], "shifted by padding")
        elif lo or hi:
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
    ctx.freeze(node, [axes[dim_index(d, len(axes))] for d in dims], f"order matters along this axis in {node.target}",
               ordered=True)
    ctx.set_axes(node, list(axes))
